from __future__ import annotations

import dataclasses
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from bot.config import BotConfig, load_bot_config
from engine.contract.config import Config, ConfigError, config_from_dict, load_config
from engine.model import fast_path_on

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def test_example_documents_every_key_with_its_default() -> None:
    raw = tomllib.loads(EXAMPLE.read_text())
    defaults = BotConfig()
    for section in dataclasses.fields(BotConfig):
        if section.name == "source":
            continue
        expected = {f.name for f in dataclasses.fields(getattr(defaults, section.name))}
        assert set(raw[section.name]) == expected, section.name
    assert set(raw) == {f.name for f in dataclasses.fields(BotConfig)} - {"source"}
    example = load_bot_config(EXAMPLE)
    assert dataclasses.replace(example, source=None) == defaults
    # An engine reads the same file as its own sections, passing over the bot's.
    assert dataclasses.replace(load_config(EXAMPLE), source=None) == Config()


def test_an_engine_passes_over_the_bots_sections_and_refuses_an_unknown_one() -> None:
    bot_only = {"intake": {"min_photos": 5, "max_photos": 2}, "safety": {"default_negative_prompt": "(x"}}
    config = config_from_dict({**bot_only, "model": {"base": "tiny"}})
    assert type(config) is Config and config.model.base == "tiny" and not hasattr(config, "intake")
    with pytest.raises(ConfigError, match=r"\[intake\] max_photos: expected at least"):
        config_from_dict(bot_only, kind=BotConfig)
    with pytest.raises(ConfigError, match=r"\[dicsord\]: unknown section"):
        config_from_dict({"dicsord": {}})


def test_no_file_means_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config() == Config() and load_bot_config() == BotConfig()


def test_a_named_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_values_are_read_and_ints_stand_for_floats(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[model]\nbase = "tiny"\ndevice = ["cpu", "cpu"]\n[training]\nresolution = 64\nlearning_rate = 1\n'
        '[discord]\nguild_ids = [123]\nprompts_channel = "prompts"\n'
    )
    config = load_bot_config(path)
    assert config.model.base == "tiny"
    assert config.model.devices == ["cpu", "cpu"]
    assert config.training.learning_rate == 1.0 and isinstance(config.training.learning_rate, float)
    assert config.discord.guild_ids == [123]
    assert config.source == path.resolve()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"modle": {}}, r"\[modle\]: unknown section"),
        ({"model": {"bsae": "x"}}, r"\[model\] bsae: unknown key"),
        ({"training": {"resolution": "512"}}, r"\[training\] resolution: expected an integer, got '512'"),
        ({"training": {"resolution": True}}, r"\[training\] resolution: expected an integer, got True"),
        ({"discord": {"guild_ids": ["1"]}}, r"\[discord\] guild_ids: expected a list of an integer"),
        ({"training": {"resolution": 500}}, r"\[training\] resolution: expected a multiple of 8, got 500"),
        ({"training": {"max_steps": 0}}, r"\[training\] max_steps: expected a positive number, got 0"),
        ({"training": {"render_steps": 0}}, r"\[training\] render_steps: expected a positive number, got 0"),
        ({"training": {"preview_at": 1.5}}, r"\[training\] preview_at: expected a fraction .* got 1.5"),
        ({"intake": {"min_photos": 5, "max_photos": 2}}, r"\[intake\] max_photos: expected at least"),
        ({"model": {"device": []}}, r"\[model\] device"),
        (
            {"safety": {"default_negative_prompt": "lowres, (blurry"}},
            r"\[safety\] default_negative_prompt: “\(” in “\(blurry” is never closed",
        ),
        (
            {"model": {"dtype": "half"}},
            r"\[model\] dtype: expected one of auto, fp16, bf16, fp32, got 'half'",
        ),
        ({"model": {"compile": "yes"}}, r'\[model\] compile: expected "auto", true or false, got \'yes\''),
        ({"model": {"channels_last": 1}}, r"\[model\] channels_last: expected a string or true or false"),
        (
            {"generation": {"batch_limit": 0}},
            r"\[generation\] batch_limit: expected a positive number, got 0",
        ),
    ],
)
def test_a_bad_key_is_named_in_one_line(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        config_from_dict(raw, kind=BotConfig)
    assert "\n" not in str(caught.value)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


@pytest.mark.parametrize(
    ("choice", "device", "on"),
    [("auto", "cuda", True), ("auto", "cpu", False), (True, "cpu", True), (False, "cuda", False)],
)
def test_fast_paths_auto_means_cuda(choice: str | bool, device: str, on: bool) -> None:
    assert config_from_dict({"model": {"compile": choice}}).model.compile == choice
    assert fast_path_on(choice, torch.device(device)) is on


def test_the_engine_backend_is_local_or_ray_and_ray_needs_ray_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match=r"\[engine\] backend: expected one of local, ray, got 'k8s'"):
        config_from_dict({"engine": {"backend": "k8s"}})
    with pytest.raises(ConfigError, match=r"cpus_per_worker > 0, got 1.0 and 0.0"):
        config_from_dict({"engine": {"backend": "ray", "cpus_per_worker": 0}})
    assert config_from_dict({"engine": {"backend": "ray"}}).engine.backend == "ray"
    # Where Ray is not installed, start-up stops with one line that says how to get it.
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    with pytest.raises(ConfigError, match=r'Ray is not installed \(pip install "dreambot\[ray\]"\)'):
        config_from_dict({"engine": {"backend": "ray"}})


def test_compile_and_channels_last_are_on_by_default_with_cuda_only() -> None:
    model = Config().model
    assert (model.compile, model.channels_last) == ("auto", "auto")
    for device, on in (("cuda", True), ("cpu", False)):
        assert fast_path_on(model.compile, torch.device(device)) is on

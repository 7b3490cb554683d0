"""The `dreambot` command end to end: check, train, imagine and models on the tiny model."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from botharness import selfie_jpeg
from conftest import PROJECT_ROOT
from fakehub import FakeHub, assert_token_kept_nowhere
from huggingface_hub import ModelCard
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from safetensors import safe_open

from bot.bot import HEARTBEAT_MAX_AGE, heartbeat_path
from bot.cli import main
from bot.db import DATABASE_FILE, LOCAL_GUILD_ID, Database
from bot.pnginfo import read_picture
from engine.contract.config import DEFAULT_BASE_MODEL, load_config
from engine.model import load_base_model


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with a config.toml for the tiny model, as the README tells a CPU user to write."""
    (tmp_path / "config.toml").write_text(
        '[model]\nbase = "tiny"\ndevice = "cpu"\n'
        "[training]\nresolution = 64\nmax_steps = 6\nclass_images = 2\nsample_count = 1\n"
        "[generation]\nsteps = 3\n[intake]\nmin_photos = 3\n"
    )
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        (photos / f"selfie{index}.jpg").write_bytes(selfie_jpeg(index))
    (photos / "notes.jpg").write_text("not a photo")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_check_prints_the_report_and_exits_by_verdict(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = sorted(str(p) for p in (workdir / "photos").glob("selfie*.jpg"))
    assert main(["check", "--class", "person", *good]) == 0
    assert "selfie0.jpg" in capsys.readouterr().out

    assert main(["check", "--json", "--class", "person", good[0], "photos/notes.jpg"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert [(p["file"], p["accepted"]) for p in report["photos"]] == [
        ("selfie0.jpg", True),
        ("notes.jpg", False),
    ]
    assert "not an image" in report["photos"][1]["reason"]


@pytest.mark.slow
def test_train_then_imagine_export_and_publish(
    workdir: Path,
    capfd: pytest.CaptureFixture[str],
    fake_hub: FakeHub,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # capfd: the CLI's own output and whatever else reaches the process's stdout and stderr.
    photos = sorted(str(p) for p in (workdir / "photos").glob("selfie*.jpg"))
    assert main(["train", "--name", "abraza", "--class", "person", *photos]) == 0
    out = capfd.readouterr().out
    assert "trained 'abraza'" in out and 'dreambot imagine "abraza as a viking"' in out

    db = Database.in_data_dir(workdir / "data")
    model = db.model_by_token(LOCAL_GUILD_ID, "abraza")
    assert model is not None and model.state == "ready"
    assert Path(model.adapter_path).is_file()
    assert not (workdir / "data" / "photos").exists() or not any((workdir / "data" / "photos").iterdir())

    # [me] is the local user's default model: her newest, abraza.
    assert main(["imagine", "[me] as thor", "--seed", "7", "--count", "2", "--out", "out"]) == 0
    written = sorted((workdir / "out").glob("*.png"))
    assert len(written) == 2
    assert Image.open(written[0]).size == (64, 64)
    parameters = read_picture(written[0].read_bytes()).parameters
    assert parameters.prompt == "abraza person as thor <lora:abraza:1>"
    assert parameters.settings["Seed"] == "7"
    assert "abraza" in parameters.settings["Lora hashes"]
    assert db.search_generations(LOCAL_GUILD_ID, search="thor")[1] == 1

    capfd.readouterr()
    assert main(["models"]) == 0
    assert "abraza" in capfd.readouterr().out

    # Export: the stored kohya file, byte for byte, and where it goes.
    exported = workdir / "exported" / "abraza.safetensors"
    assert main(["export", "abraza", "--out", str(exported)]) == 0
    out = capfd.readouterr().out
    assert exported.read_bytes() == Path(model.adapter_path).read_bytes()
    for where in ("models/Lora", "<lora:abraza:0.8>", "models/loras", "LoraLoader", "write abraza person"):
        assert where in out
    with safe_open(str(exported), framework="numpy") as file:
        keys, metadata = list(file.keys()), file.metadata()
    assert all(re.fullmatch(r"lora_unet_\w+\.(lora_down\.weight|lora_up\.weight|alpha)", key) for key in keys)
    assert metadata["modelspec.trigger_phrase"] == "abraza person" and metadata["ss_output_name"] == "abraza"
    # diffusers' kohya path puts a LoRA on every module the file names (an unmatched key is dropped).
    pipeline = load_base_model("tiny", "cpu", workdir / "data").pipeline
    pipeline.load_lora_weights(exported.parent, weight_name=exported.name, adapter_name="abraza")
    assert pipeline.get_list_adapters() == {"unet": ["abraza"]}
    lora_layers = [m for m in pipeline.unet.modules() if isinstance(m, BaseTunerLayer)]
    assert len(lora_layers) == len({key.partition(".")[0] for key in keys}) > 0

    # Publish with HF_TOKEN: a private repo unless --public, the samples as the card's widget.
    hub_token = "hf_cliWriteToken0123456789"
    fake_hub.tokens[hub_token] = "alice"
    monkeypatch.setenv("HF_TOKEN", hub_token)
    assert main(["publish", "abraza", "--repo", "alice/abraza"]) == 0
    published = capfd.readouterr()
    assert f"published 'abraza' to {fake_hub.url}/alice/abraza (private)" in published.out
    repo = fake_hub.repos["alice/abraza"]
    assert repo.private and repo.files["abraza.safetensors"] == exported.read_bytes()
    assert repo.files["samples/0.png"] == Path(model.samples[0]).read_bytes()
    card = ModelCard(repo.files["README.md"].decode())
    assert card.data.widget == [
        {"text": "portrait photo of abraza person, detailed, soft light", "output": {"url": "samples/0.png"}}
    ]
    assert card.data.instance_prompt == "photo of abraza person" and "- steps: 6" in card.text
    assert main(["publish", "abraza", "--repo", "abraza-public", "--public"]) == 0
    assert not fake_hub.repos["alice/abraza-public"].private
    assert_token_kept_nowhere(
        hub_token, workdir / "data", caplog.text, published.out, published.err, *capfd.readouterr()
    )

    monkeypatch.delenv("HF_TOKEN")
    assert main(["publish", "abraza", "--repo", "alice/other"]) == 2
    assert "set HF_TOKEN to a Hugging Face token with write access" in capfd.readouterr().err


def test_train_refuses_a_bad_photo_set_before_any_engine_starts(workdir: Path) -> None:
    assert main(["train", "--name", "abraza", "photos/notes.jpg", "photos/selfie0.jpg"]) == 1
    db = Database.in_data_dir(workdir / "data")
    assert db.model_by_token(LOCAL_GUILD_ID, "abraza") is None
    assert db.active_jobs() == []


def test_imagine_refuses_a_prompt_that_does_not_read_before_any_engine_starts(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["imagine", "a castle (at dusk", "--out", "out"]) == 1
    assert capsys.readouterr().err == (
        "dreambot: I can't read your prompt: “(” in “(at dusk” is never closed: add a “)”, "
        "or write \\( for the character itself.\n"
    )
    assert main(["imagine", "a castle", "--negative", "(blurry:9)"]) == 1
    assert "I can't read your negative prompt: the weight 9 in “(blurry:9)” is outside 0 to 2" in (
        capsys.readouterr().err
    )
    assert main(["imagine", "a castle <lora:abraza:0.5>"]) == 1
    assert "<lora:abraza> names no trained model in this server" in capsys.readouterr().err
    # Templates: [me] needs a model of the local user's, a placeholder is filled in first.
    assert main(["imagine", "[me] as thor"]) == 1
    assert "no trained model in this server yet: teach me your face with /train" in capsys.readouterr().err
    assert main(["imagine", "a castle by [ARTIST]"]) == 1
    assert "replace [ARTIST] with an artist's name" in capsys.readouterr().err
    assert Database.in_data_dir(workdir / "data").active_jobs() == []
    assert not (workdir / "out").exists()


def test_run_without_a_token_says_where_it_comes_from(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    assert main(["run"]) == 2
    assert "DISCORD_TOKEN" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"dreambot {importlib.metadata.version('dreambot')}"


@pytest.mark.parametrize("before", [True, False], ids=["before the command", "after the command"])
def test_a_bad_config_key_is_one_line_wherever_config_is_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], before: bool
) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[training]\nresolution = 'big'\n")
    option = ["--config", str(config)]
    assert main([*option, "models"] if before else ["models", *option]) == 2
    assert (
        capsys.readouterr().err.strip() == "dreambot: [training] resolution: expected an integer, got 'big'"
    )


def test_check_takes_the_photos_in_a_folder_and_prints_plain_text(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "photos" / "readme.txt").write_text("not a photo, and not named like one")
    assert main(["check", "photos"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    # Every photo file of the folder, sorted; the text file is not one.
    assert [line.split()[1].rstrip(":") for line in lines[:4]] == [
        "notes.jpg",
        "selfie0.jpg",
        "selfie1.jpg",
        "selfie2.jpg",
    ]
    assert lines[0].startswith("❌ notes.jpg: not an image")
    assert "`" not in out and "readme.txt" not in out


def test_check_on_a_folder_without_photos_says_so(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "empty").mkdir()
    assert main(["check", "empty"]) == 2
    assert capsys.readouterr().err.strip() == "dreambot: no photos in empty (JPEG, PNG, WebP or HEIC files)"


def test_health_is_the_age_of_the_running_bots_heartbeat(workdir: Path) -> None:
    heartbeat = heartbeat_path(load_config(workdir / "config.toml"))
    assert main(["health"]) == 1  # no bot has run here
    heartbeat.parent.mkdir(parents=True, exist_ok=True)
    heartbeat.touch()
    assert main(["health"]) == 0
    long_ago = time.time() - HEARTBEAT_MAX_AGE - 1
    os.utime(heartbeat, (long_ago, long_ago))
    assert main(["health"]) == 1  # the bot lost Discord, or hangs


@pytest.mark.slow
def test_a_base_model_that_is_not_downloaded_is_explained_once(tmp_path: Path) -> None:
    """Offline with an empty Hugging Face cache and the default base model: one clear line."""
    (tmp_path / "config.toml").write_text('[model]\ndevice = "cpu"\n')
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "empty-hf-home"),
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    dreambot = [sys.executable, "-c", "import sys; from bot.cli import main; sys.exit(main())"]
    finished = subprocess.run(
        [*dreambot, "imagine", "a castle"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert finished.returncode == 1
    output = finished.stdout + finished.stderr
    assert output.count(f"the base model '{DEFAULT_BASE_MODEL}' is not downloaded yet") == 1, output
    assert "Start once with a network connection (and without HF_HUB_OFFLINE) to download it" in output
    assert 'or base = "tiny" to try the flow' in output
    assert "local_files_only" not in output and "Traceback" not in output, output


def test_a_file_that_is_no_database_is_named_in_one_line_and_left_as_it_is(workdir: Path) -> None:
    database = workdir / "data" / DATABASE_FILE
    database.parent.mkdir()
    Database(database).close()
    pages = bytearray(database.read_bytes())
    # A damaged one (its header intact, its schema page overwritten), then one that is no database.
    damaged = bytes(pages[:100]) + b"\xff" * (len(pages) - 100)
    for contents, problem in (
        (damaged, "is damaged"),
        (b"notes, not a database\n" * 200, "is not a database"),
    ):
        database.write_bytes(contents)
        for command in (["run"], ["models"]):
            done = subprocess.run(
                ["dreambot", *command], capture_output=True, text=True, cwd=workdir, timeout=120,
                env={**os.environ, "DISCORD_TOKEN": "a-token"},
            )  # fmt: skip
            assert done.returncode == 1
            assert done.stderr == (
                f"dreambot: the database {database} {problem}: restore it from a backup, or move it aside "
                "to start with an empty one (nothing was changed in it)\n"
            )
        assert database.read_bytes() == contents
        assert sorted(path.name for path in database.parent.iterdir()) == [DATABASE_FILE]

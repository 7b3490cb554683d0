from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from engine.model import ModelLoadError, dtype_for, load_base_model, resolve_device


def test_tiny_loads_through_the_folder_path(tiny_data_dir: Path, tiny_model_dir: Path) -> None:
    by_name = load_base_model("tiny", "cpu", tiny_data_dir)
    by_folder = load_base_model(str(tiny_model_dir), "cpu", tiny_data_dir)
    assert isinstance(by_name.pipeline, StableDiffusionPipeline)
    assert by_name.dtype == torch.float32 and by_name.device.type == "cpu"
    assert by_name.native_resolution == 64
    for a, b in zip(by_name.pipeline.unet.parameters(), by_folder.pipeline.unet.parameters(), strict=True):
        assert torch.equal(a, b)


def test_tiny_sdxl_is_a_config_change(tiny_data_dir: Path) -> None:
    model = load_base_model("tiny-sdxl", "cpu", tiny_data_dir)
    assert isinstance(model.pipeline, StableDiffusionXLPipeline) and model.is_sdxl
    image = model.pipeline(
        "a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)


def test_tiny_model_is_written_once(tiny_data_dir: Path, tiny_model_dir: Path) -> None:
    before = (tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    load_base_model("tiny", "cpu", tiny_data_dir)
    assert (tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("base", "message"),
    [
        ("", "expected a Hub id"),
        ("./no/such/model", "no such folder or file"),
        ("/tmp/missing-model.safetensors", "does not exist"),
    ],
)
def test_bad_base_gives_a_clear_error(tmp_path: Path, base: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_base_model(base, "cpu", tmp_path)


def test_folder_without_model_index_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    with pytest.raises(ModelLoadError, match=r"no model_index\.json"):
        load_base_model(str(tmp_path / "model"), "cpu", tmp_path)


def test_broken_folder_is_a_load_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        load_base_model(str(broken), "cpu", tmp_path)


def test_hub_model_not_in_cache_offline_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="not downloaded yet and HF_HUB_OFFLINE forbids downloading"):
        load_base_model("nobody/not-a-model", "cpu", tmp_path)


def test_device_names() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in {"cuda", "mps", "cpu"}
    with pytest.raises(ModelLoadError, match="not a torch device"):
        resolve_device("gpu-please")


def test_dtype_choices() -> None:
    cpu = torch.device("cpu")
    assert dtype_for(cpu) == dtype_for(cpu, "auto") == torch.float32  # a CPU has no fast half path
    assert [dtype_for(cpu, name) for name in ("fp16", "bf16", "fp32")] == [
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ]
    with pytest.raises(
        ModelLoadError, match=r"\[model\] dtype: expected auto, fp16, bf16 or fp32, got 'half'"
    ):
        dtype_for(cpu, "half")

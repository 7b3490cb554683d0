"""The stored adapter format (engine.contract.kohya): kohya keys other tools match, its metadata, old files."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection

from engine.contract.config import TrainingSection
from engine.contract.kohya import (
    DIFFUSERS_ADAPTER_FILE,
    diffusers_adapter_bytes,
    is_kohya_adapter,
    upgrade_adapter,
)
from engine.contract.protocol import TrainJob
from engine.model import load_base_model
from engine.train import train_lora

TOKEN = "abraza"
RANK, ALPHA = 4, 8  # alpha != rank: a file or loader that assumed alpha = rank would show
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
KOHYA_PARTS = {"lora_down.weight", "lora_up.weight", "alpha"}
RENDER_TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ...]:
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for index in range(2):
        pixels = np.random.default_rng(index).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        paths.append(folder / f"{index}.png")
        PIL.Image.fromarray(pixels).save(paths[-1])
    return tuple(paths)


def render(pipeline: DiffusionPipeline) -> np.ndarray:
    return pipeline(
        f"photo of {TOKEN} person",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images[0]


def text_encoders(pipeline: DiffusionPipeline) -> list[str]:
    return [name for name in ("text_encoder", "text_encoder_2") if getattr(pipeline, name, None) is not None]


# ---------------------------------------------------------------------------------------------
# What a kohya loader sees: every module of the model under the name it matches keys against


def sgm_attention_blocks(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The UNet's attention blocks under their original Stability (sgm) names, counted the way
    ComfyUI's unet_to_diffusers counts them: input block 0 is conv_in, then every layer of a down
    block and its downsampler take one input block each; every layer of an up block takes one
    output block (its upsampler sits inside the last one); the mid block's attention is middle_block.1."""
    blocks: dict[str, torch.nn.Module] = {}
    index = 1
    for down in unet.down_blocks:
        for layer in range(len(down.resnets)):
            if getattr(down, "attentions", None):
                blocks[f"input_blocks.{index}.1"] = down.attentions[layer]
            index += 1
        if down.downsamplers:
            index += 1
    if getattr(unet.mid_block, "attentions", None):
        blocks["middle_block.1"] = unet.mid_block.attentions[0]
    index = 0
    for up in unet.up_blocks:
        for layer in range(len(up.resnets)):
            if getattr(up, "attentions", None):
                blocks[f"output_blocks.{index}.1"] = up.attentions[layer]
            index += 1
    return blocks


def kohya_module_table(pipeline: DiffusionPipeline) -> dict[str, torch.nn.Module]:
    """kohya name -> module, built from the model's modules as A1111 and ComfyUI build theirs
    (module name with dots as underscores, after the component's prefix), never from key names."""
    sdxl = "text_encoder_2" in text_encoders(pipeline)
    table: dict[str, torch.nn.Module] = {}
    if sdxl:  # kohya trains SDXL on Stability's own UNet, so the names are sgm ones
        for prefix, block in sgm_attention_blocks(pipeline.unet).items():
            for name, module in block.named_modules():
                table["lora_unet_" + f"{prefix}.{name}".replace(".", "_")] = module
    else:  # and SD 1.x on a UNet with diffusers' module names
        for name, module in pipeline.unet.named_modules():
            table["lora_unet_" + name.replace(".", "_")] = module
    prefixes = {"text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}
    for component in text_encoders(pipeline):
        # CLIP as the original checkpoints, A1111 and ComfyUI name it ("text_model.encoder.layers...");
        # transformers 5's CLIPTextModel leaves the "text_model" level out, the projection model keeps it.
        clip = CLIPTextModelWithProjection(getattr(pipeline, component).config)
        for name, module in clip.named_modules():
            table[prefixes[component] + name.replace(".", "_")] = module
    return table


def targeted_modules(pipeline: DiffusionPipeline, table: dict[str, torch.nn.Module]) -> set[str]:
    """The names of every module a training with the text encoders puts a LoRA on."""
    return {
        name
        for name, module in table.items()
        if isinstance(module, torch.nn.Linear)
        and name.endswith(
            tuple("_" + target.replace(".", "_") for target in UNET_TARGETS)
            if name.startswith("lora_unet_")
            else tuple("_" + target for target in TEXT_ENCODER_TARGETS)
        )
        and ("_attn" in name)
    }


@pytest.mark.slow
@pytest.mark.parametrize("base", ["tiny", "tiny-sdxl"])
def test_trained_adapter_keys_alpha_and_metadata_are_what_kohya_loaders_expect(
    base: str, tiny_data_dir: Path, photos: tuple[Path, ...], tmp_path: Path
) -> None:
    model = load_base_model(base, "cpu", tiny_data_dir)
    training = TrainingSection(
        resolution=64,
        rank=RANK,
        alpha=ALPHA,
        learning_rate=1e-3,
        prior_preservation=False,
        train_text_encoder=True,
        sample_count=0,
        gradient_checkpointing=False,
    )
    job = TrainJob(
        job_id="test",
        token=TOKEN,
        class_word="person",
        photos=[str(photo) for photo in photos],
        output_dir=str(tmp_path / "out"),
        steps=2,
    )
    result = train_lora(model, job, training, tmp_path / "class_images")

    weights = load_file(result.adapter_path)
    table = kohya_module_table(load_base_model(base, "cpu", tiny_data_dir).pipeline)
    unmatched, matched = [], {}
    for key, tensor in weights.items():
        # As A1111's load_network and ComfyUI's load_lora: the module name, then what it holds.
        name, _, part = key.partition(".")
        if part not in KOHYA_PARTS or name not in table:
            unmatched.append(key)
            continue
        matched.setdefault(name, {})[part] = tensor
    assert unmatched == []
    # Every trained layer is there, whole: down and up multiply to the module's weight shape.
    assert set(matched) == targeted_modules(model.pipeline, table)
    for name, parts in matched.items():
        assert parts.keys() == KOHYA_PARTS, name
        assert (parts["lora_up.weight"] @ parts["lora_down.weight"]).shape == table[name].weight.shape
        assert parts["lora_down.weight"].shape[0] == RANK
        assert parts["alpha"].shape == () and parts["alpha"].item() == ALPHA

    with safe_open(str(result.adapter_path), framework="pt") as file:
        metadata = file.metadata()
    sdxl = base == "tiny-sdxl"
    assert all(isinstance(value, str) for value in metadata.values())
    assert (
        metadata.items()
        >= {
            "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1",
            "ss_sd_model_name": base,
            "ss_output_name": TOKEN,
            "ss_network_module": "networks.lora",
            "ss_network_dim": "4",
            "ss_network_alpha": "8.0",
            "ss_resolution": "(64, 64)",
            "ss_num_train_images": "2",
            "ss_max_train_steps": "2",
            "ss_learning_rate": "0.001",
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"
            if sdxl
            else "stable-diffusion-v1/lora",
            "modelspec.title": TOKEN,
            "modelspec.trigger_phrase": f"{TOKEN} person",
            "modelspec.resolution": "64x64",
            "modelspec.date": result.metadata["created_at"],
        }.items()
    )
    assert json.loads(metadata["ss_tag_frequency"]) == {f"{TOKEN} person": {f"photo of {TOKEN} person": 2}}
    assert metadata["modelspec.implementation"] == (
        "https://github.com/Stability-AI/generative-models" if sdxl else "diffusers"
    )


# ---------------------------------------------------------------------------------------------
# Adapters written before the kohya format


def write_old_format_adapter(pipeline: DiffusionPipeline, folder: Path) -> Path:
    """A random adapter written the way engine.train wrote them before the kohya format: diffusers
    keys and the peft config (alpha) in the file's metadata. It stays active on `pipeline`."""
    layers: dict[str, object] = {}
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    for component in ["unet", *text_encoders(pipeline)]:
        module = getattr(pipeline, component)
        targets = UNET_TARGETS if component == "unet" else TEXT_ENCODER_TARGETS
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=targets)
        module.add_adapter(config, adapter_name="old")
        with torch.no_grad():
            for name, param in module.named_parameters():
                if "lora_B" in name:  # gaussian init leaves B at zero: no effect to compare
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        state = get_peft_model_state_dict(module, adapter_name="old")
        layers[f"{component}_lora_layers"] = convert_state_dict_to_diffusers(state)
        layers[f"{component}_lora_adapter_metadata"] = module.peft_config["old"].to_dict()
    type(pipeline).save_lora_weights(folder, weight_name="adapter.safetensors", **layers)
    return folder / "adapter.safetensors"


@pytest.mark.slow
@pytest.mark.parametrize("base", ["tiny", "tiny-sdxl"])
def test_old_adapter_loads_and_renders_the_same_in_the_kohya_format(
    base: str, tiny_data_dir: Path, tmp_path: Path
) -> None:
    source = load_base_model(base, "cpu", tiny_data_dir).pipeline
    old = write_old_format_adapter(source, tmp_path / "old")
    live = render(source)  # the adapter as peft applies it
    assert not is_kohya_adapter(old)

    old_loaded = load_base_model(base, "cpu", tiny_data_dir).pipeline
    old_loaded.load_lora_weights(old.parent, weight_name=old.name, adapter_name=TOKEN)
    from_old = render(old_loaded)
    assert np.abs(from_old - live).max() <= RENDER_TOLERANCE
    assert np.abs(from_old - render(load_base_model(base, "cpu", tiny_data_dir).pipeline)).max() > 0.01

    new = tmp_path / "new" / "adapter.safetensors"
    new.parent.mkdir()
    shutil.copy(old, new)
    assert upgrade_adapter(new) is True
    assert is_kohya_adapter(new) and upgrade_adapter(new) is False
    with safe_open(str(new), framework="pt") as file:
        assert {file.get_tensor(key).item() for key in file.keys() if key.endswith(".alpha")} == {ALPHA}  # noqa: SIM118
        metadata = file.metadata()
    sdxl = base == "tiny-sdxl"
    assert metadata["ss_network_alpha"] == "8.0" and metadata["ss_network_dim"] == "4"
    assert metadata["modelspec.architecture"] == (
        "stable-diffusion-xl-v1-base/lora" if sdxl else "stable-diffusion-v1/lora"
    )

    new_loaded = load_base_model(base, "cpu", tiny_data_dir).pipeline
    new_loaded.load_lora_weights(new.parent, weight_name=new.name, adapter_name=TOKEN)
    assert set(new_loaded.get_list_adapters()) == {"unet", *text_encoders(new_loaded)}
    assert np.abs(render(new_loaded) - from_old).max() <= RENDER_TOLERANCE

    # The copy in diffusers' own format (published beside the kohya file): the same weights under peft's
    # names, the alpha in its metadata, the same pictures.
    copy = tmp_path / "diffusers" / DIFFUSERS_ADAPTER_FILE
    copy.parent.mkdir()
    copy.write_bytes(diffusers_adapter_bytes(new))
    modules = {c: dict(getattr(source, c).named_modules()) for c in ["unet", *text_encoders(source)]}
    for key in load_file(copy):
        component, _, rest = key.partition(".")
        module, _, part = rest.rpartition(".lora_")
        assert part in ("A.weight", "B.weight") and module in modules[component], key
    copy_loaded = load_base_model(base, "cpu", tiny_data_dir).pipeline
    copy_loaded.load_lora_weights(copy.parent, weight_name=copy.name, adapter_name=TOKEN)
    assert set(copy_loaded.get_list_adapters()) == {"unet", *text_encoders(copy_loaded)}
    assert np.abs(render(copy_loaded) - from_old).max() <= RENDER_TOLERANCE


def test_upgrade_takes_the_training_metadata_beside_the_file(tiny_data_dir: Path, tmp_path: Path) -> None:
    old = write_old_format_adapter(load_base_model("tiny", "cpu", tiny_data_dir).pipeline, tmp_path)
    training = dict(
        base_model="tiny",
        pipeline="StableDiffusionPipeline",
        token=TOKEN,
        class_word="dog",
        instance_prompt=f"photo of {TOKEN} dog",
        steps=300,
        rank=RANK,
        alpha=16,  # what the config said; the file's own alpha (8) is what it was loaded with
        learning_rate=1e-4,
        photo_count=5,
        resolution=512,
        created_at="2025-01-02T03:04:05+00:00",
    )
    (tmp_path / "training.json").write_text(json.dumps(training), encoding="utf-8")
    assert upgrade_adapter(old)
    with safe_open(str(old), framework="pt") as file:
        metadata = file.metadata()
    assert (
        metadata.items()
        >= {
            "ss_output_name": TOKEN,
            "ss_network_alpha": "8.0",
            "ss_max_train_steps": "300",
            "ss_resolution": "(512, 512)",
            "modelspec.trigger_phrase": f"{TOKEN} dog",
            "modelspec.date": "2025-01-02T03:04:05+00:00",
        }.items()
    )


def test_a_file_that_is_no_adapter_is_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "other.safetensors"
    save_file({"model.weight": np.zeros((2, 2), dtype=np.float32)}, str(path))
    with pytest.raises(ValueError, match=re.escape("'model.weight' is not a LoRA weight")):
        upgrade_adapter(path)

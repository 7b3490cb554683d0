"""The kohya LoRA file: the one format adapters are stored in, and what other SD tools load.

Keys are kohya sd-scripts' (networks/lora.py): `<prefix>_<module path, dots as underscores>` followed
by `.lora_down.weight`, `.lora_up.weight` and `.alpha`. The prefix is `lora_unet` for the UNet,
`lora_te` for SD 1.x's text encoder and `lora_te1` / `lora_te2` for SDXL's two. As sd-scripts does,
SD 1.x UNet paths are the diffusers module names (its SD 1.x UNet is built with them) and SDXL UNet
paths are the original Stability (sgm) names (`input_blocks.4.1...`, its SDXL UNet is Stability's).
A1111/Forge, ComfyUI and diffusers' own `load_lora_weights` map both. diffusers' own
`convert_state_dict_to_kohya` is not used: it writes `lora_te1` for SD 1.x and an alpha equal to the
rank, which would change the strength of an adapter trained with another alpha.

The safetensors metadata carries kohya's `ss_*` keys and Stability's `modelspec.*` keys, which A1111,
ComfyUI and Civitai read to show the base model and the trigger words.

Adapters written before this format (diffusers/peft keys: `unet.<path>.lora_A.weight` or
`unet.<path>.lora.down.weight`) still load through diffusers; `upgrade_adapter` rewrites such a file
once into this format, with the same weights and the alpha it was loaded with.

torch-free on purpose (numpy arrays): the bot may call `upgrade_adapter` before it sends a file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save

# component -> module path (diffusers name, dots) -> (down, up): lora_A is kohya's lora_down.
LoraLayers = dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# kohya sd-scripts' prefixes (networks/lora.py LORA_PREFIX_*).
_PREFIXES_SD = {"unet": "lora_unet", "text_encoder": "lora_te"}
_PREFIXES_SDXL = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
# Every SD 1.x/2.x and SDXL UNet (and the tiny test models) has 2 layers per block, so 3 sgm blocks per
# diffusers block: kohya's SDXL UNet and A1111's name conversion hard-code the same layout.
_SGM_LAYERS_PER_BLOCK = 2
_KOHYA_PREFIX = re.compile(r"lora_(unet|te[12]?)_")
# The old spellings of a layer's down (0) and up (1) matrices: peft's, and diffusers' for the UNet
# and for the text encoders.
_OLD_PARTS = {
    **{suffix: 0 for suffix in (".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight")},
    **{suffix: 1 for suffix in (".lora_B.weight", ".lora.up.weight", ".lora_linear_layer.up.weight")},
}

# ModelSpec (github.com/Stability-AI/ModelSpec) values as kohya's library/sai_model_spec.py writes them.
_ARCHITECTURE_SD = "stable-diffusion-v1/lora"
_ARCHITECTURE_SDXL = "stable-diffusion-xl-v1-base/lora"
_IMPLEMENTATION_SD = "diffusers"
_IMPLEMENTATION_SDXL = "https://github.com/Stability-AI/generative-models"
SDXL_PIPELINE = "StableDiffusionXLPipeline"
# The training's metadata, written beside its adapter (engine.train METADATA_FILE).
TRAINING_FILE = "training.json"


class AdapterFormatError(ValueError):
    """A file that is neither a kohya nor an old diffusers LoRA adapter; the message names it."""


def kohya_module_name(component: str, path: str, *, sdxl: bool) -> str:
    """kohya's name of the module at diffusers `path` in `component` (without .lora_down etc.)."""
    prefixes = _PREFIXES_SDXL if sdxl else _PREFIXES_SD
    if component not in prefixes:
        raise ValueError(f"no kohya prefix for component {component!r} ({'SDXL' if sdxl else 'SD 1.x'})")
    if component == "unet" and sdxl:
        path = _sgm_unet_path(path)
    elif component != "unet" and not path.startswith("text_model."):
        # transformers 5's CLIPTextModel dropped its `text_model` level (CLIPTextModelWithProjection
        # kept it); kohya files, A1111 and ComfyUI name CLIP's modules with it.
        path = f"text_model.{path}"
    return f"{prefixes[component]}_{path.replace('.', '_')}"


def _sgm_unet_path(path: str) -> str:
    """The original Stability name of a diffusers UNet attention module (the ones LoRA trains)."""
    per_block = _SGM_LAYERS_PER_BLOCK + 1  # the layers, then the down/upsampler
    if match := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        block, layer, rest = int(match[1]), int(match[2]), match[3]
        return f"input_blocks.{1 + block * per_block + layer}.1.{rest}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", path):
        return f"middle_block.1.{match[1]}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        block, layer, rest = int(match[1]), int(match[2]), match[3]
        return f"output_blocks.{block * per_block + layer}.1.{rest}"
    raise ValueError(f"UNet module {path!r} is not in an attention block: no sgm name for it here")


def kohya_state_dict(layers: LoraLayers, alphas: Mapping[str, float], *, sdxl: bool) -> dict[str, np.ndarray]:
    """The kohya tensors of `layers`, with each module's alpha (its component's) as an `.alpha` tensor."""
    tensors: dict[str, np.ndarray] = {}
    for component, modules in layers.items():
        alpha = np.array(alphas[component], dtype=np.float32)
        for path, (down, up) in modules.items():
            name = kohya_module_name(component, path, sdxl=sdxl)
            tensors[f"{name}.lora_down.weight"] = np.ascontiguousarray(down)
            tensors[f"{name}.lora_up.weight"] = np.ascontiguousarray(up)
            tensors[f"{name}.alpha"] = alpha
    return tensors


def base_metadata(*, sdxl: bool, rank: int, alpha: float) -> dict[str, str]:
    """The keys that say what the file is: its base model family, network type, rank and alpha."""
    return {
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _ARCHITECTURE_SDXL if sdxl else _ARCHITECTURE_SD,
        "modelspec.implementation": _IMPLEMENTATION_SDXL if sdxl else _IMPLEMENTATION_SD,
    }


def kohya_metadata(training: Mapping[str, Any], *, sdxl: bool) -> dict[str, str]:
    """kohya's `ss_*` and ModelSpec's `modelspec.*` keys from a training's metadata (training.json).

    Every value is a string (safetensors metadata holds only strings); structured ones are JSON.
    """
    token, class_word = training["token"], training["class_word"]
    resolution = int(training["resolution"])
    trigger = f"{token} {class_word}"
    base = str(training["base_model"])
    metadata = base_metadata(sdxl=sdxl, rank=training["rank"], alpha=training["alpha"])
    metadata |= {
        # As kohya: a local checkpoint by its file name, a Hub model by its id.
        "ss_sd_model_name": Path(base).name if Path(base).expanduser().exists() else base,
        "ss_output_name": token,
        "ss_resolution": str((resolution, resolution)),
        "ss_num_train_images": str(training["photo_count"]),
        "ss_num_reg_images": str(training.get("class_images", 0)),
        "ss_max_train_steps": str(training["steps"]),
        "ss_learning_rate": str(training["learning_rate"]),
        "ss_prior_loss_weight": str(training.get("prior_loss_weight", 1.0)),
        "ss_seed": str(training.get("seed", 0)),
        # {folder: {caption: count}}; a DreamBooth run's caption is its instance prompt. A1111 lists
        # these as the model's training tags, so the trigger word shows there.
        "ss_tag_frequency": json.dumps({trigger: {training["instance_prompt"]: training["photo_count"]}}),
        "modelspec.title": token,
        "modelspec.trigger_phrase": trigger,
        "modelspec.usage_hint": f"Write '{trigger}' in the prompt, as in '{training['instance_prompt']}'",
        "modelspec.resolution": f"{resolution}x{resolution}",
    }
    if training.get("created_at"):
        metadata["modelspec.date"] = str(training["created_at"])
    return metadata


def write_kohya_adapter(
    path: Path, layers: LoraLayers, alphas: Mapping[str, float], *, sdxl: bool, metadata: Mapping[str, str]
) -> Path:
    """Write the adapter whole or not at all: a worker may be loading the previous file meanwhile.

    Written through a Python file, so that a failed write (a full disk) raises the OSError that says
    so (engine.contract.disk); safetensors' own writer reports it as a SafetensorError."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        partial.write_bytes(save(kohya_state_dict(layers, alphas, sdxl=sdxl), metadata=dict(metadata)))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def is_kohya_adapter(path: Path) -> bool:
    """True for a kohya-format file; reads the safetensors header only."""
    keys = _keys(path)
    return bool(keys) and all(_KOHYA_PREFIX.match(key) for key in keys)


def upgrade_adapter(path: Path, *, sdxl: bool | None = None) -> bool:
    """Rewrite an old (diffusers/peft) adapter file in place in the kohya format; False if it already is.

    `sdxl` says which base it belongs to; None reads it from the training.json beside the file, and
    without one, from the keys (a second text encoder). The weights are kept as they are and each
    component's alpha is the one diffusers loaded the old file with (its peft config, else the rank),
    so the adapter renders exactly as before.
    """
    path = Path(path)
    if is_kohya_adapter(path):
        return False
    with safe_open(str(path), framework="numpy") as file:
        file_metadata = file.metadata() or {}
    layers = _old_layers(path, load_file(str(path)))
    peft_config = json.loads(file_metadata.get("lora_adapter_metadata", "{}"))
    alphas = {}
    for component, modules in layers.items():
        rank = next(iter(modules.values()))[0].shape[0]
        if peft_config.get(f"{component}.alpha_pattern") or peft_config.get(f"{component}.rank_pattern"):
            raise AdapterFormatError(f"{str(path)!r}: per-layer ranks or alphas are not supported")
        alphas[component] = float(peft_config.get(f"{component}.lora_alpha", rank))
    training_file = path.with_name(TRAINING_FILE)
    training = json.loads(training_file.read_text(encoding="utf-8")) if training_file.is_file() else None
    if sdxl is None:
        sdxl = training["pipeline"] == SDXL_PIPELINE if training else "text_encoder_2" in layers
    # The rank and alpha this file holds, whatever the training asked for: the metadata describes it.
    component = "unet" if "unet" in layers else next(iter(layers))
    rank, alpha = next(iter(layers[component].values()))[0].shape[0], alphas[component]
    if training:
        metadata = kohya_metadata({**training, "rank": rank, "alpha": alpha}, sdxl=sdxl)
    else:
        metadata = base_metadata(sdxl=sdxl, rank=rank, alpha=alpha) | {"modelspec.title": path.parent.name}
    write_kohya_adapter(path, layers, alphas, sdxl=sdxl, metadata=metadata)
    return True


def _old_layers(path: Path, tensors: Mapping[str, np.ndarray]) -> LoraLayers:
    halves: dict[tuple[str, str], list[np.ndarray | None]] = {}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        part = next((suffix for suffix in _OLD_PARTS if rest.endswith(suffix)), None)
        if component not in COMPONENTS or part is None:
            raise AdapterFormatError(f"{str(path)!r}: {key!r} is not a LoRA weight of a known format")
        halves.setdefault((component, rest.removesuffix(part)), [None, None])[_OLD_PARTS[part]] = tensor
    layers: LoraLayers = {}
    for (component, module), (down, up) in halves.items():
        if down is None or up is None:
            raise AdapterFormatError(f"{str(path)!r}: {component}.{module} lacks its down or up weight")
        layers.setdefault(component, {})[module] = (down, up)
    if not layers:
        raise AdapterFormatError(f"{str(path)!r} holds no LoRA weights")
    return layers


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="numpy") as file:
        return list(file.keys())


# ---------------------------------------------------------------------------------------------
# Back to diffusers' own format, for diffusers users (the Hugging Face Hub)

# The file name diffusers' save_lora_weights writes and load_lora_weights looks for first.
DIFFUSERS_ADAPTER_FILE = "pytorch_lora_weights.safetensors"
# Module names in the UNet's attention blocks and in CLIP made of two words: kohya's names lose the
# dot between words, so a split on "_" joins these pairs again.
_TWO_WORD_NAMES = frozenset(
    {
        *("down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out"),
        *("input_blocks", "output_blocks", "middle_block", "to_q", "to_k", "to_v", "to_out"),
        *("text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj"),
    }
)


def diffusers_module_path(name: str, *, sdxl: bool) -> tuple[str, str]:
    """The component and diffusers module path of kohya module `name`: kohya_module_name's inverse."""
    prefixes = _PREFIXES_SDXL if sdxl else _PREFIXES_SD
    component = next((c for c, prefix in prefixes.items() if name.startswith(f"{prefix}_")), None)
    if component is None:
        raise ValueError(f"{name!r} has none of the kohya prefixes {sorted(prefixes.values())}")
    words = name.removeprefix(f"{prefixes[component]}_").split("_")
    parts: list[str] = []
    while words:
        pair = "_".join(words[:2])
        parts.append(pair if pair in _TWO_WORD_NAMES else words[0])
        del words[: 2 if pair in _TWO_WORD_NAMES else 1]
    path = ".".join(parts)
    if component == "unet" and sdxl:
        path = _diffusers_unet_path(path)
    elif component == "text_encoder":
        # The module names of transformers 5's CLIPTextModel (kohya_module_name adds the level).
        path = path.removeprefix("text_model.")
    return component, path


def _diffusers_unet_path(path: str) -> str:
    """_sgm_unet_path's inverse."""
    per_block = _SGM_LAYERS_PER_BLOCK + 1
    if match := re.fullmatch(r"input_blocks\.(\d+)\.1\.(.+)", path):
        block, layer = divmod(int(match[1]) - 1, per_block)
        return f"down_blocks.{block}.attentions.{layer}.{match[2]}"
    if match := re.fullmatch(r"middle_block\.1\.(.+)", path):
        return f"mid_block.attentions.0.{match[1]}"
    if match := re.fullmatch(r"output_blocks\.(\d+)\.1\.(.+)", path):
        block, layer = divmod(int(match[1]), per_block)
        return f"up_blocks.{block}.attentions.{layer}.{match[2]}"
    raise ValueError(f"UNet module {path!r} is not in an attention block")


def diffusers_adapter_bytes(path: Path) -> bytes:
    """The kohya adapter at `path` as diffusers' save_lora_weights writes it: peft keys
    (`unet.<path>.lora_A.weight`) and each component's peft config (rank, alpha, modules) in the
    `lora_adapter_metadata` diffusers reads, so the alpha is kept. Same weights, same pictures."""
    with safe_open(str(path), framework="numpy") as file:
        sdxl = (file.metadata() or {}).get("modelspec.architecture") == _ARCHITECTURE_SDXL
    tensors: dict[str, np.ndarray] = {}
    config: dict[str, Any] = {}
    for key, tensor in load_file(str(path)).items():
        name, _, part = key.partition(".")
        component, module = diffusers_module_path(name, sdxl=sdxl)
        if part == "alpha":
            config[f"{component}.lora_alpha"] = float(tensor)
            continue
        peft_part = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}[part]
        tensors[f"{component}.{module}.{peft_part}"] = tensor
        if part == "lora_down.weight":
            config[f"{component}.r"] = int(tensor.shape[0])
            config.setdefault(f"{component}.target_modules", []).append(module)
    for key in config:
        if key.endswith(".target_modules"):
            config[key] = sorted(config[key])
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}
    return save(tensors, metadata=metadata)

"""Loading the base model: a Hub id, a local diffusers folder, a single-file checkpoint, or "tiny".

Every kind of base ends up in the same `DiffusionPipeline.from_pretrained`/`from_single_file` call,
so the tiny random model that tests and GPU-less machines use goes through the production path.
Nothing here is specific to SD 1.5: the pipeline class comes from the model's own index, and SDXL
(`base = "tiny-sdxl"` in tests) loads the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from engine.contract.config import TINY_MODELS

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


class ModelLoadError(RuntimeError):
    """The base model could not be loaded; the message is fit to show to a user."""


@dataclass
class LoadedModel:
    pipeline: DiffusionPipeline
    device: torch.device
    dtype: torch.dtype
    # The base as the config names it; it keys the class-image cache and each adapter's metadata.
    base: str

    @property
    def is_sdxl(self) -> bool:
        return isinstance(self.pipeline, StableDiffusionXLPipeline)

    @property
    def native_resolution(self) -> int:
        """The image side the model was trained at (512 for SD 1.5, 1024 for SDXL, 64 for tiny)."""
        return self.pipeline.unet.config.sample_size * self.pipeline.vae_scale_factor


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU; anything else is taken as a torch device."""
    if name != "auto":
        try:
            return torch.device(name)
        except RuntimeError:
            raise ModelLoadError(
                f"[model] device: {name!r} is not a torch device (try 'auto', 'cuda:0', 'cpu')"
            ) from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_NAMED_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def dtype_for(device: torch.device, choice: str = "auto") -> torch.dtype:
    """The torch dtype for `[model] dtype` (see engine.contract.config.DTYPES) on `device`."""
    if choice != "auto":
        if choice not in _NAMED_DTYPES:
            raise ModelLoadError(f"[model] dtype: expected auto, fp16, bf16 or fp32, got {choice!r}")
        return _NAMED_DTYPES[choice]
    # Half precision halves memory and doubles speed on GPUs; CPUs have no fast fp16 path.
    if device.type == "cpu":
        return torch.float32
    # bf16 has fp32's range: no overflow in SDXL's VAE, no loss scaling in training.
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float16


def fast_path_on(choice: str | bool, device: torch.device) -> bool:
    """`[model] channels_last` / `compile`: "auto" is on with CUDA only (CPU gains little, compiling costs)."""
    return device.type == "cuda" if choice == "auto" else bool(choice)


def load_base_model(
    base: str,
    device: str,
    data_dir: Path,
    *,
    use_xformers: bool = True,
    safety_checker: bool = True,
    dtype: str = "auto",
    channels_last: str | bool = False,
) -> LoadedModel:
    """Load `base` onto `device` in `dtype` (`[model] dtype`; see module docstring for what `base` may name)."""
    if not base:
        raise ModelLoadError("[model] base: expected a Hub id, a folder or a .safetensors file, got ''")
    torch_device = resolve_device(device)
    torch_dtype = dtype_for(torch_device, dtype)

    try:
        if base in TINY_MODELS:
            pipeline = _from_folder(ensure_tiny_model(data_dir, sdxl=base == "tiny-sdxl"), torch_dtype)
        elif base.endswith(SINGLE_FILE_SUFFIXES):
            pipeline = _from_single_file(Path(base).expanduser(), torch_dtype)
        elif Path(base).expanduser().is_dir():
            pipeline = _from_folder(Path(base).expanduser(), torch_dtype)
        elif _looks_like_path(base):
            raise ModelLoadError(f"base model {base!r}: no such folder or file")
        else:
            pipeline = _from_hub(base, torch_dtype)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"base model {base!r} could not be loaded: {error}") from error

    if not safety_checker and getattr(pipeline, "safety_checker", None) is not None:
        pipeline.safety_checker = None
    pipeline.to(torch_device)
    pipeline.set_progress_bar_config(disable=True)
    if use_xformers and torch_device.type == "cuda":
        _enable_xformers(pipeline)
    if fast_path_on(channels_last, torch_device):
        for module in (pipeline.unet, pipeline.vae):
            module.to(memory_format=torch.channels_last)
    return LoadedModel(pipeline=pipeline, device=torch_device, dtype=torch_dtype, base=base)


def _looks_like_path(base: str) -> bool:
    # Hub ids are "owner/name"; anything else with a separator or a leading dot is a local path.
    return base.startswith((".", "/", "~")) or base.count("/") != 1


def _from_folder(folder: Path, dtype: torch.dtype) -> DiffusionPipeline:
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"base model folder {str(folder)!r} has no model_index.json (not a diffusers folder)"
        )
    return DiffusionPipeline.from_pretrained(folder, dtype=dtype)


def _from_single_file(path: Path, dtype: torch.dtype) -> DiffusionPipeline:
    if not path.is_file():
        raise ModelLoadError(f"base model file {str(path)!r} does not exist")
    pipeline_class = StableDiffusionXLPipeline if _is_sdxl_checkpoint(path) else StableDiffusionPipeline
    return pipeline_class.from_single_file(path, dtype=dtype)


def _is_sdxl_checkpoint(path: Path) -> bool:
    """SDXL checkpoints carry a second text encoder under `conditioner.embedders.1`."""
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(path, framework="pt") as checkpoint:
        return any(key.startswith("conditioner.embedders.1") for key in checkpoint.keys())  # noqa: SIM118


def _from_hub(repo_id: str, dtype: torch.dtype) -> DiffusionPipeline:
    """Use the local cache when the model is there (works offline); download it once otherwise."""
    # Half-precision weights are half the download where the repo publishes them (bf16 runs cast them).
    variants = ["fp16", None] if dtype in (torch.float16, torch.bfloat16) else [None]
    last_error: Exception | None = None
    for local_only in (True, False):
        if not local_only:
            if huggingface_hub.constants.HF_HUB_OFFLINE:
                raise ModelLoadError(_not_downloaded(repo_id, "HF_HUB_OFFLINE forbids downloading it"))
            log.info("%s is not in the Hugging Face cache yet: downloading it once", repo_id)
        for variant in variants:
            try:
                with _without_hub_fallback_warning():
                    return DiffusionPipeline.from_pretrained(
                        repo_id,
                        dtype=dtype,
                        variant=variant,
                        use_safetensors=True,
                        local_files_only=local_only,
                    )
            except (OSError, ValueError) as error:
                last_error = error
    unreachable = _network_error(last_error)
    if unreachable is not None:
        reason = f"the Hugging Face Hub cannot be reached ({unreachable})"
        raise ModelLoadError(_not_downloaded(repo_id, reason)) from last_error
    raise ModelLoadError(
        f"base model {repo_id!r} could not be loaded from the Hub: {last_error}"
    ) from last_error


def _not_downloaded(repo_id: str, reason: str) -> str:
    return (
        f"the base model {repo_id!r} is not downloaded yet and {reason}. Start once with a network "
        "connection (and without HF_HUB_OFFLINE) to download it, or set [model] base to a local "
        'diffusers folder or .safetensors file, or base = "tiny" to try the flow with a tiny random model'
    )


def _network_error(error: BaseException | None) -> BaseException | None:
    """The connection failure (no network, no DNS, offline mode) behind a failed download, if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ConnectionError | socket.gaierror | TimeoutError):
            return error
        error = error.__cause__ or error.__context__
    return None


class _HubFallbackFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Couldn't connect to the Hub")


@contextlib.contextmanager
def _without_hub_fallback_warning() -> Iterator[None]:
    """Hide diffusers' "Couldn't connect to the Hub ... Will try to load from local cache": the cache
    was tried first and came up empty, so that fallback can only fail, and the failure says why."""
    logger, quiet = logging.getLogger("diffusers.pipelines.pipeline_utils"), _HubFallbackFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _enable_xformers(pipeline: DiffusionPipeline) -> None:
    try:
        import xformers  # noqa: F401
    except ImportError:
        return  # PyTorch SDPA, the default, is nearly as fast.
    pipeline.enable_xformers_memory_efficient_attention()
    log.info("attention: xformers")


# ---------------------------------------------------------------------------------------------
# The tiny random model: same architecture families, a few MB, runs on a CPU in milliseconds.


def ensure_tiny_model(data_dir: Path, *, sdxl: bool = False) -> Path:
    """The tiny model's diffusers folder under `data_dir`, written the first time it is asked for."""
    folder = Path(data_dir) / "models" / ("tiny-sdxl" if sdxl else "tiny")
    if not (folder / "model_index.json").is_file():
        build_tiny_model(folder, sdxl=sdxl)
    return folder


def build_tiny_model(folder: Path, *, sdxl: bool = False, seed: int = 0) -> Path:
    """Write a tiny random SD 1.x (or SDXL) pipeline with the shapes diffusers' own tests use."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_tokenizer()
    text_config = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=64,
    )
    if sdxl:
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text
            cross_attention_dim=64,  # both text encoders' hidden states side by side
            norm_num_groups=1,
        )
        config = CLIPTextConfig(**text_config, projection_dim=32, hidden_act="gelu")
        pipeline = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=CLIPTextModel(config),
            text_encoder_2=CLIPTextModelWithProjection(config),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=EulerDiscreteScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading"
            ),
        )
    else:
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
        )
        pipeline = StableDiffusionPipeline(
            vae=vae,
            text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
            tokenizer=tokenizer,
            unet=unet,
            scheduler=DDPMScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                clip_sample=False,
                steps_offset=1,
            ),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipeline.save_pretrained(folder)
    return folder


def _tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE vocabulary with no merges: every character is a token, as in CLIP's base."""
    characters = _byte_characters()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for character in characters:
        vocab.setdefault(character, len(vocab))
        vocab.setdefault(character + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>", model_max_length=77)


def _byte_characters() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    characters = [chr(b) for b in printable]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            characters.append(chr(256 + extra))
            extra += 1
    return characters

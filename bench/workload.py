"""What the benchmarks run on: full-size model architectures with random weights, prepared photos,
and the one way they time work.

Speed does not depend on the weights, so a model with SD 1.5's (or SDXL's) architecture and random
weights measures what the real one would, with nothing downloaded. Each builder writes a diffusers
folder, which the engine then loads through `load_base_model` like any local base model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    SchedulerMixin,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from engine.model import ensure_tiny_model

PHOTO = Path(__file__).resolve().parent.parent.parent / "shared" / "photos" / "astronaut.png"


def timed(work: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of `work`, with the GPU's queued work finished: CUDA runs behind Python."""
    started = time.perf_counter()
    result = work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, result


def prepare_photos(folder: Path, resolution: int, count: int) -> list[Path]:
    """`count` different square crops of one real photo, as intake would hand them to training."""
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(PHOTO) as image:
        image = image.convert("RGB")
        paths = []
        for index in range(count):
            inset = 20 * index
            crop = image.crop((inset, inset, image.width - inset, image.height - inset))
            path = folder / f"{index}.png"
            crop.resize((resolution, resolution), Image.Resampling.LANCZOS).save(path)
            paths.append(path)
    return paths


def build_random_sd15(
    folder: Path, *, build_device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16
) -> Path:
    """SD 1.5's architecture (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder) with random weights.

    The weights are initialized on `build_device` (a GPU does it in a second, a CPU takes a minute)
    and written in `dtype` (half precision: half the bytes to write and read back; the engine casts
    to its own dtype when it loads them).
    """
    tokenizer, scheduler = _tiny_parts(folder, sdxl=False)
    with torch.device(build_device):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = _sd_vae(scaling_factor=0.18215)
        text_encoder = CLIPTextModel(_clip_config(tokenizer, hidden_act="quick_gelu"))
    pipeline = StableDiffusionPipeline(
        vae=_saveable(vae, dtype),
        text_encoder=_saveable(text_encoder, dtype),
        tokenizer=tokenizer,
        unet=_saveable(unet, dtype),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return folder


def build_random_sdxl(
    folder: Path, *, build_device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16
) -> Path:
    """SDXL 1.0 base's architecture (UNet 2.6B, CLIP ViT-L and OpenCLIP ViT-bigG text encoders) with
    random weights; `build_device` and `dtype` as in build_random_sd15."""
    tokenizer, scheduler = _tiny_parts(folder, sdxl=True)
    with torch.device(build_device):
        unet = UNet2DConditionModel(
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,  # 768 + 1280: both text encoders' hidden states side by side
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + 1280 pooled text
        )
        vae = _sd_vae(scaling_factor=0.13025)
        text_encoder = CLIPTextModel(_clip_config(tokenizer, hidden_act="quick_gelu", projection_dim=768))
        text_encoder_2 = CLIPTextModelWithProjection(
            _clip_config(
                tokenizer,
                hidden_act="gelu",
                hidden_size=1280,
                intermediate_size=5120,
                num_attention_heads=20,
                num_hidden_layers=32,
                projection_dim=1280,
            )
        )
    pipeline = StableDiffusionXLPipeline(
        vae=_saveable(vae, dtype),
        text_encoder=_saveable(text_encoder, dtype),
        text_encoder_2=_saveable(text_encoder_2, dtype),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=_saveable(unet, dtype),
        scheduler=scheduler,
    )
    pipeline.save_pretrained(folder)
    return folder


def _tiny_parts(folder: Path, *, sdxl: bool) -> tuple[CLIPTokenizer, SchedulerMixin]:
    """The tiny model's tokenizer and scheduler (neither changes the speed of a step)."""
    tiny = DiffusionPipeline.from_pretrained(ensure_tiny_model(folder.parent.parent, sdxl=sdxl))
    return tiny.tokenizer, tiny.scheduler


def _sd_vae(*, scaling_factor: float) -> AutoencoderKL:
    # SD 1.x and SDXL share the VAE architecture; SDXL's is fine-tuned and scaled differently.
    return AutoencoderKL(
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=scaling_factor,
    )


def _clip_config(tokenizer: CLIPTokenizer, *, hidden_act: str, **sizes: int) -> CLIPTextConfig:
    """CLIP ViT-L/14's text tower unless `sizes` say otherwise."""
    shape = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
    return CLIPTextConfig(
        **{**shape, **sizes},
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act=hidden_act,
    )


def _saveable(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return module.to(device="cpu", dtype=dtype)

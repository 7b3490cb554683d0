"""Live previews: a denoising step's latents as a small picture, with no extra weights.

A fixed linear projection from the 4 latent channels to RGB per model family (the "latent2rgb"
factors ComfyUI and A1111 use for their cheap previews) gives a blurry but recognisable picture at
1/8 of the final size; it is upscaled to at most PREVIEW_SIDE pixels and written as a JPEG.
"""

from __future__ import annotations

import os
from pathlib import Path

import PIL.Image
import torch

# The longest side of a preview: enough to see a picture forming, small enough for a quick upload.
PREVIEW_SIDE = 256
PREVIEW_FILE = "preview.jpg"

# Rows: latent channels 1-4; columns: R, G, B (ComfyUI comfy/latent_formats.py, SD15 and SDXL).
SD15_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
SD15_LATENT_RGB_BIAS = (0.0, 0.0, 0.0)
SDXL_LATENT_RGB = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


def latents_to_rgb(latents: torch.Tensor, *, sdxl: bool) -> torch.Tensor:
    """(4, h, w) latents, as the denoising loop holds them, to (h, w, 3) uint8 RGB."""
    if latents.ndim != 3 or latents.shape[0] != 4:
        raise ValueError(f"expected latents of shape (4, h, w), got {tuple(latents.shape)}")
    factors = torch.tensor(SDXL_LATENT_RGB if sdxl else SD15_LATENT_RGB)
    bias = torch.tensor(SDXL_LATENT_RGB_BIAS if sdxl else SD15_LATENT_RGB_BIAS)
    rgb = torch.einsum("chw,cr->hwr", latents.detach().float().cpu(), factors) + bias
    # The projection lands in the VAE's [-1, 1] image range.
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)


def preview_image(latents: torch.Tensor, *, sdxl: bool) -> PIL.Image.Image:
    """The latents as a picture whose longest side is PREVIEW_SIDE."""
    image = PIL.Image.fromarray(latents_to_rgb(latents, sdxl=sdxl).numpy(), "RGB")
    scale = PREVIEW_SIDE / max(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), PIL.Image.BILINEAR)


def write_preview(latents: torch.Tensor, output_dir: Path, *, sdxl: bool) -> Path:
    """Write the preview of `latents` as output_dir/PREVIEW_FILE, atomically: the bot may be reading
    the previous one while this one is written."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / PREVIEW_FILE
    partial = path.with_suffix(".part")
    preview_image(latents, sdxl=sdxl).save(partial, "JPEG", quality=80)
    os.replace(partial, path)
    return path

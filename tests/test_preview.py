"""engine.preview: the latent-to-RGB projection of the live previews."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from engine.preview import PREVIEW_SIDE, SD15_LATENT_RGB, latents_to_rgb, preview_image, write_preview


def test_the_projection_gives_uint8_rgb_of_the_latent_size() -> None:
    latents = torch.randn(4, 8, 12) * 5  # far outside [-1, 1]: clamped, not wrapped
    rgb = latents_to_rgb(latents, sdxl=False)
    assert rgb.shape == (8, 12, 3)
    assert rgb.dtype == torch.uint8
    assert rgb.min() == 0 and rgb.max() == 255


def test_each_family_has_its_own_factors() -> None:
    # One unit in channel 1 alone: the pixel is that channel's row of factors, mapped to 0..255.
    latents = torch.zeros(4, 1, 1)
    latents[0] = 1.0
    sd15 = latents_to_rgb(latents, sdxl=False)[0, 0].tolist()
    assert sd15 == [round((value + 1) / 2 * 255) for value in SD15_LATENT_RGB[0]]
    sdxl = latents_to_rgb(latents, sdxl=True)[0, 0].tolist()
    assert sdxl != sd15
    # SDXL's factors come with a bias: the zero latent is not mid grey.
    assert latents_to_rgb(torch.zeros(4, 1, 1), sdxl=True)[0, 0].tolist() != [128, 128, 128]
    assert latents_to_rgb(torch.zeros(4, 1, 1), sdxl=False)[0, 0].tolist() == [128, 128, 128]


def test_a_preview_is_upscaled_to_at_most_the_preview_side_and_written(tmp_path: Path) -> None:
    assert preview_image(torch.randn(4, 8, 16), sdxl=False).size == (PREVIEW_SIDE, PREVIEW_SIDE // 2)
    # An SDXL latent of a 2048 px picture is scaled down to it.
    assert preview_image(torch.randn(4, 256, 300), sdxl=True).size == (PREVIEW_SIDE, 218)
    path = write_preview(torch.randn(4, 8, 8), tmp_path / "job", sdxl=False)
    with Image.open(path) as image:
        assert image.format == "JPEG"
        assert image.size == (PREVIEW_SIDE, PREVIEW_SIDE)
    assert [file.name for file in path.parent.iterdir()] == [path.name]


def test_latents_of_another_shape_are_refused() -> None:
    with pytest.raises(ValueError, match=r"got \(1, 4, 8, 8\)"):
        latents_to_rgb(torch.zeros(1, 4, 8, 8), sdxl=False)

"""Reading prompts: which trained models a prompt names, and the image size an aspect stands for."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from bot.db import ModelRow

# Width and height relative to the model's training side.
ASPECTS: dict[str, tuple[float, float]] = {
    "square": (1.0, 1.0),
    "portrait": (1.0, 1.5),
    "landscape": (1.5, 1.0),
}


def size_for_aspect(aspect: str, side: int) -> tuple[int, int]:
    """(width, height) for an aspect preset, in multiples of 8 as the VAE needs."""
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {', '.join(ASPECTS)}, got {aspect!r}")
    width_factor, height_factor = ASPECTS[aspect]
    return _multiple_of_8(side * width_factor), _multiple_of_8(side * height_factor)


def nearest_aspect(width: int, height: int) -> str:
    """The aspect preset closest in shape to a picture of this size."""
    if width < 1 or height < 1:
        raise ValueError(f"a picture's sides are at least 1 px, got {width}x{height}")
    return min(ASPECTS, key=lambda name: abs(math.log(width / height * ASPECTS[name][1] / ASPECTS[name][0])))


def _multiple_of_8(value: float) -> int:
    return max(8, round(value / 8) * 8)


def tokens_in(prompt: str) -> set[str]:
    """The lowercase words of a prompt, the way tokens are matched (whole words only)."""
    return set(re.findall(r"[a-z0-9]+", prompt.lower()))


def models_in_prompt(prompt: str, models: Iterable[ModelRow]) -> list[ModelRow]:
    """The models whose token appears in the prompt as a whole word, in the order given."""
    words = tokens_in(prompt)
    return [model for model in models if model.token in words]

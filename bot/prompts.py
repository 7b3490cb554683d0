"""Reading prompts: which trained models a prompt names, and the image size an aspect stands for."""

from __future__ import annotations

import math
from collections.abc import Iterable

from bot.db import ModelRow
from engine.contract.prompt_syntax import ParsedPrompt
from engine.contract.protocol import words_in

# The most denoising steps /imagine and /settings offer; the engine takes up to engine.contract.protocol.MAX_STEPS.
MAX_COMMAND_STEPS = 100

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


def models_in_prompt(parsed: ParsedPrompt, models: Iterable[ModelRow]) -> list[ModelRow]:
    """The models a (parsed) prompt names, by their token as a whole word of its text or in a
    `<lora:TOKEN:WEIGHT>` tag, in the order given."""
    names = words_in(parsed.text) | set(parsed.lora_weights)
    return [model for model in models if model.token in names]

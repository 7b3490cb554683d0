"""AUTOMATIC1111's reader of a PNG's "parameters" text, which the tests check the engine's PNGs with."""

from __future__ import annotations

import json
import re
from pathlib import Path

import PIL.Image

# AUTOMATIC1111's `re_param` (modules/infotext_utils.py): "key: value" pairs, values maybe JSON-quoted.
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _unquote(value: str) -> str:
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def read_parameters(png: Path) -> dict[str, str]:
    """Parse a PNG's A1111 "parameters" text back (A1111's `parse_generation_parameters`).

    Keys: "prompt", "negative_prompt" and each "Key: value" of the last line ("Steps", "Seed", ...).
    """
    with PIL.Image.open(png) as image:
        text = image.text.get("parameters") if hasattr(image, "text") else None
    if text is None:
        raise ValueError(f"{str(png)!r} has no 'parameters' text chunk")
    *lines, last = text.strip().split("\n")
    # As A1111: a last line with fewer than 3 "key: value" pairs is part of the prompt.
    if len(_PARAM_RE.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            negative.append(line.removeprefix("Negative prompt:").strip())
        else:
            (negative if negative else prompt).append(line)
    result = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    for key, value in _PARAM_RE.findall(last):
        result[key] = _unquote(value)
    return result

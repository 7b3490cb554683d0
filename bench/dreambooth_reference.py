"""Runs diffusers' examples/dreambooth/train_dreambooth_lora.py, unchanged, without torchvision.

    python -m bench.dreambooth_reference PATH/TO/train_dreambooth_lora.py [the script's arguments]

torchvision does not install beside this project's torch build, and the script uses it only for its
image transforms. This module stands in for exactly what it uses (transforms.Compose, Resize,
CenterCrop, RandomCrop, ToTensor, Normalize, InterpolationMode), with torchvision's semantics on PIL
images, and hands it to the script's own `from torchvision import transforms` and to nothing else:
transformers probes for torchvision with importlib.util.find_spec and would take a stand-in on the
path for the real package (and import torchvision.transforms.functional from it). Nothing is
installed; the script's source is read at run time from the path given and is not part of dreambot.
"""

from __future__ import annotations

import builtins
import enum
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class Compose:
    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, value: Any) -> Any:
        for transform in self.transforms:
            value = transform(value)
        return value


class Resize:
    """An int size matches the shorter side, keeping the aspect ratio (torchvision's rule)."""

    def __init__(self, size: int, interpolation: InterpolationMode = InterpolationMode.BILINEAR) -> None:
        self.size = size
        self.resample = getattr(Image.Resampling, interpolation.name)

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        short, long = sorted((width, height))
        if short == self.size:
            return image
        long = int(self.size * long / short)
        return image.resize((self.size, long) if width <= height else (long, self.size), self.resample)


class CenterCrop:
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        left, top = round((width - self.size) / 2), round((height - self.size) / 2)
        return image.crop((left, top, left + self.size, top + self.size))


class RandomCrop:
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        top = int(torch.randint(0, height - self.size + 1, (1,)))
        left = int(torch.randint(0, width - self.size + 1, (1,)))
        return image.crop((left, top, left + self.size, top + self.size))


class ToTensor:
    """An RGB PIL image as a (3, H, W) float tensor in [0, 1]."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)


class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor - self.mean) / self.std


def torchvision_stand_in() -> types.ModuleType:
    """A `torchvision` module whose `transforms` holds the classes above."""
    transforms = types.ModuleType("torchvision.transforms")
    for kind in (InterpolationMode, Compose, Resize, CenterCrop, RandomCrop, ToTensor, Normalize):
        setattr(transforms, kind.__name__, kind)
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms  # type: ignore[attr-defined]
    return torchvision


def run_script(script: Path, arguments: Sequence[str]) -> None:
    """Execute `script` as __main__ with `arguments`; its own imports of torchvision get the stand-in."""
    torchvision = torchvision_stand_in()
    real_import = builtins.__import__

    def script_import(
        name: str,
        globals: Mapping[str, Any] | None = None,
        locals: Mapping[str, Any] | None = None,
        fromlist: Sequence[str] = (),
        level: int = 0,
    ) -> Any:
        if level == 0 and name == "torchvision":
            return torchvision
        return real_import(name, globals, locals, fromlist, level)

    # The script's module namespace alone sees this __import__: every other module keeps the real one.
    script_builtins = {**vars(builtins), "__import__": script_import}
    sys.argv = [str(script), *arguments]
    code = compile(script.read_text(encoding="utf-8"), str(script), "exec")
    exec(code, {"__name__": "__main__", "__file__": str(script), "__builtins__": script_builtins})


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    run_script(Path(sys.argv[1]), sys.argv[2:])

"""Turning image files on disk into Discord uploads that fit Discord's limits."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import discord
from PIL import Image, PngImagePlugin

# Discord takes at most 10 attachments per message.
MAX_FILES_PER_MESSAGE = 10
# What a server without boosts allows; interactions report their own (larger) limit.
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024


def image_file(path: Path, filename: str, size_limit: int = DEFAULT_UPLOAD_LIMIT) -> discord.File:
    """The image as an upload of at most `size_limit` bytes: as it is when it fits, else re-encoded.

    A PNG keeps its `parameters` text chunk when sent as it is; a re-encoded JPEG carries them in
    its comment, so the prompt and seed survive either way.
    """
    data = path.read_bytes()
    if len(data) <= size_limit:
        return discord.File(io.BytesIO(data), filename=filename)
    with Image.open(path) as image:
        parameters = (
            image.info.get("parameters", "") if isinstance(image, PngImagePlugin.PngImageFile) else ""
        )
        image = image.convert("RGB")
        while True:
            for quality in (92, 85, 75):
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=quality, comment=parameters.encode())
                if buffer.tell() <= size_limit:
                    return discord.File(
                        io.BytesIO(buffer.getvalue()), filename=Path(filename).with_suffix(".jpg").name
                    )
            if min(image.size) <= 64:
                raise ValueError(f"{filename} cannot be made smaller than {size_limit} bytes")
            image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.LANCZOS)


def image_files(
    paths: Sequence[Path], stem: str, size_limit: int = DEFAULT_UPLOAD_LIMIT
) -> list[list[discord.File]]:
    """Uploads named `{stem}-{i}.png`, grouped into messages of at most 10 files that share the limit.

    File names come from us, never from members: `stem` must be our own identifier.
    """
    per_file_limit = size_limit // max(1, min(len(paths), MAX_FILES_PER_MESSAGE))
    files = [
        image_file(path, f"{stem}-{index}{path.suffix}", per_file_limit) for index, path in enumerate(paths)
    ]
    return [files[i : i + MAX_FILES_PER_MESSAGE] for i in range(0, len(files), MAX_FILES_PER_MESSAGE)]

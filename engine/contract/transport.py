"""What travels between the bot and an engine actor on a Ray node (bot.cluster, engine.ray_actor):
a job's input files (Parcel) and each event with the files it names (Shipment), adapters by content
hash."""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Parcel:
    """A job's input files. `files`: bytes by path relative to the data dir. `adapters`: the content
    hash of each adapter file the job names (by relative path); `blobs`: the bytes of those hashes
    the bot believes the node lacks."""

    files: dict[str, bytes] = field(default_factory=dict)
    adapters: dict[str, str] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Shipment:
    """One event (encoded; None for files alone) and the files it names, by path relative to the
    data dir. `checkpoint`: the folder, among `files`, of a training's newest checkpoint: the bot
    drops the older ones beside it, as the training does."""

    event: str | None
    files: dict[str, bytes] = field(default_factory=dict)
    checkpoint: str | None = None


def write_atomically(path: Path, data: bytes) -> None:
    # Another actor on the node may read the same adapter at once: never a half-written file.
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)

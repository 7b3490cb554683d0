"""Where dreambot keeps files in the data directory, and deleting them safely.

Every path is absolute: the engine worker refuses paths outside the data directory, and the bot, its
workers and the CLI must agree on them whatever their working directory.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from bot.config import BotConfig


def photos_dir(config: BotConfig, job_id: str) -> Path:
    """A training's prepared photos (deleted after training unless [storage] keep_photos)."""
    return config.data_dir / "photos" / job_id


def incoming_dir(config: BotConfig, job_id: str) -> Path:
    """The photos of a /train as they come from Discord, while intake checks them (then deleted)."""
    return config.data_dir / "incoming" / job_id


def adapter_dir(config: BotConfig, guild_id: int, token: str) -> Path:
    """A model's adapter, metadata, checkpoints and samples."""
    return config.data_dir / "adapters" / str(guild_id) / token


def generation_dir(config: BotConfig, job_id: str) -> Path:
    return config.data_dir / "generations" / job_id


def remove_path(config: BotConfig, path: str | Path) -> int:
    """Delete a file or folder inside the data directory, and the folders it leaves empty.

    Returns how many files were removed. Paths come from rows: one pointing outside the data
    directory, or at one of its top-level folders, is never ours to delete.
    """
    root = config.data_dir.resolve()
    path = Path(path).resolve()
    if not path.is_relative_to(root) or len(path.relative_to(root).parts) < 2 or not path.exists():
        return 0
    if path.is_dir():
        removed = sum(1 for item in path.rglob("*") if not item.is_dir())
        shutil.rmtree(path, ignore_errors=True)
    else:
        removed = 1
        path.unlink(missing_ok=True)
    # e.g. adapters/{guild}/ once its last model is gone; the top-level folders themselves stay.
    parent = path.parent
    while len(parent.relative_to(root).parts) >= 2 and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent
    return removed


def remove_paths(config: BotConfig, paths: Iterable[str | Path]) -> int:
    """remove_path for each of `paths`; how many files were removed in all."""
    return sum(remove_path(config, path) for path in paths)

"""A full disk is recognised behind the errors the engine's writers raise (engine.contract.disk).

/dev/full fails every write with ENOSPC, as a full disk does. It is only ever opened here as a
Python file: a writer given its path may replace it by a regular file when run as root.
"""

from __future__ import annotations

import contextlib
import errno
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image

from engine.contract.disk import disk_full_cause

DEV_FULL = Path("/dev/full")


@pytest.fixture
def full_disk() -> Path:
    if not (DEV_FULL.exists() and stat.S_ISCHR(DEV_FULL.stat().st_mode)):
        pytest.skip("no /dev/full on this system")
    return DEV_FULL


def test_torch_save_to_a_python_file_on_a_full_disk_keeps_the_errno(full_disk: Path) -> None:
    # A buffered file, as a checkpoint's state.pt is written: torch raises a RuntimeError that names
    # no errno ...
    file = full_disk.open("wb")
    try:
        with pytest.raises(RuntimeError) as raised:
            torch.save({"weights": torch.zeros(100_000)}, file)
    finally:
        with contextlib.suppress(OSError):  # what is left in the buffer fails again
            file.close()
    # ... but the file's OSError is its context.
    cause = disk_full_cause(raised.value)
    assert cause is not None and cause.errno == errno.ENOSPC


def test_a_png_on_a_full_disk_is_a_full_disk(full_disk: Path) -> None:
    with full_disk.open("wb", buffering=0) as file, pytest.raises(OSError) as raised:
        Image.effect_noise((256, 256), 50).save(file, format="PNG")
    assert disk_full_cause(raised.value) is raised.value


def test_other_errors_are_not_a_full_disk() -> None:
    assert disk_full_cause(RuntimeError("unexpected pos 704 vs 598")) is None
    assert disk_full_cause(OSError(errno.EACCES, "Permission denied")) is None
    looped = RuntimeError("a")
    looped.__context__ = RuntimeError("b")
    looped.__context__.__context__ = looped
    assert disk_full_cause(looped) is None

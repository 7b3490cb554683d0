"""Writes that fail because the disk is full: how the engine and the bot recognise them.

A full disk (or a used-up quota) is not a bug to report as an internal error: it is the server's
state, which its admin can fix, so the member is told so in plain words and loses nothing. Plain
Python, no torch: the bot imports it too.
"""

from __future__ import annotations

import errno

DISK_FULL_MESSAGE = "the server's disk is full"
# ENOSPC: no space left on the device; EDQUOT: the user's disk quota is used up.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_full_cause(error: BaseException) -> OSError | None:
    """The OSError saying the disk is full behind `error`, if there is one.

    It is found in the chain of causes too: torch.save writing to a Python file raises a
    RuntimeError whose context is the file's OSError.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None

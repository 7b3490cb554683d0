"""Out-of-memory handling: releasing memory after one, and the test switch that simulates one.

`DREAMBOT_TEST_OOM_AT` is for tests only: a comma-separated list of `train:N` (raise at training
step N) and `generate:N` (raise at denoising step N of a generation). Each fires once per process,
so a test sees the failed job and then the worker serving the next one.
"""

from __future__ import annotations

import gc
import logging
import os
import threading

import torch

log = logging.getLogger(__name__)

TEST_OOM_VARIABLE = "DREAMBOT_TEST_OOM_AT"
OOM_PLACES = ("train", "generate")

_fired: set[str] = set()
_fired_lock = threading.Lock()


def raise_if_test_oom(place: str, step: int) -> None:
    """Raise torch.OutOfMemoryError at `place` step `step` when DREAMBOT_TEST_OOM_AT asks for it."""
    setting = os.environ.get(TEST_OOM_VARIABLE, "")
    if not setting:
        return
    for item in (part.strip() for part in setting.split(",")):
        name, _, number = item.partition(":")
        if name not in OOM_PLACES or not number.isdigit():
            raise ValueError(f"{TEST_OOM_VARIABLE}: expected items like train:3 or generate:1, got {item!r}")
        if name == place and int(number) == step:
            with _fired_lock:
                if item in _fired:
                    return
                _fired.add(item)
            raise torch.OutOfMemoryError(f"{TEST_OOM_VARIABLE}={setting}: simulated at {place} step {step}")


def release_memory() -> None:
    """Free what a failed job left: call it AFTER leaving the except block, whose traceback holds
    the frames (and so the activations) of the job that ran out of memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        log.info("GPU memory released: %.2f GiB still allocated", torch.cuda.memory_allocated() / 2**30)

"""Shared fixtures: the real photos beside the project, and a tiny random SD model on disk."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from botharness import SharedBot

# Tests never reach the network: the tiny model is built locally, nothing is fetched from the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test process and the engine workers it starts share a few cores: one thread each avoids
# oversubscription, which made a 64 px generation 20x slower on a busy 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PHOTOS_DIR = PROJECT_ROOT.parent / "shared" / "photos"
# The files whose tests take one to three minutes between them on 2 cores, longest first. They
# start first (pyproject's --no-loadscope-reorder keeps this order; xdist would otherwise start
# files with many tests first), so that no process is left alone with one of them at the end.
LONG_FILES = (
    "test_cluster.py",
    "test_worker.py",
    "test_generate.py",
    "test_cluster_sim.py",
    "test_bench_gpu.py",
    "test_train.py",
    "test_bot_process.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    if not PHOTOS_DIR.is_dir():
        pytest.fail(f"the test photos are missing: expected them in {PHOTOS_DIR}")
    return PHOTOS_DIR


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory holding the tiny SD and tiny SDXL diffusers folders, built once per run."""
    from engine.model import ensure_tiny_model

    data_dir = tmp_path_factory.mktemp("data")
    ensure_tiny_model(data_dir)
    ensure_tiny_model(data_dir, sdxl=True)
    return data_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_data_dir: Path) -> Path:
    """The tiny SD 1.x model as a diffusers folder: load it with engine.model.load_base_model."""
    return tiny_data_dir / "models" / "tiny"


@pytest.fixture(autouse=True)
def quick_engine_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine killed by a test is restarted at once, not after the second that spares a real
    server a tight loop of restarts: no test is about that second, and the kill tests wait for it."""
    from bot.jobs import JobQueue

    monkeypatch.setattr(JobQueue, "restart_delay", 0.05)


# The tests that use `shared_bot`, at most: each gets a guild of its own.
SHARED_GUILDS = 24


@pytest.fixture(scope="session")
def shared_bot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedBot]:
    """The bot (and its engine) started once for the tests that need only the test settings."""
    from botharness import SharedBot

    bot = SharedBot(tmp_path_factory.mktemp("shared-bot"), SHARED_GUILDS)
    bot.start()
    try:
        yield bot
    finally:
        bot.close()


# fakehub: the fake_hub fixture, a fake Hugging Face Hub that HfApi() reaches; queueharness: the
# JobQueue tests' data dir, database and recorder.
pytest_plugins = ["fakehub", "queueharness"]

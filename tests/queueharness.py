"""The JobQueue tests' set-up, for the local and the Ray backend alike: a data dir with the tiny
model and three photos (shared by a module's tests), a database per test, job rows, and a recorder of
the queue's events. Registered in conftest.py, so its fixtures serve every test module."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from botharness import write_engine_config
from PIL import Image

from bot.db import Database, JobRow
from engine.contract.config import Config, load_config
from engine.contract.protocol import Error, Event, GenerateJob, Progress, Result, TrainJob, encode

TIMEOUT = 180.0
ALICE, BOB, CAROL = 101, 102, 103


@dataclass
class Recorder:
    """The on_event callback: what it was given, and the row in the database at that moment."""

    db: Database
    calls: list[tuple[JobRow, Event, JobRow]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, job: JobRow, event: Event) -> None:
        self.calls.append((job, event, self.db.job(job.id)))
        self._changed.set()

    async def wait_for(
        self, matches: Callable[[JobRow, Event], bool], after: int = 0
    ) -> tuple[JobRow, Event]:
        """The first call from index `after` on whose (row, event) `matches`."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                for job, event, _ in self.calls[after:]:
                    if matches(job, event):
                        return job, event
                self._changed.clear()
                await self._changed.wait()

    async def finished(self, job_id: str, after: int = 0) -> tuple[JobRow, Event]:
        return await self.wait_for(lambda j, e: j.id == job_id and isinstance(e, Result | Error), after)

    async def training_progress(self, job_id: str, after: int = 0) -> None:
        await self.wait_for(
            lambda j, e: j.id == job_id and isinstance(e, Progress) and e.phase == "training", after
        )

    def events_of(self, job_id: str) -> list[Event]:
        return [event for job, event, _ in self.calls if job.id == job_id]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, photos_dir: Path) -> Path:
    """Shared by the tests below (the model, the cached class images); each test has its own DB."""
    data_dir = tmp_path_factory.mktemp("queue-data")
    shutil.copytree(tiny_model_dir, data_dir / "models" / "tiny")
    (data_dir / "photos").mkdir()
    with Image.open(photos_dir / "astronaut.png") as opened:
        source = opened.convert("RGB")
    for index in range(3):
        box = (120 + 40 * index, 20, 380 + 40 * index, 280)
        source.crop(box).resize((64, 64), Image.Resampling.LANCZOS).save(data_dir / "photos" / f"{index}.png")
    return data_dir


def write_config(data_dir: Path, folder: Path, base: str = "tiny") -> Config:
    return load_config(write_engine_config(folder / "config.toml", data_dir, base=base))


@pytest.fixture
def config(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    # Workers inherit the environment: one thread each keeps a shared test machine from thrashing.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return write_config(data_dir, tmp_path)


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(tmp_path / "jobs.sqlite3")
    for user_id in (ALICE, BOB):
        database.ensure_user(user_id, f"user{user_id}")
    return database


def add_generate(db: Database, data_dir: Path, job_id: str, user_id: int = ALICE, steps: int = 4) -> JobRow:
    job = GenerateJob(
        job_id=job_id,
        prompt="a photo of an astronaut",
        output_dir=str(data_dir / "generations" / job_id),
        steps=steps,
        width=64,
        height=64,
    )
    return db.add_job(
        kind="generate", user_id=user_id, guild_id=1, channel_id=1, payload=encode(job), job_id=job_id
    )


def add_train(db: Database, data_dir: Path, job_id: str, steps: int, user_id: int = ALICE) -> JobRow:
    job = TrainJob(
        job_id=job_id,
        token="zwx",
        class_word="person",
        photos=[str(path) for path in sorted((data_dir / "photos").glob("*.png"))],
        output_dir=str(data_dir / "trained" / job_id),
        steps=steps,
    )
    return db.add_job(
        kind="train", user_id=user_id, guild_id=1, channel_id=1, payload=encode(job), job_id=job_id
    )

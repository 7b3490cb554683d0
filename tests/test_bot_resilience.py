"""The bot when things go wrong under it: a restart mid-training, an engine process killed mid-job,
files a crash left behind."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from botharness import (
    JOB_TIMEOUT,
    TRAIN_TIMEOUT,
    BotHarness,
    fake_discord,
    files_under,
    running_bot,
    start_training,
)
from fakediscord import FakeMessage

from bot.db import Database, JobRow, new_job_id
from bot.service import end_training, queue_training
from bot.storage import incoming_dir, photos_dir
from engine.contract.disk import DISK_FULL_MESSAGE
from engine.contract.protocol import Error

# Every test here starts an engine process (and the bot, where it runs one).
pytestmark = pytest.mark.slow

STEPS = 40
# Three selfies at 20 steps each, capped at STEPS: long enough to interrupt, short enough to finish.
TRAINING = {"steps_per_photo": 20, "max_steps": STEPS}


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def training_steps(message: FakeMessage, since: int = 0, total: int = STEPS) -> list[int]:
    """The training steps a progress message showed, from its `since`-th version on, in order."""
    versions = [*(entry["content"] for entry in message.history[since:]), message.content]
    return [int(found) for text in versions for found in re.findall(rf"Training: step (\d+)/{total}", text)]


async def ready_post(h: BotHarness, token: str) -> FakeMessage:
    return await h.fake.wait_message(
        h.general_channel_id, lambda m: f"your model **{token}** is ready" in m.content, timeout=TRAIN_TIMEOUT
    )


def test_a_training_in_flight_resumes_after_the_bot_restarts(tmp_path) -> None:
    async def scenario() -> None:
        async with running_bot(tmp_path, training={**TRAINING, "checkpoint_every": 1000}) as h:
            progress = await start_training(h, h.alice, "abraza")
            (job,) = h.db.active_jobs(h.alice)
            await h.fake.wait_until(lambda: training_steps(progress), timeout=JOB_TIMEOUT)

            # An operator restarts the bot: its engine worker stops with it, mid-training.
            await h.restart()
            seen = len(progress.history)

            done = await ready_post(h, "abraza")
            assert done.allowed_mentions == {"parse": [], "users": [h.alice]} and done.files
            assert h.db.job(job.id).state == "done"
            model = h.db.model_by_token(h.guild_id, "abraza")
            assert model is not None and model.state == "ready"
            # It went on from where it stopped (the stop saved a checkpoint), not from step 1.
            resumed = training_steps(progress, since=seen)
            assert resumed and resumed[0] > 1, resumed
            assert h.fake.errors == []

    run(scenario)


def test_a_killed_engine_is_replaced_and_its_job_retried_while_the_bot_keeps_answering(tmp_path) -> None:
    async def scenario() -> None:
        async with running_bot(tmp_path, training={**TRAINING, "checkpoint_every": 10}) as h:
            progress = await start_training(h, h.alice, "abraza")
            await h.fake.wait_until(lambda: training_steps(progress), timeout=JOB_TIMEOUT)
            (worker,) = h.bot.jobs.workers
            killed = worker.pid
            assert killed is not None
            os.kill(killed, signal.SIGKILL)

            # Commands are answered whatever the engine is doing.
            ix = await h.fake.slash(h.bob, h.general_channel_id, "help")
            assert (await ix.wait_original(timeout=10)).embeds

            done = await ready_post(h, "abraza")
            assert done.files
            assert worker.pid != killed
            (job,) = h.db.jobs_of(h.alice)
            assert job.state == "done" and job.attempts == 2
            assert h.fake.errors == []

    run(scenario)


def stopped_training(db: Database, h: BotHarness, token: str, error: Error) -> JobRow:
    """Alice's training of one photo, which the engine ended with `error`, as the bot wrote it down
    (JobQueue, then end_training)."""
    folder = photos_dir(h.config, error.job_id or "")
    folder.mkdir(parents=True)
    (folder / "00.png").write_bytes(b"png")
    db.ensure_user(h.alice, "alice")
    row = queue_training(
        db, h.config, guild_id=h.guild_id, user_id=h.alice, user_name="alice", channel_id=h.general_channel_id,
        token=token, class_word="person", job_id=folder.name, photos=[folder / "00.png"],
    )  # fmt: skip
    row = db.update_job(row.id, state="failed", error=error.message)
    end_training(db, h.config, row, error)
    return row


def test_a_start_sweeps_what_a_crash_left_and_keeps_photos_awaiting_a_retry(tmp_path) -> None:
    async def scenario() -> None:
        async with fake_discord(tmp_path) as h:
            db = Database.in_data_dir(h.config.data_dir)
            waiting = stopped_training(db, h, "abraza", Error(new_job_id(), DISK_FULL_MESSAGE, "disk_full"))
            failed = stopped_training(db, h, "zorvik", Error(new_job_id(), "why", "internal"))
            # The bot died before it deleted the failed one's photos, and in the middle of an intake.
            leftover = photos_dir(h.config, failed.id) / "00.png"
            leftover.parent.mkdir(parents=True)
            leftover.write_bytes(b"png")
            download = incoming_dir(h.config, new_job_id()) / "00"
            download.parent.mkdir(parents=True)
            download.write_bytes(b"jpeg")
            db.close()

            await h.start()
            try:
                kept = files_under(photos_dir(h.config, waiting.id))
                assert kept and files_under(h.data_dir / "photos") == kept
                assert files_under(h.data_dir / "incoming") == []
            finally:
                await h.stop()

    run(scenario)

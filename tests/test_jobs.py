"""The job queue: the dispatch policy on its own, then JobQueue with real engine workers (tiny model)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import types
from pathlib import Path

import pytest
from queueharness import ALICE, BOB, CAROL, TIMEOUT, Recorder, add_generate, add_train, write_config

from bot.db import Database, JobRow
from bot.jobs import (
    DROPPED_MESSAGE,
    MAX_ATTEMPTS,
    UNAVAILABLE_MESSAGE,
    EngineUnavailable,
    JobQueue,
    dispatch_order,
    plan_dispatch,
)
from bot.workers import EngineWorker, LocalPool, PoolSlots, SubprocessWorker, WorkerPool
from engine.contract.config import Config
from engine.contract.protocol import (
    Accepted,
    AdapterRef,
    Error,
    GenerateJob,
    GenerationDone,
    Progress,
    Result,
    encode,
)

# ---------------------------------------------------------------------------------------------
# The dispatch policy


def row(job_id: str, kind: str, user_id: int, created_at: float) -> JobRow:
    return JobRow.queued(job_id, kind, user_id, "", created_at)  # type: ignore[arg-type]


def ids(rows: list[JobRow]) -> list[str]:
    return [r.id for r in rows]


def test_generations_go_before_trainings() -> None:
    queued = [row("t1", "train", ALICE, 1), row("g1", "generate", BOB, 2), row("t2", "train", BOB, 3)]
    assert ids(dispatch_order(queued, {})) == ["g1", "t1", "t2"]


def test_members_take_turns() -> None:
    alice = [row(f"a{i}", "generate", ALICE, i) for i in range(10)]
    bob = [row("b0", "generate", BOB, 20)]
    queued = [*alice, *bob]

    # Nobody served yet: Alice's first job is the oldest, then Bob's one, then the rest of hers.
    assert ids(dispatch_order(queued, {})) == ["a0", "b0", *(f"a{i}" for i in range(1, 10))]
    # Alice was served more recently than Bob: Bob goes first.
    assert ids(dispatch_order(queued, {ALICE: 5, BOB: 2}))[:2] == ["b0", "a0"]
    # Never served goes before served.
    assert ids(dispatch_order(queued, {ALICE: 0}))[:2] == ["b0", "a0"]
    # Three members: turns go round all of them.
    carol = [row(f"c{i}", "generate", CAROL, 30 + i) for i in range(2)]
    assert ids(dispatch_order([*queued, *carol], {}))[:6] == ["a0", "b0", "c0", "a1", "c1", "a2"]


def test_plan_fills_free_slots_preferring_idle_workers() -> None:
    queued = [
        row("g1", "generate", ALICE, 1),
        row("g2", "generate", BOB, 2),
        row("t1", "train", ALICE, 3),
        row("t2", "train", BOB, 4),
    ]
    # One idle worker: one generation and one training (it interleaves them).
    assert [(i, r.id) for i, r in plan_dispatch(queued, {}, [{"train", "generate"}])] == [
        (0, "g1"),
        (0, "t1"),
    ]
    # Worker 0 is training, worker 1 idle: the generation goes to the idle one.
    plan = plan_dispatch(queued, {}, [{"generate"}, {"train", "generate"}])
    assert [(i, r.id) for i, r in plan] == [(1, "g1"), (0, "g2"), (1, "t1")]
    # Nothing free, nothing sent.
    assert plan_dispatch(queued, {}, [set(), set()]) == []


def generation_row(job_id: str, user_id: int, created_at: float, **values: object) -> JobRow:
    request = GenerateJob(job_id=job_id, prompt="a photo", output_dir="out", **values)  # type: ignore[arg-type]
    return dataclasses.replace(row(job_id, "generate", user_id, created_at), payload=encode(request))


def test_plan_prefers_the_least_busy_worker_then_one_holding_the_adapter() -> None:
    alfa = AdapterRef("alfa", "person", "alfa.safetensors")
    wanted = generation_row("a0", ALICE, 1, adapters=[alfa])
    three_idle = [{"train", "generate"}] * 3
    # Worker 0 renders a batch and holds alfa, workers 1 and 2 are idle and 2 holds alfa too.
    plan = plan_dispatch([wanted], {}, three_idle, busy=[1, 0, 0], holds=lambda index, _: index in (0, 2))
    assert [(i, r.id) for i, r in plan] == [(2, "a0")]
    # Only the busy one holds it: an idle GPU loading the adapter beats waiting for the batch.
    plan = plan_dispatch([wanted], {}, three_idle, busy=[1, 0, 0], holds=lambda index, _: index == 0)
    assert [(i, r.id) for i, r in plan] == [(1, "a0")]
    # Jobs planned in one round count: two generations that cannot share a batch go to two workers.
    other = generation_row("b0", BOB, 2, width=64, height=64)
    plan = plan_dispatch([wanted, other], {}, three_idle, busy=[1, 0, 0])
    assert sorted(i for i, _ in plan) == [1, 2]


def test_plan_batches_compatible_generations_in_dispatch_order() -> None:
    alfa = AdapterRef("alfa", "person", "alfa.safetensors")
    queued = [
        generation_row("a0", ALICE, 1, width=64, height=64, adapters=[alfa]),
        generation_row("a1", ALICE, 2, width=64, height=64, count=2),
        generation_row("b0", BOB, 3, width=64, height=64),
        generation_row("c0", CAROL, 4, width=128, height=128),
        generation_row("c1", CAROL, 5, width=64, height=64, seed=9),
        row("t1", "train", BOB, 6),
    ]
    # Turns: a0, b0, c0, a1, c1. The batch takes the compatible ones in that order, up to 4 images
    # (a1 has 2); c0 (another size) waits for the next slot.
    plan = plan_dispatch(queued, {}, [{"train", "generate"}], batch_limit=4)
    assert [(i, r.id) for i, r in plan] == [(0, "a0"), (0, "b0"), (0, "a1"), (0, "t1")]
    # A smaller limit: a1 no longer fits, c1 does; a second worker takes c0.
    plan = plan_dispatch(queued, {}, [{"generate"}, {"generate"}], batch_limit=3)
    assert [(i, r.id) for i, r in plan] == [(0, "a0"), (0, "b0"), (0, "c1"), (1, "c0")]
    # The default limit of one image: no batching.
    assert [r.id for _, r in plan_dispatch(queued, {}, [{"generate"}])] == ["a0"]
    # A variation never shares a batch.
    variation = generation_row("v0", ALICE, 0, width=64, height=64, init_image="x.png", strength=0.5)
    assert [r.id for _, r in plan_dispatch([variation, *queued], {}, [{"generate"}], batch_limit=8)] == ["v0"]


def test_a_worker_takes_the_next_batch_while_one_renders() -> None:
    worker = SubprocessWorker(Config(), "cpu")
    worker.ready = True
    worker.process = types.SimpleNamespace(returncode=None)  # type: ignore[assignment]
    running, waiting = row("g1", "generate", ALICE, 1), row("g2", "generate", BOB, 2)
    worker.in_flight = {"g1": running}
    assert worker.free_kinds() == {"train"}  # sent, not started: the next batch forms in the bot
    worker.accepted.add("g1")
    assert worker.free_kinds() == {"train", "generate"}
    worker.in_flight["g2"] = waiting
    assert worker.free_kinds() == {"train"}
    worker.in_flight["t1"] = row("t1", "train", ALICE, 3)
    worker.accepted.update({"g2", "t1"})
    assert worker.free_kinds() == {"generate"}


def test_a_worker_remembers_the_adapters_it_loaded_lately_as_its_adapter_cache_does() -> None:
    config = Config()
    worker = SubprocessWorker(config, "cpu")
    alfa = generation_row("a0", ALICE, 1, adapters=[AdapterRef("alfa", "person", "alfa.safetensors")])
    assert not worker.holds(alfa)
    worker.remember_adapters(["alfa"])
    assert worker.holds(alfa)
    # As many as its adapter cache keeps, least recently used out first.
    worker.remember_adapters(f"other{index}" for index in range(config.generation.adapter_cache))
    assert not worker.holds(alfa)
    assert not worker.holds(row("t1", "train", ALICE, 2))


# ---------------------------------------------------------------------------------------------
# JobQueue with a pool that gives no slot


class ScriptedPool(WorkerPool):
    """A pool whose readings the test hands over one by one; `hand` returns once the queue has dealt
    with the reading (it asks for the next one)."""

    poll_interval = 0.0

    def __init__(self) -> None:
        self.readings: asyncio.Queue[PoolSlots] = asyncio.Queue()
        self._handed = False

    async def hand(self, reading: PoolSlots) -> None:
        await self.readings.put(reading)
        await self.readings.join()

    async def slots(self) -> PoolSlots:
        if self._handed:
            self.readings.task_done()
        self._handed = True
        return await self.readings.get()

    def worker(self, slot: str) -> EngineWorker:
        raise AssertionError("a pool with no slot has no worker")

    async def close(self) -> None:
        return None


def test_a_pool_with_no_slot_is_logged_at_start_and_at_each_change_saying_why(
    tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pool = ScriptedPool()
    caplog.set_level(logging.INFO, logger="bot.jobs")
    why = "the cluster's nodes have no GPUs, and [engine] gpus_per_worker = 1: set it to 0 ..."

    def pool_lines() -> list[tuple[int, str]]:
        return [
            (record.levelno, record.getMessage())
            for record in caplog.records
            if record.getMessage().startswith("engine pool:")
        ]

    async def scenario() -> None:
        queue = JobQueue(db, write_config(tmp_path, tmp_path), on_event=Recorder(db), pool=pool)
        await queue.start()
        try:
            await pool.hand(PoolSlots((), 2, why))
            assert pool_lines() == [(logging.WARNING, f"engine pool: 0 slots on 2 nodes: {why}")]
            await pool.hand(PoolSlots((), 2, why))
            assert len(pool_lines()) == 1  # the same pool: not logged again
            await pool.hand(PoolSlots((), 3, why))
            assert pool_lines()[1:] == [(logging.WARNING, f"engine pool: 0 slots on 3 nodes: {why}")]
        finally:
            await queue.stop()

    asyncio.run(scenario())


def test_with_no_slot_for_a_while_the_waiting_jobs_fail_saying_so_and_new_ones_are_refused(
    tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = ScriptedPool()
    empty = PoolSlots((), 2, "the cluster's nodes have no GPUs, and [engine] gpus_per_worker = 1: ...")

    async def scenario() -> None:
        recorder = Recorder(db)
        queue = JobQueue(db, write_config(tmp_path, tmp_path), on_event=recorder, pool=pool)
        queue.unavailable_after = 3600.0
        await queue.start()
        try:
            await pool.hand(empty)
            # For a while an empty pool may be a machine restarting: jobs are taken and wait.
            assert queue.unavailable_message() is None
            queue.submit(add_generate(db, tmp_path, "waiting"))
            await pool.hand(empty)
            assert db.job("waiting").state == "queued"
            # Empty for unavailable_after: the waiting job fails saying so, and new ones are refused
            # (DreamBot.check_engine_available).
            queue.unavailable_after = 0.0
            assert queue.unavailable_message() == UNAVAILABLE_MESSAGE
            await pool.hand(empty)
            _, event = await recorder.finished("waiting")
            assert isinstance(event, Error) and event.message == UNAVAILABLE_MESSAGE
        finally:
            await queue.stop()

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------------------
# JobQueue with real workers


def kill_worker(queue: JobQueue) -> None:
    pid = queue.workers[0].pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_jobs_left_by_a_dead_bot_and_new_ones_run_with_rows_written_first(
    config: Config, db: Database, data_dir: Path
) -> None:
    # As a bot that died left them: one job queued, one running (sent to a worker once).
    add_generate(db, data_dir, "left-queued", user_id=ALICE)
    add_generate(db, data_dir, "left-running", user_id=BOB)
    db.update_job("left-running", state="running", attempts=1, started_at=1.0)

    async def scenario() -> None:
        recorder = Recorder(db)
        queue = JobQueue(db, config, on_event=recorder, pool=LocalPool(config))
        await queue.start()
        try:
            await queue.wait_ready(TIMEOUT)
            assert sum(worker.ready for worker in queue.workers) == 1
            new = add_generate(db, data_dir, "new", user_id=ALICE)
            queue.submit(new)
            for job_id in ("left-queued", "left-running", "new"):
                await recorder.finished(job_id)
        finally:
            await queue.stop()
        worker = queue.workers[0]
        assert worker.process is not None and worker.process.returncode == 0

        for job_id in ("left-queued", "left-running", "new"):
            final = db.job(job_id)
            assert final.state == "done", final
            assert final.started_at and final.finished_at and final.started_at <= final.finished_at
            assert final.error is None
            assert [Path(file).is_file() for file in final.result["files"]] == [True]
            assert final.result["seeds"] == [0]
            kinds = [type(event) for event in recorder.events_of(job_id)]
            assert kinds[0] is Accepted and kinds[-1] is GenerationDone and Progress in kinds
        assert db.job("left-running").attempts == 2
        assert db.job("new").attempts == 1
        # Every event reached on_event after its row was written, and with that very row.
        for job, event, stored in recorder.calls:
            assert job == stored
            expected = {Accepted: "running", Progress: "running", GenerationDone: "done"}[type(event)]
            assert job.state == expected, (event, job)
        result = next(e for e in recorder.events_of("new") if isinstance(e, GenerationDone))
        # The row holds the typed result, and reads back as the very event.
        assert db.job("new").outcome == result

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_job_whose_worker_is_killed_is_retried_once_and_completes(
    config: Config, db: Database, data_dir: Path
) -> None:
    async def scenario() -> None:
        recorder = Recorder(db)
        queue = JobQueue(db, config, on_event=recorder, pool=LocalPool(config))
        await queue.start()
        try:
            queue.submit(add_train(db, data_dir, "killed-once", steps=6))
            await recorder.training_progress("killed-once")
            first_pid = queue.workers[0].pid
            kill_worker(queue)
            _, event = await recorder.finished("killed-once")
            assert isinstance(event, Result), event
            assert queue.workers[0].pid != first_pid
        finally:
            await queue.stop()
        final = db.job("killed-once")
        assert final.state == "done"
        assert final.attempts == 2
        assert Path(final.result["adapter_path"]).is_file()
        assert final.result["steps"] == 6

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_job_killed_twice_is_dropped_and_the_queue_goes_on(
    config: Config, db: Database, data_dir: Path
) -> None:
    async def scenario() -> None:
        recorder = Recorder(db)
        queue = JobQueue(db, config, on_event=recorder, pool=LocalPool(config))
        await queue.start()
        try:
            queue.submit(add_train(db, data_dir, "killed-twice", steps=300))
            await recorder.training_progress("killed-twice")
            kill_worker(queue)
            # Retried on a new worker (the same job, attempt 2) ...
            await recorder.wait_for(
                lambda j, e: j.id == "killed-twice" and j.attempts == 2 and isinstance(e, Accepted)
            )
            await recorder.training_progress("killed-twice", after=len(recorder.calls) - 1)
            kill_worker(queue)
            job, event = await recorder.finished("killed-twice")
            # ... and dropped when that one dies too.
            assert isinstance(event, Error)
            assert event.message == DROPPED_MESSAGE
            assert job.state == "failed" and job.error == DROPPED_MESSAGE and job.attempts == MAX_ATTEMPTS

            queue.submit(add_generate(db, data_dir, "next"))
            _, event = await recorder.finished("next")
            assert isinstance(event, Result)
        finally:
            await queue.stop()
        assert db.job("killed-twice").state == "failed"
        assert db.job("next").state == "done"

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_job_handed_to_a_dying_engine_is_not_an_attempt(
    config: Config, db: Database, data_dir: Path
) -> None:
    async def scenario() -> None:
        recorder = Recorder(db)
        queue = JobQueue(db, config, on_event=recorder, pool=LocalPool(config))
        await queue.start()
        try:
            await queue.wait_ready(TIMEOUT)
            (worker,) = queue.workers
            assert worker.pid is not None
            # Frozen, then killed: the job line reaches a process that never reads it.
            os.kill(worker.pid, signal.SIGSTOP)
            queue.submit(add_train(db, data_dir, "unlucky", steps=30))
            async with asyncio.timeout(TIMEOUT):
                while db.job("unlucky").state != "running":
                    await asyncio.sleep(0.05)
            kill_worker(queue)

            # Its first real attempt, on the new engine, dies under it as well ...
            await recorder.wait_for(lambda j, e: j.id == "unlucky" and isinstance(e, Accepted))
            assert db.job("unlucky").attempts == 1
            await recorder.training_progress("unlucky")
            kill_worker(queue)
            # ... and it gets the second one it is owed, and finishes.
            _, event = await recorder.finished("unlucky")
            assert isinstance(event, Result), event
        finally:
            await queue.stop()
        final = db.job("unlucky")
        assert final.state == "done" and final.attempts == 2

    asyncio.run(scenario())


@pytest.mark.slow
def test_cancel_and_stop(config: Config, db: Database, data_dir: Path) -> None:
    async def scenario() -> None:
        recorder = Recorder(db)
        queue = JobQueue(db, config, on_event=recorder, pool=LocalPool(config))
        await queue.start()
        try:
            queue.submit(add_train(db, data_dir, "running", steps=500))
            await recorder.training_progress("running")
            # A worker runs one training at a time: the second one waits in the queue, though the queue
            # has dispatched since (a generation submitted after it went to that worker, and is done).
            queue.submit(add_train(db, data_dir, "queued", steps=5, user_id=BOB))
            queue.submit(add_generate(db, data_dir, "meanwhile", user_id=BOB))
            _, event = await recorder.finished("meanwhile")
            assert isinstance(event, Result), event
            assert db.job("queued").state == "queued"
            assert queue.position("queued") == 1
            assert queue.position("running") is None

            assert await queue.cancel("queued")
            assert db.job("queued").state == "cancelled"
            job, event = await recorder.finished("queued")
            assert isinstance(event, Error) and event.code == "cancelled" and job.state == "cancelled"
            assert queue.position("queued") is None

            assert await queue.cancel("running")
            job, event = await recorder.finished("running")
            assert isinstance(event, Error) and event.code == "cancelled"
            assert job.state == "cancelled" and db.job("running").state == "cancelled"
            assert not await queue.cancel("running")
            assert not await queue.cancel("no-such-job")

            # Stopping the bot mid-training leaves the job 'running' for the next start to re-run.
            queue.submit(add_train(db, data_dir, "in-flight", steps=500))
            await recorder.training_progress("in-flight")
        finally:
            await queue.stop()
        assert db.job("in-flight").state == "running"
        # Stopped, not crashed under: the attempt is given back for the run at the next start.
        assert db.job("in-flight").attempts == 0
        assert not any(isinstance(e, Result | Error) for e in recorder.events_of("in-flight"))
        process = queue.workers[0].process
        assert process is not None and process.returncode == 0

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_worker_that_cannot_load_its_model_fails_the_queued_jobs(
    db: Database,
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = write_config(data_dir, tmp_path, base=str(tmp_path / "no-such-model"))
    add_generate(db, data_dir, "doomed")

    async def scenario() -> None:
        recorder = Recorder(db)
        queue = JobQueue(db, config, on_event=recorder, pool=LocalPool(config))
        await queue.start()
        try:
            with pytest.raises(EngineUnavailable, match="no-such-model"):
                await queue.wait_ready(TIMEOUT)
            job, event = await recorder.finished("doomed")
            assert isinstance(event, Error) and event.code == "bad_model"
            # The admin's wait_ready names the path; the member's message says what, and no path.
            assert job.state == "failed" and job.error == (
                "The image engine cannot start: base model '(a file on the server)': no such folder or file"
            )
            # Submitted while the engine cannot start: failed at once, not kept waiting.
            queue.submit(add_generate(db, data_dir, "also-doomed"))
            _, event = await recorder.finished("also-doomed")
            assert isinstance(event, Error) and event.code == "bad_model"
            # Not restarted in a tight loop: one start, whose failure (logged before wait_ready
            # raised) put the next one a long delay away.
            failures = [
                record.getMessage()
                for record in caplog.records
                if record.name == "bot.jobs" and " cannot start: " in record.getMessage()
            ]
            assert len(failures) == 1, failures
            assert failures[0].endswith(f"(retrying every {queue.broken_retry_delay:.0f} s)")
            assert queue.workers[0].failed_starts == 1
            assert sum(worker.ready for worker in queue.workers) == 0
        finally:
            await queue.stop()

    asyncio.run(scenario())

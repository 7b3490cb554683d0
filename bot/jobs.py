"""The job queue: the bot's side of the engine workers.

Rows in the jobs table are the source of truth. A cog writes a job as 'queued' and calls `submit`;
the dispatcher sends queued jobs to the engine workers and writes every change of state to the row
before the cogs hear of it through `on_event`. A worker that dies is restarted, and the jobs it was
running are retried once; a bot that stops or dies leaves its running jobs 'running', and the next
start queues them again (trainings resume from their newest checkpoint).

Where the workers run is the pool's business, and the pool is the caller's choice (bot.pools picks it
by [engine] backend): `python -m engine` processes here, one per [model] device (bot.workers.LocalPool),
or Ray actors on every GPU of a cluster (bot.cluster.RayPool), whose number changes as machines join
and leave. The queue, its policy and the protocol events are the same for both.

This module starts processes and talks JSON lines to them: it must never import torch or diffusers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from bot.consent import generation_refusal
from bot.db import ACTIVE_JOB_STATES, Database, JobKind, JobRow
from bot.workers import EngineWorker, PoolSlots, WorkerPool
from engine.contract.config import Config
from engine.contract.protocol import (
    Accepted,
    CancelJob,
    Error,
    Event,
    GenerateJob,
    Progress,
    ProtocolError,
    Ready,
    Result,
    TrainingDone,
    TrainJob,
    named_paths,
)

log = logging.getLogger(__name__)

EventCallback = Callable[[JobRow, Event], Awaitable[None]]

# A job runs on a worker at most this often: once, and once more after the worker died under it.
# An attempt counts from the worker's Accepted: a job handed to a worker that was already dying
# never ran there.
MAX_ATTEMPTS = 2
DROPPED_MESSAGE = (
    "The image engine stopped while running this job twice, so it has been dropped. "
    "Try again later, or with fewer images or a smaller size."
)
CANCELLED_MESSAGE = "cancelled"
# No engine for JobQueue.unavailable_after: the cluster is unreachable, or none of its machines can
# run one as configured (the log says which). Either way the member can only wait.
UNAVAILABLE_MESSAGE = (
    "The image engine is unavailable: no machine that can run it is connected right now. Try again later."
)
# Generations first: they take seconds, trainings minutes.
DISPATCH_ORDER: tuple[JobKind, ...] = ("generate", "train")


class EngineUnavailable(RuntimeError):
    """Every engine worker failed to start for a reason a restart will not fix (e.g. a bad model)."""


# ---------------------------------------------------------------------------------------------
# The dispatch policy: pure functions of the queued rows, unit-tested on their own.


def dispatch_order(queued: Iterable[JobRow], last_served: Mapping[int, int]) -> list[JobRow]:
    """The queued jobs (given oldest first) in the order they are to be sent to a worker.

    Generations go before trainings (DISPATCH_ORDER). Within a kind, members take turns, the
    member served least recently first (`last_served`: member -> a counter that grows with each
    dispatch; never served goes first), so one member's ten jobs do not hold up everyone else's one.
    """
    rows = list(queued)
    order: list[JobRow] = []
    for kind in DISPATCH_ORDER:
        by_member: dict[int, list[JobRow]] = {}
        for row in rows:
            if row.kind == kind:
                by_member.setdefault(row.user_id, []).append(row)
        members = sorted(
            by_member, key=lambda member: (last_served.get(member, -1), by_member[member][0].created_at)
        )
        for turn in itertools.zip_longest(*(by_member[member] for member in members)):
            order.extend(row for row in turn if row is not None)
    return order


def _adapter_files(paths: Iterable[str | Path]) -> list[Path]:
    """The adapter weights among or under `paths` (a folder's are found wherever they lie in it)."""
    return [
        file
        for path in map(Path, paths)
        for file in ([path] if path.is_file() else sorted(path.rglob("*.safetensors")))
        if file.suffix == ".safetensors"
    ]


# An absolute path in what an engine says (a Ray node's engine may be a broken or hostile process).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/-])[~]?/(?:[\w.@+=-]+/)*[\w.@+=-]+/?")


STRAY_FILES_MESSAGE = (
    "the engine's answer named files that are not this job's, so I didn't use it (the bot's admin can "
    "see why in its log)"
)


def _outside_job_folder(paths: Iterable[str], row: JobRow) -> list[str]:
    """Those of `paths` that do not resolve (links followed) inside the job's own output folder."""
    folder = Path(row.request.output_dir).resolve()
    return [path for path in paths if not Path(path).resolve().is_relative_to(folder)]


def _without_paths(message: str) -> str:
    """An engine's message for a member, with any server path taken out (engines write none; this
    keeps it so whatever an engine sends)."""
    return _ABSOLUTE_PATH.sub("(a file on the server)", message)


def plan_dispatch(
    queued: Iterable[JobRow],
    last_served: Mapping[int, int],
    free: Sequence[Collection[JobKind]],
    batch_limit: int = 1,
    *,
    busy: Sequence[int] | None = None,
    holds: Callable[[int, JobRow], bool] | None = None,
) -> list[tuple[int, JobRow]]:
    """Which queued jobs to send now, as (worker index, job) pairs.

    `free[i]` holds the kinds worker i can take now: a worker runs at most one training and one
    batch of generations at a time (it interleaves the generations into the training), and takes
    the next batch while one renders. Each job goes to the least busy worker with a free slot for
    it (`busy[i]`: the jobs worker i has in flight), so an idle GPU is never passed over for one
    whose batch is rendering; among equally busy ones, to one that already holds the job's adapter
    (`holds(i, row)`: loading costs less than waiting for a batch, so it only breaks ties), then to
    the one with the most free slots. A free generation slot takes the next generation in dispatch order and, still in
    dispatch order, the generations that can share its batch (GenerateJob.batch_key), up to
    `batch_limit` images: members keep their turns, and the worker renders them as one batch.
    """
    slots = [set(kinds) for kinds in free]
    load = list(busy) if busy is not None else [0] * len(slots)
    plan: list[tuple[int, JobRow]] = []
    order = dispatch_order(queued, last_served)
    taken: set[str] = set()
    for position, row in enumerate(order):
        if row.id in taken:
            continue
        candidates = [index for index, kinds in enumerate(slots) if row.kind in kinds]
        if not candidates:
            continue
        index = max(candidates, key=lambda i: (-load[i], holds is not None and holds(i, row), len(slots[i])))
        slots[index].discard(row.kind)
        load[index] += 1
        plan.append((index, row))
        if row.kind == "generate":
            for companion in _batch_companions(row, order[position + 1 :], batch_limit):
                taken.add(companion.id)
                plan.append((index, companion))
    return plan


def _batch_companions(first: JobRow, later: Sequence[JobRow], batch_limit: int) -> list[JobRow]:
    """The generations of `later` (in order) that share `first`'s batch, up to `batch_limit` images."""
    try:
        job = first.request
    except ProtocolError:
        return []  # _send fails it with its own message
    if not isinstance(job, GenerateJob) or job.batch_key is None:
        return []
    companions, images = [], job.count
    for row in later:
        if row.kind != "generate":
            continue
        try:
            other = row.request
        except ProtocolError:
            continue
        if (
            isinstance(other, GenerateJob)
            and other.batch_key == job.batch_key
            and images + other.count <= batch_limit
        ):
            companions.append(row)
            images += other.count
    return companions


# ---------------------------------------------------------------------------------------------
# The queue


class JobQueue:
    # After a worker that was serving dies: it is restarted after this long.
    restart_delay = 1.0
    # A worker that dies before it is ready is retried after this, doubling up to the maximum ...
    start_backoff = 2.0
    start_backoff_max = 120.0
    # ... and one that said why it cannot start (a bad model path) only this often.
    broken_retry_delay = 600.0
    # How long stop() waits for a worker to checkpoint a training and exit before killing it. A
    # GPU training step is under 1 s and a checkpoint a few seconds; `docker stop` kills after 10 s,
    # which must also leave time to close the Discord connection.
    stop_timeout = 6.0
    # Then how long it waits for the supervisors to see their processes gone.
    stop_grace = 1.0
    # With no worker at all (every machine left the cluster, or none can run an engine) for this long,
    # queued jobs fail with UNAVAILABLE_MESSAGE and new ones are refused (DreamBot.check_engine_available)
    # instead of waiting for a machine that may never come.
    unavailable_after = 30.0

    def __init__(
        self,
        db: Database,
        config: Config,
        *,
        on_event: EventCallback,
        job_ids: Collection[str] | None = None,
        pool: WorkerPool,
    ) -> None:
        self.db = db
        self.config = config
        self._on_event = on_event
        # Only these jobs are recovered and dispatched: the CLI runs its one job this way and
        # leaves the rows of a bot that is not running alone.
        self._job_ids = None if job_ids is None else set(job_ids)
        self._pool = pool
        # The workers of the pool's current slots; a retired one leaves this at once, and its
        # supervisor ends once it has exited.
        self._workers: dict[str, EngineWorker] = {}
        self._empty_since: float | None = None
        # The pool as last logged: it is logged again when it changes.
        self._pool_logged: PoolSlots | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._changed = asyncio.Condition()
        self._last_served: dict[int, int] = {}
        self._serial = itertools.count()

    @property
    def workers(self) -> list[EngineWorker]:
        return list(self._workers.values())

    # -- the API the bot and the cogs use --------------------------------------------------------

    async def start(self) -> None:
        """Queue again what a previous bot left running, start the workers and the dispatcher."""
        if self._tasks:
            return
        self._stopping.clear()
        for row in self._active():
            if row.state == "running":
                log.info("job %s was running when the bot stopped: queued again", row.id)
                self.db.update_job(row.id, state="queued")
        self._tasks = [asyncio.create_task(self._dispatch_loop(), name="job dispatcher")]
        if self._pool.poll_interval is None:
            await self._refresh_pool()
        else:
            # Reaching a cluster can take a while (or fail for a long time): the bot starts meanwhile.
            self._tasks.append(asyncio.create_task(self._watch_pool(self._pool.poll_interval), name="pool"))
        self._wakeup.set()

    async def stop(self) -> None:
        """Shut the workers down; jobs in flight stay 'running' so that the next start re-runs them."""
        if not self._tasks:
            return
        self._stopping.set()
        self._wakeup.set()
        await asyncio.gather(*(worker.shutdown(self.stop_timeout) for worker in self.workers))
        # Supervisors return once their process has exited; one caught starting a new process
        # just now is cancelled, which kills and reaps that process.
        _, pending = await asyncio.wait(self._tasks, timeout=self.stop_grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._pool.close()
        # Being stopped is not the engine dying under a job: the interrupted ones get their attempt back.
        for worker in self.workers:
            for job_id in worker.accepted:
                row = self.db.find_job(job_id)
                if row is not None and row.state == "running":
                    self.db.update_job(job_id, attempts=row.attempts - 1)
            worker.accepted.clear()

    def submit(self, job: JobRow) -> None:
        """`job` is already written as 'queued': wake the dispatcher to send it when a slot is free."""
        log.debug("job %s (%s) submitted", job.id, job.kind)
        self._wakeup.set()

    def position(self, job_id: str) -> int | None:
        """1-based place of a queued job in the order jobs will be dispatched; None if not queued."""
        order = dispatch_order(self._queued(), self._last_served)
        return next((place for place, row in enumerate(order, start=1) if row.id == job_id), None)

    async def forget_adapters(self, paths: Iterable[str | Path]) -> None:
        """Before a model's files are deleted (/model delete, /forget): every engine drops the copies
        it keeps of the adapters among or under `paths` (a Ray node keeps them by content hash)."""
        files = await asyncio.to_thread(_adapter_files, paths)
        if files:
            await asyncio.gather(*(worker.forget_adapters(files) for worker in self.workers))

    def unavailable_message(self) -> str | None:
        """Why no job can run now, for the member: the pool has had no worker for `unavailable_after`
        seconds. None while jobs are taken (an empty pool for a shorter while may be a node restarting)."""
        if self._empty_since is not None and time.monotonic() - self._empty_since >= self.unavailable_after:
            return UNAVAILABLE_MESSAGE
        return None

    async def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False if it has already finished (or does not exist)."""
        row = self.db.find_job(job_id)
        if row is None or row.state not in ACTIVE_JOB_STATES:
            return False
        for worker in self.workers:
            if job_id in worker.in_flight:
                # The worker answers with an Error(code="cancelled") within a step.
                worker.cancelling.add(job_id)
                await worker.send(CancelJob(job_id))
                return True
        # Queued, or left 'running' by a previous bot and not yet queued again: not on any worker.
        await self._finish(row, Error(job_id, CANCELLED_MESSAGE, "cancelled"))
        return True

    async def wait_finished(self, job_ids: Iterable[str], timeout: float) -> None:
        """Wait (up to `timeout`, then TimeoutError) until none of the jobs is queued or running."""
        pending = set(job_ids)
        async with asyncio.timeout(timeout):
            while pending:
                pending = {
                    job_id
                    for job_id in pending
                    if (job := self.db.find_job(job_id)) is not None and job.state in ACTIVE_JOB_STATES
                }
                if pending:
                    await asyncio.sleep(0.2)

    async def wait_ready(self, timeout: float) -> None:
        """Wait until every worker has loaded its model (TimeoutError; EngineUnavailable if none can)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self._all_ready() or self._all_broken())
        if not self._all_ready():
            raise EngineUnavailable(self._broken_message())

    # -- workers -------------------------------------------------------------------------------

    async def _refresh_pool(self) -> None:
        """Start a worker for each new slot of the pool and retire those of slots that are gone."""
        slots = await self._pool.slots()
        if self._stopping.is_set():
            return
        if slots != self._pool_logged:
            # At start and at each change; with no slot, why, as a warning: nothing will run.
            (log.info if slots.names else log.warning)("engine pool: %s", slots)
            self._pool_logged = slots
        current = set(slots.names)
        joined = sorted(current - set(self._workers))
        left = sorted(set(self._workers) - current)
        retired = [self._workers.pop(slot) for slot in left]
        for worker in retired:
            log.warning("engine %s left the pool: its jobs go to the other workers", worker.name)
            # Its supervisor sees it end, queues its jobs again and stops.
            worker.retired = True
        await asyncio.gather(*(worker.kill() for worker in retired))
        for slot in joined:
            worker = self._workers[slot] = self._pool.worker(slot)
            self._tasks.append(asyncio.create_task(self._supervise(worker), name=f"engine {worker.name}"))
        if joined or left:
            self._tasks = [task for task in self._tasks if not task.done()]
            await self._notify_changed()
        if self._workers:
            self._empty_since = None
        else:
            self._empty_since = self._empty_since or time.monotonic()
            self._wakeup.set()  # fails the queued jobs once the pool has been empty long enough

    async def _watch_pool(self, interval: float) -> None:
        while not self._stopping.is_set():
            try:
                await self._refresh_pool()
            except Exception:
                log.exception("reading the engine pool failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)

    async def _supervise(self, worker: EngineWorker) -> None:
        """Run one worker for the life of the queue, restarting it when it dies, until it is retired."""
        while not self._stopping.is_set() and not worker.retired:
            try:
                status: int | None = await worker.run(self._handle_event)
            except OSError as error:
                log.error("could not start the engine for %s: %s", worker.name, error)
                status = None
            if self._stopping.is_set():
                return
            try:
                delay = await self._after_exit(worker, status)
                if worker.retired:
                    return
            except Exception:
                log.exception("cleaning up after engine %s failed", worker.name)
                delay = self.start_backoff_max
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _after_exit(self, worker: EngineWorker, status: int | None) -> float:
        """Deal with a worker that exited on its own; how long to wait before restarting it."""
        was_ready, worker.ready = worker.ready, False
        await self._notify_changed()
        for job_id in list(worker.in_flight):
            await self._requeue_or_drop(worker, job_id)
        worker.in_flight.clear()
        worker.accepted.clear()
        worker.cancelling.clear()
        worker.adapters.clear()
        if worker.retired:
            self._wakeup.set()
            return 0.0
        if was_ready:
            log.warning("engine %s exited (status %s): restarting it", worker.name, status)
            worker.failed_starts = 0
            self._wakeup.set()
            return self.restart_delay
        worker.failed_starts += 1
        if worker.start_error is not None:
            worker.broken = worker.start_error
            log.error(
                "engine %s cannot start: %s (retrying every %.0f s)",
                worker.name,
                worker.broken,
                self.broken_retry_delay,
            )
            await self._notify_changed()
            self._wakeup.set()  # fails the queued jobs when no worker is left to run them
            return self.broken_retry_delay
        delay = min(self.start_backoff * 2 ** (worker.failed_starts - 1), self.start_backoff_max)
        log.warning(
            "engine %s exited (status %s) before it was ready: retrying in %.0f s",
            worker.name,
            status,
            delay,
        )
        return delay

    async def _requeue_or_drop(self, worker: EngineWorker, job_id: str) -> None:
        row = self.db.find_job(job_id)
        if row is None or row.state not in ACTIVE_JOB_STATES:
            return
        if job_id in worker.cancelling:
            await self._finish(row, Error(job_id, CANCELLED_MESSAGE, "cancelled"))
        elif row.attempts >= MAX_ATTEMPTS:
            log.error("job %s: the engine died under it %d times: dropped", job_id, row.attempts)
            await self._finish(row, Error(job_id, DROPPED_MESSAGE, "internal"))
        else:
            log.warning("job %s: the engine died under it: queued again", job_id)
            self.db.update_job(job_id, state="queued")

    async def _handle_event(self, worker: EngineWorker, event: Event) -> None:
        """Write what an event means to the job's row, then tell the bot."""
        if isinstance(event, Ready):
            log.info("engine %s ready: %s on %s", worker.name, event.base_model, event.device)
            worker.ready, worker.broken, worker.failed_starts = True, None, 0
            await self._notify_changed()
            self._wakeup.set()
            return
        if event.job_id is None:
            assert isinstance(event, Error)
            if not worker.ready:
                # Why this start fails: said once, when the worker has exited (_after_exit).
                worker.start_error = event.message
            else:
                log.warning("engine %s: %s (%s)", worker.name, event.message, event.code)
            return
        row = worker.in_flight.get(event.job_id)
        if row is None:
            log.warning(
                "engine %s: %s event for job %s, which it was not given",
                worker.name,
                event.type,
                event.job_id,
            )
            return
        if self.db.find_job(row.id) is None:
            # Deleted meanwhile (a member asked to be forgotten): nobody is left to tell.
            if isinstance(event, Result | Error):
                del worker.in_flight[row.id]
                worker.accepted.discard(row.id)
            return
        if isinstance(event, Error):
            event = Error(event.job_id, _without_paths(event.message), event.code)
        paths = named_paths(event)
        if paths and (strays := await asyncio.to_thread(_outside_job_folder, paths, row)):
            # A broken engine, or a hostile one on a Ray node: the bot would post or delete them.
            log.error(
                "engine %s named files outside the folder of job %s: %s refused (%s)",
                worker.name, row.id, event.type, ", ".join(strays),
            )  # fmt: skip
            if isinstance(event, Progress):
                return
            if isinstance(event, Result):
                event = Error(row.id, STRAY_FILES_MESSAGE, "internal")
        refusal = generation_refusal(self.db, row)
        if refusal is not None and not (isinstance(event, Error) and event.code == "cancelled"):
            if isinstance(event, Progress):
                return  # its preview shows a face it may no longer show
            if isinstance(event, Result | Error):
                # Drawn, or failed because its model's file went: it fails saying why, and the
                # imagine cog deletes what was drawn.
                event = Error(row.id, refusal, "bad_adapter")
        if isinstance(event, Progress):
            await self._tell(row, event)
        elif isinstance(event, Accepted):
            row = self.db.update_job(row.id, started_at=time.time(), attempts=row.attempts + 1)
            worker.in_flight[row.id] = row
            worker.accepted.add(row.id)
            log.info(
                "job %s (%s) started on engine %s, attempt %d", row.id, row.kind, worker.name, row.attempts
            )
            await self._tell(row, event)
        elif isinstance(event, Result | Error):
            del worker.in_flight[row.id]
            worker.accepted.discard(row.id)
            worker.cancelling.discard(row.id)
            if isinstance(event, TrainingDone) and isinstance(job := row.request, TrainJob):
                worker.remember_adapters([job.token])
            self._wakeup.set()
            await self._finish(row, event)

    async def _finish(self, row: JobRow, event: Result | Error) -> None:
        if isinstance(event, Result):
            row = self.db.update_job(
                row.id,
                state="done",
                result={key: value for key, value in asdict(event).items() if key != "job_id"},
                error=None,
                finished_at=time.time(),
            )
        else:
            state = "cancelled" if event.code == "cancelled" else "failed"
            row = self.db.update_job(row.id, state=state, error=event.message, finished_at=time.time())
        await self._tell(row, event)

    async def _tell(self, row: JobRow, event: Event) -> None:
        try:
            await self._on_event(row, event)
        except Exception:
            # A cog's bug must not stop the queue from reading its workers.
            log.exception("the handler for %s of job %s failed", event.type, row.id)

    # -- dispatching -----------------------------------------------------------------------------

    def _active(self) -> list[JobRow]:
        rows = self.db.active_jobs()
        return rows if self._job_ids is None else [row for row in rows if row.id in self._job_ids]

    def _queued(self) -> list[JobRow]:
        return [row for row in self._active() if row.state == "queued"]

    async def _dispatch_loop(self) -> None:
        while not self._stopping.is_set():
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._stopping.is_set():
                return
            try:
                await self._dispatch()
            except Exception:
                log.exception("dispatching jobs failed")

    async def _dispatch(self) -> None:
        queued = self._queued()
        if not queued:
            return
        if self._all_broken():
            message = f"The image engine cannot start: {_without_paths(self._broken_message())}"
            for row in queued:
                await self._finish(row, Error(row.id, message, "bad_model"))
            return
        if (unavailable := self.unavailable_message()) is not None:
            for row in queued:
                await self._finish(row, Error(row.id, unavailable, "internal"))
            return
        workers = self.workers
        plan = plan_dispatch(
            queued,
            self._last_served,
            [worker.free_kinds() for worker in workers],
            self.config.generation.batch_limit,
            busy=[len(worker.in_flight) for worker in workers],
            holds=lambda index, row: workers[index].holds(row),
        )
        for index, row in plan:
            await self._send(workers[index], row)

    async def _send(self, worker: EngineWorker, row: JobRow) -> None:
        fresh = self.db.find_job(row.id)
        # Cancelled or deleted since the plan was made, the worker died, or the bot is stopping.
        if fresh is None or fresh.state != "queued" or not worker.ready or self._stopping.is_set():
            return
        try:
            job = fresh.request
        except ProtocolError as error:
            log.error("job %s has an unusable payload: %s", fresh.id, error)
            message = "This job could not be started (its stored request is unreadable)."
            await self._finish(fresh, Error(fresh.id, message, "internal"))
            return
        if (refusal := generation_refusal(self.db, fresh)) is not None:
            await self._finish(fresh, Error(fresh.id, refusal, "bad_adapter"))
            return
        # 'running' from now on, so it is not sent twice; the attempt counts once the worker accepts it.
        row = self.db.update_job(fresh.id, state="running")
        worker.in_flight[row.id] = row
        if isinstance(job, GenerateJob):
            worker.remember_adapters(adapter.token for adapter in job.adapters)
        self._last_served[row.user_id] = next(self._serial)
        log.debug("job %s (%s) -> engine %s", row.id, row.kind, worker.name)
        # A failed write means the worker is dying: its death queues the job again.
        await worker.send(job)

    # -- state ---------------------------------------------------------------------------------

    def _all_ready(self) -> bool:
        return bool(self._workers) and all(worker.ready for worker in self.workers)

    def _all_broken(self) -> bool:
        return bool(self._workers) and all(
            worker.broken is not None and not worker.ready for worker in self.workers
        )

    def _broken_message(self) -> str:
        return next((worker.broken for worker in self.workers if worker.broken), "no engine worker is ready")

    async def _notify_changed(self) -> None:
        async with self._changed:
            self._changed.notify_all()

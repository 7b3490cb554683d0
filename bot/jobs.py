"""The job queue: the bot's side of the engine workers.

Rows in the jobs table are the source of truth. A cog writes a job as 'queued' and calls `submit`;
the dispatcher sends queued jobs to the engine workers (`python -m engine`, one process per
configured device) and writes every change of state to the row before the cogs hear of it through
`on_event`. A worker that dies is restarted, and the jobs it was running are retried once; a bot
that stops or dies leaves its running jobs 'running', and the next start queues them again
(trainings resume from their newest checkpoint).

This module starts processes and talks JSON lines to them: it must never import torch or diffusers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict

from bot.db import ACTIVE_JOB_STATES, Database, JobKind, JobRow
from engine.config import Config
from engine.protocol import (
    Accepted,
    CancelJob,
    Error,
    Event,
    GenerateJob,
    Job,
    Progress,
    ProtocolError,
    Ready,
    Result,
    ShutdownJob,
    decode,
    encode,
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
# Events carry paths and metadata, never images, but a training's metadata can be long.
STDOUT_LINE_LIMIT = 16 * 1024 * 1024
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


def plan_dispatch(
    queued: Iterable[JobRow],
    last_served: Mapping[int, int],
    free: Sequence[Collection[JobKind]],
    batch_limit: int = 1,
) -> list[tuple[int, JobRow]]:
    """Which queued jobs to send now, as (worker index, job) pairs.

    `free[i]` holds the kinds worker i can take now: a worker runs at most one training and one
    batch of generations at a time (it interleaves the generations into the training). Each job
    goes to the worker with the most free slots, so an idle worker is preferred to one that is busy
    training. A free generation slot takes the next generation in dispatch order and, still in
    dispatch order, the generations that can share its batch (GenerateJob.batch_key), up to
    `batch_limit` images: members keep their turns, and the worker renders them as one batch.
    """
    slots = [set(kinds) for kinds in free]
    plan: list[tuple[int, JobRow]] = []
    order = dispatch_order(queued, last_served)
    taken: set[str] = set()
    for position, row in enumerate(order):
        if row.id in taken:
            continue
        candidates = [index for index, kinds in enumerate(slots) if row.kind in kinds]
        if not candidates:
            continue
        index = max(candidates, key=lambda i: len(slots[i]))
        slots[index].discard(row.kind)
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
# One engine process


class EngineWorker:
    """One `python -m engine` process for one device; the JobQueue restarts it when it dies."""

    def __init__(self, config: Config, device: str) -> None:
        self.config = config
        self.device = device
        self.process: asyncio.subprocess.Process | None = None
        self.ready = False
        # Jobs sent and not finished, with their rows as last written.
        self.in_flight: dict[str, JobRow] = {}
        # Those of them the worker has accepted, each counted as an attempt.
        self.accepted: set[str] = set()
        # Jobs a member cancelled while they ran: they end 'cancelled' even if the worker dies.
        self.cancelling: set[str] = set()
        # An error not about a job before Ready: this start failed for a reason stated there.
        self.start_error: str | None = None
        # Set while the last start failed with such an error, until a start succeeds.
        self.broken: str | None = None
        self.failed_starts = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def command(self) -> list[str]:
        config_args = ["--config", str(self.config.source)] if self.config.source else []
        return [sys.executable, "-m", "engine", *config_args, "--device", self.device]

    def free_kinds(self) -> set[JobKind]:
        if not (self.ready and self.alive):
            return set()
        busy = {row.kind for row in self.in_flight.values() if row.kind == "train"}
        # The next batch of generations may wait in the worker while one renders: it starts as
        # soon as that one ends, and jobs that arrive together are batched there (engine.worker).
        if any(row.kind == "generate" and row.id not in self.accepted for row in self.in_flight.values()):
            busy.add("generate")
        return set(DISPATCH_ORDER) - busy

    async def run(self, on_event: Callable[[EngineWorker, Event], Awaitable[None]]) -> int:
        """Start the process and hand each event to `on_event` until it exits; its exit status."""
        self.ready, self.start_error = False, None
        # A session of its own: a Ctrl-C meant for the bot must not kill the workers under it
        # (the bot shuts them down cleanly); stderr is inherited, the worker logs there.
        self.process = await asyncio.create_subprocess_exec(
            *self.command(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=STDOUT_LINE_LIMIT,
            start_new_session=True,
        )
        log.info("engine worker for %s started (pid %s)", self.device, self.process.pid)
        assert self.process.stdout is not None
        try:
            while line := await self.process.stdout.readline():
                try:
                    event = decode(line.decode("utf-8", errors="replace"))
                except ProtocolError as error:
                    log.warning("engine %s wrote a line that is not an event: %s", self.device, error)
                    continue
                try:
                    await on_event(self, event)
                except Exception:
                    # A failed database write must not stop the reading: the worker would block.
                    log.exception("handling %s from engine %s failed", event.type, self.device)
            return await self.process.wait()
        finally:
            # Cancelled (bot stopping) or failed: never leave a process behind unreaped.
            if self.process.returncode is None:
                self.kill()
                await self.process.wait()

    async def send(self, job: Job) -> None:
        """Write one job line; a dead process is left to the JobQueue, which sees it exit."""
        if not self.alive:
            return
        assert self.process is not None and self.process.stdin is not None
        try:
            self.process.stdin.write((encode(job) + "\n").encode())
            await self.process.stdin.drain()
        except (ConnectionError, RuntimeError) as error:
            log.warning("could not send %s to engine %s: %s", job.type, self.device, error)

    async def shutdown(self, timeout: float) -> None:
        """Ask the worker to stop, wait up to `timeout` seconds, then kill it."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        await self.send(ShutdownJob())
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            log.warning("engine %s did not stop within %.0f s: killing it", self.device, timeout)
            self.kill()
            await process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()


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

    def __init__(
        self,
        db: Database,
        config: Config,
        *,
        on_event: EventCallback,
        job_ids: Collection[str] | None = None,
    ) -> None:
        self.db = db
        self.config = config
        self._on_event = on_event
        # Only these jobs are recovered and dispatched: the CLI runs its one job this way and
        # leaves the rows of a bot that is not running alone.
        self._job_ids = None if job_ids is None else set(job_ids)
        self._workers: list[EngineWorker] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._changed = asyncio.Condition()
        self._last_served: dict[int, int] = {}
        self._serial = itertools.count()

    @property
    def workers(self) -> list[EngineWorker]:
        return list(self._workers)

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
        self._workers = [EngineWorker(self.config, device) for device in self.config.model.devices]
        self._tasks = [
            asyncio.create_task(self._supervise(worker), name=f"engine {worker.device}")
            for worker in self._workers
        ]
        self._tasks.append(asyncio.create_task(self._dispatch_loop(), name="job dispatcher"))
        self._wakeup.set()

    async def stop(self) -> None:
        """Shut the workers down; jobs in flight stay 'running' so that the next start re-runs them."""
        if not self._tasks:
            return
        self._stopping.set()
        self._wakeup.set()
        await asyncio.gather(*(worker.shutdown(self.stop_timeout) for worker in self._workers))
        # Supervisors return once their process has exited; one caught starting a new process
        # just now is cancelled, which kills and reaps that process.
        _, pending = await asyncio.wait(self._tasks, timeout=self.stop_grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        # Being stopped is not the engine dying under a job: the interrupted ones get their attempt back.
        for worker in self._workers:
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

    async def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False if it has already finished (or does not exist)."""
        row = self.db.find_job(job_id)
        if row is None or row.state not in ACTIVE_JOB_STATES:
            return False
        for worker in self._workers:
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

    async def _supervise(self, worker: EngineWorker) -> None:
        """Run one worker for the life of the queue, restarting it when it dies."""
        while not self._stopping.is_set():
            try:
                status: int | None = await worker.run(self._handle_event)
            except OSError as error:
                log.error("could not start the engine for %s: %s", worker.device, error)
                status = None
            if self._stopping.is_set():
                return
            try:
                delay = await self._after_exit(worker, status)
            except Exception:
                log.exception("cleaning up after engine %s failed", worker.device)
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
        if was_ready:
            log.warning("engine %s exited (status %s): restarting it", worker.device, status)
            worker.failed_starts = 0
            self._wakeup.set()
            return self.restart_delay
        worker.failed_starts += 1
        if worker.start_error is not None:
            worker.broken = worker.start_error
            log.error(
                "engine %s cannot start: %s (retrying every %.0f s)",
                worker.device,
                worker.broken,
                self.broken_retry_delay,
            )
            await self._notify_changed()
            self._wakeup.set()  # fails the queued jobs when no worker is left to run them
            return self.broken_retry_delay
        delay = min(self.start_backoff * 2 ** (worker.failed_starts - 1), self.start_backoff_max)
        log.warning(
            "engine %s exited (status %s) before it was ready: retrying in %.0f s",
            worker.device,
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
            log.info("engine %s ready: %s on %s", worker.device, event.base_model, event.device)
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
                log.warning("engine %s: %s (%s)", worker.device, event.message, event.code)
            return
        row = worker.in_flight.get(event.job_id)
        if row is None:
            log.warning(
                "engine %s: %s event for job %s, which it was not given",
                worker.device,
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
        if isinstance(event, Progress):
            await self._tell(row, event)
        elif isinstance(event, Accepted):
            row = self.db.update_job(row.id, started_at=time.time(), attempts=row.attempts + 1)
            worker.in_flight[row.id] = row
            worker.accepted.add(row.id)
            log.info(
                "job %s (%s) started on engine %s, attempt %d", row.id, row.kind, worker.device, row.attempts
            )
            await self._tell(row, event)
        elif isinstance(event, Result | Error):
            del worker.in_flight[row.id]
            worker.accepted.discard(row.id)
            worker.cancelling.discard(row.id)
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
            message = f"The image engine cannot start: {self._broken_message()}"
            for row in queued:
                await self._finish(row, Error(row.id, message, "bad_model"))
            return
        free = [worker.free_kinds() for worker in self._workers]
        batch_limit = self.config.generation.batch_limit
        for index, row in plan_dispatch(queued, self._last_served, free, batch_limit):
            await self._send(self._workers[index], row)

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
        # 'running' from now on, so it is not sent twice; the attempt counts once the worker accepts it.
        row = self.db.update_job(fresh.id, state="running")
        worker.in_flight[row.id] = row
        self._last_served[row.user_id] = next(self._serial)
        log.debug("job %s (%s) -> engine %s", row.id, row.kind, worker.device)
        # A failed write means the worker is dying: its death queues the job again.
        await worker.send(job)

    # -- state ---------------------------------------------------------------------------------

    def _all_ready(self) -> bool:
        return bool(self._workers) and all(worker.ready for worker in self._workers)

    def _all_broken(self) -> bool:
        return bool(self._workers) and all(
            worker.broken is not None and not worker.ready for worker in self._workers
        )

    def _broken_message(self) -> str:
        return next((worker.broken for worker in self._workers if worker.broken), "no engine worker is ready")

    async def _notify_changed(self) -> None:
        async with self._changed:
            self._changed.notify_all()

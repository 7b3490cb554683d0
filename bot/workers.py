"""The engine workers as the job queue (bot.jobs) sees them, and the pools they come from.

A worker is one engine the queue sends jobs to and hears events from: a `python -m engine` process
here (SubprocessWorker), or a Ray actor on a node (bot.cluster.RayWorker). A pool says which worker
slots there are now; the queue starts a worker for each and retires those of slots that are gone.

This module starts processes and talks JSON lines to them: it must never import torch or diffusers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from bot import forkserver
from bot.db import JobKind, JobRow
from engine.contract.config import Config
from engine.contract.protocol import (
    Event,
    GenerateJob,
    Job,
    ProtocolError,
    ShutdownJob,
    decode,
    encode,
)

log = logging.getLogger(__name__)

# Events carry paths and metadata, never images, but a training's metadata can be long.
STDOUT_LINE_LIMIT = 16 * 1024 * 1024


class EngineWorker(ABC):
    """One engine worker as the JobQueue sees it, whichever backend runs it. The queue keeps its
    bookkeeping here, restarts it when it dies, and stops doing so once it is retired (its machine
    left the cluster)."""

    def __init__(self, config: Config, name: str) -> None:
        self.config = config
        self.name = name
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
        self.retired = False
        # The members' tokens whose adapters it has loaded lately (as many as its adapter cache
        # keeps), most recent last: their generations are best sent here.
        self.adapters: OrderedDict[str, None] = OrderedDict()

    @property
    @abstractmethod
    def alive(self) -> bool: ...

    @abstractmethod
    async def run(self, on_event: Callable[[EngineWorker, Event], Awaitable[None]]) -> int | None:
        """Start the worker and hand each event to `on_event` until it ends; its exit status
        (None: it died without one)."""

    @abstractmethod
    async def send(self, job: Job) -> None:
        """Hand over one job; a dead worker is left to the JobQueue, which sees it end."""

    @abstractmethod
    async def shutdown(self, timeout: float) -> None:
        """Ask the worker to stop, wait up to `timeout` seconds, then kill it."""

    @abstractmethod
    async def kill(self) -> None:
        """Kill the worker at once; its run() then ends."""

    async def deliver(self, on_event: Callable[[EngineWorker, Event], Awaitable[None]], event: Event) -> None:
        try:
            await on_event(self, event)
        except Exception:
            # A failed database write must not stop the reading: the worker would block.
            log.exception("handling %s from engine %s failed", event.type, self.name)

    def free_kinds(self) -> set[JobKind]:
        if not (self.ready and self.alive):
            return set()
        busy = {row.kind for row in self.in_flight.values() if row.kind == "train"}
        # The next batch of generations may wait in the worker while one renders: it starts as
        # soon as that one ends, and jobs that arrive together are batched there (engine.worker).
        if any(row.kind == "generate" and row.id not in self.accepted for row in self.in_flight.values()):
            busy.add("generate")
        return set(get_args(JobKind)) - busy

    @abstractmethod
    async def forget_adapters(self, files: Sequence[Path]) -> None:
        """Drop this worker's own copies of these adapter files, which the bot is about to delete."""

    def holds(self, row: JobRow) -> bool:
        """Whether a generation's adapter is among those this worker loaded lately."""
        try:
            job = row.request
        except ProtocolError:
            return False
        return isinstance(job, GenerateJob) and any(
            adapter.token in self.adapters for adapter in job.adapters
        )

    def remember_adapters(self, tokens: Iterable[str]) -> None:
        for token in tokens:
            self.adapters[token] = None
            self.adapters.move_to_end(token)
        while len(self.adapters) > self.config.generation.adapter_cache:
            self.adapters.popitem(last=False)


class SubprocessWorker(EngineWorker):
    """One `python -m engine` process for one device ([engine] backend = "local"), forked from the
    engine's fork server (bot.forkserver) so that a restart does not import torch again."""

    def __init__(self, config: Config, device: str) -> None:
        super().__init__(config, device)
        self.device = device
        self.process: forkserver.ForkedProcess | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def arguments(self) -> list[str]:
        config_args = ["--config", str(self.config.source)] if self.config.source else []
        return [*config_args, "--device", self.device]

    async def run(self, on_event: Callable[[EngineWorker, Event], Awaitable[None]]) -> int:
        self.ready, self.start_error = False, None
        # A session of its own (a Ctrl-C meant for the bot must not kill the workers under it: the
        # bot shuts them down cleanly); stderr is the bot's, the worker logs there.
        self.process = await forkserver.spawn(self.arguments(), STDOUT_LINE_LIMIT)
        log.info("engine worker for %s started (pid %s)", self.device, self.process.pid)
        try:
            while line := await self.process.stdout.readline():
                try:
                    event = decode(line.decode("utf-8", errors="replace"))
                except ProtocolError as error:
                    log.warning("engine %s wrote a line that is not an event: %s", self.device, error)
                    continue
                await self.deliver(on_event, event)
            return await self.process.wait()
        finally:
            # Cancelled (bot stopping) or failed: never leave a process behind unreaped.
            if self.process.returncode is None:
                await self.kill()
                await self.process.wait()

    async def send(self, job: Job) -> None:
        if not self.alive:
            return
        assert self.process is not None and self.process.stdin is not None
        try:
            self.process.stdin.write((encode(job) + "\n").encode())
            await self.process.stdin.drain()
        except (ConnectionError, RuntimeError) as error:
            log.warning("could not send %s to engine %s: %s", job.type, self.device, error)

    async def shutdown(self, timeout: float) -> None:
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
            await self.kill()
            await process.wait()

    async def forget_adapters(self, files: Sequence[Path]) -> None:
        return None  # it reads the bot's own files and keeps no copy

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()


@dataclass(frozen=True)
class PoolSlots:
    """The worker slots a pool gives now, by name, the nodes (machines) it has, and why there is no
    slot when there is none: for the operator, who can change that."""

    names: tuple[str, ...]
    nodes: int
    shortage: str | None = None

    def __str__(self) -> str:
        counts = f"{len(self.names)} slots on {self.nodes} nodes"
        return counts if self.shortage is None else f"{counts}: {self.shortage}"


class WorkerPool(ABC):
    """Where the engine workers come from: the slots there are now, and a worker for each."""

    # How often the queue asks for the slots again (seconds); None: they never change.
    poll_interval: float | None = None

    @abstractmethod
    async def slots(self) -> PoolSlots:
        """The worker slots there are now (none, saying why, when the pool cannot be reached)."""

    @abstractmethod
    def worker(self, slot: str) -> EngineWorker: ...

    @abstractmethod
    async def close(self) -> None:
        """Release what the pool holds once every worker has stopped."""


class LocalPool(WorkerPool):
    """[engine] backend = "local": one `python -m engine` process per [model] device, here."""

    def __init__(self, config: Config) -> None:
        self.config = config

    async def slots(self) -> PoolSlots:
        return PoolSlots(tuple(str(index) for index in range(len(self.config.model.devices))), nodes=1)

    def worker(self, slot: str) -> EngineWorker:
        return SubprocessWorker(self.config, self.config.model.devices[int(slot)])

    async def close(self) -> None:
        """Nothing to release: each process is its worker's."""

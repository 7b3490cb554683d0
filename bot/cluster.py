"""Engine workers on a Ray cluster: `[engine] backend = "ray"` (README "More than one machine").

The bot is the Ray driver and stays light: it creates engine.ray_actor.EngineActor on the nodes and
never imports torch. One actor runs per `gpus_per_worker` GPUs of every node (per `cpus_per_worker`
CPUs with gpus_per_worker = 0), pinned to its node. The pool follows the cluster: the JobQueue asks
for its slots every few seconds, starts actors for new ones and retires those of nodes that left.
A cluster whose nodes give no slot (CPU-only nodes and gpus_per_worker = 1) says why in the log.
A node or actor that dies shows up within seconds as Ray's actor error on the pending
`next_events` call; the queue then retries its jobs on another actor. A cluster that cannot be
reached (its head restarted) empties the pool until a reconnect succeeds.

Every Ray call runs off the event loop, submitting an actor call too: Ray Client blocks a call for up
to its reconnection grace period (30 s) while the head is away, which on the loop would stall the
bot's answers and its Discord heartbeats as long.

Files travel with the messages (engine.ray_actor), so the bot's data_dir stays the one copy of
every photo, adapter, checkpoint and picture.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from bot.workers import EngineWorker, PoolSlots, WorkerPool
from engine.contract.actor import engine_actor_class
from engine.contract.config import Config, EngineSection
from engine.contract.protocol import (
    CHECKPOINTS_DIR,
    CancelJob,
    Event,
    GenerateJob,
    Job,
    ProtocolError,
    TrainingDone,
    TrainJob,
    decode,
    encode,
)
from engine.contract.transport import Parcel, Shipment, content_hash, write_atomically

log = logging.getLogger(__name__)

# One next_events call waits this long at most for an event.
EVENT_WAIT_SECONDS = 1.0
# How often the pool reads the cluster's nodes, and how long it waits for the head's port to answer.
POOL_POLL_SECONDS = 2.0
PROBE_SECONDS = 2.0
RemoteEngineActor = ray.remote(engine_actor_class())


def node_slots(node: Mapping[str, Any], engine: EngineSection) -> int:
    """How many engine actors a node (an entry of ray.nodes()) takes."""
    if not node.get("Alive"):
        return 0
    resources = node.get("Resources", {})
    by_cpu = int(resources.get("CPU", 0) // engine.cpus_per_worker)
    if engine.gpus_per_worker == 0:
        return by_cpu
    return min(int(resources.get("GPU", 0) // engine.gpus_per_worker), by_cpu)


def no_slot_reason(alive: Sequence[Mapping[str, Any]], engine: EngineSection) -> str:
    """Why the cluster's alive nodes give no engine slot (node_slots is 0 for each), for the operator."""
    if not alive:
        return "no node of the cluster is alive"
    gpus, cpus = engine.gpus_per_worker, engine.cpus_per_worker
    most_gpus = max(node.get("Resources", {}).get("GPU", 0) for node in alive)
    most_cpus = max(node.get("Resources", {}).get("CPU", 0) for node in alive)
    if gpus and not most_gpus:
        return (
            f"the cluster's nodes have no GPUs, and [engine] gpus_per_worker = {gpus:g}: set it to 0 to "
            "run engines on CPUs, or join GPU machines to the cluster"
        )
    if most_gpus < gpus:
        return f"no node has as many GPUs as [engine] gpus_per_worker = {gpus:g} (the most on one: {most_gpus:g})"
    if most_cpus < cpus:
        return f"no node has as many CPUs as [engine] cpus_per_worker = {cpus:g} (the most on one: {most_cpus:g})"
    return (
        f"no node has both as many GPUs as [engine] gpus_per_worker = {gpus:g} and as many CPUs as "
        f"cpus_per_worker = {cpus:g}"
    )


class RayPool(WorkerPool):
    poll_interval = POOL_POLL_SECONDS

    def __init__(self, config: Config) -> None:
        self.config = config
        self._connected = False
        # Said once per outage, not at every poll.
        self._unreachable_said = False

    async def slots(self) -> PoolSlots:
        address = self.config.engine.ray_address
        try:
            if not self._connected:
                await asyncio.to_thread(self._connect)
            nodes = await asyncio.to_thread(ray.nodes)
        except Exception as error:  # ConnectionError, RaySystemError, gRPC errors: all mean unreachable
            if not self._unreachable_said:
                log.warning("the Ray cluster at %s cannot be reached (%s): retrying", address, error)
                self._unreachable_said = True
            self._connected = False
            await asyncio.to_thread(ray.shutdown)
            return PoolSlots((), 0, f"the Ray cluster at {address} cannot be reached")
        self._unreachable_said = False
        engine = self.config.engine
        alive = [node for node in nodes if node.get("Alive")]
        names = tuple(
            f"{node['NodeID']}/{index}" for node in alive for index in range(node_slots(node, engine))
        )
        return PoolSlots(names, len(alive), None if names else no_slot_reason(alive, engine))

    def _connect(self) -> None:
        address = self.config.engine.ray_address
        # ray.init retries for up to a minute against a head that is down; a refused port says so
        # at once, so a head that comes back is found at the next poll.
        if (endpoint := _host_and_port(address)) is not None:
            socket.create_connection(endpoint, timeout=PROBE_SECONDS).close()
        ray.init(address=address, namespace="dreambot", configure_logging=False)
        self._connected = True
        log.info("connected to the Ray cluster at %s", address)

    def worker(self, slot: str) -> EngineWorker:
        node_id, index = slot.split("/")
        return RayWorker(self.config, node_id, int(index))

    async def close(self) -> None:
        if self._connected:
            await asyncio.to_thread(ray.shutdown)
            self._connected = False


class RayWorker(EngineWorker):
    """One EngineActor pinned to one node; a new actor on each (re)start."""

    def __init__(self, config: Config, node_id: str, index: int) -> None:
        super().__init__(config, f"{node_id[:8]}/{index}")
        self.node_id = node_id
        self.actor: Any = None
        # Content hashes of the adapters the node holds, as far as the bot knows (the actor says
        # which it lacks, so a wrong guess costs one more call, never a failed job).
        self.node_adapters: set[str] = set()
        self._hashes: dict[tuple[str, int, int], str] = {}
        # Set once run() has read the actor's last shipment (after a shutdown: its checkpoints).
        self._drained = asyncio.Event()

    @property
    def alive(self) -> bool:
        return self.actor is not None

    async def run(self, on_event: Callable[[EngineWorker, Event], Awaitable[None]]) -> int | None:
        self.ready, self.start_error = False, None
        self._drained.clear()
        try:
            self.actor = await asyncio.to_thread(self._create_actor)
            log.info("engine actor %s starting on node %s", self.name, self.node_id)
            while True:
                shipments, closed = await _call(self.actor.next_events, EVENT_WAIT_SECONDS)
                for shipment in shipments:
                    await self._receive(shipment, on_event)
                if closed:
                    self._drained.set()
                    return 0
        except RayActorError as error:
            if error.actor_init_failed and not self.ready:
                # The node cannot run the engine at all (dreambot or torch missing there). Members
                # read start_error: the exception stays in the log.
                log.error("engine %s could not start: %s", self.name, _last_line(error))
                self.start_error = (
                    f"the engine could not start on node {self.node_id[:8]} (the bot's log says why)"
                )
            log.warning("engine %s died: %s", self.name, _first_line(error))
            return None
        except RayError as error:
            log.warning("engine %s is unreachable: %s", self.name, _first_line(error))
            return None
        finally:
            # Killed for sure, so that a node that was only cut off never posts a second result.
            await self.kill()
            self.actor = None

    def _create_actor(self) -> Any:
        engine = self.config.engine
        return RemoteEngineActor.options(
            num_cpus=engine.cpus_per_worker,
            num_gpus=engine.gpus_per_worker,
            # next_events waits while jobs and cancels come in.
            max_concurrency=4,
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.node_id, soft=False),
        ).remote(self.config, str(self.config.data_dir), "cpu" if engine.gpus_per_worker == 0 else "auto")

    async def _receive(
        self, shipment: Shipment, on_event: Callable[[EngineWorker, Event], Awaitable[None]]
    ) -> None:
        try:
            event = None if shipment.event is None else decode(shipment.event)
        except ProtocolError as error:
            log.warning("engine %s sent something that is not an event: %s", self.name, error)
            return
        # A node is another machine: its files land only in the folder of the job they are about
        # (a checkpoint sent alone: of a job this worker holds), wherever it says they go.
        about = getattr(event, "job_id", None)
        folders = [
            Path(row.request.output_dir) for job_id, row in self.in_flight.items() if about in (None, job_id)
        ]
        await asyncio.to_thread(store_shipment, self.config.data_dir, shipment, folders)
        if event is None:
            return
        if isinstance(event, TrainingDone) and (
            digest := await asyncio.to_thread(self._trained, event, shipment)
        ):
            self.node_adapters.add(digest)
        await self.deliver(on_event, event)

    def _trained(self, event: TrainingDone, shipment: Shipment) -> str | None:
        """After a training: delete the bot's copy of its checkpoints, from the folder of the job this
        worker holds (not where the event says), as the training deleted them; the content hash of the
        adapter the node now holds, if it came with the shipment."""
        if (row := self.in_flight.get(event.job_id)) is not None:
            shutil.rmtree(Path(row.request.output_dir) / CHECKPOINTS_DIR, ignore_errors=True)
        adapter = shipment.files.get(_relative(self.config.data_dir, event.adapter_path) or "")
        return None if adapter is None else content_hash(adapter)

    async def send(self, job: Job) -> None:
        actor = self.actor
        if actor is None:
            return
        try:
            if isinstance(job, TrainJob | GenerateJob):
                parcel = await asyncio.to_thread(self._parcel, job, self.node_adapters)
                missing = await _call(actor.submit, encode(job), parcel)
                if missing:
                    self.node_adapters.difference_update(missing)
                    parcel = await asyncio.to_thread(self._parcel, job, set())
                    await _call(actor.submit, encode(job), parcel)
                self.node_adapters.update(parcel.adapters.values())
            elif isinstance(job, CancelJob):
                await _call(actor.cancel, job.job_id)
            else:
                await _call(actor.shutdown, 0)
        except RayError as error:
            # A dying actor: run() sees it end and the queue retries the job.
            log.warning("could not send %s to engine %s: %s", job.type, self.name, _first_line(error))

    def _parcel(self, job: TrainJob | GenerateJob, node_adapters: set[str]) -> Parcel:
        """The files `job` reads, from the bot's data_dir: adapters by hash, bytes for those the
        node lacks. A file that cannot be read is left out: the engine then fails the job saying
        which one is missing, as it does on one machine."""
        paths: list[str] = []
        adapters: dict[str, str] = {}
        blobs: dict[str, bytes] = {}
        if isinstance(job, TrainJob):
            paths = list(job.photos)
            if job.resume:
                paths += _newest_checkpoint(Path(job.output_dir))
        else:
            paths = [] if job.init_image is None else [job.init_image]
            for adapter in job.adapters:
                relative = _relative(self.config.data_dir, adapter.path)
                if relative is None:
                    continue
                with contextlib.suppress(OSError):
                    digest, data = self._digest(adapter.path)
                    if digest not in node_adapters:
                        blobs[digest] = data if data is not None else Path(adapter.path).read_bytes()
                    adapters[relative] = digest
        files = {}
        for path in paths:
            relative = _relative(self.config.data_dir, path)
            if relative is not None:
                with contextlib.suppress(OSError):
                    files[relative] = Path(path).read_bytes()
        return Parcel(files, adapters, blobs)

    def _digest(self, path: str) -> tuple[str, bytes | None]:
        """The content hash of the file at `path`, and its bytes when they had to be read for it
        (a file unchanged since it was last hashed is not read again)."""
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key in self._hashes:
            return self._hashes[key], None
        data = Path(path).read_bytes()
        self._hashes[key] = content_hash(data)
        return self._hashes[key], data

    def _digests(self, files: Sequence[Path]) -> set[str]:
        digests = set()
        for file in files:
            with contextlib.suppress(OSError):  # gone already: nothing of it to find on a node
                digests.add(self._digest(str(file))[0])
        return digests

    async def forget_adapters(self, files: Sequence[Path]) -> None:
        digests = await asyncio.to_thread(self._digests, files)
        self.node_adapters -= digests
        if self.actor is None or not digests:
            return
        try:
            await _call(self.actor.forget_adapters, sorted(digests))
        except RayError as error:
            log.warning(
                "engine %s could not delete its copies of adapters: %s", self.name, _first_line(error)
            )

    async def shutdown(self, timeout: float) -> None:
        actor = self.actor
        if actor is None:
            return
        try:
            # The actor stops its jobs and ships their checkpoints; run() then stores them and ends.
            async with asyncio.timeout(timeout):
                await _call(actor.shutdown, max(timeout - 1, 0.5))
                await self._drained.wait()
        except (TimeoutError, RayError) as error:
            log.warning("engine %s did not stop within %.0f s (%s): killing it", self.name, timeout, error)
            await self.kill()

    async def kill(self) -> None:
        if self.actor is not None:
            await asyncio.to_thread(_kill_actor, self.actor)


async def _call(method: Any, *args: Any) -> Any:
    """What an actor method returns. Making the call blocks (Ray Client waits up to its reconnection
    grace period, 30 s, for a head that went away, and sends a parcel whole), so not on the loop."""
    return await (await asyncio.to_thread(method.remote, *args))


def _kill_actor(actor: Any) -> None:
    # After ray.shutdown (the cluster went away) the actor went with the connection, and ray.kill
    # would start a Ray of its own on this machine to find it.
    if ray.is_initialized():
        # Gone already, or the cluster is: nothing is left to kill.
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)


def store_shipment(data_dir: Path, shipment: Shipment, folders: Sequence[Path]) -> None:
    """Write a shipment's files into the data dir, those inside one of `folders` (its jobs' output
    folders) only; a checkpoint lands whole or not at all, and the older ones beside it go, as
    engine.train keeps them."""
    allowed = [folder.resolve() for folder in folders]

    def target_of(relative: str) -> Path | None:
        target = _inside(data_dir, relative)
        return target if target is not None and any(target.is_relative_to(f) for f in allowed) else None

    checkpoint = None if shipment.checkpoint is None else target_of(shipment.checkpoint)
    partial = None if checkpoint is None else checkpoint.with_name(f".partial-{checkpoint.name}")
    for relative, data in shipment.files.items():
        target = target_of(relative)
        if target is None:
            log.error("ignored a file from the engine outside its jobs' folders: %s", relative)
            continue
        if checkpoint is not None and partial is not None and target.parent == checkpoint:
            target = partial / target.name
        write_atomically(target, data)
    if checkpoint is None or partial is None or not partial.is_dir():
        return
    shutil.rmtree(checkpoint, ignore_errors=True)
    os.replace(partial, checkpoint)
    for older in checkpoint.parent.glob("step-*"):
        if older != checkpoint:
            shutil.rmtree(older, ignore_errors=True)


def _host_and_port(address: str) -> tuple[str, int] | None:
    """The head's (host, port) in "HOST:PORT" or "ray://HOST:PORT"; None for "auto"."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


def _newest_checkpoint(output_dir: Path) -> list[str]:
    folder = output_dir / CHECKPOINTS_DIR
    newest = max(folder.glob("step-*"), default=None) if folder.is_dir() else None
    try:
        return [] if newest is None else [str(path) for path in newest.iterdir() if path.is_file()]
    except OSError:  # replaced meanwhile: the training starts over rather than not at all
        return []


def _relative(data_dir: Path, path: str) -> str | None:
    resolved = Path(path).expanduser().resolve()
    return str(resolved.relative_to(data_dir)) if resolved.is_relative_to(data_dir) else None


def _inside(data_dir: Path, relative: str) -> Path | None:
    target = (data_dir / relative).resolve()
    return target if target.is_relative_to(data_dir) else None


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _last_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__

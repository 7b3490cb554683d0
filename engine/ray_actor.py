"""An engine worker as a Ray actor, for `[engine] backend = "ray"` (bot.cluster drives it).

Inside runs the same Worker as in `python -m engine`; only the channel differs. The bot keeps the
one copy of every file in its data_dir, so files travel with the messages: a job arrives with its
photos, init image and newest checkpoint as bytes, and its adapters by content hash (the bytes only
when this node does not hold them yet); each event leaves with the files it names. Paths in the
messages are the bot's; the actor keeps its copies at the same place relative to its node's folder
(under the system temp dir), where the node's class images and adapters stay cached for later jobs.
A job's other copies are deleted when it ends.

Checkpoints go back as they are written, so a training whose node dies resumes elsewhere from the
newest one the bot has received.

The bot imports this module to create the actor: it imports neither torch nor ray until the actor
starts on its node.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.contract.config import Config
from engine.contract.protocol import (
    CHECKPOINTS_DIR,
    LOG_FORMAT,
    CancelJob,
    Error,
    Event,
    GenerateJob,
    GenerationDone,
    Progress,
    ProtocolError,
    TrainingDone,
    TrainJob,
    decode,
    encode,
)
from engine.contract.transport import Parcel, Shipment, content_hash, write_atomically

if TYPE_CHECKING:
    from engine.worker import Worker

log = logging.getLogger("engine.ray_actor")

# Under the node's folder: adapters by content hash, shared by the node's actors.
ADAPTER_STORE = "ray-adapters"


@dataclass
class _HeldJob:
    output_dir: Path
    written: list[Path]
    training: bool
    shipped_checkpoint: str | None = None


class EngineActor:
    """Started by bot.cluster with the bot's Config and data_dir; one per GPU (or CPU slot)."""

    def __init__(self, config: Config, bot_data_dir: str, device: str) -> None:
        import ray  # the node's Ray, present wherever this actor can start

        from engine.worker import start_worker

        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, force=True)
        self.bot_data_dir = Path(bot_data_dir)
        node = ray.get_runtime_context().get_node_id()
        self.root = Path(tempfile.gettempdir()) / "dreambot-ray" / node[:16]
        self.root.mkdir(parents=True, exist_ok=True)
        storage = dataclasses.replace(config.storage, data_dir=str(self.root))
        self.config = dataclasses.replace(config, storage=storage, source=None)
        self._state = threading.Condition()
        self._outbox: list[Shipment] = []
        self._closed = False
        self._jobs: dict[str, _HeldJob] = {}
        self._gpu: threading.Thread | None = None
        self.worker: Worker | None = start_worker(self.config, device, self._on_event)
        if self.worker is None:
            self._close()
        else:
            self._gpu = threading.Thread(target=self.worker.run_gpu, name="gpu", daemon=True)
            self._gpu.start()

    # -- called by the bot ---------------------------------------------------------------------

    def submit(self, line: str, parcel: Parcel) -> list[str]:
        """Queue one job; the adapter hashes the node lacks instead (nothing queued: send their bytes)."""
        assert self.worker is not None
        try:
            job = decode(line)
        except ProtocolError:
            self.worker.handle_line(line)  # emits the Error that says what is wrong
            return []
        if not isinstance(job, TrainJob | GenerateJob):
            self.worker.handle(job)
            return []
        missing = [
            digest
            for digest in parcel.adapters.values()
            if digest not in parcel.blobs and not self._adapter_file(digest).is_file()
        ]
        if missing:
            return missing
        written: list[Path] = []
        try:
            for digest, data in parcel.blobs.items():
                write_atomically(self._adapter_file(digest), data)
            for relative, data in parcel.files.items():
                path = self.root / relative
                write_atomically(path, data)
                written.append(path)
        except OSError as error:  # a full or read-only disk on this node: the job fails, the queue goes on
            for path in written:
                path.unlink(missing_ok=True)
            self._ship(
                Shipment(
                    encode(Error(job.job_id, f"the engine machine could not store the job's files ({error})"))
                )
            )
            return []
        local = self._localised(job, parcel)
        with self._state:
            self._jobs[job.job_id] = _HeldJob(Path(local.output_dir), written, isinstance(job, TrainJob))
        self.worker.handle(local)
        return []

    def cancel(self, job_id: str) -> None:
        assert self.worker is not None
        self.worker.handle(CancelJob(job_id))

    def forget_adapters(self, digests: list[str]) -> None:
        """Delete this node's copies of these adapters: their model was deleted, or its member forgot."""
        for digest in digests:
            if re.fullmatch(r"[0-9a-f]{64}", digest):  # a content hash, never a path
                self._adapter_file(digest).unlink(missing_ok=True)

    def next_events(self, timeout: float) -> tuple[list[Shipment], bool]:
        """The shipments since the last call, waiting up to `timeout` s for one; and whether the
        actor has stopped (nothing more will come)."""
        with self._state:
            self._state.wait_for(lambda: self._outbox or self._closed, timeout)
            shipments, self._outbox = self._outbox, []
            return shipments, self._closed

    def shutdown(self, timeout: float) -> None:
        """Stop the running jobs at their next step, as `python -m engine` does on a shutdown job,
        and ship the checkpoints they leave for the resume."""
        if self.worker is not None:
            self.worker.close()
        if self._gpu is not None:
            self._gpu.join(timeout)
        with self._state:
            held = list(self._jobs.items())
        for job_id, job in held:
            if job.training:
                files, checkpoint = self._new_checkpoint(job)
                if checkpoint is not None:
                    log.info("job %s interrupted: its checkpoint goes back to the bot", job_id)
                    self._ship(Shipment(None, files, checkpoint))
        self._close()

    # -- events --------------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        """The Worker's emit: the event with the bot's paths, its files and any new checkpoint."""
        job_id = getattr(event, "job_id", None)
        with self._state:
            held = self._jobs.get(job_id) if job_id is not None else None
        files: dict[str, bytes] = {}
        checkpoint = None
        if held is not None and held.training:
            files, checkpoint = self._new_checkpoint(held)
        event = self._shipped(event, files)
        finished = isinstance(event, TrainingDone | GenerationDone | Error)
        if held is not None and finished:
            if isinstance(event, TrainingDone):
                # The node keeps the new adapter: generations with it are best routed here.
                adapter = files[self._relative_to_bot(event.adapter_path)]
                write_atomically(self._adapter_file(content_hash(adapter)), adapter)
            self._forget(job_id)
        self._ship(Shipment(encode(event), files, checkpoint))

    def _shipped(self, event: Event, files: dict[str, bytes]) -> Event:
        """`event` with the bot's paths; the files it names are read into `files`."""

        def ship(path: str) -> str:
            relative = self._relative(self.root / path)
            files[relative] = (self.root / relative).read_bytes()
            return str(self.bot_data_dir / relative)

        if isinstance(event, Progress) and event.preview is not None:
            return dataclasses.replace(event, preview=ship(event.preview))
        if isinstance(event, GenerationDone):
            return dataclasses.replace(event, files=[ship(path) for path in event.files])
        if isinstance(event, TrainingDone):
            return dataclasses.replace(
                event,
                files=[ship(path) for path in event.files],
                adapter_path=ship(event.adapter_path),
                metadata_path=ship(event.metadata_path),
            )
        return event

    def _new_checkpoint(self, job: _HeldJob) -> tuple[dict[str, bytes], str | None]:
        """The training's newest checkpoint, if the bot does not have it yet."""
        folder = job.output_dir / CHECKPOINTS_DIR
        newest = max(folder.glob("step-*"), default=None) if folder.is_dir() else None
        if newest is None or newest.name == job.shipped_checkpoint:
            return {}, None
        try:
            files = {self._relative(path): path.read_bytes() for path in newest.iterdir() if path.is_file()}
        except OSError:  # replaced by a newer one while being read: that one goes with the next event
            return {}, None
        job.shipped_checkpoint = newest.name
        return files, self._relative(newest)

    def _ship(self, shipment: Shipment) -> None:
        with self._state:
            self._outbox.append(shipment)
            self._state.notify_all()

    def _close(self) -> None:
        with self._state:
            self._closed = True
            self._state.notify_all()

    # -- paths ---------------------------------------------------------------------------------

    def _relative(self, path: Path) -> str:
        return str(path.resolve().relative_to(self.root.resolve()))

    def _local(self, bot_path: str) -> str:
        """Where the node keeps the file the bot has at `bot_path`. A path outside the bot's data dir
        is left as it is, so that the Worker refuses it as outside its own."""
        path = Path(bot_path)
        if not path.is_relative_to(self.bot_data_dir):
            return bot_path
        return str(self.root / path.relative_to(self.bot_data_dir))

    def _adapter_file(self, digest: str) -> Path:
        return self.root / ADAPTER_STORE / f"{digest}.safetensors"

    def _localised(self, job: TrainJob | GenerateJob, parcel: Parcel) -> TrainJob | GenerateJob:
        if isinstance(job, TrainJob):
            return dataclasses.replace(
                job, photos=[self._local(path) for path in job.photos], output_dir=self._local(job.output_dir)
            )
        adapters = []
        for adapter in job.adapters:
            digest = parcel.adapters.get(self._relative_to_bot(adapter.path))
            path = str(self._adapter_file(digest)) if digest else self._local(adapter.path)
            adapters.append(dataclasses.replace(adapter, path=path))
        return dataclasses.replace(
            job,
            output_dir=self._local(job.output_dir),
            adapters=adapters,
            init_image=None if job.init_image is None else self._local(job.init_image),
        )

    def _relative_to_bot(self, bot_path: str) -> str:
        path = Path(bot_path)
        return (
            str(path.relative_to(self.bot_data_dir)) if path.is_relative_to(self.bot_data_dir) else bot_path
        )

    def _forget(self, job_id: str) -> None:
        """Delete the node's copies of a finished job's files (its adapter stays in the store)."""
        with self._state:
            job = self._jobs.pop(job_id, None)
        if job is None:
            return
        shutil.rmtree(job.output_dir, ignore_errors=True)
        for path in job.written:
            path.unlink(missing_ok=True)

"""The engine worker: one process per device, jobs in on stdin, events out on stdout (engine.contract.protocol).

The base model is loaded once. An asyncio loop reads job lines while all GPU work runs in one
thread, so a cancel or a generation arriving mid-training is seen at once. Generations go before
trainings, and a training runs waiting generations between two of its optimizer steps on the same
loaded pipeline, so /imagine never waits for a training to end.

A job is answered with Accepted when it starts on the GPU thread (a second training waits for the
first one without a word); a job refused on arrival (bad paths, bad values) gets only an Error.

Shutdown (a `shutdown` job, or EOF on stdin) stops the running job at its next step and exits 0.
The interrupted job gets NO event: its row stays 'running' on the bot side and is re-run at the next
start, a training from its newest checkpoint. Jobs still waiting in the worker are dropped silently
for the same reason.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from engine.contract.config import Config, ConfigError, load_config
from engine.contract.disk import DISK_FULL_MESSAGE, disk_full_cause
from engine.contract.protocol import (
    LOG_FORMAT,
    Accepted,
    CancelJob,
    Error,
    Event,
    GenerateJob,
    GenerationDone,
    Job,
    Progress,
    ProtocolError,
    Ready,
    ShutdownJob,
    TrainingDone,
    TrainJob,
    decode,
    encode,
)
from engine.generate import AdapterLoadError, GenerationCancelled, GenerationResult, Generator
from engine.memory import release_memory
from engine.model import LoadedModel, ModelLoadError, fast_path_on, load_base_model
from engine.train import TrainingCancelled, TrainingProgress, TrainingResult, train_lora

log = logging.getLogger("engine.worker")

EXIT_BAD_MODEL = 3
EXIT_BAD_CONFIG = 2
# A job line is small (paths, a prompt); this only bounds a runaway writer.
MAX_LINE_BYTES = 1024 * 1024
# Progress events are for a Discord message edited a few times a minute: more is only pipe noise.
TRAINING_PROGRESS_INTERVAL = 0.5
GENERATION_PROGRESS_INTERVAL = 0.2
# A preview is a file written and a Discord message edited with an upload: one every 2 s at most.
PREVIEW_INTERVAL = 2.0
OUT_OF_MEMORY_MESSAGE = "the GPU ran out of memory: try fewer images or a smaller size"


class Emitter:
    """Writes events to the protocol channel; safe to call from the loop and the GPU thread."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        line = encode(event) + "\n"
        with self._lock:
            try:
                self._stream.write(line)
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                # The reader is gone (the bot died); EOF on stdin ends this worker soon.
                log.warning("dropped %s event: the protocol pipe is closed", event.type)


def claim_stdout() -> TextIO:
    """Keep the real stdout for protocol lines and send everything else written to it to stderr.

    fd 1 itself is re-pointed, so prints from C extensions and libraries holding a reference to the
    original sys.stdout cannot corrupt the pipe either.
    """
    sys.stdout.flush()
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return protocol


@dataclass
class _Throttle:
    interval: float
    _last: float = float("-inf")
    _phase: str = ""

    def due(self, phase: str, final: bool) -> bool:
        now = time.monotonic()
        if final or phase != self._phase or now - self._last >= self.interval:
            self._last, self._phase = now, phase
            return True
        return False


@dataclass
class _Task:
    job: TrainJob | GenerateJob
    # Set by a cancel or a shutdown; the job's should_stop reads it once a step.
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def job_id(self) -> str:
        return self.job.job_id


class Worker:
    """Holds the loaded model and schedules jobs onto the single GPU thread."""

    def __init__(
        self, config: Config, model: LoadedModel, generator: Generator, emit: Callable[[Event], None]
    ) -> None:
        self.config = config
        self.model = model
        self.generator = generator
        self.emit = emit
        self.data_dir = config.data_dir.resolve()
        # Everything below is shared with the GPU thread and guarded by this condition.
        self._state = threading.Condition()
        self._generations: deque[_Task] = deque()
        self._trainings: deque[_Task] = deque()
        self._running: dict[str, _Task] = {}
        self._closing = False

    # -- the asyncio side ----------------------------------------------------------------------

    async def serve(self, stdin: TextIO) -> None:
        """Read jobs until a shutdown job or EOF, then stop the GPU thread and return."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu") as executor:
            gpu = loop.run_in_executor(executor, self.run_gpu)
            try:
                while True:
                    try:
                        line = await reader.readline()
                    except ValueError:
                        self.emit(Error(None, "a job line was too long and was ignored", "bad_request"))
                        continue
                    if not line:
                        log.info("stdin closed: shutting down")
                        break
                    if line.strip() and not self.handle_line(line.decode("utf-8", errors="replace")):
                        break
            finally:
                self.close()
                await gpu

    def handle_line(self, line: str) -> bool:
        """Act on one job line; False once it was a shutdown."""
        try:
            job = decode(line)
        except ProtocolError as error:
            if error.job_id is None:
                self.emit(Error(None, f"could not read the job: {error}", "bad_request"))
            else:
                # A job with a bad value (a job's dataclass checks them all): that job failed.
                self.emit(Error(error.job_id, f"refused: {error}", "bad_request"))
            return True
        if isinstance(job, ShutdownJob):
            log.info("shutdown requested")
            return False
        self.handle(job)
        return True

    def handle(self, job: Job | Event) -> None:
        """Queue a training or generation, or act on a cancel (a Ray actor calls this directly)."""
        if isinstance(job, CancelJob):
            self.cancel(job.job_id)
        elif isinstance(job, TrainJob | GenerateJob):
            try:
                task = self.prepare(job)
            except (TypeError, ValueError) as error:
                # decode() checks the values a job's dataclass knows, not every type: a path that
                # is not a string fails here.
                self.emit(Error(job.job_id, f"refused: {error}", "bad_request"))
            else:
                self.submit(task)
        else:
            self.emit(Error(None, f"a worker does not take {job.type!r} messages", "bad_request"))

    def prepare(self, job: TrainJob | GenerateJob) -> _Task:
        """The task that runs a job; ValueError says why it is refused (a path it may not use)."""
        self._check_paths("output_dir", [job.output_dir])
        if isinstance(job, TrainJob):
            self._check_paths("photos", job.photos)
        else:
            self._check_paths("adapter path", [adapter.path for adapter in job.adapters])
            if job.init_image is not None:
                self._check_paths("init_image", [job.init_image])
        return _Task(job)

    def _check_paths(self, what: str, paths: list[str]) -> None:
        # Paths come from the bot, which builds them from ids; a path escaping the data directory
        # means a bug or a crafted line, and the engine must never read or write there.
        for path in paths:
            if not Path(path).expanduser().resolve().is_relative_to(self.data_dir):
                raise ValueError(f"the {what} is outside the data directory")

    def submit(self, task: _Task) -> None:
        with self._state:
            if isinstance(task.job, TrainJob):
                self._trainings.append(task)
            else:
                self._generations.append(task)
            self._state.notify_all()

    def cancel(self, job_id: str) -> None:
        with self._state:
            running = self._running.get(job_id)
            if running is not None:
                log.info("cancelling running job %s", job_id)
                running.stop.set()
                return
            found = None
            for waiting in (self._generations, self._trainings):
                found = next((task for task in waiting if task.job_id == job_id), None)
                if found is not None:
                    waiting.remove(found)
                    break
        if found is None:
            log.info("cancel for unknown or finished job %s ignored", job_id)
        else:
            log.info("cancelled waiting job %s", job_id)
            self.emit(Error(job_id, "cancelled", "cancelled"))

    def close(self) -> None:
        """Stop the running jobs at their next step and drop the waiting ones (see module docstring)."""
        with self._state:
            self._closing = True
            dropped = [task.job_id for task in (*self._generations, *self._trainings)]
            self._generations.clear()
            self._trainings.clear()
            for task in self._running.values():
                task.stop.set()
            self._state.notify_all()
        if dropped:
            log.info("shutdown: dropped waiting jobs %s", ", ".join(dropped))

    # -- the GPU thread ------------------------------------------------------------------------

    def run_gpu(self) -> None:
        """The GPU thread: run jobs one at a time (compatible generations as one batch), generations
        first, until closed."""
        while True:
            with self._state:
                while not (self._closing or self._generations or self._trainings):
                    self._state.wait()
                if self._closing:
                    return
                if self._generations:
                    tasks = self._take_batch()
                else:
                    tasks = [self._trainings.popleft()]
                    self._running[tasks[0].job_id] = tasks[0]
            self._execute(tasks)

    def _take_batch(self) -> list[_Task]:
        """The first waiting generation and, in arrival order, the waiting ones that can share its
        batch (GenerateJob.batch_key), up to [generation] batch_limit images. Call with _state held."""
        first = self._generations.popleft()
        batch = [first]
        assert isinstance(first.job, GenerateJob)
        key, images = first.job.batch_key, first.job.count
        if key is not None:
            for task in list(self._generations):
                assert isinstance(task.job, GenerateJob)
                if (
                    task.job.batch_key == key
                    and (self.generator.mixed_batches or task.job.adapters == first.job.adapters)
                    and images + task.job.count <= self.config.generation.batch_limit
                ):
                    self._generations.remove(task)
                    batch.append(task)
                    images += task.job.count
        for task in batch:
            self._running[task.job_id] = task
        return batch

    def _take_generations(self) -> list[_Task] | None:
        with self._state:
            if self._closing or not self._generations:
                return None
            return self._take_batch()

    def _generations_waiting(self) -> bool:
        """Whether _between_steps has work: asked after every training step, so nothing else is done."""
        with self._state:
            return bool(self._generations) and not self._closing

    def _between_steps(self) -> bool:
        """Run the generations that arrived during a training, between two of its steps."""
        ran = False
        while (tasks := self._take_generations()) is not None:
            self._execute(tasks)
            ran = True
        return ran

    def _execute(self, tasks: list[_Task]) -> None:
        """Run one job, or a batch of generations, to a TrainingDone, GenerationDone or Error event
        each; never raises. A batch that fails is run again job by job, so that one member's bad
        adapter (or a batch too big for the memory) fails that job alone."""
        for task in tasks:
            self.emit(Accepted(task.job_id))
        try:
            if not self._attempt(tasks) and len(tasks) > 1:
                log.warning("a batch of %d generations failed: running them one by one", len(tasks))
                for task in tasks:
                    self._attempt([task])
        finally:
            with self._state:
                for task in tasks:
                    del self._running[task.job_id]

    def _attempt(self, tasks: list[_Task]) -> bool:
        """Run `tasks` and emit their results; False (and nothing emitted) when a batch of several failed."""
        failure: tuple[str, str] | None = None
        out_of_memory = False
        try:
            job = tasks[0].job
            if isinstance(job, TrainJob):
                self._train(tasks[0], job)
            else:
                self._generate(tasks)
        except (TrainingCancelled, GenerationCancelled):
            with self._state:
                closing = self._closing
            for task in tasks:
                if closing:
                    log.info("job %s interrupted by shutdown: no event, it is re-run later", task.job_id)
                else:
                    self.emit(Error(task.job_id, "cancelled", "cancelled"))
            return True
        except torch.OutOfMemoryError:
            # Memory is released below, after this block: its traceback holds the failed job's frames.
            out_of_memory = True
            failure = (OUT_OF_MEMORY_MESSAGE, "out_of_memory")
        except AdapterLoadError as error:
            failure = (str(error), "bad_adapter")
        except ValueError as error:
            failure = (str(error), "bad_request")
        except Exception as error:
            job_ids = [task.job_id for task in tasks]
            if (cause := disk_full_cause(error)) is not None:
                # The server's state, not a bug: one line for the admin, the member told in plain words.
                log.error("jobs %s stopped: a write failed, the disk is full (%s)", job_ids, cause)
                failure = (DISK_FULL_MESSAGE, "disk_full")
            else:
                log.error("jobs %s failed:\n%s", job_ids, traceback.format_exc())
                failure = (
                    "the engine hit an unexpected error; it has been logged for the bot's admin",
                    "internal",
                )
        if out_of_memory:
            log.warning("jobs %s ran out of memory", [task.job_id for task in tasks])
            release_memory()
        if failure is None:
            return True
        if len(tasks) > 1:
            return False
        self.emit(Error(tasks[0].job_id, *failure))
        return True

    def _train(self, task: _Task, job: TrainJob) -> None:
        throttle = _Throttle(TRAINING_PROGRESS_INTERVAL)

        def on_progress(progress: TrainingProgress) -> None:
            # The one preview of a training is never throttled away.
            if throttle.due(progress.phase, progress.step >= progress.total) or progress.preview:
                self.emit(
                    Progress(
                        task.job_id,
                        progress.phase,
                        progress.step,
                        progress.total,
                        progress.loss,
                        progress.eta_seconds,
                        None if progress.preview is None else str(progress.preview),
                    )
                )

        try:
            result: TrainingResult = train_lora(
                self.model,
                job,
                self.config.training,
                self.config.data_dir / "class_images",
                on_progress=on_progress,
                should_stop=task.stop.is_set,
                between_steps=self._between_steps,
                jobs_waiting=self._generations_waiting,
            )
        finally:
            # A retrained token must not be served from the adapter cache's old weights.
            self.generator.adapters.forget(job.token)
        self.emit(
            TrainingDone(
                task.job_id,
                files=[str(path) for path in result.samples],
                adapter_path=str(result.adapter_path),
                metadata_path=str(result.metadata_path),
                metadata=result.metadata,
                steps=result.steps,
                seconds=result.seconds,
            )
        )

    def _generate(self, tasks: list[_Task]) -> None:
        throttle = _Throttle(GENERATION_PROGRESS_INTERVAL)
        jobs = [task.job for task in tasks]
        assert all(isinstance(job, GenerateJob) for job in jobs)

        def on_step(step: int, total: int) -> None:
            if throttle.due("generating", step >= total):
                for task in tasks:
                    self.emit(Progress(task.job_id, "generating", step, total))

        # Started now, so that the first preview shows 2 s of denoising rather than the noise.
        previews = _Throttle(PREVIEW_INTERVAL, time.monotonic(), "generating")

        def on_preview(step: int, total: int, paths: list[Path | None]) -> None:
            for task, path in zip(tasks, paths, strict=True):
                if path is not None:
                    self.emit(Progress(task.job_id, "generating", step, total, preview=str(path)))

        results: list[GenerationResult] = self.generator.generate_batch(
            jobs,  # type: ignore[arg-type]
            [Path(job.output_dir) for job in jobs],
            on_step=on_step,
            # A batch stops when all its jobs are cancelled; one cancelled alone is dropped at the end.
            should_stop=lambda: all(task.stop.is_set() for task in tasks),
            on_preview=on_preview,
            preview_due=lambda: previews.due("generating", False),
        )
        for task, result in zip(tasks, results, strict=True):
            if task.stop.is_set():
                self.emit(Error(task.job_id, "cancelled", "cancelled"))
                continue
            self.emit(
                GenerationDone(
                    task.job_id,
                    files=[str(path) for path in result.files],
                    seeds=result.seeds,
                    parameters=result.parameters,
                    nsfw=result.nsfw,
                    seconds=result.seconds,
                )
            )


# ---------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m engine", description="The dreambot engine worker (JSON lines on stdin/stdout)."
    )
    parser.add_argument("--config", type=Path, help="config file (default: ./config.toml if present)")
    parser.add_argument("--device", help="torch device (default: the first of [model] device)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    emit = Emitter(claim_stdout())
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=LOG_FORMAT,
        force=True,
    )
    args = parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as error:
        emit(Error(None, str(error), "bad_request"))
        return EXIT_BAD_CONFIG
    device = args.device or config.model.devices[0]
    worker = start_worker(config, device, emit)
    if worker is None:
        return EXIT_BAD_MODEL
    asyncio.run(worker.serve(sys.stdin))
    return 0


def start_worker(config: Config, device: str, emit: Callable[[Event], None]) -> Worker | None:
    """Load the base model on `device` and emit Ready: the Worker that serves it. None (and an
    Error emitted that says why) when the model cannot load. `python -m engine` and the Ray actor
    (engine.ray_actor) both start here."""

    def load() -> LoadedModel:
        return load_base_model(
            config.model.base,
            device,
            config.data_dir,
            use_xformers=config.model.xformers,
            safety_checker=config.model.safety_checker,
            dtype=config.model.dtype,
            channels_last=config.model.channels_last,
        )

    try:
        model = load()
    except ModelLoadError as error:
        # Not logged here as well: the bot (or the CLI) that started this worker reports it, once.
        emit(Error(None, str(error), "bad_model"))
        return None
    started = time.perf_counter()
    generator = Generator(
        model,
        config.generation.adapter_cache,
        compile_unet=fast_path_on(config.model.compile, model.device),
        hotswap_rank=config.training.rank,
    )
    try:
        generator.warm_up()
    except Exception:
        # Inductor needs a working toolchain (Triton builds its launcher with a C compiler) and
        # memory to compile: without them the engine serves uncompiled rather than not at all, from
        # a fresh copy of the model (this one holds the half-compiled UNet and its hotswap slots).
        log.exception("compiling the UNet failed: serving it uncompiled ([model] compile = false skips this)")
        del generator, model
        release_memory()
        model = load()
        generator = Generator(model, config.generation.adapter_cache)
    log.info(
        "ready: %s on %s (warm-up %.1f s)", config.model.base, model.device, time.perf_counter() - started
    )
    emit(Ready(str(model.device), config.model.base))
    return Worker(config, model, generator, emit)

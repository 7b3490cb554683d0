"""`python -m engine` over real pipes, on the tiny model: the protocol as the bot sees it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from botharness import write_engine_config, write_toml
from PIL import Image

from engine.contract.protocol import (
    Accepted,
    AdapterRef,
    CancelJob,
    Error,
    Event,
    GenerateJob,
    GenerationDone,
    Job,
    Progress,
    ProtocolError,
    Ready,
    Result,
    ShutdownJob,
    TrainingDone,
    TrainJob,
    decode,
    encode,
)
from engine.memory import TEST_OOM_VARIABLE
from engine.worker import OUT_OF_MEMORY_MESSAGE

# Every test here starts an engine process (and the bot, where it runs one).
pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The machine running the tests is often shared: one thread per worker avoids the OpenMP
# oversubscription that makes a 64 px step take seconds instead of milliseconds.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CHECKPOINT_EVERY = 3
TIMEOUT = 120.0


def write_config(data_dir: Path, tiny_model_dir: Path, *, base: str = "tiny") -> Path:
    """A config for the tiny model with data under `data_dir` (the tiny model copied in, not rebuilt)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "models" / "tiny").exists():
        shutil.copytree(tiny_model_dir, data_dir / "models" / "tiny")
    return write_engine_config(
        data_dir / "config.toml", data_dir, base=base, checkpoint_every=CHECKPOINT_EVERY
    )


def write_photos(photos_dir: Path, folder: Path, count: int = 3) -> list[str]:
    """Prepared 64x64 PNG training photos: crops of the astronaut around her face."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with Image.open(photos_dir / "astronaut.png") as opened:
        source = opened.convert("RGB")
    for index in range(count):
        offset = 40 * index
        crop = source.crop((120 + offset, 20, 380 + offset, 280)).resize((64, 64), Image.Resampling.LANCZOS)
        path = folder / f"{index}.png"
        crop.save(path)
        paths.append(str(path))
    return paths


class EngineProcess:
    """A worker process with a thread reading its stdout; every line must be a protocol event."""

    def __init__(self, config: Path, env: dict[str, str] | None = None, log: Path | None = None) -> None:
        """`log`: a file for the worker's stderr (its log) instead of the test's."""
        with open(log, "w") if log else contextlib.nullcontext() as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "engine", "--config", str(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=PROJECT_ROOT,
                env={**os.environ, **WORKER_ENV, **(env or {})},
                text=True,
                bufsize=1,
            )
        self.events: list[Event] = []
        self.not_protocol: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                try:
                    self.events.append(decode(line))  # type: ignore[arg-type]
                except ProtocolError:
                    self.not_protocol.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def send(self, job: Job | str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((job if isinstance(job, str) else encode(job)) + "\n")
        self.process.stdin.flush()

    def wait_for(self, matches: Callable[[Event], bool], timeout: float = TIMEOUT) -> Event:
        """The first event so far or to come that `matches`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((event for event in self.events if matches(event)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (not self._reader.is_alive() and self.process.poll() is not None):
                    raise AssertionError(f"no matching event; events so far: {self.events}")
                self._changed.wait(min(left, 1.0))

    def finished(self, job_id: str, timeout: float = TIMEOUT) -> Result | Error:
        event = self.wait_for(
            lambda e: isinstance(e, Result | Error) and e.job_id == job_id,
            timeout,  # type: ignore[union-attr]
        )
        assert isinstance(event, Result | Error)
        return event

    def finished_after(self, job: TrainJob | GenerateJob) -> Result | Error:
        """Send `job` and wait for its end."""
        self.send(job)
        return self.finished(job.job_id)

    def of(self, job_id: str) -> list[Event]:
        with self._changed:
            return [e for e in self.events if getattr(e, "job_id", None) == job_id]

    def training_steps(self, job_id: str) -> list[int]:
        return [e.step for e in self.of(job_id) if isinstance(e, Progress) and e.phase == "training"]

    def shutdown(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.send(encode(ShutdownJob()))
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker-data")


@pytest.fixture(scope="module")
def config_file(data_dir: Path, tiny_model_dir: Path) -> Path:
    return write_config(data_dir, tiny_model_dir)


@pytest.fixture(scope="module")
def photos(data_dir: Path, photos_dir: Path) -> list[str]:
    return write_photos(photos_dir, data_dir / "photos")


@pytest.fixture(scope="module")
def engine(config_file: Path) -> Iterator[EngineProcess]:
    """One worker shared by the tests that do not kill it."""
    process = EngineProcess(config_file)
    process.wait_for(lambda e: isinstance(e, Ready))
    yield process
    try:
        assert process.shutdown() == 0
        assert process.not_protocol == []
    finally:
        process.kill()


def generate_job(job_id: str, data_dir: Path, **overrides: object) -> GenerateJob:
    values: dict[str, object] = {
        "prompt": "a photo of an astronaut",
        "output_dir": str(data_dir / "generations" / job_id),
        "steps": 4,
        "width": 64,
        "height": 64,
        **overrides,
    }
    return GenerateJob(job_id=job_id, **values)  # type: ignore[arg-type]


def train_job(job_id: str, data_dir: Path, photos: list[str], steps: int) -> TrainJob:
    return TrainJob(
        job_id=job_id,
        token="zwx",
        class_word="person",
        photos=photos,
        output_dir=str(data_dir / "models" / job_id),
        steps=steps,
    )


def test_ready_comes_first_and_a_generation_writes_pngs(engine: EngineProcess, data_dir: Path) -> None:
    assert isinstance(engine.events[0], Ready)
    assert engine.events[0].base_model == "tiny"
    assert engine.events[0].device == "cpu"

    engine.send(generate_job("gen1", data_dir, count=2, seed=7))
    result = engine.finished("gen1")

    assert isinstance(result, GenerationDone), result
    kinds = [type(event) for event in engine.of("gen1")]
    assert kinds[0] is Accepted
    assert Progress in kinds
    assert kinds[-1] is GenerationDone
    progress = [e for e in engine.of("gen1") if isinstance(e, Progress)]
    assert progress[-1].step == progress[-1].total == 4
    assert {e.phase for e in progress} == {"generating"}
    assert len(result.files) == 2
    for file in result.files:
        assert Path(file).is_file()
        assert Path(file).resolve().is_relative_to(data_dir.resolve())
        with Image.open(file) as image:
            assert image.size == (64, 64)
    assert result.seeds == [7, 8]
    assert [parameters.splitlines()[0] for parameters in result.parameters] == ["a photo of an astronaut"] * 2
    assert "Seed: 8," in result.parameters[1]
    assert result.nsfw == [False, False]
    assert result.seconds > 0

    # A variation runs at the strength its job names (the bot chooses it, the engine fills nothing in).
    engine.send(generate_job("gen1-variation", data_dir, init_image=result.files[0], strength=0.45))
    variation = engine.finished("gen1-variation")
    assert isinstance(variation, GenerationDone), variation
    assert "Denoising strength: 0.45" in variation.parameters[0]
    assert engine.not_protocol == []


def test_a_bad_line_is_refused_and_the_worker_keeps_serving(engine: EngineProcess, data_dir: Path) -> None:
    seen = len(engine.events)
    engine.send("this is not json")
    engine.send('{"type": "generate", "prompt": "no job id"}')
    # A line that names its job is answered as that job's error, so the bot can fail the job.
    engine.send('{"type": "generate", "job_id": "missing-fields"}')
    wrong_type = encode(generate_job("wrong-type", data_dir)).replace('"steps":4', '"steps":"many"')
    engine.send(wrong_type)
    engine.send(generate_job("gen-after-bad-lines", data_dir))

    assert isinstance(engine.finished("gen-after-bad-lines"), GenerationDone)
    errors = [e for e in engine.events[seen:] if isinstance(e, Error) and e.job_id is None]
    assert [e.code for e in errors] == ["bad_request", "bad_request"]
    assert all(e.message.startswith("could not read the job: ") for e in errors)
    for job_id in ("missing-fields", "wrong-type"):
        refused = engine.finished(job_id)
        assert isinstance(refused, Error) and refused.code == "bad_request"
        assert refused.message.startswith("refused: bad 'generate' message: ")
        assert [type(e) for e in engine.of(job_id)] == [Error]
    assert engine.not_protocol == []


def test_a_job_with_a_bad_value_is_refused_as_that_job(engine: EngineProcess, data_dir: Path) -> None:
    """GenerateJob checks every value as the worker decodes the line; the job's own Error says which."""
    job = encode(generate_job("too-many-steps", data_dir))
    engine.send(job.replace('"steps":4', '"steps":10000'))
    # An init image without a strength: the engine no longer fills one in.
    engine.send(
        encode(
            generate_job("no-strength", data_dir, init_image=str(data_dir / "x.png"), strength=0.5)
        ).replace('"strength":0.5', '"strength":null')
    )
    too_many = engine.finished("too-many-steps")
    assert isinstance(too_many, Error) and too_many.code == "bad_request"
    assert too_many.message.startswith("refused: ")
    assert "`steps` has to be between 1 and 150 but is 10000" in too_many.message
    no_strength = engine.finished("no-strength")
    assert isinstance(no_strength, Error) and no_strength.code == "bad_request"
    assert "`strength` has to be in (0, 1] with an `init_image` but is None" in no_strength.message
    for job_id in ("too-many-steps", "no-strength"):
        assert [type(e) for e in engine.of(job_id)] == [Error]


def test_an_init_image_that_is_gone_fails_its_job(engine: EngineProcess, data_dir: Path) -> None:
    gone = data_dir / "generations" / "deleted" / "0.png"
    engine.send(generate_job("init-gone", data_dir, init_image=str(gone), strength=0.5))
    error = engine.finished("init-gone")
    assert isinstance(error, Error) and error.code == "bad_request"
    assert error.message == "the picture to start from is gone (was it deleted?)"


def test_paths_outside_the_data_dir_are_refused(
    engine: EngineProcess, data_dir: Path, photos: list[str], tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    escaping = str(data_dir / ".." / "escaped")
    foreign_photo = str(tmp_path / "photo.png")
    shutil.copy(photos[0], foreign_photo)
    jobs: list[Job] = [
        generate_job("out-output", data_dir, output_dir=str(outside)),
        generate_job("out-dotdot", data_dir, output_dir=escaping),
        generate_job(
            "out-adapter",
            data_dir,
            adapters=[AdapterRef("zwx", "person", str(tmp_path / "adapter.safetensors"))],
        ),
        generate_job("out-init", data_dir, init_image=foreign_photo, strength=0.5),
        TrainJob(
            job_id="out-photos",
            token="zwx",
            class_word="person",
            photos=[photos[0], foreign_photo],
            output_dir=str(data_dir / "models" / "out-photos"),
        ),
        TrainJob(
            job_id="out-train-output",
            token="zwx",
            class_word="person",
            photos=photos,
            output_dir=str(outside),
        ),
    ]
    for job in jobs:
        engine.send(job)
    for job in jobs:
        assert isinstance(job, TrainJob | GenerateJob)
        error = engine.finished(job.job_id)
        assert isinstance(error, Error)
        assert error.code == "bad_request"
        assert "outside the data directory" in error.message
        # Refused before it was taken: nothing ran and nothing was written.
        assert [type(e) for e in engine.of(job.job_id)] == [Error]
    assert not outside.exists()
    assert not (data_dir.parent / "escaped").exists()


def test_a_corrupt_adapter_fails_alone(engine: EngineProcess, data_dir: Path) -> None:
    adapter = data_dir / "adapters" / "broken" / "adapter.safetensors"
    adapter.parent.mkdir(parents=True)
    adapter.write_bytes(os.urandom(4096))

    engine.send(generate_job("corrupt", data_dir, adapters=[AdapterRef("brk", "person", str(adapter))]))
    error = engine.finished("corrupt")
    assert isinstance(error, Error)
    assert error.code == "bad_adapter"
    assert "brk" in error.message

    engine.send(generate_job("after-corrupt", data_dir))
    assert isinstance(engine.finished("after-corrupt"), GenerationDone)


def test_a_generation_runs_between_training_steps_and_cancel_stops_the_training(
    engine: EngineProcess, data_dir: Path, photos: list[str]
) -> None:
    total = 200
    engine.send(train_job("long-train", data_dir, photos, steps=total))
    engine.wait_for(lambda e: isinstance(e, Progress) and e.job_id == "long-train" and e.phase == "training")

    engine.send(generate_job("during-training", data_dir))
    result = engine.finished("during-training")
    assert isinstance(result, GenerationDone)
    assert all(Path(file).is_file() for file in result.files)
    # It did not wait for the training: that is far from its end and goes on afterwards.
    steps_before = engine.training_steps("long-train")
    assert steps_before and steps_before[-1] < total // 2
    engine.wait_for(
        lambda e: isinstance(e, Progress) and e.job_id == "long-train" and e.step > steps_before[-1]
    )

    # Cancel right after a progress event, so the training is at most a step past the step seen.
    seen = engine.training_steps("long-train")[-1]
    engine.send(CancelJob("long-train"))
    error = engine.finished("long-train", timeout=30)
    assert isinstance(error, Error)
    assert error.code == "cancelled"
    after = [step for step in engine.training_steps("long-train") if step > seen]
    # At most one more progress event, for the step that was running (or whose event was in flight).
    assert len(after) <= 1
    assert all(step <= seen + 2 for step in after)
    assert not any(isinstance(e, Result) for e in engine.of("long-train"))

    # Cancelling what has finished or never existed is ignored, and the worker still serves.
    engine.send(CancelJob("long-train"))
    engine.send(CancelJob("no-such-job"))
    engine.send(generate_job("after-cancel", data_dir))
    assert isinstance(engine.finished("after-cancel"), GenerationDone)
    assert [type(e) for e in engine.of("long-train")].count(Error) == 1
    assert engine.not_protocol == []


def test_a_waiting_job_is_cancelled_at_once(engine: EngineProcess, data_dir: Path, photos: list[str]) -> None:
    engine.send(train_job("running-train", data_dir, photos, steps=200))
    engine.wait_for(lambda e: isinstance(e, Progress) and e.job_id == "running-train")
    # A second training waits for the first: cancelling it answers at once, the first runs on.
    engine.send(train_job("waiting-train", data_dir, photos, steps=5))
    engine.send(CancelJob("waiting-train"))
    error = engine.finished("waiting-train", timeout=30)
    assert isinstance(error, Error)
    assert error.code == "cancelled"
    assert [type(e) for e in engine.of("waiting-train")] == [Error]
    assert not any(isinstance(e, Error | Result) for e in engine.of("running-train"))

    engine.send(CancelJob("running-train"))
    assert engine.finished("running-train", timeout=30).code == "cancelled"  # type: ignore[union-attr]


def test_a_killed_training_resumes_from_its_checkpoint_and_shutdown_interrupts_one(
    config_file: Path, data_dir: Path, photos: list[str]
) -> None:
    total = 3 * CHECKPOINT_EVERY
    job = train_job("resumed", data_dir, photos, steps=total)

    first = EngineProcess(config_file)
    try:
        first.send(job)
        first.wait_for(
            lambda e: isinstance(e, Progress) and e.phase == "training" and e.step >= CHECKPOINT_EVERY
        )
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(30)
    finally:
        first.kill()
    assert not any(isinstance(e, Result) for e in first.events)
    # Checkpoints are written every CHECKPOINT_EVERY steps, before that step's progress event.
    checkpoint_step = max(first.training_steps("resumed")) // CHECKPOINT_EVERY * CHECKPOINT_EVERY
    assert checkpoint_step >= CHECKPOINT_EVERY

    second = EngineProcess(config_file)
    try:
        second.send(job)
        result = second.finished("resumed")
        assert isinstance(result, TrainingDone), result
        steps = second.training_steps("resumed")
        # The first step it ran is one after the newest checkpoint (a later one if the first worker
        # got further than its last progress event said before it was killed).
        assert steps[0] > checkpoint_step
        assert steps[-1] == total
        assert result.steps == total
        assert Path(result.adapter_path).is_file()
        assert Path(result.metadata_path).is_file()
        assert result.metadata["token"] == "zwx"
        assert result.metadata["steps"] == total
        assert result.seconds > 0
        assert [Path(file).is_file() for file in result.files] == [True]

        # Shutdown stops a training at its next step; the bot keeps the job 'running' and re-runs
        # it at its next start, so the worker sends no Result and no Error for it.
        second.send(train_job("interrupted", data_dir, photos, steps=500))
        second.wait_for(lambda e: isinstance(e, Progress) and e.job_id == "interrupted" and e.step >= 2)
        started = time.monotonic()
        assert second.shutdown() == 0
        assert time.monotonic() - started < 30
        assert not any(isinstance(e, Result | Error) for e in second.of("interrupted"))
        assert first.not_protocol == second.not_protocol == []
    finally:
        second.kill()


def test_out_of_memory_fails_the_job_alone_and_waiting_generations_render_as_one_batch(
    config_file: Path, data_dir: Path, photos: list[str]
) -> None:
    engine = EngineProcess(config_file, env={TEST_OOM_VARIABLE: "generate:2,train:2"})
    try:
        # Out of memory at denoising step 2, then at training step 2: each job fails with the
        # member-facing message, and the worker serves the next job.
        engine.send(generate_job("oom-gen", data_dir))
        engine.send(train_job("oom-train", data_dir, photos, steps=4))
        for job_id in ("oom-gen", "oom-train"):
            error = engine.finished(job_id)
            assert isinstance(error, Error), error
            assert (error.code, error.message) == ("out_of_memory", OUT_OF_MEMORY_MESSAGE)
        trained = engine.finished_after(train_job("after-oom", data_dir, photos, steps=2))
        assert isinstance(trained, TrainingDone), trained
        adapter = AdapterRef("zwx", "person", trained.adapter_path)

        # While one generation renders, three compatible ones (two with the member's adapter,
        # one without) wait, and then render as ONE batch: all accepted before any step of theirs.
        batch = [
            generate_job("batch-a", data_dir, prompt="zwx on the moon", seed=1, adapters=[adapter]),
            generate_job("batch-plain", data_dir, prompt="a red car", seed=2),
            generate_job("batch-b", data_dir, prompt="zwx in a forest", seed=3, adapters=[adapter], count=2),
        ]
        engine.send(generate_job("blocker", data_dir, steps=60))
        engine.wait_for(lambda e: isinstance(e, Progress) and e.job_id == "blocker")
        for job in batch:
            engine.send(job)
        results = [engine.finished(job.job_id) for job in batch]
        assert all(isinstance(result, GenerationDone) for result in results), results
        first_step = min(
            engine.events.index(e) for job in batch for e in engine.of(job.job_id) if isinstance(e, Progress)
        )
        accepted = [
            engine.events.index(e) for job in batch for e in engine.of(job.job_id) if isinstance(e, Accepted)
        ]
        assert len(accepted) == 3 and max(accepted) < first_step

        # Each image is the one its job renders alone (batching moves a pixel by 2/255 at most).
        for job, result in zip(batch, results, strict=True):
            alone = engine.finished_after(
                dataclasses.replace(job, job_id=f"{job.job_id}-alone", output_dir=job.output_dir + "-alone")
            )
            assert isinstance(alone, GenerationDone) and isinstance(result, GenerationDone)
            assert alone.parameters == result.parameters
            for batched_file, alone_file in zip(result.files, alone.files, strict=True):
                with Image.open(batched_file) as batched_image, Image.open(alone_file) as alone_image:
                    difference = np.abs(
                        np.asarray(batched_image, np.int16) - np.asarray(alone_image, np.int16)
                    )
                assert difference.max() <= 2, job.job_id
        assert engine.shutdown() == 0
        assert engine.not_protocol == []
    finally:
        engine.kill()


def test_a_bad_model_path_fails_the_start_with_status_3(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path / "data", tiny_model_dir, base=str(tmp_path / "no-such-model"))
    engine = EngineProcess(config)
    try:
        assert engine.process.wait(TIMEOUT) == 3
        engine.wait_for(lambda e: True, timeout=10)
        assert len(engine.events) == 1
        error = engine.events[0]
        assert isinstance(error, Error)
        assert error.code == "bad_model"
        assert error.job_id is None
        assert "no-such-model" in error.message
        assert engine.not_protocol == []
    finally:
        engine.kill()


def test_with_compile_on_ready_comes_after_the_unet_is_compiled(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "data"
    config = write_config(data, tiny_model_dir)  # copies the tiny model in
    # test_generate's compiled generator's settings, so inductor's cache (shared) serves its kernels.
    settings = {
        "model": {"base": "tiny", "device": "cpu", "compile": True},
        "storage": {"data_dir": str(data)},
        "generation": {"adapter_cache": 2},
        "training": {"rank": 4},
    }
    write_toml(config, settings)
    engine = EngineProcess(config, log=tmp_path / "engine.log")
    try:
        engine.wait_for(lambda e: isinstance(e, Ready))
        assert "UNet compiled, 2 adapter slots" in (tmp_path / "engine.log").read_text()
        assert isinstance(engine.finished_after(generate_job("gen-compiled", data)), GenerationDone)
        assert engine.shutdown() == 0
        assert engine.not_protocol == []
    finally:
        engine.kill()


@pytest.mark.slow
def test_a_unet_that_fails_to_compile_is_served_uncompiled(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "data"
    config = write_config(data, tiny_model_dir)
    settings = {
        "model": {"base": "tiny", "device": "cpu", "compile": True},
        "storage": {"data_dir": str(data)},
        "generation": {"adapter_cache": 1},  # one hotswap slot: the least to trace before it fails
    }
    write_toml(config, settings)
    # No working C++ compiler for inductor (as a slim image lacks the C compiler Triton needs), and
    # an empty kernel cache, so that nothing compiled by an earlier test is found.
    broken = {"CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")}
    engine = EngineProcess(config, env=broken, log=tmp_path / "engine.log")
    try:
        engine.wait_for(lambda e: isinstance(e, Ready))
        assert "compiling the UNet failed: serving it uncompiled" in (tmp_path / "engine.log").read_text()
        assert isinstance(engine.finished_after(generate_job("gen-uncompiled", data)), GenerationDone)
        assert engine.shutdown() == 0
    finally:
        engine.kill()


def test_a_slow_generation_sends_previews_that_exist(engine: EngineProcess, data_dir: Path) -> None:
    engine.send(generate_job("gen-preview", data_dir, steps=150))
    result = engine.finished("gen-preview")

    assert isinstance(result, GenerationDone), result
    previews = [e for e in engine.of("gen-preview") if isinstance(e, Progress) and e.preview is not None]
    assert previews, "no preview in a 150-step generation"
    for event in previews:
        assert 0 < event.step < event.total == 150
        assert Path(event.preview).resolve().is_relative_to(Path(result.files[0]).parent.resolve())
    with Image.open(previews[-1].preview) as image:
        assert image.format == "JPEG"
        assert max(image.size) == 256

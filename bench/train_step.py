"""Training steps/s: dreambot's trainer beside diffusers' examples/dreambooth/train_dreambooth_lora.py.

    python -m bench.train_step --reference PATH [--steps 200] [--runs 3]

PATH is the reference script, or a diffusers git directory (bare or not) to take it from
(examples/dreambooth/train_dreambooth_lora.py at HEAD); DREAMBOT_REFERENCE_SCRIPT may name it instead.
Without either, only our trainer runs, and the reference is reported as skipped.

Both sides do the same work: the tiny SD model of the tests (engine.model.ensure_tiny_model, whose
tokenizer has a byte-level vocabulary, not CLIP's real one), 64 px, 5 photos, prior preservation with
10 class images (rendered and cached by our engine in a first, untimed training, then handed to the
reference as its class_data_dir), LoRA rank 4, learning rate 1e-4, batch 1 photo + 1 class image, no
gradient checkpointing, no checkpoint within the run, each on one CPU thread.

Ours is a TrainJob through engine.worker.Worker, the way the engine runs it (its between-steps hook
included, with no generation waiting). The reference is the script itself, unchanged, in a child
process (bench.dreambooth_reference gives it a torchvision stand-in). The runs alternate, ours first.

Steps/s are steady state, from the first report at or after --warmup steps to the last step: for ours
the worker's Progress events (throttled to 0.5 s, each naming its step), for the reference the updates
of its tqdm bar, read as they are written. Wall time counts waiting for a core on a shared machine, so
each figure also comes per CPU-second of the process that trains (this process, or the child's
/proc/PID/stat); the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from bench.workload import prepare_photos
from engine.contract.config import Config, StorageSection, TrainingSection
from engine.contract.protocol import Error, Event, Progress, TrainingDone, TrainJob
from engine.generate import Generator
from engine.model import LoadedModel, load_base_model
from engine.worker import Worker

PROJECT_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_IN_REPOSITORY = "examples/dreambooth/train_dreambooth_lora.py"
REFERENCE_ENV = "DREAMBOT_REFERENCE_SCRIPT"
RESOLUTION = 64
PHOTO_COUNT = 5
CLASS_IMAGES = 10
RANK = 4
LEARNING_RATE = 1e-4
TOKEN = "benchone"
CLASS_WORD = "person"
# tqdm's bar line, e.g. "Steps:  50%|#####     | 100/200 [00:12<00:12,  7.90it/s, loss=0.1, lr=0.0001]".
TQDM_STEP = re.compile(r"Steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")


class Mark(NamedTuple):
    """The moment a run reported `step`: wall clock and the training process's CPU seconds."""

    step: int
    wall: float
    cpu: float


class Rate(NamedTuple):
    per_second: float
    per_cpu_second: float


def steady_rate(marks: list[Mark], warmup: int, total: int) -> Rate:
    """Steps per second and per CPU-second from the first mark at or after `warmup` to step `total`."""
    start = next(mark for mark in marks if mark.step >= warmup)
    end = marks[-1]
    if end.step != total or end.step <= start.step:
        raise RuntimeError(f"the run reported steps {[mark.step for mark in marks]}, not up to {total}")
    steps = end.step - start.step
    return Rate(steps / (end.wall - start.wall), steps / (end.cpu - start.cpu))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=os.environ.get(REFERENCE_ENV))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the rate")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(scratch)
        reference = reference_script(args.reference, data_dir) if args.reference else None
        print(
            f"torch {torch.__version__}, {os.cpu_count()} cores, 1 thread per side, "
            f"load average {os.getloadavg()[0]:.1f} at the start"
        )
        print(
            f"tiny SD (byte-level vocabulary), {RESOLUTION} px, {PHOTO_COUNT} photos, {CLASS_IMAGES} class "
            f"images, rank {RANK}, lr {LEARNING_RATE:g}, batch 1+1, {args.steps} steps, "
            f"steady state from step {args.warmup}"
        )
        model = load_base_model("tiny", "cpu", data_dir)
        photos = prepare_photos(data_dir / "photos", RESOLUTION, count=PHOTO_COUNT)
        settings = TrainingSection(
            resolution=RESOLUTION,
            rank=RANK,
            alpha=RANK,  # the reference's lora_alpha
            learning_rate=LEARNING_RATE,
            class_images=CLASS_IMAGES,
            gradient_checkpointing=False,  # the reference's default
            checkpoint_every=args.steps + 1,
            preview_at=0,
            sample_count=1,
        )
        config = Config(storage=StorageSection(data_dir=str(data_dir)), training=settings)
        # The first training renders and caches the class images; the reference trains on the same.
        train_ours(config, model, photos, steps=1)
        class_dir = next((data_dir / "class_images").glob(f"*/{CLASS_WORD}/{RESOLUTION}px"))

        ours: list[Rate] = []
        theirs: list[Rate] = []
        for run in range(1, args.runs + 1):
            ours.append(steady_rate(train_ours(config, model, photos, args.steps), args.warmup, args.steps))
            line = f"run {run}: ours {describe(ours[-1], 'steps/s')}"
            if reference is not None:
                marks = train_reference(reference, data_dir, class_dir, photos[0].parent, args.steps)
                theirs.append(steady_rate(marks, args.warmup, args.steps))
                line += f"; reference {describe(theirs[-1], 'it/s')}; {describe_ratio(ours[-1], theirs[-1])}"
            print(line, flush=True)

        middle = median_rate(ours)
        if reference is None:
            print(f"medians: ours {describe(middle, 'steps/s')}")
            print(
                f"reference: skipped (give --reference or {REFERENCE_ENV}: the script, or a diffusers git "
                f"directory holding {REFERENCE_IN_REPOSITORY})"
            )
        else:
            their_middle = median_rate(theirs)
            print(
                f"medians: ours {describe(middle, 'steps/s')}; reference {describe(their_middle, 'it/s')}; "
                f"{describe_ratio(middle, their_middle)} of the medians"
            )
        print(f"load average {os.getloadavg()[0]:.1f} at the end")


def reference_script(given: Path, scratch: Path) -> Path:
    """The script itself, or a copy taken from the diffusers git directory `given`."""
    if given.is_file():
        return given
    try:
        source = subprocess.run(
            ["git", "-C", str(given), "show", f"HEAD:{REFERENCE_IN_REPOSITORY}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        sys.exit(f"--reference {given}: neither the script nor a diffusers git directory ({error})")
    script = scratch / Path(REFERENCE_IN_REPOSITORY).name
    script.write_text(source, encoding="utf-8")
    return script


def train_ours(config: Config, model: LoadedModel, photos: list[Path], steps: int) -> list[Mark]:
    """A TrainJob of `steps` through a Worker on this thread; the marks of its training progress."""
    marks: list[Mark] = []
    failure: list[str] = []
    job = TrainJob(
        job_id=f"bench-{steps}",
        token=TOKEN,
        class_word=CLASS_WORD,
        photos=[str(photo) for photo in photos],
        output_dir=str(config.data_dir / "adapters" / TOKEN),
        steps=steps,
        resume=False,
    )

    def emit(event: Event) -> None:
        if isinstance(event, Progress) and event.phase == "training":
            marks.append(Mark(event.step, time.perf_counter(), time.process_time()))
        elif isinstance(event, Error):
            failure.append(event.message)
        if isinstance(event, TrainingDone | Error):
            worker.close()

    worker = Worker(config, model, Generator(model), emit)
    worker.submit(worker.prepare(job))
    worker.run_gpu()
    if failure:
        raise RuntimeError(f"our training failed: {failure[0]}")
    return marks


def train_reference(script: Path, scratch: Path, class_dir: Path, photo_dir: Path, steps: int) -> list[Mark]:
    """diffusers' script on the same model and images, in a child process on one thread."""
    output_dir = scratch / "reference-output"
    shutil.rmtree(output_dir, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "bench.dreambooth_reference",
        str(script),
        f"--pretrained_model_name_or_path={scratch / 'models' / 'tiny'}",
        f"--instance_data_dir={photo_dir}",
        f"--instance_prompt=photo of {TOKEN} {CLASS_WORD}",
        "--with_prior_preservation",
        f"--class_data_dir={class_dir}",
        f"--class_prompt=photo of a {CLASS_WORD}",
        f"--num_class_images={CLASS_IMAGES}",
        f"--resolution={RESOLUTION}",
        "--train_batch_size=1",
        f"--rank={RANK}",
        f"--learning_rate={LEARNING_RATE}",
        f"--max_train_steps={steps}",
        f"--checkpointing_steps={steps + 1}",
        "--seed=0",
        f"--output_dir={output_dir}",
    ]
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TQDM_MININTERVAL": "0",  # a bar update for every step, not every 0.1 s
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    }
    child = subprocess.Popen(
        command, cwd=PROJECT_ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert child.stdout is not None
    marks: list[Mark] = []
    output, pending = bytearray(), b""
    while chunk := os.read(child.stdout.fileno(), 65536):
        wall, cpu = time.perf_counter(), cpu_seconds(child.pid)
        output += chunk
        *lines, pending = re.split(rb"[\r\n]", pending + chunk)
        # Only the newest update of a chunk was written at (about) the time it was read.
        steps = [
            int(found[1]) for line in lines if (found := TQDM_STEP.search(line.decode(errors="replace")))
        ]
        if steps:
            marks.append(Mark(steps[-1], wall, cpu))
    if child.wait() != 0:
        tail = output[-4000:].decode("utf-8", errors="replace").replace("\r", "\n")
        raise RuntimeError(f"the reference script failed (exit {child.returncode}):\n{tail}")
    return marks


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median_rate(rates: list[Rate]) -> Rate:
    return Rate(
        statistics.median(rate.per_second for rate in rates),
        statistics.median(rate.per_cpu_second for rate in rates),
    )


def describe(rate: Rate, unit: str) -> str:
    return f"{rate.per_second:.2f} {unit} ({rate.per_cpu_second:.2f} per CPU-second)"


def describe_ratio(ours: Rate, theirs: Rate) -> str:
    return (
        f"ratio {ours.per_second / theirs.per_second:.2f}x "
        f"({ours.per_cpu_second / theirs.per_cpu_second:.2f}x per CPU-second)"
    )


if __name__ == "__main__":
    main()

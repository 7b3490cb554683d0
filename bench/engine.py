"""Engine speed: training steps/s, images/s, adapter switch vs full reload, peak memory.

    python -m bench.engine            # the tiny model on this machine's device (CPU here)
    python -m bench.engine --full     # also an SD 1.5-architecture model with random weights at 512 px
                                      # (speed does not depend on the weights; needs a GPU to be useful)

Prints one line per figure. The tiny run is the same work diffusers' examples/dreambooth/
train_dreambooth_lora.py does at 64 px with prior preservation and batch 1 (about 7 steps/s on a
2-core machine), so the two can be compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
import time
from pathlib import Path

import torch

from bench.workload import build_random_sd15, prepare_photos, timed
from engine.contract.config import TrainingSection
from engine.contract.protocol import AdapterRef, GenerateJob, TrainJob
from engine.generate import Generator
from engine.model import LoadedModel, load_base_model
from engine.train import train_lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--full", action="store_true", help="also bench a full-size SD 1.5-shaped model")
    parser.add_argument("--train-steps", type=int, default=60)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(scratch)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
        # The reference script's defaults: rank 4, no gradient checkpointing (a CPU needs no memory saving).
        tiny = TrainingSection(resolution=64, rank=4, alpha=4, gradient_checkpointing=False)
        bench("tiny", "tiny", data_dir, args.device, tiny, train_steps=args.train_steps)
        if args.full:
            folder = build_random_sd15(data_dir / "models" / "sd15-random")
            # dreambot's own defaults (rank 16, gradient checkpointing) at SD 1.5's 512 px.
            bench(
                "sd15 random",
                str(folder),
                data_dir,
                args.device,
                TrainingSection(),
                train_steps=args.train_steps,
            )


def bench(
    label: str, base: str, data_dir: Path, device: str, training: TrainingSection, *, train_steps: int
) -> None:
    resolution = training.resolution
    load_seconds, model = timed(lambda: load_base_model(base, device, data_dir))
    print(f"[{label}] device {model.device}, {model.dtype}, base load {load_seconds:.2f} s")
    reset_peak_memory(model)

    photos = prepare_photos(data_dir / "photos" / label.replace(" ", "-"), resolution, count=5)
    settings = dataclasses.replace(
        training, max_steps=train_steps, class_images=4, checkpoint_every=10**6, sample_count=1
    )
    adapters = []
    for token in ("benchone", "benchtwo"):
        output_dir = data_dir / "adapters" / label.replace(" ", "-") / token
        request = TrainJob(
            job_id=f"bench-{token}",
            token=token,
            class_word="person",
            photos=[str(photo) for photo in photos],
            output_dir=str(output_dir),
        )
        # The first training also renders and caches the class images; time the steps of the second.
        started: dict[str, float] = {}

        def on_progress(progress, started: dict[str, float] = started) -> None:
            if progress.phase == "training" and progress.step == 1:
                started["first step"] = time.perf_counter()
            if progress.phase == "training" and progress.step == progress.total:
                started["last step"] = time.perf_counter()

        train_lora(model, request, settings, data_dir / "class_images", on_progress=on_progress)
        adapters.append(
            AdapterRef(token=token, class_word="person", path=str(output_dir / "adapter.safetensors"))
        )
    steps_per_second = (train_steps - 1) / (started["last step"] - started["first step"])
    print(
        f"[{label}] training: {steps_per_second:.2f} steps/s at {resolution} px, prior preservation, batch 1+1, "
        f"rank {settings.rank}, gradient checkpointing {'on' if settings.gradient_checkpointing else 'off'}"
    )

    generator = Generator(model)
    job = GenerateJob(
        job_id="bench-generate",
        prompt="portrait photo of benchone person",
        output_dir=str(data_dir / "generations" / "bench"),
        width=resolution,
        height=resolution,
    )
    generator.generate(job)  # warm-up: first call compiles kernels / allocates
    for count in (1, 4):
        seconds, _ = timed(lambda count=count: generator.generate(dataclasses.replace(job, count=count)))
        print(f"[{label}] generation: {count / seconds:.2f} images/s (count {count}, 25 DPM++ steps)")

    generator.generate(dataclasses.replace(job, adapters=[adapters[0]]))
    generator.generate(dataclasses.replace(job, adapters=[adapters[1]]))
    switch_seconds, _ = timed(lambda: generator.adapters.activate([adapters[0]]))
    load_seconds_fresh, _ = timed(
        lambda: (generator.adapters.forget("benchone"), generator.adapters.activate([adapters[0]]))
    )
    reload_seconds, _ = timed(lambda: load_base_model(base, device, data_dir))
    print(
        f"[{label}] adapter switch (cached) {switch_seconds * 1000:.1f} ms, adapter load from file "
        f"{load_seconds_fresh * 1000:.1f} ms, full pipeline reload {reload_seconds * 1000:.0f} ms"
    )
    print(f"[{label}] peak memory: {peak_memory(model)}")


def reset_peak_memory(model: LoadedModel) -> None:
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)


def peak_memory(model: LoadedModel) -> str:
    process = f"process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    if model.device.type == "cuda":
        return f"GPU {torch.cuda.max_memory_allocated(model.device) / 2**30:.2f} GiB allocated, {process}"
    return process


if __name__ == "__main__":
    main()

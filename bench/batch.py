"""Several members in one batch: images/s for 4 members' requests one by one vs in one UNet batch.

    python -m bench.batch             # the tiny model at 64 px, then SD 1.5's architecture at 128 px

(Run it as a module from the project root.) Each request has its own member's adapter (rank 16,
the default), one image, the same seed rule as /imagine. "One by one" is what the engine did before:
four `Generator.generate` calls with switches between cached adapters; "batched" is one
`Generator.generate_batch` call of the four (peft's mixed-batch LoRA forward). The SD 1.5 model has
random weights (bench/workload.py; speed does not depend on them), and so do the adapters: one
training step each, which is enough to give them the real shapes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.workload import build_random_sd15, prepare_photos, timed
from engine.contract.config import TrainingSection
from engine.contract.protocol import AdapterRef, GenerateJob, TrainJob
from engine.generate import Generator
from engine.model import load_base_model
from engine.train import train_lora

TOKENS = ("benchone", "benchtwo", "benchthree", "benchfour")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds of each way (after a warm-up)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(scratch)
        bench("tiny", "tiny", data_dir, args.device, resolution=64, steps=25, repeats=args.repeats)
        sd15 = build_random_sd15(data_dir / "models" / "sd15-random")
        bench("sd15 random", str(sd15), data_dir, args.device, resolution=128, steps=10, repeats=args.repeats)


def bench(
    label: str, base: str, data_dir: Path, device: str, *, resolution: int, steps: int, repeats: int
) -> None:
    model = load_base_model(base, device, data_dir)
    slug = label.replace(" ", "-")
    photos = prepare_photos(data_dir / "photos" / slug, resolution, count=2)
    settings = TrainingSection(
        resolution=resolution,
        max_steps=1,
        prior_preservation=False,
        sample_count=0,
        gradient_checkpointing=False,
    )
    adapters = []
    for token in TOKENS:
        output_dir = data_dir / "adapters" / slug / token
        request = TrainJob(
            job_id=f"bench-{token}",
            token=token,
            class_word="person",
            photos=[str(photo) for photo in photos],
            output_dir=str(output_dir),
        )
        result = train_lora(model, request, settings, data_dir / "class_images")
        adapters.append(AdapterRef(token=token, class_word="person", path=str(result.adapter_path)))

    generator = Generator(model)
    jobs = [
        GenerateJob(
            job_id=f"bench-{index}",
            prompt=f"portrait photo of {adapter.token} as an astronaut",
            output_dir=str(data_dir / "generations" / str(index)),
            negative_prompt="blurry",
            seed=index,
            steps=steps,
            width=resolution,
            height=resolution,
            adapters=[adapter],
        )
        for index, adapter in enumerate(adapters)
    ]
    # Warm-up: every adapter loaded once, and each batch shape seen once.
    for job in jobs:
        generator.generate(job)
    generator.generate_batch(jobs)
    one_by_one = min(timed(lambda: [generator.generate(job) for job in jobs])[0] for _ in range(repeats))
    batched = min(timed(lambda: generator.generate_batch(jobs))[0] for _ in range(repeats))
    what = f"4 members' adapters, {resolution} px, {steps} DPM++ steps, {model.device}, {model.dtype}"
    print(f"[{label}] one by one: {len(jobs) / one_by_one:.2f} images/s ({what})")
    print(f"[{label}] one batch:  {len(jobs) / batched:.2f} images/s ({one_by_one / batched:.2f}x)")


if __name__ == "__main__":
    main()

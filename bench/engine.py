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
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from engine.config import TrainingSection
from engine.generate import GenerationRequest, Generator
from engine.model import LoadedModel, load_base_model
from engine.protocol import AdapterRef
from engine.train import TrainingRequest, train_lora

PHOTO = Path(__file__).resolve().parent.parent.parent / "shared" / "photos" / "astronaut.png"


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
        request = TrainingRequest(
            token=token, class_word="person", photos=tuple(photos), output_dir=output_dir
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
    request = GenerationRequest(
        prompt="portrait photo of benchone person", width=resolution, height=resolution
    )
    generator.generate(request)  # warm-up: first call compiles kernels / allocates
    for count in (1, 4):
        seconds, _ = timed(lambda count=count: generator.generate(dataclasses.replace(request, count=count)))
        print(f"[{label}] generation: {count / seconds:.2f} images/s (count {count}, 25 DPM++ steps)")

    generator.generate(dataclasses.replace(request, adapters=(adapters[0],)))
    generator.generate(dataclasses.replace(request, adapters=(adapters[1],)))
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


def timed(work: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, result


def reset_peak_memory(model: LoadedModel) -> None:
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)


def peak_memory(model: LoadedModel) -> str:
    process = f"process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    if model.device.type == "cuda":
        return f"GPU {torch.cuda.max_memory_allocated(model.device) / 2**30:.2f} GiB allocated, {process}"
    return process


def prepare_photos(folder: Path, resolution: int, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(PHOTO) as image:
        image = image.convert("RGB")
        paths = []
        for index in range(count):
            inset = 20 * index
            crop = image.crop((inset, inset, image.width - inset, image.height - inset))
            path = folder / f"{index}.png"
            crop.resize((resolution, resolution), Image.Resampling.LANCZOS).save(path)
            paths.append(path)
    return paths


def build_random_sd15(folder: Path) -> Path:
    """SD 1.5's architecture (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder) with random weights."""
    from engine.model import ensure_tiny_model

    tiny = StableDiffusionPipeline.from_pretrained(ensure_tiny_model(folder.parent.parent))
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            vocab_size=len(tiny.tokenizer),
            max_position_embeddings=77,
            bos_token_id=tiny.tokenizer.bos_token_id,
            eos_token_id=tiny.tokenizer.eos_token_id,
            pad_token_id=tiny.tokenizer.pad_token_id,
            hidden_act="quick_gelu",
        )
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny.tokenizer,
        unet=unet,
        scheduler=DDPMScheduler.from_config(tiny.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    main()

"""One prepared GPU benchmark: every figure of the README's GPU table, in under 5 minutes.

    python -m bench.gpu                    # SD 1.5 architecture, random weights, 512 px, on the GPU
    python -m bench.gpu --sdxl             # then SDXL at 1024 px, with half of --budget
    python -m bench.gpu --smoke [--sdxl]   # every measurement on the tiny model(s) on the CPU

(Run it as a module from the project root.) The JSON report goes to stdout, one readable line per
figure to stderr. Nothing comes from the network: the model is a diffusers folder with random
weights written to a temporary directory (bench/workload.py; speed does not depend on the weights),
loaded by the engine's own load_base_model and measured through the engine's own code: train_lora,
Generator and its AdapterCache, and engine.worker.Worker, which runs generations between training
steps.

Every measurement has a time cap and the run a budget (--budget), so a slow GPU gets fewer repeats
or a figure left null with its reason, never a run over 5 minutes. The compiled-UNet figures come
from a child process that is killed at its cap, because a compilation cannot be interrupted; it
starts with its section, so that its imports overlap the section's first measurements.

The batch of 4 is 4 members' requests, each with its own adapter, in one Generator.generate_batch
call (peft's mixed-batch LoRA forward); the compiled figures start the engine's way, compiling in
Generator.warm_up. The report's "method" says how each figure is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import itertools
import json
import logging
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import torch
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from bench.intake import max_rss_mb
from bench.workload import build_random_sd15, build_random_sdxl, prepare_photos, timed
from engine.contract.config import Config, GenerationSection, StorageSection, TrainingSection
from engine.contract.protocol import (
    LOG_FORMAT,
    Accepted,
    AdapterRef,
    Error,
    Event,
    GenerateJob,
    Progress,
    TrainJob,
    decode,
    encode,
)
from engine.generate import Generator
from engine.model import LoadedModel, ModelLoadError, ensure_tiny_model, load_base_model, resolve_device
from engine.train import TrainingCancelled, TrainingProgress, default_steps, train_lora
from engine.worker import Emitter, Worker, claim_stdout

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Figure(NamedTuple):
    what: str
    unit: str


# The one list of figures: every section of every run (smoke or full) reports exactly these keys.
FIGURES: dict[str, Figure] = {
    "base_load_s": Figure("loading the base model (load_base_model, local diffusers folder)", "s"),
    "generation_eager_it_s": Figure("generation, eager, 1 image with an adapter: denoising speed", "it/s"),
    "generation_eager_s_per_image": Figure("generation, eager, 1 image with an adapter", "s/image"),
    "generation_compiled_it_s": Figure(
        "generation, compiled UNet, 1 image with an adapter: denoising speed", "it/s"
    ),
    "generation_compiled_s_per_image": Figure(
        "generation, compiled UNet, 1 image with an adapter", "s/image"
    ),
    "compile_warmup_s": Figure("engine start: compiling and warming up the UNet (Generator.warm_up)", "s"),
    "compiled_adapter_switch_first_image_s": Figure(
        "compiled UNet: first image after hotswapping in another adapter", "s"
    ),
    "four_adapters_one_by_one_images_s": Figure(
        "4 requests with 4 members' adapters, one after the other", "images/s"
    ),
    "four_adapters_one_batch_images_s": Figure(
        "4 requests with 4 members' adapters in one batch (Generator.generate_batch)", "images/s"
    ),
    "adapter_switch_cached_ms": Figure("switching to a loaded adapter (AdapterCache.activate)", "ms"),
    "adapter_load_from_file_ms": Figure("loading an adapter from its file (AdapterCache.activate)", "ms"),
    "training_steps_s": Figure(
        "training: prior preservation, batch photo + class image, cached latents", "steps/s"
    ),
    "training_setup_s": Figure("training: from the class images to the first step (encoding, adapter)", "s"),
    "training_finish_s": Figure("training: from the last step to the return (adapter saved, samples)", "s"),
    "class_image_render_s_per_image": Figure("rendering class images (prior preservation)", "s/image"),
    "photos_to_model_10_photos_s": Figure("photos to personal model, 10 photos, class images cached", "s"),
    "photos_to_model_10_photos_100_class_images_s": Figure(
        "photos to personal model, 10 photos, 100 class images to render first", "s"
    ),
    "imagine_latency_idle_s": Figure("/imagine latency through the worker, idle", "s"),
    "imagine_latency_during_training_s": Figure(
        "/imagine latency through the worker while a training runs", "s"
    ),
    "peak_gpu_memory_training_gib": Figure("peak GPU memory (max_memory_allocated) during a training", "GiB"),
    "peak_gpu_memory_generation_gib": Figure(
        "peak GPU memory (max_memory_allocated) during generation", "GiB"
    ),
    "peak_rss_mib": Figure("peak process memory (max RSS), so far in the run", "MiB"),
}
# Null on a CPU run (with the reason); peak_rss_mib stands in for them there.
GPU_MEMORY_FIGURES = ("peak_gpu_memory_training_gib", "peak_gpu_memory_generation_gib")
SECTIONS = ("sd15", "sdxl")
REPORT_KEYS = ("benchmark", "mode", "date", "budget_s", "wall_s", "environment", *SECTIONS)
SECTION_KEYS = ("model", "figures", "null_reasons", "method", "wall_s")

# A member's model as the bot trains it: 10 photos, 100 cached class images, the default steps.
PHOTO_COUNT = 10
PRODUCTION = TrainingSection()
GENERATION = GenerationSection()
PRODUCTION_STEPS = default_steps(PHOTO_COUNT, PRODUCTION)
TOKENS = ("benchone", "benchtwo", "benchthree", "benchfour")
LIVE_TOKEN = "benchlive"
CLASS_WORD = "person"
# Shorter than this left for a measurement and it is skipped rather than cut to nothing.
MIN_MEASUREMENT_S = 1.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much each measurement does; the smoke run's is small, and its report says so."""

    generation_steps: int
    # Timed images per generation figure, after one warm-up image.
    timed_images: int
    # Steps of the timed training and how many of them warm up untimed.
    training_steps: int
    warmup_steps: int
    # Rendered by the first training (timed), then cached for the rest.
    class_images: int
    sample_count: int
    idle_requests: int
    latency_requests: int
    switches: int
    compile_options: dict[str, str]
    budget_s: float
    # Each measurement's cap in the SD 1.5 section; SDXL's are sdxl_cap_scale times longer.
    caps_s: dict[str, float]
    sdxl_cap_scale: float
    # SDXL starts only with this much of the budget left (its model alone takes half a minute).
    sdxl_min_s: float

    def sdxl_reserve_s(self) -> float:
        """What SD 1.5 leaves for SDXL: half the budget, or nothing when half is too short for SDXL."""
        half = self.budget_s / 2
        return half if half >= self.sdxl_min_s else 0.0


# 20 s under 5 minutes: imports happen before the clock starts, and a step may end after a cap.
FULL_BUDGET_S = 280


def full_plan(compile_mode: str) -> Plan:
    return Plan(
        generation_steps=GENERATION.steps,
        timed_images=3,
        training_steps=40,
        warmup_steps=8,
        class_images=4,
        sample_count=PRODUCTION.sample_count,
        idle_requests=2,
        latency_requests=3,
        switches=10,
        compile_options={"mode": compile_mode},
        budget_s=FULL_BUDGET_S,
        caps_s={"training": 60, "generation": 15, "four adapters": 25, "switch": 10, "worker": 40},
        sdxl_cap_scale=2.5,
        sdxl_min_s=120,
    )


# The least that still runs every measurement (a median of one, steps/s over the steps after 2):
# the test suite runs it whole.
SMOKE = Plan(
    generation_steps=3,
    timed_images=1,
    training_steps=6,
    warmup_steps=2,
    class_images=1,
    sample_count=1,
    idle_requests=1,
    latency_requests=1,
    switches=2,
    # Dynamo only: inductor's C++ code generation takes over a minute for the tiny UNet on a CPU.
    compile_options={"backend": "eager"},
    budget_s=110,
    caps_s={"training": 25, "generation": 8, "four adapters": 12, "switch": 4, "worker": 15},
    sdxl_cap_scale=1,
    sdxl_min_s=20,
)


class NotMeasured(Exception):
    """A measurement stopped short; the message is the reason its remaining figures are null."""


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    # CUDA runs behind the Python code that queues its work: a timestamp means nothing before this.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def number(value: float) -> float:
    """Four significant digits: more would be noise."""
    return float(f"{value:.4g}")


class Budget:
    """The run's time budget: each measurement gets its cap, or what is left if that is less."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)

    def deadline(self, cap: float, reserve: float) -> float:
        return time.perf_counter() + max(0.0, min(cap, self.left() - reserve))


def check_deadline(deadline: float, cap: float) -> None:
    if time.perf_counter() > deadline:
        raise NotMeasured(f"over its time cap of {cap:.0f} s")


class Figures:
    """One section's figures: each a number, or null with the reason."""

    def __init__(self, section: str) -> None:
        self.section = section
        self.values: dict[str, float | None] = dict.fromkeys(FIGURES)
        self.null_reasons: dict[str, str] = {}
        self.failures = 0

    def set(self, key: str, value: float) -> None:
        self.values[key] = number(value)
        figure = FIGURES[key]
        say(f"[{self.section}] {figure.what}: {number(value):g} {figure.unit}")

    def null(self, keys: tuple[str, ...], reason: str) -> None:
        """Null every figure of `keys` that has no value yet."""
        for key in keys:
            if self.values[key] is None and key not in self.null_reasons:
                self.null_reasons[key] = reason
                say(f"[{self.section}] {FIGURES[key].what}: not measured ({reason})")


def bench_job(
    adapter: AdapterRef, resolution: int, steps: int, output_dir: Path, *, count: int = 1, seed: int = 0
) -> GenerateJob:
    """What a member's /imagine asks for: their token in the prompt, the default guidance."""
    return GenerateJob(
        job_id=f"bench-{output_dir.name}",
        prompt=f"portrait photo of {adapter.token} as an astronaut, detailed, soft light",
        output_dir=str(output_dir),
        seed=seed,
        steps=steps,
        guidance=GENERATION.guidance,
        width=resolution,
        height=resolution,
        count=count,
        adapters=[adapter],
    )


def time_images(generator: Generator, job: GenerateJob, repeats: int, deadline: float) -> tuple[float, float]:
    """(denoising it/s, seconds per job): medians of `repeats` runs, fewer past the deadline."""
    device = generator.model.device
    rates, seconds = [], []
    for _ in range(repeats):
        stamps: list[float] = []

        def on_step(_step: int, _total: int, stamps: list[float] = stamps) -> None:
            synchronize(device)
            stamps.append(time.perf_counter())

        started = time.perf_counter()
        generator.generate(job, on_step=on_step)  # no output_dir: no PNG written
        seconds.append(time.perf_counter() - started)  # the images are PIL images: synchronized
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        if time.perf_counter() > deadline:
            break
    return statistics.median(rates), statistics.median(seconds)


# ---------------------------------------------------------------------------------------------
# One section: one base model, every measurement


class SectionRun:
    def __init__(
        self,
        name: str,
        plan: Plan,
        budget: Budget,
        device: torch.device,
        data_dir: Path,
        *,
        smoke: bool,
        cap_scale: float,
        reserve_s: float,
    ) -> None:
        self.name = name
        self.plan = plan
        self.budget = budget
        self.device = device
        self.data_dir = data_dir
        self.smoke = smoke
        self.cap_scale = cap_scale
        # Kept for what comes after this section (SDXL), whatever this one's caps say.
        self.reserve_s = reserve_s
        self.figures = Figures(name)
        self.method: dict[str, Any] = {}
        self.model: LoadedModel | None = None
        self.generator: Generator | None = None
        self.folder = Path()
        self.resolution = 0
        self.photos: list[Path] = []
        self.adapters: list[AdapterRef] = []
        self.child: subprocess.Popen[str] | None = None

    @property
    def sdxl(self) -> bool:
        return self.name == "sdxl"

    @property
    def training_settings(self) -> TrainingSection:
        """The engine's defaults (rank, learning rate, gradient checkpointing...) at this model's size."""
        return dataclasses.replace(
            PRODUCTION,
            resolution=self.resolution,
            class_images=self.plan.class_images,
            sample_count=self.plan.sample_count,
        )

    def run(self) -> dict[str, Any]:
        # Started first, so that its imports overlap this section's measurements.
        self.child = start_compiled_child()
        try:
            return self.run_measurements()
        finally:
            stop_child(self.child)  # nothing to stop once it has answered

    def run_measurements(self) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            self.load()
        except Exception as error:
            traceback.print_exc()
            self.figures.failures += 1
            self.figures.null(
                tuple(FIGURES), f"failed: the model did not load: {type(error).__name__}: {error}"
            )
            return self.report(time.perf_counter() - started)
        self.method.update(self.describe())
        self.measure(
            (
                "training_steps_s",
                "training_setup_s",
                "training_finish_s",
                "class_image_render_s_per_image",
                "photos_to_model_10_photos_s",
                "photos_to_model_10_photos_100_class_images_s",
                "peak_gpu_memory_training_gib",
            ),
            "training",
            self.training,
        )
        self.reset_peak_memory()
        self.measure(("generation_eager_it_s", "generation_eager_s_per_image"), "generation", self.eager)
        self.measure(
            (
                "adapter_load_from_file_ms",
                "four_adapters_one_by_one_images_s",
                "four_adapters_one_batch_images_s",
            ),
            "four adapters",
            self.four_adapters,
        )
        self.measure(("adapter_switch_cached_ms",), "switch", self.switch)
        self.record_peak_memory("peak_gpu_memory_generation_gib")  # the batch of 4 included
        self.measure(("imagine_latency_idle_s", "imagine_latency_during_training_s"), "worker", self.worker)
        self.release_model()
        # The rest of the section's share of the budget: a compilation takes as long as it takes.
        self.measure(
            (
                "compile_warmup_s",
                "generation_compiled_it_s",
                "generation_compiled_s_per_image",
                "compiled_adapter_switch_first_image_s",
            ),
            "compiled",
            self.compiled,
        )
        self.figures.set("peak_rss_mib", max_rss_mb())
        return self.report(time.perf_counter() - started)

    def report(self, seconds: float) -> dict[str, Any]:
        if self.smoke:
            model = f"{'tiny-sdxl' if self.sdxl else 'tiny'} (engine/model.py): a smoke run, its figures only show that every measurement runs"
        else:
            architecture = "SDXL 1.0" if self.sdxl else "SD 1.5"
            model = f"{architecture} architecture with random weights (bench/workload.py), loaded by load_base_model"
        return {
            "model": model,
            "figures": self.figures.values,
            "null_reasons": self.figures.null_reasons,
            "method": self.method,
            "wall_s": number(seconds),
        }

    def measure(self, keys: tuple[str, ...], cap_name: str, work: Callable[[float, float], None]) -> None:
        """Run one measurement within its cap; whatever stops it nulls its remaining figures."""
        cap = self.plan.caps_s.get(cap_name, math.inf) * self.cap_scale
        deadline = self.budget.deadline(cap, self.reserve_s)
        if deadline - time.perf_counter() < MIN_MEASUREMENT_S:
            self.figures.null(keys, "skipped: the run's time budget is spent; try a larger --budget")
            return
        try:
            work(deadline, min(cap, deadline - time.perf_counter()))
        except NotMeasured as reason:
            self.figures.null(keys, str(reason))
        except Exception as error:
            traceback.print_exc()
            self.figures.failures += 1
            self.figures.null(keys, f"failed: {type(error).__name__}: {error}")

    # -- the model ------------------------------------------------------------------------------

    def load(self) -> None:
        if self.smoke:
            build_seconds, folder = timed(lambda: ensure_tiny_model(self.data_dir, sdxl=self.sdxl))
        else:
            builder = build_random_sdxl if self.sdxl else build_random_sd15
            target = self.data_dir / "models" / f"{self.name}-random"
            build_seconds, folder = timed(lambda: builder(target, build_device=self.device))
            self.release_model()  # the weights were built on the GPU, then moved off it to be written
        self.folder = Path(folder)
        say(f"[{self.name}] model written to {self.folder} in {build_seconds:.1f} s")
        load_seconds, model = timed(
            lambda: load_base_model(str(self.folder), str(self.device), self.data_dir)
        )
        self.model = model
        self.generator = Generator(model)
        self.resolution = model.native_resolution
        self.figures.set("base_load_s", load_seconds)
        self.photos = prepare_photos(self.data_dir / "photos" / self.name, self.resolution, PHOTO_COUNT)

    def describe(self) -> dict[str, Any]:
        assert self.model is not None
        plan = self.plan
        return {
            "dtype": str(self.model.dtype),
            "resolution": self.resolution,
            "generation_steps": plan.generation_steps,
            "timed_images": plan.timed_images,
            "training_steps": plan.training_steps,
            "warmup_steps": plan.warmup_steps,
            "class_images_rendered": plan.class_images,
            "sample_count": plan.sample_count,
            "switches": plan.switches,
            "latency_requests": plan.latency_requests,
            "generation": (
                f"Generator.generate, {plan.generation_steps} DPM++ steps, guidance {GENERATION.guidance:g} "
                "(the UNet sees 2 latents per image), one member's adapter; median of timed_images after a "
                "warm-up image; it/s between the first and the last denoising step, synchronized"
            ),
            "training": (
                f"train_lora with the engine's [training] defaults at {self.resolution} px (rank {PRODUCTION.rank}, "
                f"gradient checkpointing {PRODUCTION.gradient_checkpointing}), {PHOTO_COUNT} photos; steps/s over "
                "the steps after warmup_steps"
            ),
            "photos_to_model": (
                f"extrapolated from the timed training: its setup scaled to {PHOTO_COUNT} photos + "
                f"{PRODUCTION.class_images} class images to encode (an upper bound: the adapter's setup "
                f"is counted per image), + {PRODUCTION_STEPS} steps (default_steps for {PHOTO_COUNT} photos) "
                f"at the measured steps/s, + the measured finish (adapter saved, sample_count samples); "
                f"with class images to render, + {PRODUCTION.class_images} x the measured time per class "
                "image. Photo intake (bench.intake) is not included"
            ),
            "four_adapters": (
                "4 requests of 1 image, each with another member's loaded adapter: one after the other "
                "(Generator.generate), then all 4 as one UNet batch (Generator.generate_batch, peft's "
                "mixed-batch LoRA forward) after a warm-up batch"
            ),
            "adapter_switch": "AdapterCache.activate between two loaded adapters, median of switches",
            "compiled": (
                f"pipeline.unet.compile({', '.join(f'{k}={v!r}' for k, v in plan.compile_options.items())}) "
                "as the engine starts with [model] compile on (Generator(compile_unet=True) with "
                f"{GENERATION.adapter_cache} adapter slots, then Generator.warm_up, timed), in a child process "
                "killed at its cap; then a warm-up image with one adapter, the timed images, and the first "
                "image after hotswapping in the other adapter"
            ),
            "imagine_latency": (
                "engine.worker.Worker on this process's model: from a generate job's line to its result "
                "event, idle and while a training job runs (the worker renders it between two steps); "
                "median of latency_requests"
            ),
        }

    def release_model(self) -> None:
        """Drop the model, if any, and hand its GPU memory back (for the compiled child's own copy)."""
        self.model = self.generator = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def record_peak_memory(self, key: str) -> None:
        if self.device.type == "cuda":
            self.figures.set(key, torch.cuda.max_memory_allocated(self.device) / 2**30)
        else:
            self.figures.null((key,), "no CUDA device in this run: see peak_rss_mib")

    def pictures(self, name: str) -> Path:
        """A job's output folder (only the worker writes into it: a direct generate() writes nothing)."""
        return self.data_dir / "pictures" / f"{self.name}-{name}"

    def ready(self) -> tuple[LoadedModel, Generator, list[AdapterRef]]:
        if self.model is None or self.generator is None:
            raise NotMeasured("skipped: the model did not load")
        if not self.adapters:
            raise NotMeasured("skipped: the training measurement produced no adapter")
        return self.model, self.generator, self.adapters

    # -- the measurements -----------------------------------------------------------------------

    def training(self, deadline: float, cap: float) -> None:
        """One training the way the worker runs it, timed phase by phase from its progress reports."""
        assert self.model is not None
        plan, figures = self.plan, self.figures
        events: list[tuple[str, int, float]] = []

        def on_progress(progress: TrainingProgress) -> None:
            events.append((progress.phase, progress.step, time.perf_counter()))

        job = TrainJob(
            job_id=f"bench-{self.name}-train-{TOKENS[0]}",
            token=TOKENS[0],
            class_word=CLASS_WORD,
            photos=[str(photo) for photo in self.photos],
            output_dir=str(self.data_dir / "adapters" / self.name / TOKENS[0]),
            steps=plan.training_steps,
        )
        self.reset_peak_memory()
        started = time.perf_counter()
        try:
            result = train_lora(
                self.model,
                job,
                self.training_settings,
                self.data_dir / "class_images",
                on_progress=on_progress,
                should_stop=lambda: time.perf_counter() > deadline,
            )
        except TrainingCancelled:
            result = None
        finished = time.perf_counter()
        self.record_peak_memory("peak_gpu_memory_training_gib")

        class_done = [
            stamp for phase, step, stamp in events if phase == "class images" and step == plan.class_images
        ]
        steps = [(step, stamp) for phase, step, stamp in events if phase == "training"]
        timed_steps = [(step, stamp) for step, stamp in steps if step >= plan.warmup_steps]
        if class_done:
            per_class_image = (class_done[-1] - started) / plan.class_images
            figures.set("class_image_render_s_per_image", per_class_image)
        if len(timed_steps) < 2:
            raise NotMeasured(
                f"fewer than {plan.warmup_steps + 1} training steps within its cap of {cap:.0f} s"
            )
        (first, first_stamp), (last, last_stamp) = timed_steps[0], timed_steps[-1]
        steps_per_second = (last - first) / (last_stamp - first_stamp)
        figures.set("training_steps_s", steps_per_second)
        if not class_done:
            raise RuntimeError("the training rendered no class images: the class-image cache was not empty")
        setup = max(0.0, steps[0][1] - class_done[-1] - 1 / steps_per_second)
        figures.set("training_setup_s", setup)
        if result is None:
            raise NotMeasured(f"the training did not finish within its cap of {cap:.0f} s")
        finish = finished - steps[-1][1]
        figures.set("training_finish_s", finish)

        encoded_now = PHOTO_COUNT + plan.class_images
        encoded_in_production = PHOTO_COUNT + PRODUCTION.class_images
        cached = setup * encoded_in_production / encoded_now + PRODUCTION_STEPS / steps_per_second + finish
        figures.set("photos_to_model_10_photos_s", cached)
        figures.set(
            "photos_to_model_10_photos_100_class_images_s", cached + PRODUCTION.class_images * per_class_image
        )

        # Four members' adapters: copies of this one (the speed of an adapter does not depend on its weights).
        self.adapters = [AdapterRef(TOKENS[0], CLASS_WORD, str(result.adapter_path))]
        for token in TOKENS[1:]:
            copy = self.data_dir / "adapters" / self.name / token / result.adapter_path.name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(result.adapter_path, copy)
            self.adapters.append(AdapterRef(token, CLASS_WORD, str(copy)))

    def eager(self, deadline: float, cap: float) -> None:
        _model, generator, adapters = self.ready()
        job = bench_job(adapters[0], self.resolution, self.plan.generation_steps, self.pictures("eager"))
        generator.generate(job)  # warm-up: cuDNN picks its kernels, the allocator grows
        check_deadline(deadline, cap)
        it_s, seconds = time_images(generator, job, self.plan.timed_images, deadline)
        self.figures.set("generation_eager_it_s", it_s)
        self.figures.set("generation_eager_s_per_image", seconds)

    def four_adapters(self, deadline: float, cap: float) -> None:
        _model, generator, adapters = self.ready()
        loads = []
        for adapter in [adapter for adapter in adapters if adapter.token not in generator.adapters.loaded]:
            seconds, _ = timed(lambda adapter=adapter: generator.adapters.activate([adapter]))
            loads.append(seconds)
        generator.adapters.activate([])
        self.figures.set("adapter_load_from_file_ms", statistics.median(loads) * 1000)
        check_deadline(deadline, cap)

        steps, resolution = self.plan.generation_steps, self.resolution
        one_by_one = [
            bench_job(adapter, resolution, steps, self.pictures(adapter.token), seed=n)
            for n, adapter in enumerate(adapters)
        ]
        seconds, _ = timed(lambda: [generator.generate(job) for job in one_by_one])
        self.figures.set("four_adapters_one_by_one_images_s", len(one_by_one) / seconds)
        check_deadline(deadline, cap)

        # The same 4 requests in one UNet batch, each image through its own member's adapter.
        generator.generate_batch(one_by_one)  # warm-up: 8 latents at once are new shapes for cuDNN
        check_deadline(deadline, cap)
        seconds, _ = timed(lambda: generator.generate_batch(one_by_one))
        self.figures.set("four_adapters_one_batch_images_s", len(one_by_one) / seconds)

    def switch(self, deadline: float, cap: float) -> None:
        _model, generator, adapters = self.ready()
        switches = []
        for n in range(self.plan.switches):
            seconds, _ = timed(lambda n=n: generator.adapters.activate([adapters[n % 2]]))
            switches.append(seconds)
            if time.perf_counter() > deadline:
                break
        generator.adapters.activate([])
        self.figures.set("adapter_switch_cached_ms", statistics.median(switches) * 1000)

    def worker(self, deadline: float, cap: float) -> None:
        """/imagine through the engine worker's own scheduling, fed job lines as the bot sends them."""
        model, generator, adapters = self.ready()
        config = Config(storage=StorageSection(data_dir=str(self.data_dir)), training=self.training_settings)
        events = EventLog()
        worker = Worker(config, model, generator, Emitter(events))
        thread = threading.Thread(target=worker.run_gpu, name="bench-worker-gpu")
        thread.start()
        imagines = itertools.count()

        def imagine() -> float:
            folder = self.pictures(f"imagine-{next(imagines)}")
            job = bench_job(adapters[0], self.resolution, self.plan.generation_steps, folder)
            sent = time.perf_counter()
            worker.handle_line(encode(job))
            stamp, _ = events.wait_for(job.job_id, is_result, sent, deadline, cap)
            return stamp - sent

        try:
            idle = [imagine() for _ in range(self.plan.idle_requests)]
            self.figures.set("imagine_latency_idle_s", statistics.median(idle))

            training_id = f"bench-{self.name}-train"
            train = TrainJob(
                job_id=training_id,
                token=LIVE_TOKEN,
                class_word=CLASS_WORD,
                photos=[str(photo) for photo in self.photos],
                output_dir=str(self.data_dir / "adapters" / self.name / LIVE_TOKEN),
                steps=10**6,  # stopped by close() below
                resume=False,
            )

            def training_step(event: Event) -> bool:
                return isinstance(event, Progress) and event.phase == "training"

            worker.handle_line(encode(train))
            # Step 1 is reported at once, the next one a throttle interval later: by then it is steady.
            steady = time.perf_counter()
            events.wait_for(training_id, lambda e: training_step(e) and e.step >= 2, steady, deadline, cap)
            during = []
            for _ in range(self.plan.latency_requests):
                during.append(imagine())
                # The next request must arrive mid-training again, not before the training is back.
                events.wait_for(training_id, training_step, time.perf_counter(), deadline, cap)
            self.figures.set("imagine_latency_during_training_s", statistics.median(during))
        finally:
            worker.close()  # stops the training at its next step, as a shutdown does
            thread.join()

    def compiled(self, deadline: float, cap: float) -> None:
        if not self.adapters:
            raise NotMeasured("skipped: the training measurement produced no adapter")
        spec = {
            "base": str(self.folder),
            "device": str(self.device),
            "data_dir": str(self.data_dir),
            "adapters": [dataclasses.asdict(adapter) for adapter in self.adapters[:2]],
            "resolution": self.resolution,
            "steps": self.plan.generation_steps,
            "timed_images": self.plan.timed_images,
            "compile": self.plan.compile_options,
            "seconds": deadline - time.perf_counter(),
        }
        child = self.child
        assert child is not None  # started by run()
        try:
            output, _ = child.communicate(
                json.dumps(spec) + "\n", timeout=max(0.0, deadline - time.perf_counter())
            )
        except subprocess.TimeoutExpired:
            stop_child(child)
            raise NotMeasured(
                f"the compiled run did not finish within its {cap:.0f} s; try a larger --budget"
            ) from None
        if child.returncode != 0:
            raise RuntimeError(
                f"the compiled run exited with status {child.returncode} (its traceback is above)"
            )
        for key, value in json.loads(output.strip().splitlines()[-1]).items():
            self.figures.set(key, value)


def is_result(event: Event) -> bool:
    """A job's result event: neither Accepted nor Progress (EventLog.wait_for raises on an Error)."""
    return not isinstance(event, Accepted | Progress)


class EventLog:
    """The worker's protocol stream: each event it writes, with the time it was written."""

    def __init__(self) -> None:
        self._events: list[tuple[float, Any]] = []
        self._written = threading.Condition()

    def write(self, text: str) -> int:
        stamp = time.perf_counter()
        with self._written:
            for line in text.splitlines():
                if line.strip():
                    self._events.append((stamp, decode(line)))  # a worker writes events only
            self._written.notify_all()
        return len(text)

    def flush(self) -> None:
        pass

    def wait_for(
        self, job_id: str, match: Callable[[Event], bool], after: float, deadline: float, cap: float
    ) -> tuple[float, Event]:
        """The first event about `job_id` written at or after `after` that matches, and when it was
        written; an Error event about the job raises."""
        with self._written:
            while True:
                for stamp, event in self._events:
                    if stamp < after or getattr(event, "job_id", None) != job_id:
                        continue
                    if isinstance(event, Error):
                        raise RuntimeError(f"the worker failed {job_id}: {event.message}")
                    if match(event):
                        return stamp, event
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise NotMeasured(f"over its time cap of {cap:.0f} s")
                self._written.wait(left)


def skipped_section(name: str, reason: str) -> dict[str, Any]:
    say(f"[{name}] {reason}")
    return {
        "model": None,
        "figures": dict.fromkeys(FIGURES),
        "null_reasons": dict.fromkeys(FIGURES, reason),
        "method": {},
        "wall_s": 0.0,
    }


# ---------------------------------------------------------------------------------------------
# The compiled UNet, in a child process


def start_compiled_child() -> subprocess.Popen[str]:
    """The compiled run's process: it imports torch and diffusers at once, then waits for its spec
    (one JSON line on stdin) and answers one JSON line of figures on stdout."""
    command = [sys.executable, "-m", "bench.gpu", "--compiled-child"]
    # Its own process group, so that inductor's compile workers go with it at the cap.
    return subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def stop_child(child: subprocess.Popen[str]) -> None:
    """Kill the compiled run's process group, unless it has exited."""
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()


def compiled_child(spec: dict[str, Any]) -> int:
    """Load the model again and start a compiled Generator the way the engine starts (warm_up), then
    time images: the figures as one JSON line on stdout."""
    out = claim_stdout()
    deadline = time.perf_counter() + spec["seconds"]
    model = load_base_model(spec["base"], spec["device"], Path(spec["data_dir"]))
    # engine.worker.start_worker's generator with [model] compile on: every slot, compiled before Ready.
    generator = Generator(
        model,
        GENERATION.adapter_cache,
        compile_unet=True,
        hotswap_rank=PRODUCTION.rank,
        compile_options=spec["compile"],
    )
    warm_up, _ = timed(generator.warm_up)
    first, second = (AdapterRef(**adapter) for adapter in spec["adapters"])
    job = bench_job(
        first, spec["resolution"], spec["steps"], Path(spec["data_dir"]) / "pictures" / "compiled"
    )
    generator.generate(job)  # warm-up image: the first adapter hotswapped into its slot
    it_s, seconds = time_images(generator, job, spec["timed_images"], deadline)
    switched, _ = timed(lambda: generator.generate(dataclasses.replace(job, adapters=[second])))
    figures = {
        "compile_warmup_s": warm_up,
        "generation_compiled_it_s": it_s,
        "generation_compiled_s_per_image": seconds,
        "compiled_adapter_switch_first_image_s": switched,
    }
    out.write(json.dumps(figures) + "\n")
    out.flush()
    return 0


# ---------------------------------------------------------------------------------------------
# The run


def environment(device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{package: metadata.version(package) for package in ("diffusers", "transformers", "peft")},
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "gpu_memory_gib": number(torch.cuda.get_device_properties(device).total_memory / 2**30)
        if cuda
        else None,
        "cuda": torch.version.cuda,
        "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
        # As the engine leaves them: the benchmark measures what production runs.
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "xformers_installed": importlib.util.find_spec("xformers") is not None,
        "bitsandbytes_installed": importlib.util.find_spec("bitsandbytes") is not None,
        "cpu_threads": torch.get_num_threads(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny model(s) on the CPU, small counts")
    parser.add_argument("--sdxl", action="store_true", help="then SDXL, with half of the budget")
    parser.add_argument("--device", help="torch device (default: cuda, or cpu with --smoke)")
    parser.add_argument(
        "--budget",
        type=float,
        help=f"seconds for the whole run (default {FULL_BUDGET_S}, {SMOKE.budget_s:g} with --smoke)",
    )
    parser.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode for the compiled figures (max-autotune-no-cudagraphs compiles for minutes)",
    )
    parser.add_argument("--compiled-child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    # One line per figure: not diffusers' "no LoRA keys for the text encoder" at every adapter load,
    # nor peft's warning that a training adapter joins the members' adapters (both are expected here).
    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=LOG_FORMAT, force=True)
    if args.compiled_child:
        spec = sys.stdin.readline()
        # No spec: the run ended before its compiled measurement (it kills this process otherwise).
        return compiled_child(json.loads(spec)) if spec else 0

    out = claim_stdout()  # stdout is the JSON report alone; whatever libraries print goes to stderr
    plan = SMOKE if args.smoke else full_plan(args.compile_mode)
    if args.budget is not None:
        plan = dataclasses.replace(plan, budget_s=args.budget)
    try:
        device = resolve_device(args.device or ("cpu" if args.smoke else "auto"))
    except ModelLoadError as error:
        say(str(error))
        return 2
    if not args.smoke and device.type != "cuda":
        say(
            f"no CUDA device ({device} would take hours): run `python -m bench.gpu --smoke` to check the script"
        )
        return 2
    budget = Budget(plan.budget_s)
    say(f"bench.gpu {'smoke run' if args.smoke else 'run'} on {device}, budget {plan.budget_s:.0f} s")

    sections: dict[str, dict[str, Any]] = {}
    failures = 0
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        data_dir = Path(scratch).resolve()
        for name in SECTIONS:
            if name == "sdxl" and not args.sdxl:
                sections[name] = skipped_section(name, "not asked for: run with --sdxl")
                continue
            if name == "sdxl" and budget.left() < plan.sdxl_min_s:
                reason = (
                    f"skipped: {max(0.0, budget.left()):.0f} s of the {plan.budget_s:.0f} s budget left, "
                    f"SDXL needs {plan.sdxl_min_s:.0f} s; try a larger --budget"
                )
                sections[name] = skipped_section(name, reason)
                continue
            section = SectionRun(
                name,
                plan,
                budget,
                device,
                data_dir,
                smoke=args.smoke,
                cap_scale=plan.sdxl_cap_scale if name == "sdxl" else 1.0,
                reserve_s=plan.sdxl_reserve_s() if name == "sd15" and args.sdxl else 0.0,
            )
            sections[name] = section.run()
            failures += section.figures.failures

    report = {
        "benchmark": "python -m bench.gpu" + (" --smoke" if args.smoke else ""),
        "mode": "smoke" if args.smoke else "full",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "budget_s": plan.budget_s,
        "wall_s": number(time.perf_counter() - budget.started),
        "environment": environment(device),
        **sections,
    }
    out.write(json.dumps(report, indent=2) + "\n")
    out.flush()
    say(f"done in {report['wall_s']:g} s" + (f", {failures} measurement(s) failed" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

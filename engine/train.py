"""DreamBooth LoRA training on the worker's shared, already loaded pipeline.

The recipe is diffusers' examples/dreambooth/train_dreambooth_lora.py (and its SDXL sibling), reshaped
for a bot that trains many small adapters on one base model that is also serving generation jobs:

* The base weights are never copied. A peft adapter named TRAINING_ADAPTER is added to the shared UNet
  (and text encoders) for the run and removed again in a `finally`, so afterwards the pipeline computes
  exactly what it computed before, and between steps it can render other people's images
  (`between_steps`).
* Photos and class images go through the VAE once, the two prompts through the text encoders once
  (unless those are trained). A step is one UNet forward and backward on one photo plus one class image.
* Class images (prior preservation) are rendered by the base model itself and cached per base model,
  class word and resolution, so only the first training of a class pays for them.
* Checkpoints hold the adapter, optimizer and RNG state, so a resumed run ends with the adapter an
  uninterrupted one would have produced.
* The adapter is saved as a kohya LoRA file (engine.contract.kohya), with the alpha it was trained with and the
  metadata A1111, ComfyUI and Civitai read; checkpoints keep peft's own names, which resume needs.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import recurse_remove_peft_layers
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from PIL import Image, ImageOps
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from engine.contract import kohya
from engine.contract.config import TrainingSection
from engine.contract.protocol import CHECKPOINTS_DIR, TrainJob
from engine.memory import raise_if_test_oom
from engine.model import LoadedModel

log = logging.getLogger(__name__)

# The peft adapter name while training runs on the shared pipeline.
TRAINING_ADAPTER = "dreambot_training"
ADAPTER_FILE = "adapter.safetensors"
METADATA_FILE = kohya.TRAINING_FILE
SAMPLES_DIR = "samples"
PREVIEW_FILE = "preview.png"

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# Class images render a few at a time; four 512 px images at once fit any GPU that can train.
RENDER_BATCH_PIXELS = 4 * 512 * 512
MAX_RENDER_BATCH = 4
# The reference script's defaults.
WEIGHT_DECAY = 1e-2
MAX_GRAD_NORM = 1.0
# Exponential smoothing of the reported loss: the per-step loss depends mostly on the random timestep.
LOSS_SMOOTHING = 0.9


class TrainingCancelled(Exception):
    """`should_stop` asked for it; the pipeline is clean again and checkpoints are kept for a resume."""


@dataclass(frozen=True)
class TrainingProgress:
    phase: str  # "class images" | "training" | "samples"
    step: int
    total: int
    # Reads the smoothed loss after `step` (see `loss`); None where a phase has no loss.
    read_loss: Callable[[], float | None] | None
    eta_seconds: float | None
    # The [training] preview_at sample, on the one step that rendered it.
    preview: Path | None = None

    @property
    def loss(self) -> float | None:
        """On a GPU this waits for the steps so far to finish (a host sync): read it only to show it."""
        return None if self.read_loss is None else self.read_loss()


@dataclass
class TrainingResult:
    adapter_path: Path
    metadata_path: Path
    samples: list[Path]
    steps: int
    # Wall time to the saved adapter, over all resumed runs; class images included, samples not.
    seconds: float
    # The loss of every step, from step 1 (resumed runs included).
    losses: list[float]
    metadata: dict[str, Any]


def default_steps(photo_count: int, settings: TrainingSection) -> int:
    """steps_per_photo per photo, plus extra_steps_under_10_photos for small sets, capped at max_steps."""
    steps = settings.steps_per_photo * photo_count
    if photo_count < 10:
        steps += settings.extra_steps_under_10_photos
    return max(1, min(steps, settings.max_steps))


# A compiled UNet (engine.generate with [model] compile) serves generation only: everything a training
# runs itself (its steps' forward and backward, class images, preview, samples) runs it eagerly. Through it,
# a first training compiled forward and backward graphs of its own (4 steps of the tiny model on one CPU
# thread: 134 s, 5 s eager), spent dynamo's recompile limit and backpropagated through a hotswap graph.
# Generations handed over between steps run with the default stance again (_generations_between).
# The stance is process-wide, which is safe: the worker runs every UNet call on one thread.
@torch.compiler.set_stance("force_eager")
def train_lora(
    model: LoadedModel,
    job: TrainJob,
    settings: TrainingSection,
    class_images_dir: Path,
    *,
    on_progress: Callable[[TrainingProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    between_steps: Callable[[], bool] | None = None,
    jobs_waiting: Callable[[], bool] | None = None,
) -> TrainingResult:
    """Train a LoRA adapter for `job` on `model`'s pipeline and write it under job.output_dir.

    The job's values were checked when it was made; ValueError says that a photo is missing.

    `should_stop` is polled before every step and every denoising step of the images rendered here;
    True raises TrainingCancelled. `between_steps` runs after every optimizer step at which
    `jobs_waiting` (None: always) says True, and after every batch of class images, with the
    compiler's default stance, the pipeline in train mode and TRAINING_ADAPTER's weights set aside
    (its peft_config stays): a job that uses the pipeline must choose its own adapters (set_adapters /
    disable_lora) and modes (eval) and return True; the training state is then restored. Whatever
    happens, the pipeline is left with no TRAINING_ADAPTER, no LoRA active, nothing requiring grad,
    everything in eval mode.
    """
    started = time.monotonic()
    photos = [Path(photo) for photo in job.photos]
    missing = [str(photo) for photo in photos if not photo.is_file()]
    if missing:
        log.error("training %s: %d photos are gone, %s first", job.job_id, len(missing), missing[0])
        raise ValueError(f"{len(missing)} of the training photos are gone (deleted before the training ran?)")
    pipeline = model.pipeline
    report = on_progress or (lambda _progress: None)
    stop = should_stop or (lambda: False)
    total = job.steps if job.steps is not None else default_steps(len(photos), settings)
    instance_prompt = f"photo of {job.token} {job.class_word}"
    class_prompt = f"photo of a {job.class_word}"
    output_dir = Path(job.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpointing_was_on = pipeline.unet.is_gradient_checkpointing

    try:
        for module in _modules(pipeline):
            module.requires_grad_(False)
        # The base model alone renders class images and encodes the prompts.
        _select_adapter(_lora_models(pipeline), None)
        class_paths: list[Path] = []
        if settings.prior_preservation:
            class_paths = _class_images(
                model,
                class_prompt,
                job.class_word,
                settings,
                class_images_dir,
                report,
                stop,
                between_steps,
            )
        prompts = [instance_prompt, class_prompt] if class_paths else [instance_prompt]
        examples = _encode_examples(model, photos, class_paths, prompts, settings)

        trainer = _Trainer(model, settings, examples, prompts)
        fingerprint = {
            "base_model": model.base,
            "dtype": str(model.dtype),  # an fp16 (GPU) run's optimizer and loss scaler do not fit an fp32 one
            "token": job.token,
            "class_word": job.class_word,
            "photo_count": len(photos),
            "class_images": len(class_paths),
            "steps": total,
            **{key: getattr(settings, key) for key in _FINGERPRINT_SETTINGS},
        }
        checkpoints = output_dir / CHECKPOINTS_DIR
        resumed = _load_checkpoint(checkpoints, fingerprint, trainer) if job.resume else None
        if resumed is None:
            shutil.rmtree(checkpoints, ignore_errors=True)
        step, settled_losses, smoothed, earlier_seconds = resumed or (0, [], None, 0.0)
        losses = _StepLosses(settled_losses, smoothed)

        loop_started, first_step = time.monotonic(), step
        preview_step = math.ceil(total * settings.preview_at) if settings.preview_at > 0 else None
        while step < total:
            if stop():
                # A shutdown stops here too: keep every step done so far for the resume.
                if step > first_step:
                    seconds = earlier_seconds + time.monotonic() - started
                    _save_checkpoint(
                        checkpoints, step, trainer, fingerprint, losses.values(), losses.smoothed(), seconds
                    )
                raise TrainingCancelled(f"training cancelled after step {step} of {total}")
            raise_if_test_oom("train", step + 1)
            losses.append(trainer.step(step))
            step += 1
            if step % settings.checkpoint_every == 0 and step < total:
                seconds = earlier_seconds + time.monotonic() - started
                _save_checkpoint(
                    checkpoints, step, trainer, fingerprint, losses.values(), losses.smoothed(), seconds
                )
            per_step = (time.monotonic() - loop_started) / (step - first_step)
            preview = None
            if step == preview_step:
                try:
                    preview = trainer.render_preview(job, settings, output_dir / PREVIEW_FILE, stop)
                except TrainingCancelled:
                    # Stopped while drawing it: no preview, and the stop check above keeps the steps.
                    preview = None
            smoothed_loss = functools.partial(losses.smoothed, step)
            report(
                TrainingProgress("training", step, total, smoothed_loss, per_step * (total - step), preview)
            )
            # The pipeline is handed over (adapter set aside, stance switched) only to a job that waits.
            if between_steps is not None and (jobs_waiting is None or jobs_waiting()):
                trainer.hand_over(between_steps)

        seconds = earlier_seconds + time.monotonic() - started
        metadata = {
            "base_model": model.base,
            "pipeline": type(pipeline).__name__,
            "token": job.token,
            "class_word": job.class_word,
            "instance_prompt": instance_prompt,
            "class_prompt": class_prompt if class_paths else None,
            "sample_prompt": sample_prompt(job, settings),
            "steps": total,
            "rank": settings.rank,
            "alpha": settings.alpha,
            "learning_rate": settings.learning_rate,
            "photo_count": len(photos),
            "resolution": settings.resolution,
            "train_text_encoder": settings.train_text_encoder,
            "prior_preservation": bool(class_paths),
            "class_images": len(class_paths),
            "prior_loss_weight": settings.prior_loss_weight,
            "seed": settings.seed,
            "seconds": round(seconds, 1),
            "final_loss": round(losses.smoothed(), 5),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "dreambot_version": dreambot_version(),
        }
        adapter_path = _save_adapter(model, trainer.models, settings.alpha, metadata, output_dir)
        metadata_path = output_dir / METADATA_FILE
        metadata_path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")

        # Samples show the adapter as it will be used: TRAINING_ADAPTER alone, in eval mode.
        _select_adapter(_lora_models(pipeline), None)
        _select_adapter(trainer.models.values(), TRAINING_ADAPTER)
        for module in trainer.models.values():
            module.eval()
        samples = _render_samples(pipeline, job, settings, output_dir / SAMPLES_DIR, report, stop)
        shutil.rmtree(checkpoints, ignore_errors=True)
        return TrainingResult(adapter_path, metadata_path, samples, total, seconds, losses.values(), metadata)
    finally:
        _restore_pipeline(pipeline, checkpointing_was_on)


# ---------------------------------------------------------------------------------------------
# The training state and one step


@dataclass
class _Examples:
    """Everything a step reads, computed once: latent distributions and (frozen) prompt encodings."""

    # VAE posterior of every photo, then every class image: (n, C, h, w), fp32.
    means: torch.Tensor
    stds: torch.Tensor
    photo_count: int
    class_count: int
    # Encodings of [instance prompt, class prompt] (or just the instance prompt without prior
    # preservation); None when the text encoders are trained and must run every step.
    embeds: torch.Tensor | None
    pooled: torch.Tensor | None  # SDXL only
    time_ids: torch.Tensor | None  # SDXL only


class _StepLosses:
    """Every step's loss, left on the device until something reads it: reading waits for the device (a
    host sync on a GPU), so it happens when progress shows the loss or a checkpoint saves it, all the
    losses not read yet at once, and not at every step."""

    def __init__(self, settled: list[float], smoothed: float | None) -> None:
        self._settled = settled
        self._pending: list[torch.Tensor] = []
        # The smoothed loss after each step read so far (a resumed run's from its checkpoint's step on).
        self._smoothed: dict[int, float] = {} if smoothed is None else {len(settled): smoothed}

    def append(self, loss: torch.Tensor) -> None:
        self._pending.append(loss)

    def values(self) -> list[float]:
        """The loss of every step, from step 1."""
        self._settle()
        return list(self._settled)

    def smoothed(self, step: int | None = None) -> float | None:
        """The exponentially smoothed loss after `step` (the newest step when None)."""
        self._settle()
        return self._smoothed.get(len(self._settled) if step is None else step)

    def _settle(self) -> None:
        if not self._pending:
            return
        for loss in torch.stack(self._pending).tolist():  # one copy to the host for all of them
            previous = self._smoothed.get(len(self._settled))
            self._settled.append(loss)
            self._smoothed[len(self._settled)] = (
                loss if previous is None else LOSS_SMOOTHING * previous + (1 - LOSS_SMOOTHING) * loss
            )
        self._pending.clear()


class _Trainer:
    """The adapter, optimizer and noise RNG of one run, and the step that updates them."""

    def __init__(
        self,
        model: LoadedModel,
        settings: TrainingSection,
        examples: _Examples,
        prompts: list[str],
    ) -> None:
        pipeline = model.pipeline
        self.model = model
        self.settings = settings
        self.examples = examples
        self.prompts = prompts
        self.unet = pipeline.unet
        self.models: dict[str, torch.nn.Module] = {"unet": self.unet}
        if settings.train_text_encoder:
            self.models.update((name, getattr(pipeline, name)) for name in _text_encoder_names(pipeline))
        # Its own DDPM scheduler: pipeline.scheduler belongs to the generation jobs.
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        self.device = model.device
        # Instance loss + prior_loss_weight * class loss, as the reference script computes it.
        weights = [1.0, settings.prior_loss_weight] if examples.class_count else [1.0]
        self.loss_weights = torch.tensor(weights, device=self.device)
        # The same switches on every device: CPU autocast has bf16 and fp16, and GradScaler a CPU backend.
        self.autocast = model.dtype != torch.float32
        # bf16 has fp32's range and needs no loss scaling; fp16 gradients underflow without it.
        self.scaler = torch.amp.GradScaler(model.device.type, enabled=model.dtype == torch.float16)
        self.generator = torch.Generator(self.device).manual_seed(settings.seed)
        self._epoch: tuple[int, list[int]] = (-1, [])

        # Seeded so that the same job and settings give the same adapter.
        with torch.random.fork_rng(devices=[]):  # peft initializes the weights on the CPU
            torch.default_generator.manual_seed(settings.seed)
            for name, module in self.models.items():
                config = LoraConfig(
                    r=settings.rank,
                    lora_alpha=settings.alpha,
                    init_lora_weights="gaussian",
                    target_modules=UNET_TARGETS if name == "unet" else TEXT_ENCODER_TARGETS,
                )
                module.add_adapter(config, adapter_name=TRAINING_ADAPTER)
        _select_adapter(self.models.values(), TRAINING_ADAPTER)
        # fp32 master weights for the adapter even on an fp16 base (autocast does the fp16 math).
        cast_training_params(list(self.models.values()), dtype=torch.float32)
        # The peft dicts that hold the training adapter's entries, found once: set aside at every step.
        self.adapter_entries = _adapter_entries(self.models.values(), TRAINING_ADAPTER)
        self.params = {
            f"{name}.{key}": param
            for name, module in self.models.items()
            for key, param in module.named_parameters()
            if param.requires_grad
        }
        # The same list every step: clip_grad_norm_ and the optimizer take a list.
        self.trained_params = list(self.params.values())
        self.optimizer = _optimizer(
            self.trained_params,
            settings.learning_rate,
            eight_bit=settings.adam_8bit and self.device.type == "cuda",
        )
        if settings.gradient_checkpointing and not self.unet.is_gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        for module in self.models.values():
            module.train()

    def step(self, step: int) -> torch.Tensor:
        """One optimizer step on photo number `step` of a shuffled epoch (+ a class image); its loss,
        on the device (reading it waits for the step to finish)."""
        examples, device, generator = self.examples, self.device, self.generator
        indices = [self._photo_order(step // examples.photo_count)[step % examples.photo_count]]
        if examples.class_count:
            indices.append(examples.photo_count + step % examples.class_count)
        # Rows picked by slicing: an index tensor would be copied to the device, a host sync on a GPU.
        means = torch.cat([examples.means[index : index + 1] for index in indices])
        stds = torch.cat([examples.stds[index : index + 1] for index in indices])
        scaling = self.model.pipeline.vae.config.scaling_factor
        latents = (means + stds * torch.randn(means.shape, generator=generator, device=device)) * scaling
        noise = torch.randn(latents.shape, generator=generator, device=device)
        timesteps = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (len(indices),),
            generator=generator,
            device=device,
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise

        with torch.autocast(device.type, dtype=self.model.dtype, enabled=self.autocast):
            if examples.embeds is None:
                embeds, pooled = _encode_prompts(self.model, self.prompts)
            else:
                embeds, pooled = examples.embeds, examples.pooled
            added = None if pooled is None else {"text_embeds": pooled, "time_ids": examples.time_ids}
            prediction = self.unet(
                noisy.to(self.model.dtype), timesteps, embeds, added_cond_kwargs=added, return_dict=False
            )[0]
        per_example = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_example * self.loss_weights).sum()

        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.trained_params, MAX_GRAD_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def render_preview(
        self, job: TrainJob, settings: TrainingSection, path: Path, stop: Callable[[], bool]
    ) -> Path:
        """The first sample as the adapter draws it now, written to `path`; training mode is restored."""
        for module in self.models.values():
            module.eval()
        try:
            prompt = sample_prompt(job, settings)
            image = _render(self.model.pipeline, [prompt], [settings.seed], settings, stop).images[0]
        finally:
            for module in self.models.values():
                module.train()
        return _write_png(image, path)

    def hand_over(self, between_steps: Callable[[], bool]) -> None:
        """Let the worker use the pipeline; if it did, take the training state back."""
        if not _generations_between(between_steps, self.adapter_entries):
            return
        for name, module in self.models.items():
            if TRAINING_ADAPTER not in getattr(module, "peft_config", {}):
                raise RuntimeError(f"between_steps removed the training adapter from the {name}")
        # Generation selects its own adapters, which also flips requires_grad (peft), and switches to eval.
        _select_adapter(self.models.values(), TRAINING_ADAPTER)
        for module in self.models.values():
            module.train()

    def _photo_order(self, epoch: int) -> list[int]:
        # A function of the epoch alone, so that a resumed run sees the same order.
        if self._epoch[0] != epoch:
            shuffle = torch.Generator().manual_seed(self.settings.seed + epoch)
            self._epoch = (epoch, torch.randperm(self.examples.photo_count, generator=shuffle).tolist())
        return self._epoch[1]


def _optimizer(
    params: list[torch.nn.Parameter], learning_rate: float, *, eight_bit: bool
) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW when `eight_bit` and it imports (CUDA only), torch AdamW otherwise."""
    if eight_bit:
        try:
            import bitsandbytes
        except (ImportError, RuntimeError, OSError) as error:
            log.warning(
                "8-bit Adam unavailable (bitsandbytes: %s): training with torch AdamW, which needs more "
                "GPU memory; pip install bitsandbytes to use it",
                _first_line(error),
            )
        else:
            return bitsandbytes.optim.AdamW8bit(params, lr=learning_rate, weight_decay=WEIGHT_DECAY)
    # Fused: one kernel for all the adapter's tensors, not a Python loop of a few ops per tensor.
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=WEIGHT_DECAY, fused=True)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


# ---------------------------------------------------------------------------------------------
# Data: class images, VAE latents, prompt encodings


def _class_images(
    model: LoadedModel,
    prompt: str,
    class_word: str,
    settings: TrainingSection,
    cache_root: Path,
    report: Callable[[TrainingProgress], None],
    stop: Callable[[], bool],
    between_steps: Callable[[], bool] | None,
) -> list[Path]:
    """settings.class_images renders of `prompt` by the base model, from the shared cache where possible."""
    resolution = settings.resolution
    folder = Path(cache_root) / _slug(model.base) / _slug(class_word) / f"{resolution}px"
    paths = [folder / f"{index}.png" for index in range(settings.class_images)]
    missing = [index for index, path in enumerate(paths) if not path.is_file()]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        log.info("rendering %d class images of %r into %s", len(missing), prompt, folder)
        batch_size = max(1, min(MAX_RENDER_BATCH, RENDER_BATCH_PIXELS // resolution**2))
        started = time.monotonic()
        for done in range(0, len(missing), batch_size):
            batch = missing[done : done + batch_size]
            # Image i always comes from seed i, so the cache fills the same whoever renders it.
            output = _render(model.pipeline, [prompt] * len(batch), batch, settings, stop)
            flagged = getattr(output, "nsfw_content_detected", None) or [False] * len(batch)
            for index, image, unsafe in zip(batch, output.images, flagged, strict=True):
                if unsafe:  # The safety checker blacked it out: a black image would teach nothing good.
                    log.warning(
                        "class image %d of %r was flagged by the safety checker: skipped", index, prompt
                    )
                    continue
                _write_png(image, paths[index])
            rendered = done + len(batch)
            eta = (time.monotonic() - started) / rendered * (len(missing) - rendered)
            report(TrainingProgress("class images", rendered, len(missing), None, eta))
            if between_steps is not None and _generations_between(between_steps, []):
                _select_adapter(_lora_models(model.pipeline), None)
    return [path for path in paths if path.is_file()]


def sample_prompt(job: TrainJob, settings: TrainingSection) -> str:
    """The prompt of the samples a training renders ([training] sample_prompt for this job)."""
    return settings.sample_prompt.replace("{token}", job.token).replace("{class}", job.class_word)


def _render_samples(
    pipeline: DiffusionPipeline,
    job: TrainJob,
    settings: TrainingSection,
    folder: Path,
    report: Callable[[TrainingProgress], None],
    stop: Callable[[], bool],
) -> list[Path]:
    prompt = sample_prompt(job, settings)
    shutil.rmtree(folder, ignore_errors=True)  # No stale samples from an earlier run with more of them.
    folder.mkdir(parents=True)
    samples: list[Path] = []
    started = time.monotonic()
    for index in range(settings.sample_count):
        image = _render(pipeline, [prompt], [settings.seed + index], settings, stop).images[0]
        samples.append(_write_png(image, folder / f"{index}.png"))
        eta = (time.monotonic() - started) / (index + 1) * (settings.sample_count - index - 1)
        report(TrainingProgress("samples", index + 1, settings.sample_count, None, eta))
    return samples


def _render(
    pipeline: DiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    settings: TrainingSection,
    stop: Callable[[], bool],
) -> Any:
    """A plain pipeline call, one CPU-seeded generator per image (the same images on any device)."""

    def poll(pipe: DiffusionPipeline, _step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if stop():
            pipe._interrupt = True  # diffusers' documented way to end the denoising loop early
        return tensors

    output = pipeline(
        prompt=prompts,
        num_inference_steps=settings.render_steps,
        height=settings.resolution,
        width=settings.resolution,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        callback_on_step_end=poll,
    )
    if pipeline.interrupt:
        raise TrainingCancelled("training cancelled while rendering images")
    return output


def _encode_examples(
    model: LoadedModel,
    photos: Sequence[Path],
    class_paths: Sequence[Path],
    prompts: list[str],
    settings: TrainingSection,
) -> _Examples:
    pipeline = model.pipeline
    means, stds = _encode_images(pipeline.vae, [*photos, *class_paths], settings.resolution, model.device)
    embeds = pooled = time_ids = None
    with torch.no_grad():
        if not settings.train_text_encoder:
            embeds, pooled = _encode_prompts(model, prompts)
    if model.is_sdxl:
        # Original size, crop top-left, target size: the photos are uncropped squares at the resolution.
        size = settings.resolution
        time_ids = torch.tensor(
            [[size, size, 0, 0, size, size]] * len(prompts), device=model.device, dtype=model.dtype
        )
    return _Examples(means, stds, len(photos), len(class_paths), embeds, pooled, time_ids)


@torch.no_grad()
def _encode_images(
    vae: torch.nn.Module, paths: Sequence[Path], resolution: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of each image; a step samples from it as the reference does."""
    dtype = vae.dtype
    # SDXL's VAE overflows in fp16 (force_upcast); encoding a few images in fp32 costs little.
    upcast = dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        vae.to(torch.float32)
    try:
        means, stds = [], []
        for path in paths:
            pixels = _load_pixels(path, resolution).to(device, vae.dtype)
            posterior = vae.encode(pixels[None]).latent_dist
            means.append(posterior.mean.float())
            stds.append(posterior.std.float())
    finally:
        if upcast:
            vae.to(dtype)
    return torch.cat(means), torch.cat(stds)


def _load_pixels(path: Path, resolution: int) -> torch.Tensor:
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    if image.size != (resolution, resolution):
        image = ImageOps.fit(image, (resolution, resolution), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def _encode_prompts(model: LoadedModel, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt encodings (and SDXL's pooled ones) with the pipeline's own encode_prompt."""
    encoded = model.pipeline.encode_prompt(
        prompt=prompts, device=model.device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    return encoded[0], encoded[2] if model.is_sdxl else None


# ---------------------------------------------------------------------------------------------
# Adapters on the shared pipeline


def _modules(pipeline: DiffusionPipeline) -> list[torch.nn.Module]:
    return [component for component in pipeline.components.values() if isinstance(component, torch.nn.Module)]


def _text_encoder_names(pipeline: DiffusionPipeline) -> list[str]:
    return [name for name in TEXT_ENCODERS if getattr(pipeline, name, None) is not None]


def _lora_models(pipeline: DiffusionPipeline) -> list[torch.nn.Module]:
    """The modules LoRA adapters live in: the UNet and the text encoders."""
    return [pipeline.unet, *(getattr(pipeline, name) for name in _text_encoder_names(pipeline))]


def _select_adapter(models: Iterable[torch.nn.Module], name: str | None) -> None:
    """Make `name` the only adapter that acts in `models` (None: no adapter), whatever was set before.

    Works on peft's layers directly: it must also undo disable_adapters(), and layers without `name`
    (another user's adapter on a module this run does not train) must end up with no adapter active.
    peft's set_adapter also makes exactly the active adapter's weights require grad.
    """
    for model in models:
        for layer in model.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.enable_adapters(True)
                layer.set_adapter([name] if name else [])


def _adapter_entries(
    models: Iterable[torch.nn.Module], adapter: str
) -> list[tuple[torch.nn.Module, dict[str, Any]]]:
    """(model, dict) for every dict of the models' LoRA layers that holds `adapter`'s entry: the
    attributes peft's own delete_adapter removes an adapter from."""
    found = []
    for model in models:
        for layer in model.modules():
            if isinstance(layer, BaseTunerLayer):
                for attribute in (*layer.adapter_layer_names, *layer.other_param_names):
                    entries = getattr(layer, attribute)
                    if adapter in entries:
                        found.append((model, entries))
    return found


def _generations_between(
    between_steps: Callable[[], bool], adapter_entries: list[tuple[torch.nn.Module, dict[str, Any]]]
) -> bool:
    """between_steps() outside train_lora's force_eager stance, with TRAINING_ADAPTER's entries taken
    out of `adapter_entries` (see _adapter_entries) meanwhile.

    A compiled UNet's graphs are guarded on how many adapters each LoRA layer holds (peft's forward
    reads `self.lora_A.keys()`): with the training adapter's layers in place, a generation between steps
    would compile a graph of its own (measured: 26 s on the tiny model, one CPU thread) and spend one of
    dynamo's recompiles. Taken out, every layer holds what the warm-up compiled for. The same parameter
    objects go back, so the optimizer's state still belongs to them.
    """
    taken = [(model, entries, entries.pop(TRAINING_ADAPTER)) for model, entries in adapter_entries]
    try:
        with torch.compiler.set_stance("default"):
            return between_steps()
    finally:
        for model, entries, weights in taken:
            # Where between_steps deleted the adapter (hand_over refuses that), it stays deleted.
            if TRAINING_ADAPTER in getattr(model, "peft_config", {}):
                entries[TRAINING_ADAPTER] = weights


def _save_adapter(
    model: LoadedModel,
    models: dict[str, torch.nn.Module],
    alpha: float,
    metadata: dict[str, Any],
    output_dir: Path,
) -> Path:
    """The adapter as a kohya LoRA file (engine.contract.kohya), which diffusers' load_lora_weights reads too."""
    layers: kohya.LoraLayers = {}
    for name, module in models.items():
        state = get_peft_model_state_dict(module, adapter_name=TRAINING_ADAPTER)
        arrays = {key: tensor.detach().cpu().numpy() for key, tensor in state.items()}
        layers[name] = {
            key.removesuffix(".lora_A.weight"): (arrays[key], arrays[key.replace(".lora_A.", ".lora_B.")])
            for key in arrays
            if key.endswith(".lora_A.weight")
        }
    return kohya.write_kohya_adapter(
        output_dir / ADAPTER_FILE,
        layers,
        dict.fromkeys(layers, alpha),
        sdxl=model.is_sdxl,
        metadata=kohya.kohya_metadata(metadata, sdxl=model.is_sdxl),
    )


def _restore_pipeline(pipeline: DiffusionPipeline, checkpointing_was_on: bool) -> None:
    """Leave the pipeline as generation expects it, after success, cancellation or an error alike."""
    models = _lora_models(pipeline)
    # peft activates some other adapter when the active one is deleted; deactivate everything first.
    _select_adapter(models, None)
    if any(TRAINING_ADAPTER in getattr(model, "peft_config", {}) for model in models):
        pipeline.delete_adapters(TRAINING_ADAPTER)
    for model in models:
        # With no adapter left, put the plain layers back: empty peft wrappers only cost time.
        if not getattr(model, "peft_config", None) and any(
            isinstance(m, BaseTunerLayer) for m in model.modules()
        ):
            recurse_remove_peft_layers(model)
    for module in _modules(pipeline):
        module.requires_grad_(False)
        module.eval()
    if pipeline.unet.is_gradient_checkpointing and not checkpointing_was_on:
        pipeline.unet.disable_gradient_checkpointing()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # The optimizer and activations are gone; give generation the memory.


# ---------------------------------------------------------------------------------------------
# Checkpoints: output_dir/checkpoints/step-NNNNNN/{adapter.safetensors,state.pt}, newest only

_FINGERPRINT_SETTINGS = (
    "resolution",
    "rank",
    "alpha",
    "learning_rate",
    "train_text_encoder",
    "prior_loss_weight",
    "seed",
)


def _save_checkpoint(
    folder: Path,
    step: int,
    trainer: _Trainer,
    fingerprint: dict[str, Any],
    losses: list[float],
    smoothed: float,
    seconds: float,
) -> None:
    final = folder / f"step-{step:06d}"
    partial = folder / f".partial-step-{step:06d}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    state = {
        "step": step,
        "run": json.dumps(fingerprint, sort_keys=True),
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "rng": trainer.generator.get_state(),
        "losses": losses,
        "smoothed": smoothed,
        "seconds": seconds,
    }
    # Both files through Python file objects: a write that fails (a full disk) raises the OSError
    # that says so (engine.contract.disk), where safetensors' and torch's own writers lose the errno.
    try:
        weights = {name: param.detach().contiguous() for name, param in trainer.params.items()}
        (partial / ADAPTER_FILE).write_bytes(safetensors_bytes(weights))
        with (partial / "state.pt").open("wb") as file:
            torch.save(state, file)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # its space goes back; the older checkpoint stays
        raise
    # Renamed only when complete, so a crash mid-write never leaves a checkpoint that looks usable.
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    for older in folder.glob("step-*"):
        if older != final:
            shutil.rmtree(older, ignore_errors=True)


def _load_checkpoint(
    folder: Path, fingerprint: dict[str, Any], trainer: _Trainer
) -> tuple[int, list[float], float | None, float] | None:
    """(step, losses, smoothed loss, seconds) from the newest checkpoint of this very run, if any."""
    candidates = sorted(folder.glob("step-*"), reverse=True) if folder.is_dir() else []
    if not candidates:
        return None
    newest = candidates[0]
    try:
        state = torch.load(newest / "state.pt", map_location="cpu", weights_only=True)
        weights = load_file(newest / ADAPTER_FILE)
    except (OSError, RuntimeError, ValueError) as error:
        log.warning("checkpoint %s is unreadable (%s): training from the start", newest, error)
        return None
    if state["run"] != json.dumps(fingerprint, sort_keys=True) or weights.keys() != trainer.params.keys():
        log.warning("checkpoint %s belongs to another training: training from the start", newest)
        return None
    with torch.no_grad():
        for name, param in trainer.params.items():
            param.copy_(weights[name])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.generator.set_state(state["rng"])
    log.info("resuming %s from step %d", folder.parent, state["step"])
    return state["step"], list(state["losses"]), state["smoothed"], state["seconds"]


# ---------------------------------------------------------------------------------------------
# Small helpers


def _slug(text: str) -> str:
    """A folder name for a base model (Hub id, path) or class word."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "model"


def _write_png(image: Image.Image, path: Path) -> Path:
    # Written whole or not at all: other workers read the shared class-image cache concurrently.
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        image.save(partial, format="PNG")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # a write that failed (a full disk) gives its space back
    return path


def dreambot_version() -> str:
    """This package's version; "unknown" when it runs from a tree that was never installed."""
    try:
        return package_metadata.version("dreambot")
    except package_metadata.PackageNotFoundError:
        return "unknown"


__all__ = [
    "TRAINING_ADAPTER",
    "TrainingCancelled",
    "TrainingProgress",
    "TrainingResult",
    "default_steps",
    "dreambot_version",
    "train_lora",
]

"""Image generation: text-to-image, variations and 2x upscales, with per-user LoRA adapters.

One `Generator` wraps the loaded base model. Its text-to-image and image-to-image pipelines are
built with `from_pipe`, so they share the base pipeline's modules (one UNet in memory) and only
swap in their own DPM++ 2M scheduler: the base pipeline's scheduler, which training may use, is
never touched. Nothing here assumes SD 1.x: SDXL bases go through the same code.

Users' adapters are LoRA files loaded by name onto the base pipeline and kept in an LRU
(`AdapterCache`), so switching between members' models costs a `set_adapters` call, not a reload.
They are kohya files (engine.contract.kohya); a file in the older diffusers format is rewritten as one the
first time it loads, so that the "Lora hashes" in the PNGs name the file an export sends.

Between two training steps the trainer's own adapter sits on the same UNet. `generate` deactivates
every adapter it did not ask for and, when it returns, puts back what it found: which adapters
were active or disabled on each LoRA layer, their `requires_grad` flags and every module's
train/eval mode.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import re
import tempfile
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForText2Image,
    DPMSolverMultistepScheduler,
    StableDiffusionXLPipeline,
)
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from PIL.PngImagePlugin import PngInfo

from engine.contract import kohya
from engine.contract.prompt_syntax import ParsedPrompt, outside_tags, parse_prompt
from engine.contract.protocol import MAX_SIDE, MIN_SIDE, UPSCALE_FACTOR, AdapterRef, GenerateJob, whole_word
from engine.memory import raise_if_test_oom
from engine.model import SINGLE_FILE_SUFFIXES, LoadedModel
from engine.preview import write_preview
from engine.prompt_embeds import batch_embeddings, encode_prompts
from engine.train import UNET_TARGETS, dreambot_version

log = logging.getLogger(__name__)

SAMPLER_NAME = "DPM++ 2M"


class AdapterLoadError(RuntimeError):
    """A user's adapter file could not be used; the message names the file and is fit to show a user."""


class GenerationCancelled(Exception):
    """`should_stop` asked for the generation to stop."""


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class GenerationResult:
    images: list[PIL.Image.Image]
    # Image i is reproducible alone with seeds[i].
    seeds: list[int]
    # The A1111 "parameters" text of each image.
    parameters: list[str]
    # PNGs written, in order (empty without an output_dir).
    files: list[Path]
    seconds: float
    # Per image: the base's safety checker flagged it. Flagged images are kept and written as they
    # are; the caller decides what to do with them. All False when the base has no checker.
    nsfw: list[bool] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Prompts and A1111 parameters


def expand_tokens(prompt: str, adapters: Sequence[AdapterRef]) -> str:
    """Write each adapter's token as "{token} {class_word}", the phrase the adapter was trained on.

    Whole words by engine.contract.protocol's definition (the one that selects the adapters, so
    "abraza_viking" gets the class word too), any case; a token already followed by its class word
    is left alone, and so is the name in a `<lora:...>` tag.
    """
    for adapter in adapters:
        if not adapter.class_word:
            continue
        token, class_word = whole_word(adapter.token).pattern, whole_word(adapter.class_word).pattern
        unexpanded = re.compile(rf"{token}(?!\s+{class_word})", re.IGNORECASE)
        prompt = outside_tags(
            prompt,
            lambda text, u=unexpanded, c=adapter.class_word: u.sub(lambda m: f"{m.group(0)} {c}", text),
        )
    return prompt


def _quote(value: str) -> str:
    """A1111's `quote`: JSON-quote values that would break the "key: value, ..." line."""
    if "," not in value and "\n" not in value and ":" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def a1111_parameters(
    prompt: str,
    negative_prompt: str,
    steps: int,
    sampler: str,
    guidance: float,
    seed: int,
    width: int,
    height: int,
    model_name: str,
    extra: dict[str, str] | None = None,
    *,
    model_hash: str | None = None,
    version: str | None = None,
) -> str:
    """The "parameters" text AUTOMATIC1111 writes into its PNGs (its `create_infotext` layout).

    As there: "Model hash" right before "Model", the extras (Lora hashes, ...) after, "Version" last.
    """
    params = {
        "Steps": str(steps),
        "Sampler": sampler,
        "CFG scale": f"{guidance:g}",
        "Seed": str(seed),
        "Size": f"{width}x{height}",
        **({"Model hash": model_hash} if model_hash else {}),
        "Model": model_name,
        **(extra or {}),
        **({"Version": version} if version else {}),
    }
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in params.items())
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}"


def model_display_name(base: str) -> str:
    """The name A1111 would show for a base: the checkpoint's file or folder name, or a Hub id's name."""
    name = PurePosixPath(base.replace("\\", "/").rstrip("/")).name or base
    for suffix in SINGLE_FILE_SUFFIXES:
        name = name.removesuffix(suffix)
    # A1111 strips these so the value never needs quoting.
    return name.replace(",", "").replace(":", "")


def lora_tags(adapters: Sequence[AdapterRef]) -> str:
    """A1111's `<lora:NAME:WEIGHT>` prompt tags, which make its "Send to txt2img" apply the adapters."""
    return " ".join(f"<lora:{adapter.token}:{adapter.weight:g}>" for adapter in adapters)


def checkpoint_hash(path: Path) -> str:
    """A1111's "Model hash" of a single-file checkpoint: the first 10 hex digits of its sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()[:10]


def lora_shorthash(path: Path) -> str:
    """A1111's LoRA hash: the first 12 hex digits of the sha256 of the tensor data (header skipped)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        header_length = int.from_bytes(file.read(8), "little")
        file.seek(header_length + 8)
        for chunk in iter(lambda: file.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Adapters


# What identifies an adapter file's content: a retrained model rewrites the file (new mtime, size).
_FileKey = tuple[str, int, int]


@dataclass(frozen=True)
class _AdapterEntry:
    key: _FileKey
    shorthash: str


class AdapterCache:
    """LRU of LoRA adapters loaded on ONE pipeline by name; switching never reloads base weights."""

    def __init__(
        self,
        pipeline: Any,
        capacity: int,
        *,
        hotswap: bool = False,
        compile_options: dict[str, Any] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"adapter cache capacity has to be at least 1 but is {capacity}")
        self.pipeline = pipeline
        # For a compiled UNet: the job's i-th adapter is hotswapped into the fixed slot i, so the
        # set of adapter names (and the compiled graph) never changes; capacity is the slot count.
        self.hotswap = hotswap
        # Hotswap mode: the token each slot holds.
        self._slots: dict[str, str] = {}
        self._compiled = False
        # torch.compile's options (bench/gpu.py picks its mode; the engine uses the defaults).
        self._compile_options = compile_options or {}
        # Which kohya naming an old adapter file is rewritten in (see _upgrade).
        self._sdxl = isinstance(pipeline, StableDiffusionXLPipeline)
        self.capacity = capacity
        # How many times an adapter file was actually loaded (cache hits do not count).
        self.loads = 0
        self._entries: OrderedDict[str, _AdapterEntry] = OrderedDict()

    @property
    def loaded(self) -> list[str]:
        """Adapter names currently loaded, least recently used first."""
        return list(self._entries)

    def shorthash(self, token: str) -> str:
        """A1111's hash of a loaded adapter's file (see lora_shorthash)."""
        return self._entries[token].shorthash

    def activate(self, adapters: Sequence[AdapterRef]) -> None:
        """Make exactly `adapters` active, each at its weight; with none, no LoRA affects the output.

        Any other adapter on the pipeline, the cache's or not (a training adapter), is deactivated.
        """
        if self.hotswap:
            self._activate_slots(adapters)
            return
        wanted = [adapter.token for adapter in adapters]
        keys = {adapter.token: _file_key(adapter.token, adapter.path) for adapter in adapters}
        missing = [adapter for adapter in adapters if adapter.token not in self._entries]
        for adapter in adapters:
            if adapter.token in self._entries and self._entries[adapter.token].key != keys[adapter.token]:
                # Retrained (or moved) since it was loaded: the old weights must go.
                self.forget(adapter.token)
                missing.append(adapter)
        self._evict(keep=set(wanted), room_for=len(missing))
        for adapter in missing:
            self._load(adapter, keys[adapter.token])
        for token in wanted:
            self._entries.move_to_end(token)

        if wanted:
            # set_adapters alone does not undo an earlier disable_lora: the layers would stay bypassed.
            self.pipeline.enable_lora()
            self.pipeline.set_adapters(wanted, adapter_weights=[adapter.weight for adapter in adapters])
        else:
            self.pipeline.disable_lora()

    def _activate_slots(self, adapters: Sequence[AdapterRef]) -> None:
        if len(adapters) > self.capacity:
            raise AdapterLoadError(
                f"{len(adapters)} adapters in one picture, but [generation] adapter_cache allows "
                f"{self.capacity} with [model] compile on"
            )
        slots = [f"slot{index}" for index in range(len(adapters))]
        for slot, adapter in zip(slots, adapters, strict=True):
            key = _file_key(adapter.token, adapter.path)
            entry = self._entries.get(adapter.token)
            if self._slots.get(slot) == adapter.token and entry is not None and entry.key == key:
                continue
            self._entries.pop(self._slots.pop(slot, ""), None)
            # A token held in another slot moves here: that slot no longer counts as holding it.
            self.forget(adapter.token)
            self._load(adapter, key, name=slot)
            self._slots[slot] = adapter.token
        if slots and not self._compiled:
            # peft pads the slots for hotswapping at the first load, which has to precede compiling.
            self.pipeline.unet.compile(**self._compile_options)
            self._compiled = True
        if slots:
            self.pipeline.enable_lora()
            self.pipeline.set_adapters(slots, adapter_weights=[adapter.weight for adapter in adapters])
            _scalings_as_tensors(self.pipeline.unet, slots)
        else:
            self.pipeline.disable_lora()

    def adapter_name(self, token: str) -> str:
        """The name `token`'s loaded adapter has on the pipeline (its slot when hotswapping)."""
        if not self.hotswap:
            return token
        return next(slot for slot, held in self._slots.items() if held == token)

    def forget(self, token: str) -> None:
        """Unload `token`'s adapter if it is loaded (its model was deleted or retrained)."""
        if self.hotswap:
            # The slot keeps its weights (the compiled graph needs it); the next adapter replaces them.
            self._entries.pop(token, None)
            self._slots = {slot: held for slot, held in self._slots.items() if held != token}
            return
        if self._entries.pop(token, None) is not None:
            self.pipeline.delete_adapters([token])
            log.info("adapter %r unloaded", token)

    def _evict(self, keep: set[str], room_for: int) -> None:
        """Unload least recently used adapters until `room_for` more fit (never one in `keep`)."""
        for token in list(self._entries):
            if len(self._entries) + room_for <= self.capacity:
                return
            if token not in keep:
                self.forget(token)

    def _load(self, adapter: AdapterRef, key: _FileKey, name: str | None = None) -> None:
        token, path = adapter.token, key[0]
        # Hotswapping replaces the weights of a slot loaded once before, in place.
        swap = name is not None and name in self._present_adapters()
        name = name or token
        if token == name and token in self._present_adapters():
            log.error("adapter %r is taken on this pipeline by an adapter not loaded from %s", token, path)
            raise AdapterLoadError(
                f"the adapter of “{token}” could not be loaded: its name is taken by another adapter"
            )
        _check_lora_file(token, Path(path))
        try:
            with warnings.catch_warnings():
                # peft warns whenever a model gets a second adapter: several are the point here.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                # A folder and a file name: diffusers 0.37 refuses a bare file path when offline.
                file = Path(path)
                self.pipeline.load_lora_weights(
                    str(file.parent), weight_name=file.name, adapter_name=name, hotswap=swap
                )
            if name not in self._present_adapters():
                raise ValueError("none of its layers exist in this base model")
        except Exception as error:
            # No half-loaded adapter may stay behind: diffusers only cleans up the component that failed.
            if not swap:
                self.pipeline.delete_adapters([name])
            if isinstance(error, torch.OutOfMemoryError):
                raise
            # Whatever else stops a user's file from loading is that file's problem, not the engine's.
            log.warning("adapter %r from %s could not be loaded: %s", token, path, error)
            raise AdapterLoadError(
                f"the adapter of “{token}” does not fit this base model (trained on another one?): "
                f"{_brief(error)}"
            ) from error
        self.loads += 1
        key = self._upgrade(token, Path(path), key)
        self._entries[token] = _AdapterEntry(key, lora_shorthash(Path(path)))
        log.info("adapter %r loaded from %s", token, path)

    def _upgrade(self, token: str, path: Path, key: _FileKey) -> _FileKey:
        """Rewrite an adapter of the old (diffusers) format as a kohya file, once; the new file's key.

        Only after it loaded here, so it is known to fit this base: the file then holds the same
        weights in the one format that exports and the PNGs' "Lora hashes" refer to.
        """
        try:
            upgraded = kohya.upgrade_adapter(path, sdxl=self._sdxl)
        except (OSError, ValueError) as error:
            # The loaded weights are fine either way: it stays in the old format and is tried again next load.
            log.warning("adapter %r: %s stays in the old format: %s", token, path, error)
            return key
        if not upgraded:
            return key
        log.info("adapter %r: %s rewritten in the kohya format", token, path)
        return _file_key(token, path)

    def _present_adapters(self) -> set[str]:
        return {name for names in self.pipeline.get_list_adapters().values() for name in names}


def _scalings_as_tensors(unet: torch.nn.Module, slots: Sequence[str]) -> None:
    """set_adapters writes each slot's scaling (alpha / rank x weight) as a float, which a compiled
    graph guards on; as a tensor (what peft's hotswap keeps) another weight is data, not a recompile."""
    for layer in unet.modules():
        if isinstance(layer, LoraLayer):
            for slot in slots:
                scaling = layer.scaling.get(slot)
                if isinstance(scaling, float):
                    layer.scaling[slot] = torch.tensor(scaling, device=layer.get_base_layer().weight.device)


def _file_key(token: str, path: str | Path) -> _FileKey:
    path = Path(path).expanduser()
    try:
        stat = path.stat()
    except OSError:
        log.warning("the adapter file of %r is gone: %s", token, path)
        raise AdapterLoadError(f"the adapter file of “{token}” is gone (was the model deleted?)") from None
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def _check_lora_file(token: str, path: Path) -> None:
    """Read the safetensors header only: a corrupt file is reported as such, not as a misfit."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as checkpoint:
            keys = list(checkpoint.keys())
    except Exception as error:
        log.warning("the adapter file of %r, %s, is not readable: %s", token, path, error)
        raise AdapterLoadError(
            f"the adapter file of “{token}” is not a readable safetensors file (corrupt or truncated?)"
        ) from error
    if not keys or not all("lora" in key for key in keys):
        log.warning("the adapter file of %r, %s, holds no LoRA weights", token, path)
        raise AdapterLoadError(f"the adapter file of “{token}” holds no LoRA weights")


def _brief(error: Exception, limit: int = 300) -> str:
    """Enough of an error for a chat message (a state-dict mismatch lists every layer)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    text = " ".join(lines[:2]) + (f" (+{len(lines) - 2} more)" if len(lines) > 2 else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Generation


class Generator:
    def __init__(
        self,
        model: LoadedModel,
        adapter_cache_size: int = 8,
        *,
        compile_unet: bool = False,
        hotswap_rank: int = 16,
        compile_options: dict[str, Any] | None = None,
    ) -> None:
        """`compile_unet`: torch.compile the UNet (in `warm_up`, else when the first adapter loads) and hotswap
        adapters (ranks up to `hotswap_rank`) into fixed slots; jobs with different adapters are then never
        batched together."""
        self.model = model
        self._hotswap_rank = hotswap_rank
        base = model.pipeline
        # peft's per-row adapter names would change the compiled graph's inputs on every batch.
        self.mixed_batches = not compile_unet
        if compile_unet:
            # Before the first adapter: pads every slot to one rank, so swapping never reshapes.
            base.enable_lora_hotswap(target_rank=hotswap_rank)
            # Loading an adapter freezes the base weights; the compiled graph is guarded on that flag,
            # so they are frozen from the start (training only ever trains its LoRA weights).
            base.unet.requires_grad_(False)
        # DPM++ 2M as A1111 names it; our own instance, so the base pipeline's scheduler is untouched.
        scheduler = DPMSolverMultistepScheduler.from_config(
            base.scheduler.config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False
        )
        overrides: dict[str, Any] = {"scheduler": scheduler}
        if "safety_checker" in base.components:
            # The checker runs separately (see _nsfw_flags) so that flagged images are not blacked out.
            overrides["safety_checker"] = None
            if "requires_safety_checker" in base.config:
                overrides["requires_safety_checker"] = False
        # from_pipe shares every module with the base pipeline: no second UNet in memory.
        self._text2image = AutoPipelineForText2Image.from_pipe(base, **overrides)
        self._image2image = AutoPipelineForImage2Image.from_pipe(base, **overrides)
        for pipeline in (self._text2image, self._image2image):
            pipeline.set_progress_bar_config(disable=True)
        self.adapters = AdapterCache(
            base, adapter_cache_size, hotswap=compile_unet, compile_options=compile_options
        )

    def warm_up(self) -> None:
        """Compile the UNet now, before the first member waits for it (nothing to do uncompiled).

        Every hotswap slot gets a zero adapter (training's UNet layers at the hotswap rank, lora_B
        zero: it changes nothing) before compiling, as peft needs; then one picture at the model's
        native size, with one adapter and with none (a disabled LoRA is another graph), compiles the
        two graphs /imagine takes. The slots keep the zero weights as "no member": any member's
        adapter, at any weight, then hotswaps in without recompiling.

        Compiled once more, each the first time it comes: another size, another count or guidance
        <= 1 (torch then compiles sizes as dynamic, serving every later one), and k > 1 adapters in
        one picture (a graph per k). A training compiles nothing: engine.train runs its own UNet
        calls eagerly, and the pictures rendered between its steps take these graphs.
        """
        if not self.adapters.hotswap:
            return
        unet = self.model.pipeline.unet
        targets = LoraConfig(target_modules=UNET_TARGETS)
        rank = self._hotswap_rank
        zeros = {
            name: (
                np.zeros((rank, module.in_features), np.float32),
                np.zeros((module.out_features, rank), np.float32),
            )
            for name, module in unet.named_modules()
            if isinstance(module, torch.nn.Linear) and check_target_module_exists(targets, name)
        }
        sdxl = self.model.is_sdxl
        with tempfile.TemporaryDirectory(prefix="dreambot-warm-up-") as folder:
            path = kohya.write_kohya_adapter(
                Path(folder) / "zero.safetensors",
                {"unet": zeros},
                {"unet": rank},
                sdxl=sdxl,
                metadata=kohya.base_metadata(sdxl=sdxl, rank=rank, alpha=rank),
            )
            slots = [
                AdapterRef(token=f"warmup{index}", class_word="", path=str(path))
                for index in range(self.adapters.capacity)
            ]
            with _inference_state(self.model.pipeline):
                self.adapters.activate(slots)  # loads every slot, then marks the UNet for compiling
            side = self.model.native_resolution
            for adapters in (slots[:1], []):
                self.generate(
                    GenerateJob(
                        job_id="warm-up",
                        output_dir=folder,
                        prompt="warm-up",
                        steps=1,
                        width=side,
                        height=side,
                        adapters=adapters,
                    )
                )
        for slot in slots:
            self.adapters.forget(slot.token)
        log.info("UNet compiled, %d adapter slots, warmed up at %d px", len(slots), side)

    def generate(
        self,
        job: GenerateJob,
        output_dir: Path | None = None,
        on_step: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Make `job.count` images in one batched call; write them to output_dir as {i}.png (the
        worker passes job.output_dir; None writes nothing).

        The job's values were checked when it was made; ValueError says why its init image cannot
        serve (missing, unreadable, too big to upscale)."""
        return self.generate_batch([job], [output_dir], on_step, should_stop)[0]

    def generate_batch(
        self,
        jobs: Sequence[GenerateJob],
        output_dirs: Sequence[Path | None] | None = None,
        on_step: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_preview: Callable[[int, int, list[Path | None]], None] | None = None,
        preview_due: Callable[[], bool] | None = None,
    ) -> list[GenerationResult]:
        """Render several jobs in ONE pipeline call (one UNet batch), each with its own adapter; one
        result per job, as `generate` would give it alone up to batching's float rounding.

        More than one job needs equal, non-None `GenerateJob.batch_key`s. When the jobs' adapters
        differ, each image goes through its own job's adapter (`per_sample_adapters`).

        After a step for which `preview_due()` is true, each job with an output_dir gets a preview of
        its first image (engine.preview) and `on_preview(step, total, paths)` gets their paths, one
        per job (None for a job without an output_dir)."""
        started = time.perf_counter()
        if not jobs:
            raise ValueError("generate_batch needs at least one job, got none")
        keys = {job.batch_key for job in jobs}
        if len(jobs) > 1 and (None in keys or len(keys) > 1):
            raise ValueError(f"jobs {[job.job_id for job in jobs]} cannot share a batch: batch keys {keys}")
        dirs = list(output_dirs) if output_dirs is not None else [None] * len(jobs)
        if len(dirs) != len(jobs):
            raise ValueError(f"expected one output_dir per job ({len(jobs)}), got {len(dirs)}")
        stop = should_stop or (lambda: False)
        if stop():
            raise GenerationCancelled("generation cancelled before it started")

        first = jobs[0]
        prompts = [expand_tokens(job.prompt, job.adapters) for job in jobs]
        parsed = [parse_prompt(prompt) for prompt in prompts]
        # Up to MAX_SEED + count - 1: torch takes any 64-bit seed.
        seeds = [[job.seed + index for index in range(job.count)] for job in jobs]
        counts = {job.count for job in jobs}
        # One prompt per job and num_images_per_prompt when the counts agree (always, alone); else
        # one prompt per image. Either way image i of the batch is job by job, in order.
        per_prompt = (
            list(range(len(jobs)))
            if len(counts) == 1
            else [i for i, job in enumerate(jobs) for _ in range(job.count)]
        )
        per_image = [i for i, job in enumerate(jobs) for _ in range(job.count)]
        kwargs: dict[str, Any] = dict(
            num_inference_steps=first.steps,
            guidance_scale=first.guidance,
            num_images_per_prompt=first.count if len(counts) == 1 else 1,
            # CPU generators: the same seed gives the same noise on any device.
            generator=[torch.Generator("cpu").manual_seed(seed) for job_seeds in seeds for seed in job_seeds],
            callback_on_step_end=_step_callback(
                on_step, stop, self._previews(jobs, dirs, on_preview, preview_due)
            ),
            output_type="pil",
        )
        extra: dict[str, str] = {}
        if first.init_image is None:
            pipeline = self._text2image
            width, height = first.width, first.height
            kwargs.update(width=width, height=height)
        else:
            pipeline = self._image2image
            init = _init_image(Path(first.init_image), first)
            width, height = init.size
            kwargs.update(image=init, strength=first.effective_strength)
            extra["Denoising strength"] = f"{first.effective_strength:g}"
            if first.upscale:
                extra["Postprocess upscale by"] = str(UPSCALE_FACTOR)
                extra["Postprocess upscaler"] = "Lanczos"

        adapter_sets = {tuple(adapter.token for adapter in job.adapters) for job in jobs}
        wanted = list({adapter.token: adapter for job in jobs for adapter in job.adapters}.values())
        if len(adapter_sets) > 1 and not self.mixed_batches:
            raise ValueError(
                f"jobs {[job.job_id for job in jobs]}: no mixed-adapter batch with a compiled UNet"
            )
        with _inference_state(self.model.pipeline):
            self.adapters.activate(wanted)
            for component in _modules(self.model.pipeline):
                component.eval()
            mixed = len(adapter_sets) > 1
            # Jobs with different adapters (at most one each, see batch_key): one per row.
            names = [
                self.adapters.adapter_name(job.adapters[0].token) if job.adapters else BASE_ONLY
                for job in jobs
            ]
            embeddings = []
            for index, job in enumerate(jobs):
                # With the job's adapters active: a LoRA of the text encoder changes the embeddings.
                alone = (
                    per_sample_adapters(self.model.pipeline, [names[index]], [names[index]])
                    if mixed
                    else contextlib.nullcontext()
                )
                with alone:
                    negative = parse_prompt(job.negative_prompt, loras=False)
                    embeddings.append(encode_prompts(self.model.pipeline, parsed[index], negative))
            arguments = batch_embeddings([embeddings[i] for i in per_prompt])
            if mixed:
                with per_sample_adapters(
                    self.model.pipeline,
                    prompt_adapters=[names[i] for i in per_prompt],
                    image_adapters=[names[i] for i in per_image],
                ):
                    images = pipeline(**kwargs, **arguments).images
            else:
                images = pipeline(**kwargs, **arguments).images
            nsfw = self._nsfw_flags(images)

        seconds = time.perf_counter() - started
        results, offset = [], 0
        for job, prompt, job_parsed, job_seeds, output_dir in zip(
            jobs, prompts, parsed, seeds, dirs, strict=True
        ):
            job_images = images[offset : offset + job.count]
            job_nsfw = nsfw[offset : offset + job.count]
            offset += job.count
            parameters = self._parameters(job, prompt, job_parsed, job_seeds, width, height, extra)
            files = _write_pngs(job_images, parameters, output_dir) if output_dir is not None else []
            results.append(GenerationResult(job_images, job_seeds, parameters, files, seconds, job_nsfw))
        return results

    def _previews(
        self,
        jobs: Sequence[GenerateJob],
        dirs: Sequence[Path | None],
        on_preview: Callable[[int, int, list[Path | None]], None] | None,
        preview_due: Callable[[], bool] | None,
    ) -> Callable[[int, int, torch.Tensor], None] | None:
        """The step hook that writes each job's preview when one is due; None when none is wanted."""
        if on_preview is None or preview_due is None:
            return None
        # The latents hold the batch image by image, job by job: a job's first image leads its rows.
        firsts = [sum(job.count for job in jobs[:index]) for index in range(len(jobs))]

        def write(step: int, total: int, latents: torch.Tensor) -> None:
            if not preview_due():
                return
            paths = [
                None
                if folder is None
                else write_preview(latents[first], Path(folder), sdxl=self.model.is_sdxl)
                for first, folder in zip(firsts, dirs, strict=True)
            ]
            on_preview(step, total, paths)

        return write

    def _parameters(
        self,
        job: GenerateJob,
        prompt: str,
        parsed: ParsedPrompt,
        seeds: list[int],
        width: int,
        height: int,
        extra: dict[str, str],
    ) -> list[str]:
        """The A1111 parameters text of each of `job`'s images."""
        extra = dict(extra)
        # The prompt as written (tags in place), plus a tag for each adapter its bare token selected.
        untagged = [adapter for adapter in job.adapters if adapter.token not in parsed.lora_weights]
        written_prompt = f"{prompt} {lora_tags(untagged)}" if untagged else prompt
        if job.adapters:
            extra["Lora hashes"] = ", ".join(
                f"{adapter.token}: {self.adapters.shorthash(adapter.token)}" for adapter in job.adapters
            )
        model_name = model_display_name(self.model.base)
        return [
            a1111_parameters(
                written_prompt,
                job.negative_prompt,
                job.steps,
                SAMPLER_NAME,
                job.guidance,
                seed,
                width,
                height,
                model_name,
                extra,
                model_hash=self._model_hash,
                version=f"dreambot {dreambot_version()}",
            )
            for seed in seeds
        ]

    @functools.cached_property
    def _model_hash(self) -> str | None:
        """A1111's hash of a single-file base (read once: a checkpoint is gigabytes); None otherwise."""
        base = self.model.base
        return checkpoint_hash(Path(base).expanduser()) if base.endswith(SINGLE_FILE_SUFFIXES) else None

    def _nsfw_flags(self, images: list[PIL.Image.Image]) -> list[bool]:
        base = self.model.pipeline
        checker = getattr(base, "safety_checker", None)
        extractor = getattr(base, "feature_extractor", None)
        if checker is None or extractor is None:
            return [False] * len(images)
        clip_input = extractor(images, return_tensors="pt").pixel_values.to(
            self.model.device, self.model.dtype
        )
        # The checker blacks out flagged images in the array it is given: hand it a copy.
        pixels = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
        _, flags = checker(images=pixels, clip_input=clip_input)
        return [bool(flag) for flag in flags]


def _init_image(path: Path, job: GenerateJob) -> PIL.Image.Image:
    """The init image at `path` in RGB, resized to the size `job` makes."""
    # Its path goes to the log, not into the message: members read it.
    if not path.is_file():
        log.warning("the init image %s is gone", path)
        raise ValueError("the picture to start from is gone (was it deleted?)")
    try:
        with PIL.Image.open(path) as opened:
            width, height = job.output_size(*opened.size)
            # Checked on the header, before a too-big image is decoded.
            if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
                raise ValueError(
                    f"the picture to start from is {opened.width}x{opened.height}: upscaled "
                    f"{UPSCALE_FACTOR}x it would be {width}x{height}, outside {MIN_SIDE}..{MAX_SIDE}"
                )
            init = opened.convert("RGB")
    except (OSError, PIL.Image.DecompressionBombError) as error:
        log.warning("the init image %s is not readable: %s", path, error)
        raise ValueError("the picture to start from is not a readable image") from None
    # Lanczos: the hires-fix resize; img2img then redraws detail at the new size.
    return init.resize((width, height), PIL.Image.LANCZOS)


def _step_callback(
    on_step: Callable[[int, int], None] | None,
    stop: Callable[[], bool],
    on_latents: Callable[[int, int, torch.Tensor], None] | None = None,
) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
    def callback(pipeline: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        # Raising (rather than pipeline._interrupt) stops at once: no VAE decode of a dropped image.
        if stop():
            raise GenerationCancelled(f"generation cancelled after step {step + 1}")
        raise_if_test_oom("generate", step + 1)
        if on_step is not None:
            on_step(step + 1, pipeline.num_timesteps)
        if on_latents is not None:
            on_latents(step + 1, pipeline.num_timesteps, callback_kwargs["latents"])
        return {}

    return callback


def _write_pngs(images: list[PIL.Image.Image], parameters: list[str], output_dir: Path) -> list[Path]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for index, (image, text) in enumerate(zip(images, parameters, strict=True)):
        info = PngInfo()
        # add_text falls back to an iTXt chunk for text Latin-1 cannot hold (emoji, CJK prompts).
        info.add_text("parameters", text)
        path = output_dir / f"{index}.png"
        image.save(path, pnginfo=info)
        files.append(path)
    return files


# peft's name for "no adapter" in a mixed batch.
BASE_ONLY = "__base__"
# The components whose LoRA layers see text (one row per prompt) rather than latents (one per image).
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@contextmanager
def per_sample_adapters(
    pipeline: Any, prompt_adapters: Sequence[str], image_adapters: Sequence[str]
) -> Iterator[None]:
    """Inside, row i of every LoRA layer's input goes through adapter number i only (peft's
    mixed-batch forward, `adapter_names`), which diffusers pipelines do not pass through.

    The text encoders see one row per prompt (`prompt_adapters`; the negative prompts are encoded
    in a call of their own, of the same length); the UNet sees one row per image (`image_adapters`),
    and with classifier-free guidance a batch of [unconditional x N, conditional x N]: the names are
    repeated the same way. BASE_ONLY is a row with no adapter. The adapters must be loaded and LoRA
    enabled; which are "active" does not matter to a mixed batch.
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def hook_giving(names: list[str], component: str) -> Callable[..., Any]:
        def add_adapter_names(_layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            rows = (args[0] if args else kwargs["x"]).shape[0]
            if rows % len(names):
                raise RuntimeError(
                    f"{component}: a batch of {rows} rows does not fit {len(names)} adapter names"
                )
            return args, {**kwargs, "adapter_names": names * (rows // len(names))}

        return add_adapter_names

    components = [("unet", list(image_adapters))] + [(name, list(prompt_adapters)) for name in _TEXT_ENCODERS]
    try:
        for name, names in components:
            module = getattr(pipeline, name, None)
            if module is None:
                continue
            for layer in module.modules():
                if isinstance(layer, LoraLayer):
                    handles.append(
                        layer.register_forward_pre_hook(hook_giving(names, name), with_kwargs=True)
                    )
        yield
    finally:
        for handle in handles:
            handle.remove()


def _modules(pipeline: Any) -> list[torch.nn.Module]:
    return [component for component in pipeline.components.values() if isinstance(component, torch.nn.Module)]


@contextmanager
def _inference_state(pipeline: Any) -> Iterator[None]:
    """No gradients inside; on the way out, the pipeline's modules are as they were found.

    Restored: each module's train/eval mode, and on each LoRA layer that existed before, its active
    and disabled adapters and the requires_grad flags that set_adapters/disable_lora change. LoRA
    layers created inside (a newly loaded adapter) are left with no adapter active, so the cache's
    adapters never affect the model outside `generate`.
    """
    modules = _modules(pipeline)
    # Keyed by id, holding the module so that no id is reused by a module created inside.
    modes = {id(module): (module, module.training) for component in modules for module in component.modules()}
    layers = {
        id(layer): (layer, list(layer.active_adapters), layer.disable_adapters)
        for component in modules
        for layer in component.modules()
        if isinstance(layer, BaseTunerLayer)
    }
    # Every parameter, not only the adapters': injecting a new adapter freezes all non-LoRA weights.
    grads = [(param, param.requires_grad) for component in modules for param in component.parameters()]
    try:
        with torch.no_grad():
            yield
    finally:
        for component in modules:
            for layer in component.modules():
                if isinstance(layer, BaseTunerLayer) and id(layer) not in layers:
                    layer.set_adapter([], inference_mode=True)
        for layer, active, disabled in layers.values():
            layer.set_adapter(active)
            layer.enable_adapters(not disabled)
        for param, requires_grad in grads:
            param.requires_grad_(requires_grad)
        for component in modules:
            restored: dict[str, bool] = {}
            for name, module in component.named_modules():
                # Modules created inside (a newly loaded adapter's layers) take their parent's mode.
                parent = restored.get(name.rpartition(".")[0])
                training = modes[id(module)][1] if id(module) in modes else parent
                # Not .train(): that recurses and would flatten mixed modes.
                module.training = restored[name] = training

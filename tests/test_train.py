"""engine.train on the tiny random models: CPU, 64 px, a few dozen steps at most."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from engine.contract.config import TrainingSection
from engine.contract.protocol import CHECKPOINTS_DIR, TrainJob
from engine.model import LoadedModel, load_base_model
from engine.train import (
    LOSS_SMOOTHING,
    TRAINING_ADAPTER,
    TrainingCancelled,
    TrainingProgress,
    TrainingResult,
    _optimizer,
    _StepLosses,
    default_steps,
    train_lora,
)

TOKEN = "abraza"
INSTANCE_PROMPT = f"photo of {TOKEN} person"
# Photos are crops of the astronaut: (left, top, right, bottom) in the 512 px original.
CROPS = [(0, 0, 512, 512), (96, 0, 416, 320), (160, 40, 352, 232), (48, 48, 464, 464)]


def settings(**overrides: object) -> TrainingSection:
    values: dict[str, object] = dict(
        resolution=64,
        rank=4,
        alpha=8,  # scale 2, so a loader that lost alpha would show
        learning_rate=1e-3,
        class_images=2,
        checkpoint_every=5,
        sample_count=1,
        # Class images and samples in 2 steps, not 25: the tests check that they exist and are used.
        render_steps=2,
        gradient_checkpointing=False,
        preview_at=0,
    )
    values.update(overrides)
    return TrainingSection(**values)  # type: ignore[arg-type]


def train_job(
    photos: tuple[Path, ...],
    output_dir: Path,
    *,
    class_word: str = "person",
    steps: int | None = None,
    resume: bool = True,
) -> TrainJob:
    """The job as the bot writes it: paths as strings."""
    return TrainJob(
        job_id="test",
        token=TOKEN,
        class_word=class_word,
        photos=[str(photo) for photo in photos],
        output_dir=str(output_dir),
        steps=steps,
        resume=resume,
    )


@pytest.fixture(scope="module")
def sd(tiny_data_dir: Path) -> LoadedModel:
    """The tiny SD 1.x pipeline every test trains on, one after another, as a worker would."""
    return load_base_model("tiny", "cpu", tiny_data_dir)


@pytest.fixture(scope="module")
def photos(photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ...]:
    folder = tmp_path_factory.mktemp("photos")
    with PIL.Image.open(photos_dir / "astronaut.png") as opened:
        astronaut = opened.convert("RGB")
    paths = []
    for index, box in enumerate(CROPS):
        path = folder / f"{index}.png"
        astronaut.crop(box).resize((64, 64), PIL.Image.LANCZOS).save(path)
        paths.append(path)
    return tuple(paths)


@pytest.fixture(scope="module")
def class_images_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("class_images")


def run(
    model: LoadedModel,
    photos: tuple[Path, ...],
    output_dir: Path,
    class_images_dir: Path,
    training: TrainingSection,
    *,
    steps: int,
    resume: bool = True,
    stop_after: int | None = None,
    between_steps: Callable[[], bool] | None = None,
    after_step: Callable[[], None] | None = None,
) -> tuple[TrainingResult | None, list[TrainingProgress]]:
    """Train (asking to stop once step `stop_after` is done); the result (None if cancelled), all
    progress. `after_step` runs at each step's progress report, while the training adapter is on the UNet."""
    events: list[TrainingProgress] = []

    def on_progress(progress: TrainingProgress) -> None:
        events.append(progress)
        if after_step is not None and progress.phase == "training":
            after_step()

    def should_stop() -> bool:
        return stop_after is not None and len(training_steps(events)) >= stop_after

    try:
        result = train_lora(
            model,
            train_job(photos, output_dir, steps=steps, resume=resume),
            training,
            class_images_dir,
            on_progress=on_progress,
            should_stop=should_stop,
            between_steps=between_steps,
        )
    except TrainingCancelled:
        return None, events
    return result, events


def training_steps(events: list[TrainingProgress]) -> list[int]:
    return [event.step for event in events if event.phase == "training"]


def unet_probe(pipeline: object) -> torch.Tensor:
    """The UNet's output for one fixed input: equal before and after training if nothing was left behind."""
    unet = pipeline.unet  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 32, 32, generator=generator)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, 500, context).sample


def assert_pristine(model: LoadedModel, probe: torch.Tensor) -> None:
    """The shared pipeline as generation expects it after a training, whatever way it ended."""
    pipeline = model.pipeline
    for component in (pipeline.unet, pipeline.text_encoder):
        assert not any(isinstance(module, BaseTunerLayer) for module in component.modules())
        assert TRAINING_ADAPTER not in getattr(component, "peft_config", {})
    for component in (pipeline.unet, pipeline.text_encoder, pipeline.vae):
        assert not any(param.requires_grad for param in component.parameters())
        assert not any(module.training for module in component.modules())
    assert not pipeline.unet.is_gradient_checkpointing
    assert torch.equal(unet_probe(pipeline), probe)


def instance_loss(pipeline: object, photos: tuple[Path, ...]) -> float:
    """The denoising loss on the photos for a fixed set of noise and timesteps (not the noisy step loss)."""
    generator = torch.Generator().manual_seed(2)
    pixels = torch.stack(
        [torch.from_numpy(np.asarray(PIL.Image.open(path), dtype=np.float32) / 127.5 - 1) for path in photos]
    ).permute(0, 3, 1, 2)
    with torch.no_grad():
        latents = pipeline.vae.encode(pixels).latent_dist.mean * pipeline.vae.config.scaling_factor  # type: ignore[attr-defined]
        embeds = pipeline.encode_prompt(INSTANCE_PROMPT, "cpu", len(photos), False)[0]  # type: ignore[attr-defined]
        losses = []
        for timestep in (100, 300, 500, 700, 900):
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.full((len(photos),), timestep)
            noisy = pipeline.scheduler.add_noise(latents, noise, timesteps)  # type: ignore[attr-defined]
            prediction = pipeline.unet(noisy, timesteps, embeds).sample  # type: ignore[attr-defined]
            losses.append(torch.nn.functional.mse_loss(prediction, noise).item())
    return float(np.mean(losses))


def render(pipeline: object, prompt: str, seed: int, training: TrainingSection) -> np.ndarray:
    """An image as engine.train renders its samples with `training`."""
    image = pipeline(  # type: ignore[operator]
        prompt,
        num_inference_steps=training.render_steps,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]
    return np.asarray(image, dtype=np.int16)


# ---------------------------------------------------------------------------------------------


def test_a_missing_photo_is_named(sd: LoadedModel, photos: tuple[Path, ...], tmp_path: Path) -> None:
    """The values are TrainJob's to check (tests/test_protocol.py); the files are the engine's."""
    gone = tmp_path / "nope.png"
    job = train_job((*photos, gone, tmp_path / "gone too.png"), tmp_path / "out", steps=1)
    with pytest.raises(
        ValueError, match=r"^2 of the training photos are gone \(deleted before the training ran\?\)$"
    ):
        train_lora(sd, job, settings(), tmp_path / "class_images")
    # Refused before anything was written or rendered.
    assert list(tmp_path.iterdir()) == []


def test_default_steps() -> None:
    training = TrainingSection(steps_per_photo=100, extra_steps_under_10_photos=100, max_steps=2000)
    assert default_steps(5, training) == 600
    assert default_steps(10, training) == 1000
    assert default_steps(30, training) == 2000


@pytest.mark.slow
def test_training_learns_writes_a_loadable_adapter_and_leaves_the_pipeline_as_it_was(
    sd: LoadedModel, photos: tuple[Path, ...], tiny_data_dir: Path, tmp_path: Path
) -> None:
    probe = unet_probe(sd.pipeline)
    base_loss = instance_loss(sd.pipeline, photos)
    # A high learning rate: the tiny random UNet has little to learn from 30 steps of attention LoRA.
    training = settings(gradient_checkpointing=True, learning_rate=1e-2, preview_at=0.5)
    output_dir = tmp_path / "out"
    result, events = run(sd, photos, output_dir, tmp_path / "class_images", training, steps=30)
    assert result is not None
    # One preview sample, halfway, rendered with the adapter in training.
    (preview,) = [event for event in events if event.preview is not None]
    assert preview.step == 15 and preview.preview == output_dir / "preview.png"
    with PIL.Image.open(preview.preview) as image:
        assert image.size == (64, 64)

    assert_pristine(sd, probe)
    assert len(result.losses) == result.steps == 30
    assert [event.phase for event in events] == ["class images"] + ["training"] * 30 + ["samples"]
    assert training_steps(events) == list(range(1, 31))
    assert all(event.loss is not None and event.eta_seconds is not None for event in events[1:-1])
    assert events[-2].eta_seconds == 0
    assert not (output_dir / "checkpoints").exists()

    metadata = json.loads(result.metadata_path.read_text())
    assert metadata == result.metadata
    expected = dict(base_model="tiny", token=TOKEN, class_word="person", steps=30, rank=4, alpha=8)
    expected |= dict(learning_rate=1e-2, photo_count=4, resolution=64, train_text_encoder=False)
    assert metadata.items() >= expected.items()
    for key in ("seconds", "final_loss", "created_at", "dreambot_version"):
        assert metadata[key]

    # The kohya format (tests/test_kohya.py checks its keys): UNet layers only, alpha 8 in the file.
    weights = load_file(result.adapter_path)
    assert weights and all(key.startswith("lora_unet_") for key in weights)
    assert {weights[key].item() for key in weights if key.endswith(".alpha")} == {8}
    fresh = load_base_model("tiny", "cpu", tiny_data_dir).pipeline
    base_image = render(fresh, INSTANCE_PROMPT, seed=0, training=training)
    fresh.load_lora_weights(
        result.adapter_path.parent, weight_name=result.adapter_path.name, adapter_name="abraza"
    )
    trained_loss = instance_loss(fresh, photos)
    print(f"\ninstance loss {base_loss:.4f} -> {trained_loss:.4f}")
    assert trained_loss < base_loss * 0.95
    assert np.abs(render(fresh, INSTANCE_PROMPT, seed=0, training=training) - base_image).max() > 10
    # The sample was rendered with the adapter in training; the loaded file reproduces it exactly.
    (sample,) = result.samples
    assert sample == output_dir / "samples" / "0.png"
    prompt = training.sample_prompt.format(token=TOKEN, **{"class": "person"})
    sample_pixels = np.asarray(PIL.Image.open(sample), dtype=np.int16)
    assert np.abs(render(fresh, prompt, seed=training.seed, training=training) - sample_pixels).max() <= 1


@pytest.mark.slow
def test_class_images_are_rendered_once_per_base_and_class(
    sd: LoadedModel, photos: tuple[Path, ...], tmp_path: Path
) -> None:
    cache = tmp_path / "class_images"
    folder = cache / "tiny" / "young-man" / "64px"
    training = settings(class_images=3, sample_count=0)
    job = train_job(photos, tmp_path / "a", class_word="young man", steps=1)
    first: list[TrainingProgress] = []
    train_lora(
        sd,
        job,
        dataclasses.replace(training, class_images=2, render_steps=3),
        cache,
        on_progress=first.append,
    )
    assert sorted(path.name for path in folder.iterdir()) == ["0.png", "1.png"]
    # Rendered in [training] render_steps denoising steps, by the pipeline's own scheduler.
    assert len(sd.pipeline.scheduler.timesteps) == 3
    mtimes = {path: path.stat().st_mtime_ns for path in folder.iterdir()}

    # One more wanted: only that one is rendered.
    second: list[TrainingProgress] = []
    train_lora(
        sd,
        dataclasses.replace(job, output_dir=str(tmp_path / "b")),
        training,
        cache,
        on_progress=second.append,
    )
    assert [(e.step, e.total) for e in second if e.phase == "class images"] == [(1, 1)]
    assert {path: path.stat().st_mtime_ns for path in mtimes} == mtimes

    third: list[TrainingProgress] = []
    train_lora(
        sd,
        dataclasses.replace(job, output_dir=str(tmp_path / "c")),
        training,
        cache,
        on_progress=third.append,
    )
    assert not [event for event in third if event.phase == "class images"]
    assert len(list(folder.iterdir())) == 3


@pytest.mark.slow
def test_should_stop_ends_the_run_within_one_step(
    sd: LoadedModel, photos: tuple[Path, ...], class_images_dir: Path, tmp_path: Path
) -> None:
    probe = unet_probe(sd.pipeline)
    training = settings(train_text_encoder=True)
    result, events = run(sd, photos, tmp_path, class_images_dir, training, steps=20, stop_after=3)
    assert result is None
    assert training_steps(events) == [1, 2, 3]
    assert not (tmp_path / "adapter.safetensors").exists()
    assert_pristine(sd, probe)

    # While images render, too: polled before each of the 2 steps, then inside the sample's denoising
    # loop of 4 steps.
    polls: list[int] = []

    def stop_on_fifth_poll() -> bool:
        polls.append(len(polls))
        return len(polls) == 5

    output_dir = tmp_path / "stopped in samples"
    with pytest.raises(TrainingCancelled):
        train_lora(
            sd,
            train_job(photos, output_dir, steps=2),
            settings(prior_preservation=False, render_steps=4),
            class_images_dir,
            should_stop=stop_on_fifth_poll,
        )
    assert len(polls) == 5 and not list((output_dir / "samples").iterdir())
    assert_pristine(sd, probe)

    # While the preview renders (after step 2 of 4): no preview, and the two steps are kept for the resume.
    events: list[TrainingProgress] = []

    def stop_in_the_preview() -> bool:
        # Polled before step 2 (False), then in the preview's denoising loop before step 2 is reported.
        polls.append(len(polls))
        return training_steps(events) != [1] or len(polls) > 1

    polls.clear()
    output_dir = tmp_path / "stopped in the preview"
    with pytest.raises(TrainingCancelled):
        train_lora(
            sd,
            train_job(photos, output_dir, steps=4),
            settings(prior_preservation=False, preview_at=0.5, checkpoint_every=100),
            class_images_dir,
            on_progress=events.append,
            should_stop=lambda: bool(training_steps(events)) and stop_in_the_preview(),
        )
    assert training_steps(events) == [1, 2] and all(event.preview is None for event in events)
    assert [path.name for path in (output_dir / CHECKPOINTS_DIR).iterdir()] == ["step-000002"]
    assert_pristine(sd, probe)


@pytest.mark.slow
def test_an_error_propagates_after_the_cleanup(
    sd: LoadedModel, photos: tuple[Path, ...], tmp_path: Path
) -> None:
    probe = unet_probe(sd.pipeline)

    def out_of_memory() -> bool:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    training = settings(prior_preservation=False, gradient_checkpointing=True, checkpoint_every=1)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run(sd, photos, tmp_path, tmp_path, training, steps=5, between_steps=out_of_memory)
    # Left for a resume: the checkpoint of the one step that ran.
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]
    assert_pristine(sd, probe)


# peft's note on a second adapter beside the training one, and transformers' "MISSING" load report for the
# training adapter's weights when the user's adapter loads into the text encoder: both harmless.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_generation_between_steps_does_not_change_the_training(
    sd: LoadedModel, photos: tuple[Path, ...], class_images_dir: Path, tmp_path: Path
) -> None:
    """A generation job that loads a user's adapter, selects it (or none) and renders, every step."""
    probe = unet_probe(sd.pipeline)
    training = settings(train_text_encoder=True, sample_count=0)
    alone, _ = run(sd, photos, tmp_path / "alone", class_images_dir, training, steps=10)
    assert alone is not None
    pipeline = sd.pipeline
    calls: list[int] = []

    def generate() -> bool:
        # The training state is back after the previous call.
        assert pipeline.unet.training and pipeline.text_encoder.training
        # What engine.generate does at worst: its own adapters and modes, a plain pipeline call, no cleanup.
        pipeline.unet.eval()
        pipeline.text_encoder.eval()
        if not calls:
            pipeline.load_lora_weights(
                alone.adapter_path.parent, weight_name=alone.adapter_path.name, adapter_name="someone"
            )
        if len(calls) % 2:
            pipeline.unet.disable_adapters()
        else:
            pipeline.set_adapters(["someone"])
        pipeline("photo of someone person", num_inference_steps=2, height=64, width=64)
        calls.append(len(calls))
        return True

    try:
        shared, _ = run(
            sd, photos, tmp_path / "shared", class_images_dir, training, steps=10, between_steps=generate
        )
        assert shared is not None and len(calls) == 10
        # The generator's adapter is still loaded (its cache), but inactive; the training adapter is gone.
        assert "someone" in pipeline.unet.peft_config
        assert TRAINING_ADAPTER not in pipeline.unet.peft_config
        assert torch.equal(unet_probe(pipeline), probe)
        assert not any(param.requires_grad for param in pipeline.unet.parameters())
    finally:
        pipeline.unload_lora_weights()
    # Same noise, same data order, same start: generation in between changed nothing.
    assert shared.losses == alone.losses
    trained, reference = load_file(shared.adapter_path), load_file(alone.adapter_path)
    assert trained.keys() == reference.keys()
    # The text encoder trained too (gaussian init starts its "up" matrices at zero).
    text_encoder_up = [
        key for key in trained if key.startswith("lora_te_") and key.endswith(".lora_up.weight")
    ]
    assert text_encoder_up and all(trained[key].abs().sum() > 0 for key in text_encoder_up)
    assert all(torch.equal(trained[key], reference[key]) for key in trained)
    assert_pristine(sd, probe)


@pytest.mark.slow
def test_the_pipeline_is_handed_over_only_after_the_steps_at_which_a_job_waits(
    sd: LoadedModel, photos: tuple[Path, ...], tmp_path: Path
) -> None:
    events: list[TrainingProgress] = []
    handed_over_after: list[int] = []

    def between_steps() -> bool:
        # Handed over: the training adapter's weights are set aside meanwhile.
        assert TRAINING_ADAPTER not in next(
            layer.lora_A for layer in sd.pipeline.unet.modules() if isinstance(layer, BaseTunerLayer)
        )
        handed_over_after.append(training_steps(events)[-1])
        return False

    train_lora(
        sd,
        train_job(photos, tmp_path, steps=6),
        settings(prior_preservation=False, sample_count=0),
        tmp_path / "class_images",
        on_progress=events.append,
        between_steps=between_steps,
        jobs_waiting=lambda: training_steps(events)[-1] in (2, 5),
    )
    assert handed_over_after == [2, 5]


@pytest.mark.slow
def test_the_step_losses_are_read_from_the_device_only_when_wanted(
    sd: LoadedModel, photos: tuple[Path, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step leaves its loss on the device (reading it is a host sync on a GPU): the losses are read
    all at once, for a checkpoint, the result, or a progress event's loss when someone asks for it."""
    read_at_once: list[int] = []
    settle = _StepLosses._settle

    def counted_settle(self: _StepLosses) -> None:
        if self._pending:
            read_at_once.append(len(self._pending))
        settle(self)

    monkeypatch.setattr(_StepLosses, "_settle", counted_settle)
    events: list[TrainingProgress] = []
    training = settings(prior_preservation=False, sample_count=0, checkpoint_every=4)
    result = train_lora(
        sd,
        train_job(photos, tmp_path, steps=10),
        training,
        tmp_path / "class_images",
        on_progress=events.append,
    )
    # Steps 1-4 for the checkpoint of step 4, 5-8 for step 8's, 9-10 for the result.
    assert read_at_once == [4, 4, 2]
    # Each event's loss, read after the run, is the loss smoothed up to that event's step.
    smoothed, expected = None, []
    for loss in result.losses:
        smoothed = loss if smoothed is None else LOSS_SMOOTHING * smoothed + (1 - LOSS_SMOOTHING) * loss
        expected.append(smoothed)
    assert [event.loss for event in events if event.phase == "training"] == expected
    assert result.metadata["final_loss"] == round(expected[-1], 5)


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(
    sd: LoadedModel, photos: tuple[Path, ...], class_images_dir: Path, tmp_path: Path
) -> None:
    training = settings(sample_count=0)
    uninterrupted, _ = run(sd, photos, tmp_path / "uninterrupted", class_images_dir, training, steps=12)
    assert uninterrupted is not None

    output_dir = tmp_path / "interrupted"
    first, _ = run(sd, photos, output_dir, class_images_dir, training, steps=12, stop_after=7)
    assert first is None
    # Stopping keeps every step done: step 7's checkpoint replaces the periodic one of step 5.
    assert [path.name for path in (output_dir / "checkpoints").iterdir()] == ["step-000007"]

    resumed, events = run(sd, photos, output_dir, class_images_dir, training, steps=12)
    assert resumed is not None
    assert training_steps(events) == list(range(8, 13))
    assert len(resumed.losses) == 12
    assert resumed.losses == pytest.approx(uninterrupted.losses, rel=1e-4)
    trained, reference = load_file(resumed.adapter_path), load_file(uninterrupted.adapter_path)
    assert all(torch.allclose(trained[key], reference[key], atol=1e-6) for key in reference)
    assert not (output_dir / "checkpoints").exists()

    # resume=False starts over (and ignores the checkpoint a cancelled run left).
    run(sd, photos, output_dir, class_images_dir, training, steps=12, stop_after=7)
    fresh, events = run(sd, photos, output_dir, class_images_dir, training, steps=12, resume=False)
    assert fresh is not None and training_steps(events)[0] == 1


@pytest.mark.slow
def test_sdxl_adapter_with_text_encoders_loads_back(
    tiny_data_dir: Path, photos: tuple[Path, ...], class_images_dir: Path, tmp_path: Path
) -> None:
    sdxl = load_base_model("tiny-sdxl", "cpu", tiny_data_dir)
    training = settings(train_text_encoder=True, class_images=1, checkpoint_every=2)
    result, _ = run(sdxl, photos, tmp_path, class_images_dir, training, steps=4)
    assert result is not None and len(result.losses) == 4
    assert all(np.isfinite(result.losses))
    assert (class_images_dir / "tiny-sdxl" / "person" / "64px" / "0.png").is_file()
    for component in (sdxl.pipeline.unet, sdxl.pipeline.text_encoder, sdxl.pipeline.text_encoder_2):
        assert not any(isinstance(module, BaseTunerLayer) for module in component.modules())

    prefixes = {re.match(r"lora_(unet|te1|te2)_", key)[0] for key in load_file(result.adapter_path)}  # type: ignore[index]
    assert prefixes == {"lora_unet_", "lora_te1_", "lora_te2_"}
    fresh = load_base_model("tiny-sdxl", "cpu", tiny_data_dir).pipeline
    fresh.load_lora_weights(
        result.adapter_path.parent, weight_name=result.adapter_path.name, adapter_name="abraza"
    )
    assert set(fresh.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    prompt = training.sample_prompt.format(token=TOKEN, **{"class": "person"})
    sample = np.asarray(PIL.Image.open(result.samples[0]), dtype=np.int16)
    assert np.abs(render(fresh, prompt, seed=training.seed, training=training) - sample).max() <= 1


# ---------------------------------------------------------------------------------------------
# The GPU's precisions and optimizer, run on the CPU with the same switches


def test_without_bitsandbytes_8bit_adam_falls_back_to_adamw_with_one_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with caplog.at_level(logging.INFO, logger="engine.train"):
        optimizer = _optimizer([param], 1e-3, eight_bit=True)
    assert type(optimizer) is torch.optim.AdamW
    assert [record.getMessage() for record in caplog.records] == [
        "8-bit Adam unavailable (bitsandbytes: import of bitsandbytes halted; None in sys.modules): training "
        "with torch AdamW, which needs more GPU memory; pip install bitsandbytes to use it"
    ]
    caplog.clear()
    assert type(_optimizer([param], 1e-3, eight_bit=False)) is torch.optim.AdamW
    assert caplog.records == []
    # torch's fused kernel: one call per step for all the adapter's tensors.
    assert optimizer.defaults["fused"] is True


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_training_autocasts_and_the_fp16_loss_scaler_skips_an_inf_step(
    dtype: str, tiny_data_dir: Path, photos: tuple[Path, ...], class_images_dir: Path, tmp_path: Path
) -> None:
    training = settings(prior_preservation=False, checkpoint_every=100)
    model = load_base_model("tiny", "cpu", tiny_data_dir, dtype=dtype)
    assert model.dtype == model.pipeline.unet.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    seen: list[tuple[bool, torch.dtype]] = []
    model.pipeline.unet.register_forward_pre_hook(
        lambda *_: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
    )
    snapshot: dict[str, torch.Tensor] = {}

    def poison_the_next_step() -> None:
        """After step 1, the fp16 run's next gradients are infinite: GradScaler must skip that step."""
        if dtype == "fp16" and not snapshot:
            params = {f"unet.{k}": p for k, p in model.pipeline.unet.named_parameters() if p.requires_grad}
            snapshot.update({name: param.detach().clone() for name, param in params.items()})
            next(iter(params.values())).register_hook(lambda grad: grad * float("inf"))

    output = tmp_path / dtype
    result, events = run(
        model,
        photos,
        output,
        class_images_dir,
        training,
        steps=4,
        stop_after=2,
        after_step=poison_the_next_step,
    )
    assert result is None and training_steps(events) == [1, 2]
    assert all(np.isfinite(event.loss) for event in events if event.phase == "training")
    assert seen and all(enabled and autocast == model.dtype for enabled, autocast in seen), seen
    # The cancelled run's checkpoint holds the step-2 state: for bf16 no loss scaling at all; for
    # fp16 the poisoned step left the adapter as step 1 did and halved the scale (65536 -> 32768).
    checkpoint = output / CHECKPOINTS_DIR / "step-000002"
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    if dtype == "bf16":
        assert state["scaler"] == {}
    else:
        assert state["scaler"]["scale"] == 32768.0
        weights = load_file(checkpoint / "adapter.safetensors")
        assert weights.keys() == snapshot.keys()
        assert all(torch.equal(weights[name], snapshot[name]) for name in snapshot)

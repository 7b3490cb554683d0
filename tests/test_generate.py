"""engine.generate on the tiny random models: CPU, 64 px, a few steps."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from bot.pnginfo import read_picture
from engine.contract.config import TrainingSection
from engine.contract.kohya import is_kohya_adapter
from engine.contract.protocol import AdapterRef, GenerateJob, TrainJob, words_in
from engine.generate import AdapterLoadError, GenerationCancelled, Generator, a1111_parameters, expand_tokens
from engine.model import LoadedModel, load_base_model
from engine.train import train_lora

TRAINING_ADAPTER = "dreambot_training"  # engine.train's name; not imported, as in engine.generate
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# engine.train's: kohya files with fewer (no out_proj) do not load in diffusers 0.42, which infers a
# kohya text encoder's format from its to_out layers.
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# Batching reorders float sums: a pixel can move by 1/255, even on one CPU thread.
BATCH_TOLERANCE = 2


def job(**overrides: object) -> GenerateJob:
    """A small job; Generator.generate writes where the test says, not to the job's output_dir."""
    values: dict[str, object] = dict(
        job_id="test", output_dir="unused", prompt="a photo of a cat", steps=2, width=64, height=64, seed=7
    )
    values.update(overrides)
    return GenerateJob(**values)  # type: ignore[arg-type]


def pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def max_diff(a: PIL.Image.Image, b: PIL.Image.Image) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS, init_lora_weights="gaussian")


def randomize_lora_b(module: torch.nn.Module, seed: int) -> None:
    """Gaussian init leaves lora_B at zero (no effect): give the adapter a visible one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread() -> Iterator[None]:
    """The tiny models gain nothing from threads, and on a busy machine spinning OpenMP threads
    make every call several times slower (2-4 s instead of 0.3 s per generation seen)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tiny_data_dir: Path) -> LoadedModel:
    return load_base_model("tiny", "cpu", tiny_data_dir)


@pytest.fixture(scope="module")
def generator(model: LoadedModel) -> Generator:
    return Generator(model)


@pytest.fixture
def fresh_model(tiny_data_dir: Path) -> LoadedModel:
    """A model of its own, for tests that leave something on the pipeline."""
    return load_base_model("tiny", "cpu", tiny_data_dir)


def write_old_format_adapter(pipeline: StableDiffusionPipeline, folder: Path, name: str, seed: int) -> Path:
    """A LoRA file in the diffusers/peft format adapters had before the kohya format, written
    without engine.train. "bravo" also adapts the text encoder."""
    pipeline.unet.add_adapter(lora_config(), adapter_name=name)
    randomize_lora_b(pipeline.unet, seed)
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipeline.unet, adapter_name=name)}
    if name == "bravo":
        text_config = LoraConfig(
            r=4, lora_alpha=4, target_modules=TEXT_ENCODER_TARGETS, init_lora_weights="gaussian"
        )
        pipeline.text_encoder.add_adapter(text_config, adapter_name=name)
        randomize_lora_b(pipeline.text_encoder, seed)
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(
            pipeline.text_encoder, adapter_name=name
        )
    StableDiffusionPipeline.save_lora_weights(
        folder, weight_name="adapter.safetensors", safe_serialization=True, **layers
    )
    pipeline.delete_adapters(name)
    return folder / "adapter.safetensors"


@pytest.fixture(scope="module")
def adapter_files(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three old-format LoRA files on a separately loaded copy of the base (the generator rewrites
    them in the kohya format when it first loads them)."""
    folder = tmp_path_factory.mktemp("adapters")
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    return {
        name: write_old_format_adapter(pipeline, folder / name, name, seed)
        for seed, name in enumerate(("alfa", "bravo", "charlie"), start=1)
    }


def ref(files: dict[str, Path], name: str, class_word: str = "person") -> AdapterRef:
    return AdapterRef(token=name, class_word=class_word, path=str(files[name]))


# ---------------------------------------------------------------------------------------------
# Text to image, seeds, parameters


def test_pipelines_share_the_base_modules(generator: Generator, model: LoadedModel) -> None:
    base = model.pipeline
    for pipeline in (generator._text2image, generator._image2image):
        for name in ("unet", "vae", "text_encoder", "tokenizer"):
            assert getattr(pipeline, name) is getattr(base, name)
        assert type(pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    # The base pipeline keeps its own scheduler (training uses it).
    assert type(base.scheduler).__name__ == "DDPMScheduler"


def test_text_to_image_makes_count_images_in_one_call(generator: Generator) -> None:
    steps: list[tuple[int, int]] = []
    result = generator.generate(
        job(count=3, steps=3, width=64, height=96), on_step=lambda *s: steps.append(s)
    )
    assert len(result.images) == 3
    assert all(image.size == (64, 96) for image in result.images)
    assert result.seeds == [7, 8, 9]
    assert result.files == []
    assert result.nsfw == [False, False, False]
    # One batched call: each denoising step is reported once, not once per image.
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert result.seconds > 0


def test_same_seed_same_pixels_other_seed_differs(generator: Generator) -> None:
    first = generator.generate(job(seed=11)).images[0]
    again = generator.generate(job(seed=11)).images[0]
    other = generator.generate(job(seed=12)).images[0]
    assert max_diff(first, again) == 0
    assert max_diff(first, other) > 10


def test_batch_image_matches_single_run(generator: Generator) -> None:
    batch = generator.generate(job(count=3, seed=100))
    for index, seed in enumerate(batch.seeds):
        alone = generator.generate(job(count=1, seed=seed)).images[0]
        # Same initial noise (one CPU generator per image); the batched UNet/VAE only reorder
        # float sums, which can move a pixel by 1/255 on CPU.
        assert max_diff(batch.images[index], alone) <= BATCH_TOLERANCE


def test_png_parameters_round_trip(generator: Generator, tmp_path: Path) -> None:
    prompt = "a portrait, oil painting, by someone: 'famous' ✨"
    negative = "blurry, lowres"
    result = generator.generate(
        job(prompt=prompt, negative_prompt=negative, count=2, guidance=6.5), output_dir=tmp_path / "out"
    )
    assert result.files == [tmp_path / "out" / "0.png", tmp_path / "out" / "1.png"]
    for path, seed, text in zip(result.files, result.seeds, result.parameters, strict=True):
        assert PIL.Image.open(path).text["parameters"] == text
        parsed = read_picture(path.read_bytes()).parameters
        assert parsed.prompt == prompt
        assert parsed.negative_prompt == negative
        assert parsed.settings["Steps"] == "2"
        assert parsed.settings["Sampler"] == "DPM++ 2M"
        assert parsed.settings["CFG scale"] == "6.5"
        assert parsed.settings["Seed"] == str(seed)
        assert parsed.settings["Size"] == "64x64"
        assert parsed.settings["Model"] == "tiny"
        assert parsed.settings["Version"] == f"dreambot {package_version('dreambot')}"
        assert "Model hash" not in parsed.settings  # a Hub or folder base has none
        assert (
            pixels(PIL.Image.open(path).convert("RGB")).tolist() == pixels(result.images[seed - 7]).tolist()
        )


def test_a1111_parameters_layout() -> None:
    text = a1111_parameters("a cat", "ugly", 25, "DPM++ 2M", 7.5, 123, 512, 768, "stable-diffusion-v1-5")
    assert text == (
        "a cat\nNegative prompt: ugly\n"
        "Steps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 123, Size: 512x768, Model: stable-diffusion-v1-5"
    )
    text = a1111_parameters("a cat", "", 20, "DPM++ 2M", 7.0, 1, 512, 512, "m", {"Lora hashes": "x: 1, y: 2"})
    # No negative line when empty; values with commas or colons are JSON-quoted as A1111 does.
    assert (
        text
        == 'a cat\nSteps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, Size: 512x512, Model: m, Lora hashes: "x: 1, y: 2"'
    )
    # A1111's order: the model's hash right before its name, the version last.
    text = a1111_parameters(
        "a cat",
        "",
        20,
        "DPM++ 2M",
        7,
        1,
        64,
        64,
        "m",
        {"Lora hashes": "x: 1"},
        model_hash="0123abcdef",
        version="v9",
    )
    assert text.endswith('Size: 64x64, Model hash: 0123abcdef, Model: m, Lora hashes: "x: 1", Version: v9')


def test_read_parameters_multiline_prompt_and_quoted_values(tmp_path: Path) -> None:
    text = a1111_parameters(
        "line one,\nline two", "neg one\nneg two", 5, "DPM++ 2M", 7, 3, 64, 64, "m", {"Key": "a, b"}
    )
    path = tmp_path / "p.png"
    info = PngInfo()
    info.add_text("parameters", text)
    PIL.Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    parsed = read_picture(path.read_bytes()).parameters
    assert parsed.prompt == "line one,\nline two"
    assert parsed.negative_prompt == "neg one\nneg two"
    assert parsed.settings["Key"] == "a, b"
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "bare.png")
    assert read_picture((tmp_path / "bare.png").read_bytes()).parameters is None


# ---------------------------------------------------------------------------------------------
# Variations and upscales


def test_variation_and_upscale(generator: Generator, tmp_path: Path) -> None:
    source = generator.generate(job(seed=5), output_dir=tmp_path / "source")
    init = source.files[0]

    variation = generator.generate(job(init_image=str(init), strength=0.6, count=2, steps=4, seed=5))
    assert [image.size for image in variation.images] == [(64, 64), (64, 64)]
    assert max_diff(variation.images[0], source.images[0]) > 10
    assert max_diff(variation.images[0], variation.images[1]) > 0
    assert "Denoising strength: 0.6" in variation.parameters[0]

    upscale = generator.generate(
        job(init_image=str(init), upscale=True, strength=0.35, steps=6), output_dir=tmp_path / "up"
    )
    assert upscale.images[0].size == (128, 128)
    resized = source.images[0].resize((128, 128), PIL.Image.LANCZOS)
    assert max_diff(upscale.images[0], resized) > 10
    parsed = read_picture(upscale.files[0].read_bytes()).parameters
    assert parsed.settings["Size"] == "128x128"
    assert parsed.settings["Denoising strength"] == "0.35"
    assert parsed.settings["Postprocess upscale by"] == "2"


# ---------------------------------------------------------------------------------------------
# Validation and helpers


def test_an_init_image_that_cannot_serve_is_refused_saying_why_without_its_path(
    generator: Generator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The values are GenerateJob's to check (tests/test_protocol.py); the files are the engine's.
    Members read the message, so the path goes to the log only."""
    output_dir = tmp_path / "out"
    missing = tmp_path / "gone.png"
    with pytest.raises(ValueError, match=r"^the picture to start from is gone \(was it deleted\?\)$"):
        generator.generate(job(init_image=str(missing), strength=0.6), output_dir)
    assert str(missing) in caplog.text
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    with pytest.raises(ValueError, match=r"^the picture to start from is not a readable image$"):
        generator.generate(job(init_image=str(not_image), strength=0.6), output_dir)
    big = tmp_path / "big.png"
    PIL.Image.new("RGB", (1200, 800)).save(big)
    with pytest.raises(
        ValueError, match=r"^the picture to start from is 1200x800: upscaled 2x it would be 2400x1600"
    ):
        generator.generate(job(init_image=str(big), upscale=True, strength=0.35, steps=6), output_dir)
    assert not output_dir.exists()


def test_expand_tokens() -> None:
    abraza = AdapterRef("abraza", "person", "a")
    sabafry = AdapterRef("sabafry", "woman", "s")
    both = [abraza, sabafry]
    assert (
        expand_tokens("abraza and sabafry as superheroes", both)
        == "abraza person and sabafry woman as superheroes"
    )
    # Already followed by the class word: left alone (any case).
    assert expand_tokens("abraza person on a beach", both) == "abraza person on a beach"
    assert expand_tokens("Abraza Person, Abraza", both) == "Abraza Person, Abraza person"
    # Whole words only.
    assert expand_tokens("abrazadera, xabraza", both) == "abrazadera, xabraza"
    assert expand_tokens("(abraza:1.2) in paris", both) == "(abraza person:1.2) in paris"
    assert expand_tokens("a dog", both) == "a dog"
    # A word by engine.contract.protocol's definition: what selects abraza's adapter gets abraza's class word.
    assert expand_tokens("abraza_viking, ABRAZA-2", both) == "abraza person_viking, ABRAZA person-2"
    assert expand_tokens("young abraza", [AdapterRef("abraza", "young man", "a")]) == "young abraza young man"
    assert expand_tokens("abraza young man", [AdapterRef("abraza", "young man", "a")]) == "abraza young man"
    # The name in a LoRA tag is not a word of the text.
    assert expand_tokens("abraza <lora:abraza:0.5>", both) == "abraza person <lora:abraza:0.5>"


@pytest.mark.parametrize(
    "prompt",
    ["abraza_viking", "abraza, thor", "(abraza:1.2)", "ABRAZA-viking", "abrazadera", "xabraza", "abraza2"],
)
def test_the_prompts_that_select_an_adapter_are_the_ones_that_get_its_class_word(prompt: str) -> None:
    abraza = AdapterRef("abraza", "person", "a")
    assert (expand_tokens(prompt, [abraza]) != prompt) is ("abraza" in words_in(prompt))


def test_cancel_within_a_step(generator: Generator) -> None:
    seen: list[tuple[int, int]] = []
    with pytest.raises(GenerationCancelled):
        generator.generate(
            job(steps=5), on_step=lambda *s: seen.append(s), should_stop=lambda: len(seen) >= 2
        )
    assert seen == [(1, 5), (2, 5)]
    with pytest.raises(GenerationCancelled):
        generator.generate(job(), should_stop=lambda: True)
    # Still usable afterwards.
    assert len(generator.generate(job()).images) == 1


def test_safety_checker_flags_are_reported_and_images_kept(fresh_model: LoadedModel) -> None:
    from transformers import CLIPImageProcessor

    class FlagFirst:
        """Stands in for StableDiffusionSafetyChecker: blacks out and flags the first image."""

        def __call__(self, images: np.ndarray, clip_input: torch.Tensor) -> tuple[np.ndarray, list[bool]]:
            assert clip_input.shape[0] == len(images)
            images[0] = 0.0
            return images, [index == 0 for index in range(len(images))]

    fresh_model.pipeline.feature_extractor = CLIPImageProcessor()
    fresh_model.pipeline.safety_checker = FlagFirst()
    result = Generator(fresh_model).generate(job(count=2))
    assert result.nsfw == [True, False]
    assert pixels(result.images[0]).max() > 0  # written as generated; the caller decides


# ---------------------------------------------------------------------------------------------
# Adapters


def test_adapter_changes_output_and_switching_never_reloads(
    generator: Generator, adapter_files: dict[str, Path], tiny_data_dir: Path
) -> None:
    cache = generator.adapters
    for token in list(cache.loaded):
        cache.forget(token)
    unet = generator.model.pipeline.unet
    weight = unet.conv_in.weight
    loads = cache.loads

    base = generator.generate(job()).images[0]
    with_a = generator.generate(job(prompt="a photo of alfa", adapters=[ref(adapter_files, "alfa")]))
    with_b = generator.generate(job(prompt="a photo of bravo", adapters=[ref(adapter_files, "bravo")]))
    with_a_again = generator.generate(job(prompt="a photo of alfa", adapters=[ref(adapter_files, "alfa")]))
    plain_again = generator.generate(job()).images[0]

    assert max_diff(with_a.images[0], base) > 10
    assert max_diff(with_a.images[0], with_a_again.images[0]) == 0
    assert max_diff(plain_again, base) == 0
    assert cache.loads == loads + 2  # each file read once
    assert cache.loaded == ["bravo", "alfa"]
    assert generator.model.pipeline.unet is unet and unet.conv_in.weight is weight
    assert with_a.parameters[0].splitlines()[0] == "a photo of alfa person <lora:alfa:1>"
    assert f'Lora hashes: "alfa: {cache.shorthash("alfa")}"' in with_a.parameters[0]

    # A fresh pipeline with only that adapter gives the same pixels.
    for name, switched in (("alfa", with_a_again), ("bravo", with_b)):
        alone = Generator(load_base_model("tiny", "cpu", tiny_data_dir))
        fresh = alone.generate(job(prompt=f"a photo of {name}", adapters=[ref(adapter_files, name)]))
        assert max_diff(fresh.images[0], switched.images[0]) == 0


def test_two_adapters_at_once(generator: Generator, adapter_files: dict[str, Path]) -> None:
    a, b = ref(adapter_files, "alfa"), ref(adapter_files, "bravo")
    only_a = generator.generate(job(prompt="alfa and bravo", adapters=[a])).images[0]
    only_b = generator.generate(job(prompt="alfa and bravo", adapters=[b])).images[0]
    both = generator.generate(job(prompt="alfa and bravo", adapters=[a, b]))
    assert both.parameters[0].startswith("alfa person and bravo person <lora:alfa:1> <lora:bravo:1>\n")
    assert max_diff(both.images[0], only_a) > 10
    assert max_diff(both.images[0], only_b) > 10


def test_an_adapter_at_half_weight_has_half_its_effect(
    fresh_model: LoadedModel, adapter_files: dict[str, Path], tmp_path: Path
) -> None:
    """<lora:bravo:0.5>: the bot queues bravo at weight 0.5; the tag stays in the PNG's prompt as typed."""
    generator = Generator(fresh_model)
    bravo = ref(adapter_files, "bravo")  # bravo adapts the text encoder too
    prompt = "bravo at the beach <lora:bravo:0.5>"
    images = {
        weight: generator.generate(
            job(prompt=prompt.replace("0.5", f"{weight:g}"), adapters=[replace(bravo, weight=weight)]),
            tmp_path / str(weight),
        )
        for weight in (0.0, 0.5, 1.0)
    }
    # At 0 the adapter does nothing.
    plain = generator.generate(job(prompt="bravo person at the beach")).images[0]
    assert max_diff(images[0.0].images[0], plain) == 0
    assert max_diff(images[0.5].images[0], images[0.0].images[0]) > 10
    assert max_diff(images[0.5].images[0], images[1.0].images[0]) > 10
    assert (
        read_picture(images[0.5].files[0].read_bytes()).parameters.prompt  # type: ignore[union-attr]
        == "bravo person at the beach <lora:bravo:0.5>"
    )
    # A bare token is weight 1: the same picture as its tag at 1, which the PNG gets appended.
    bare = generator.generate(job(prompt="bravo at the beach", adapters=[bravo]), tmp_path / "bare")
    assert max_diff(bare.images[0], images[1.0].images[0]) == 0
    assert (
        read_picture(bare.files[0].read_bytes()).parameters.prompt  # type: ignore[union-attr]
        == "bravo person at the beach <lora:bravo:1>"
    )

    # Each LoRA layer adds weight x its change: half of it at 0.5.
    layer = next(
        module
        for module in fresh_model.pipeline.unet.modules()
        if isinstance(module, BaseTunerLayer) and "bravo" in module.lora_A
    )
    features = torch.randn(1, 4, layer.in_features, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for weight in (0.0, 0.5, 1.0):
        generator.adapters.activate([replace(bravo, weight=weight)])
        with torch.no_grad():
            outputs[weight] = layer(features)
    change = outputs[1.0] - outputs[0.0]
    assert change.abs().max() > 1e-3
    assert torch.allclose(outputs[0.5] - outputs[0.0], change / 2, atol=1e-6)


def test_members_adapters_in_one_batch_give_the_images_each_renders_alone(
    generator: Generator, adapter_files: dict[str, Path]
) -> None:
    """Four members' requests in one UNet batch: alfa, bravo (whose adapter also changes the text
    encoder), one without an adapter, charlie with two images. Each image equals its job rendered
    alone, within BATCH_TOLERANCE (batching reorders float sums; the LoRA math is the same)."""
    jobs = [
        job(
            job_id="a",
            prompt="alfa on a horse",
            seed=1,
            negative_prompt="blurry",
            adapters=[ref(adapter_files, "alfa")],
        ),
        job(
            job_id="b",
            prompt="bravo as a knight",
            seed=2,
            negative_prompt="dark",
            adapters=[ref(adapter_files, "bravo")],
        ),
        job(job_id="plain", prompt="a castle", seed=3, negative_prompt="text"),
        job(
            job_id="c",
            prompt="charlie swims",
            seed=4,
            count=2,
            negative_prompt="ugly",
            adapters=[ref(adapter_files, "charlie")],
        ),
    ]
    steps: list[tuple[int, int]] = []
    batched = generator.generate_batch(jobs, on_step=lambda step, total: steps.append((step, total)))
    assert steps == [(1, 2), (2, 2)]  # one denoising loop for all of them
    assert [len(result.images) for result in batched] == [1, 1, 1, 2]
    plain_alone = generator.generate(jobs[2]).images[0]
    for request, result in zip(jobs, batched, strict=True):
        alone = generator.generate(request)
        assert result.seeds == alone.seeds
        assert result.parameters == alone.parameters
        for image, expected in zip(result.images, alone.images, strict=True):
            assert max_diff(image, expected) <= BATCH_TOLERANCE, request.job_id
        if request.adapters:
            # The adapter really acted on its own image (and no other adapter did).
            assert (
                max_diff(
                    result.images[0], generator.generate(dataclasses.replace(request, adapters=[])).images[0]
                )
                > 10
            )
    # Equal counts take the one-prompt-per-job path: the same images.
    pair = generator.generate_batch(jobs[:2])
    for request, result in zip(jobs[:2], pair, strict=True):
        assert max_diff(result.images[0], generator.generate(request).images[0]) <= BATCH_TOLERANCE
    assert max_diff(batched[2].images[0], plain_alone) <= BATCH_TOLERANCE

    # Jobs that cannot share a denoising loop are refused by name.
    with pytest.raises(ValueError, match=r"cannot share a batch"):
        generator.generate_batch([jobs[0], job(job_id="big", width=128, height=128)])
    with pytest.raises(ValueError, match=r"cannot share a batch"):
        generator.generate_batch(
            [jobs[0], job(job_id="two", adapters=[ref(adapter_files, "alfa"), ref(adapter_files, "bravo")])]
        )


def test_capacity_one_evicts(fresh_model: LoadedModel, adapter_files: dict[str, Path]) -> None:
    generator = Generator(fresh_model, adapter_cache_size=1)
    a_first = generator.generate(job(adapters=[ref(adapter_files, "alfa")])).images[0]
    generator.generate(job(adapters=[ref(adapter_files, "bravo")]))
    assert generator.adapters.loaded == ["bravo"]
    assert "alfa" not in {n for names in fresh_model.pipeline.get_list_adapters().values() for n in names}
    a_again = generator.generate(job(adapters=[ref(adapter_files, "alfa")])).images[0]
    assert generator.adapters.loads == 3
    assert generator.adapters.loaded == ["alfa"]
    assert max_diff(a_first, a_again) == 0
    # Two requested at once stay loaded together, even over capacity.
    generator.generate(job(adapters=[ref(adapter_files, "alfa"), ref(adapter_files, "bravo")]))
    assert sorted(generator.adapters.loaded) == ["alfa", "bravo"]


def test_retrained_adapter_is_reloaded(
    fresh_model: LoadedModel, adapter_files: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(adapter_files["alfa"].read_bytes())
    adapter = AdapterRef("mine", "person", str(path))
    generator = Generator(fresh_model)
    before = generator.generate(job(adapters=[adapter])).images[0]
    generator.generate(job(adapters=[adapter]))
    assert generator.adapters.loads == 1

    path.write_bytes(adapter_files["charlie"].read_bytes())  # same size: only the mtime tells
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = generator.generate(job(adapters=[adapter])).images[0]
    assert generator.adapters.loads == 2
    assert max_diff(before, after) > 10

    generator.adapters.forget("mine")
    assert generator.adapters.loaded == []
    assert not any(fresh_model.pipeline.get_list_adapters().values())


def test_bad_adapter_files_raise_and_leave_the_pipeline_usable(
    generator: Generator, adapter_files: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = ref(adapter_files, "alfa")
    with_a = generator.generate(job(adapters=[a])).images[0]
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(adapter_files["alfa"].read_bytes()[:-100])
    missing = tmp_path / "gone.safetensors"

    problems = ("is not a readable safetensors file", "is not a readable safetensors file", "is gone")
    for path, problem in zip((corrupt, truncated, missing), problems, strict=True):
        bad = AdapterRef("bad", "person", str(path))
        # Members read the message: it says what is wrong, and only the log names the file.
        with pytest.raises(AdapterLoadError, match=f"^the adapter file of “bad” {problem}") as refused:
            generator.generate(job(adapters=[a, bad]))
        assert str(tmp_path) not in str(refused.value) and path.name in caplog.text
        present = {n for names in generator.model.pipeline.get_list_adapters().values() for n in names}
        assert "bad" not in present and "bad" not in generator.adapters.loaded

    assert max_diff(generator.generate(job(adapters=[a])).images[0], with_a) == 0


def test_adapter_for_another_base_is_refused(tiny_data_dir: Path, adapter_files: dict[str, Path]) -> None:
    sdxl = Generator(load_base_model("tiny-sdxl", "cpu", tiny_data_dir))
    with pytest.raises(
        AdapterLoadError, match=r"^the adapter of “alfa” does not fit this base model"
    ) as refused:
        sdxl.generate(job(adapters=[ref(adapter_files, "alfa")]))
    assert str(adapter_files["alfa"].parent) not in str(refused.value)
    assert not any(sdxl.model.pipeline.get_list_adapters().values())
    assert len(sdxl.generate(job()).images) == 1


def test_training_adapter_is_ignored_and_restored(
    fresh_model: LoadedModel, adapter_files: dict[str, Path]
) -> None:
    """An adapter the cache did not load (the trainer's) never shows in a generation, and the
    trainer finds it as it left it: active, trainable, in training mode."""
    generator = Generator(fresh_model)
    base = generator.generate(job()).images[0]
    with_alfa = generator.generate(job(adapters=[ref(adapter_files, "alfa")])).images[0]
    generator.adapters.forget("alfa")

    # What a trainer does between two steps: frozen base, its own adapter on UNet and text encoder.
    pipeline = fresh_model.pipeline
    text_config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"
    )
    for module, config in ((pipeline.unet, lora_config()), (pipeline.text_encoder, text_config)):
        module.requires_grad_(False)
        module.add_adapter(config, adapter_name=TRAINING_ADAPTER)
        randomize_lora_b(module, 99)
        module.train()
    modules = {"unet": pipeline.unet, "text_encoder": pipeline.text_encoder}
    grads = {(key, n): p.requires_grad for key, m in modules.items() for n, p in m.named_parameters()}
    assert sum(grads.values()) > 0

    assert max_diff(generator.generate(job()).images[0], base) == 0
    # Loading a new adapter while the training one is there, then using it.
    assert max_diff(generator.generate(job(adapters=[ref(adapter_files, "alfa")])).images[0], with_alfa) == 0
    assert max_diff(generator.generate(job()).images[0], base) == 0

    for key, module in modules.items():
        assert module.training and all(sub.training for sub in module.modules())
        for name, param in module.named_parameters():
            # The cache's own adapter weights (new names) stay frozen.
            assert param.requires_grad == grads.get((key, name), False), name
        for layer in module.modules():
            if isinstance(layer, BaseTunerLayer):
                assert layer.active_adapters == (
                    [TRAINING_ADAPTER] if TRAINING_ADAPTER in layer.lora_A else []
                )
                assert not layer.disable_adapters


def a1111_lora_hash(path: Path) -> str:
    """A1111's addnet_hash_safetensors: sha256 of what follows the 8-byte length and the JSON header."""
    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_length :]).hexdigest()[:12]


def test_png_of_a_lora_generation_carries_the_tag_and_the_hash_of_the_file(
    fresh_model: LoadedModel, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """An adapter in the old format is rewritten once in the kohya format when it loads; the PNG names
    the file as it is then, the one exports send."""
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    path = write_old_format_adapter(pipeline, tmp_path / "alfa", "alfa", seed=1)
    assert not is_kohya_adapter(path)
    old_hash = a1111_lora_hash(path)
    generator = Generator(fresh_model)
    result = generator.generate(
        job(prompt="alfa at the beach", adapters=[ref({"alfa": path}, "alfa")]), tmp_path
    )

    assert is_kohya_adapter(path)
    assert a1111_lora_hash(path) != old_hash
    parsed = read_picture(result.files[0].read_bytes()).parameters
    assert parsed.prompt == "alfa person at the beach <lora:alfa:1>"
    assert parsed.settings["Lora hashes"] == f"alfa: {a1111_lora_hash(path)}"
    assert parsed.settings["Model"] == "tiny"
    assert parsed.settings["Version"] == f"dreambot {package_version('dreambot')}"

    # The converted file is what the cache now holds: no second load, no second rewrite.
    again = generator.generate(job(prompt="alfa", adapters=[ref({"alfa": path}, "alfa")]))
    assert generator.adapters.loads == 1
    assert f'Lora hashes: "alfa: {a1111_lora_hash(path)}"' in again.parameters[0]


def test_a_single_file_base_has_a1111s_model_hash(tiny_model_dir: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "my-model.safetensors"
    checkpoint.write_bytes(np.random.default_rng(1).bytes(3 * 1024 * 1024 + 5))
    pipeline = load_base_model("tiny", "cpu", tiny_model_dir.parent.parent).pipeline
    # The tiny pipeline, named as if it came from that file (a real checkpoint is gigabytes).
    generator = Generator(LoadedModel(pipeline, torch.device("cpu"), torch.float32, str(checkpoint)))
    parsed = read_picture(generator.generate(job(), tmp_path / "out").files[0].read_bytes()).parameters
    assert parsed.settings["Model hash"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]
    assert parsed.settings["Model"] == "my-model"


# ---------------------------------------------------------------------------------------------
# SDXL


def test_sdxl_text_to_image_and_variation(tiny_data_dir: Path, tmp_path: Path) -> None:
    generator = Generator(load_base_model("tiny-sdxl", "cpu", tiny_data_dir))
    result = generator.generate(job(count=2, width=64, height=96), output_dir=tmp_path)
    assert [image.size for image in result.images] == [(64, 96), (64, 96)]
    assert (
        max_diff(result.images[0], generator.generate(job(width=64, height=96)).images[0]) <= BATCH_TOLERANCE
    )
    assert read_picture(result.files[0].read_bytes()).parameters.settings["Model"] == "tiny-sdxl"

    variation = generator.generate(job(init_image=str(result.files[0]), strength=0.5, width=64, height=96))
    assert variation.images[0].size == (64, 96)
    assert max_diff(variation.images[0], result.images[0]) > 10
    upscale = generator.generate(job(init_image=str(result.files[0]), upscale=True, strength=0.35, steps=3))
    assert upscale.images[0].size == (128, 192)


# ---------------------------------------------------------------------------------------------
# The GPU's precisions, run on the CPU with the same switches


def test_bf16_generation_matches_fp32_within_bf16_rounding(generator: Generator, tiny_data_dir: Path) -> None:
    bf16 = Generator(load_base_model("tiny", "cpu", tiny_data_dir, dtype="bf16"))
    assert bf16.model.dtype == bf16.model.pipeline.unet.dtype == torch.bfloat16
    image, reference = bf16.generate(job(seed=5)).images[0], generator.generate(job(seed=5)).images[0]
    # bf16 keeps 8 bits of mantissa: a pixel moves by a few levels, the picture stays the same.
    assert max_diff(image, reference) <= 16
    assert np.abs(pixels(image) - pixels(reference)).mean() <= 2
    assert max_diff(image, generator.generate(job(seed=6)).images[0]) > 16


def test_sdxl_vae_decodes_in_fp32_on_half_precision_weights(tiny_data_dir: Path) -> None:
    """SDXL's VAE overflows in fp16 (force_upcast): on fp16 weights it decodes in fp32, then goes back."""
    half = Generator(load_base_model("tiny-sdxl", "cpu", tiny_data_dir, dtype="fp16"))
    vae = half.model.pipeline.vae
    assert vae.dtype == torch.float16 and vae.config.force_upcast
    decoded: list[torch.dtype] = []
    vae.decoder.register_forward_pre_hook(lambda _module, args: decoded.append(args[0].dtype))
    image = half.generate(job(seed=3)).images[0]
    assert decoded == [torch.float32]
    assert vae.dtype == torch.float16
    full = Generator(load_base_model("tiny-sdxl", "cpu", tiny_data_dir)).generate(job(seed=3)).images[0]
    assert max_diff(image, full) <= 4


def test_prompts_that_cannot_share_a_batch_say_so(
    generator: Generator, adapter_files: dict[str, Path]
) -> None:
    """An adapter below full weight runs alone (its weight is one for all the images it is in), and
    prompts of different lengths (77-token chunks) cannot be stacked: the worker then renders the
    jobs one by one."""
    half = replace(ref(adapter_files, "alfa"), weight=0.5)
    assert job(prompt="alfa <lora:alfa:0.5>", adapters=[half]).batch_key is None
    assert job(adapters=[ref(adapter_files, "alfa")]).batch_key == job().batch_key
    long = job(job_id="long", prompt=", ".join(["a photo of a cat"] * 30))
    with pytest.raises(ValueError, match="prompts of different lengths"):
        generator.generate_batch([job(job_id="short"), long])


# ---------------------------------------------------------------------------------------------
# Fast inference paths ([model] channels_last, compile)


def test_channels_last_matches_the_plain_path(tiny_data_dir: Path, generator: Generator) -> None:
    channels_last = Generator(load_base_model("tiny", "cpu", tiny_data_dir, channels_last=True))
    assert channels_last.model.pipeline.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    # Same math in another memory layout: at most one pixel level of float rounding.
    assert max_diff(channels_last.generate(job()).images[0], generator.generate(job()).images[0]) <= 1


@pytest.fixture(scope="module")
def compiled(tiny_data_dir: Path) -> Generator:
    """Compiled and warmed up once for the module, as the worker does before Ready: inductor on 2
    CPU cores takes a while. Two slots, so that the warm-up has more than one to fill."""
    compiled = Generator(
        load_base_model("tiny", "cpu", tiny_data_dir), adapter_cache_size=2, compile_unet=True, hotswap_rank=4
    )
    compiled.warm_up()
    return compiled


@pytest.mark.slow
def test_a_warmed_up_unet_switches_members_without_recompiling(
    compiled: Generator, generator: Generator, adapter_files: dict[str, Path]
) -> None:
    assert compiled.adapters.loaded == []  # the warm-up's zero adapters stand for no member
    alfa, charlie = (
        job(prompt=f"{name} on a beach", adapters=[ref(adapter_files, name)]) for name in ("alfa", "charlie")
    )
    half = replace(alfa, adapters=[replace(ref(adapter_files, "alfa"), weight=0.5)])
    jobs = [alfa, charlie, job(), half, alfa]
    eager = [generator.generate(each).images[0] for each in jobs]
    graphs, loads = counters["stats"]["unique_graphs"], compiled.adapters.loads
    with torch._dynamo.config.patch(error_on_recompile=True):
        rendered = [compiled.generate(each).images[0] for each in jobs]
    assert counters["stats"]["unique_graphs"] == graphs  # the warm-up compiled every graph they take
    assert compiled.adapters.loads == loads + 3  # alfa, charlie, alfa again swapped into slot0
    assert max_diff(eager[0], eager[1]) > 10 and max_diff(eager[0], eager[3]) > 10  # the adapters act
    # Compiled kernels fuse and reorder float math: within 2/255 of the eager picture.
    for image, expected in zip(rendered, eager, strict=True):
        assert max_diff(image, expected) <= 2
    with pytest.raises(ValueError, match="no mixed-adapter batch"):
        compiled.generate_batch([replace(alfa, job_id="a"), replace(charlie, job_id="b")])
    # Two members in one picture fill both slots (one graph more); in the other order each moves slot.
    both = job(
        prompt="alfa and charlie", adapters=[ref(adapter_files, "alfa"), ref(adapter_files, "charlie")]
    )
    for order in (both.adapters, both.adapters[::-1]):
        expected, result = (each.generate(replace(both, adapters=order)) for each in (generator, compiled))
        assert result.parameters == expected.parameters  # each member's Lora hash, in the prompt's order
        assert max_diff(result.images[0], expected.images[0]) <= 2
    # "bravo" also adapts the text encoder, which diffusers cannot hotswap: refused, by name.
    with pytest.raises(AdapterLoadError, match="bravo"):
        compiled.generate(job(adapters=[ref(adapter_files, "bravo")]))


@pytest.mark.slow
def test_a_training_on_a_compiled_unet_compiles_nothing_and_generations_between_its_steps_run_compiled(
    compiled: Generator,
    fresh_model: LoadedModel,
    adapter_files: dict[str, Path],
    photos_dir: Path,
    tmp_path: Path,
) -> None:
    """engine.train runs its own UNet calls eagerly; what it hands over between steps is compiled."""
    with PIL.Image.open(photos_dir / "astronaut.png") as opened:
        astronaut = opened.convert("RGB").resize((64, 64))
    astronaut.save(tmp_path / "photo.png")
    # Class images, a preview and a sample: every way a training calls the UNet itself.
    training = TrainingSection(
        resolution=64,
        rank=4,
        alpha=8,
        class_images=1,
        sample_count=1,
        render_steps=2,
        preview_at=0.5,
        gradient_checkpointing=False,
    )

    def train(model: LoadedModel, name: str, between_steps: Callable[[], bool] | None = None) -> Path:
        train_job = TrainJob(
            job_id=name,
            token="abraza",
            class_word="person",
            photos=[str(tmp_path / "photo.png")],
            output_dir=str(tmp_path / name),
            steps=3,
        )
        return train_lora(
            model, train_job, training, tmp_path / name / "class images", between_steps=between_steps
        ).adapter_path

    alfa = job(adapters=[ref(adapter_files, "alfa")])
    compiled_runs: list[bool] = []

    def generate() -> bool:
        with torch.profiler.profile() as profile:
            compiled.generate(alfa)
        compiled_runs.append(
            any(event.name.startswith("Torch-Compiled Region") for event in profile.events())
        )
        return True

    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        adapter = train(compiled.model, "compiled", between_steps=generate)
        compiled.generate(alfa)
    assert (
        counters["stats"]["unique_graphs"] == graphs
    )  # no graph for the training, nor for what came between
    # After the class image and after each step, the warm-up's graph rendered alfa, not eager code.
    assert compiled_runs == [True] * 4
    trained, expected = load_file(adapter), load_file(train(fresh_model, "uncompiled"))
    assert trained.keys() == expected.keys()
    assert any(tensor.abs().sum() > 0 for key, tensor in trained.items() if key.endswith(".lora_up.weight"))
    # The same eager math as on a pipeline that was never compiled: the same adapter, bit for bit.
    assert all(torch.equal(trained[key], expected[key]) for key in trained)

"""The configuration the engine reads: [model], [engine], [storage], [training] and [generation], and
the loader of the one TOML file that the bot, the engine worker and the CLI read alike. The bot's own
sections ([discord], [intake], [limits], [safety]) are bot.config's: a Config passes over them.

Plain data only (no torch, no discord), so every process can import it. Every key has a default, so
no file at all is a valid configuration; a key that is unknown or of the wrong type stops start-up
with one line naming the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

DEFAULT_CONFIG_FILE = Path("config.toml")
DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# Built-in tiny random models (engine/model.py) for tests and machines without a GPU.
TINY_MODELS = ("tiny", "tiny-sdxl")
DTYPES = ("auto", "fp16", "bf16", "fp32")
BACKENDS = ("local", "ray")


class ConfigError(ValueError):
    """A configuration problem, stated in one line that names the key."""


@dataclass(frozen=True)
class ModelSection:
    # A Hub id, a local diffusers folder, a single-file .safetensors checkpoint, or "tiny".
    base: str = DEFAULT_BASE_MODEL
    # "auto" (CUDA, then MPS, then CPU), or an explicit torch device. A list starts one engine
    # worker per device.
    device: str | list[str] = "auto"
    # Use xformers' memory-efficient attention when it is installed; PyTorch SDPA otherwise.
    xformers: bool = True
    # Run the base model's safety checker when it ships one.
    safety_checker: bool = True
    # Weights and math: "auto" is bf16 on GPUs that have it, fp16 on other GPUs, fp32 on a CPU.
    dtype: str = "auto"
    # Fast inference paths: "auto" is on with CUDA, off elsewhere; true/false force them.
    # channels_last memory format for the UNet and VAE (faster convolutions on tensor cores).
    channels_last: str | bool = "auto"
    # torch.compile the UNet at start, before the engine says it is ready (start-up takes the compile
    # time longer); members' adapters are then hotswapped into fixed slots, so switching never
    # recompiles. Limits: no text-encoder adapters, no mixed-adapter batches, and another size or
    # count and several adapters in one picture each compile once more. Trainings run it eagerly.
    compile: str | bool = "auto"

    @property
    def devices(self) -> list[str]:
        return [self.device] if isinstance(self.device, str) else list(self.device)


@dataclass(frozen=True)
class EngineSection:
    # "local": one `python -m engine` child process per [model] device. "ray": one engine actor per
    # GPU of every node of a Ray cluster (pip install "dreambot[ray]"; README "More than one machine").
    backend: str = "local"
    # Where the cluster is: "auto" (the one `ray start` made on this machine), "HOST:6379", or
    # "ray://HOST:10001" for a bot outside the cluster.
    ray_address: str = "auto"
    # What one engine actor takes. With gpus_per_worker = 0 the actors run on CPUs, cpus_per_worker each.
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0


@dataclass(frozen=True)
class StorageSection:
    data_dir: str = "data"
    # Keep the prepared training photos after the model is trained (default: delete them).
    keep_photos: bool = False


@dataclass(frozen=True)
class TrainingSection:
    resolution: int = 512
    steps_per_photo: int = 100
    # The notebooks' rule of thumb: small sets need a little more.
    extra_steps_under_10_photos: int = 100
    max_steps: int = 2000
    rank: int = 16
    alpha: int = 16
    learning_rate: float = 1e-4
    train_text_encoder: bool = False
    prior_preservation: bool = True
    class_images: int = 100
    prior_loss_weight: float = 1.0
    checkpoint_every: int = 250
    gradient_checkpointing: bool = True
    # bitsandbytes' 8-bit AdamW on CUDA where it is installed (less memory); torch AdamW otherwise.
    adam_8bit: bool = True
    sample_count: int = 4
    # Denoising steps of the class images, the preview and the samples (the pipeline's scheduler).
    render_steps: int = 25
    sample_prompt: str = "portrait photo of {token} {class}, detailed, soft light"
    seed: int = 0
    # One sample rendered at this fraction of the steps, shown while the training runs; 0 for none.
    preview_at: float = 0.5


@dataclass(frozen=True)
class GenerationSection:
    steps: int = 25
    guidance: float = 7.5
    # Adapters kept loaded on the pipeline at once (least recently used is unloaded first).
    adapter_cache: int = 8
    # Most images in one UNet batch: waiting text-to-image requests of the same size, steps and
    # guidance are rendered together, even with different members' adapters.
    batch_limit: int = 8
    variation_strength: float = 0.6
    upscale_strength: float = 0.35


@dataclass(frozen=True)
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    engine: EngineSection = field(default_factory=EngineSection)
    storage: StorageSection = field(default_factory=StorageSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    # The file this was read from (None for built-in defaults); workers are started with it.
    source: Path | None = None

    # The file's sections another reader checks (bot.config.BotConfig's): passed over, not refused.
    other_sections: ClassVar[tuple[str, ...]] = ("discord", "intake", "limits", "safety")

    @property
    def data_dir(self) -> Path:
        # Absolute, so the bot, its workers and the CLI agree on every path whatever their directory.
        return Path(self.storage.data_dir).expanduser().resolve()

    def check(self) -> None:
        """Range checks that a type alone does not express; ConfigError names the key."""
        _check_values(self)


AnyConfig = TypeVar("AnyConfig", bound=Config)


def load_config(path: str | Path | None = None, kind: type[AnyConfig] = Config) -> AnyConfig:  # type: ignore[assignment]
    """Read `path`, or `config.toml` in the working directory, or fall back to the built-in defaults,
    as `kind` (the engine's Config, or the bot's BotConfig, which reads every section).

    A path that was named explicitly must exist; the default file may be absent.
    """
    if path is None:
        if not DEFAULT_CONFIG_FILE.exists():
            return kind()
        path = DEFAULT_CONFIG_FILE
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    return config_from_dict(raw, source=path.resolve(), kind=kind)


def config_from_dict(
    raw: dict[str, Any],
    source: Path | None = None,
    kind: type[AnyConfig] = Config,  # type: ignore[assignment]
) -> AnyConfig:
    sections: dict[str, Any] = {}
    section_types = {f.name: f.type for f in dataclasses.fields(kind) if f.name != "source"}
    for name, values in raw.items():
        if name in kind.other_sections:
            continue
        if name not in section_types:
            raise ConfigError(f"[{name}]: unknown section (expected one of {', '.join(section_types)})")
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}]: expected a table of keys, got {values!r}")
        section_class = _resolve(kind, name)
        sections[name] = _build_section(name, section_class, values)
    config = kind(**sections, source=source)
    config.check()
    return config


def _resolve(owner: type, field_name: str) -> Any:
    return typing.get_type_hints(owner)[field_name]


def _build_section(section: str, section_class: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(section_class)
    known = {f.name for f in dataclasses.fields(section_class)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"[{section}] {key}: unknown key (expected one of {', '.join(sorted(known))})")
        if not _matches(value, hints[key]):
            raise ConfigError(f"[{section}] {key}: expected {_describe(hints[key])}, got {value!r}")
    # TOML integers are fine where a float is expected.
    coerced = {k: float(v) if hints[k] is float else v for k, v in values.items()}
    return section_class(**coerced)


def _matches(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(expected))
    if origin is list:
        (item_type,) = typing.get_args(expected)
        return isinstance(value, list) and all(_matches(item, item_type) for item in value)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _describe(expected: Any) -> str:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(expected))
    if origin is list:
        return f"a list of {_describe(typing.get_args(expected)[0])}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[expected]


def _check_values(config: Config) -> None:
    """Range checks that a type alone does not express."""
    positive = {
        "[training] resolution": config.training.resolution,
        "[training] max_steps": config.training.max_steps,
        "[training] rank": config.training.rank,
        "[training] checkpoint_every": config.training.checkpoint_every,
        "[training] render_steps": config.training.render_steps,
        "[generation] steps": config.generation.steps,
        "[generation] adapter_cache": config.generation.adapter_cache,
        "[generation] batch_limit": config.generation.batch_limit,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: expected a positive number, got {value!r}")
    if not 0 <= config.training.preview_at < 1:
        raise ConfigError(
            f"[training] preview_at: expected a fraction from 0 (no preview) up to 1, got {config.training.preview_at!r}"
        )
    if config.training.resolution % 8:
        raise ConfigError(
            f"[training] resolution: expected a multiple of 8, got {config.training.resolution!r}"
        )
    if config.model.dtype not in DTYPES:
        raise ConfigError(f"[model] dtype: expected one of {', '.join(DTYPES)}, got {config.model.dtype!r}")
    for key in ("channels_last", "compile"):
        value = getattr(config.model, key)
        if isinstance(value, str) and value != "auto":
            raise ConfigError(f'[model] {key}: expected "auto", true or false, got {value!r}')
    if config.engine.backend not in BACKENDS:
        raise ConfigError(
            f"[engine] backend: expected one of {', '.join(BACKENDS)}, got {config.engine.backend!r}"
        )
    if config.engine.backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError('[engine] backend = "ray": Ray is not installed (pip install "dreambot[ray]")')
    if config.engine.gpus_per_worker < 0 or config.engine.cpus_per_worker <= 0:
        raise ConfigError(
            "[engine] gpus_per_worker and cpus_per_worker: expected gpus_per_worker >= 0 and "
            f"cpus_per_worker > 0, got {config.engine.gpus_per_worker!r} and {config.engine.cpus_per_worker!r}"
        )
    if not config.model.devices:
        raise ConfigError("[model] device: expected a device name or a non-empty list, got []")

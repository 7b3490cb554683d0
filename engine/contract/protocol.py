"""The line protocol between the bot (or CLI) and an engine worker: one JSON object a line.

Jobs go to the worker on its stdin, events come back on its stdout. Every message carries a `type`
field naming its dataclass below. Images never travel in the pipe, only paths under the data
directory. This module imports neither torch nor discord, so both sides can use it.

It is also the one contract of a job: the cogs and the CLI write a job as a TrainJob or GenerateJob,
the bot stores it as the row's payload, the engine runs it as it is, and its result comes back and
is stored as a TrainingDone or GenerationDone. Each value is checked once, in the job's dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from engine.contract.prompt_syntax import MAX_WEIGHT, parse_prompt

# What a member's token and class word may be: the bot refuses others before queuing, the engine
# before training. A token also names the adapter on the pipeline.
TOKEN_PATTERN = re.compile(r"[a-z0-9]{3,20}")
CLASS_WORD_PATTERN = re.compile(r"[a-z]+(?: [a-z]+){0,2}")
# The bot and its engine workers write their logs to one stderr, in this one format.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"

# The limits of one generation: the bot's command options and the checks below both read them.
MAX_IMAGES = 4
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MIN_SIDE, MAX_SIDE = 64, 2048
# Image i of a batch is made with seed + i; 32 bits is what A1111 and every UI show and accept.
MAX_SEED = 2**32 - 1
UPSCALE_FACTOR = 2

# A word, wherever a prompt is read for tokens: letters and digits, so "abraza_viking" and
# "abraza," both hold the word "abraza".
_WORD = re.compile(r"[a-z0-9]+")


def words_in(text: str) -> set[str]:
    """The lowercase words of a text, the way tokens are matched (whole words only)."""
    return set(_WORD.findall(text.lower()))


def whole_word(word: str) -> re.Pattern[str]:
    """A pattern for `word` as a whole word (any case), by the same definition as words_in."""
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Jobs: bot -> worker


@dataclass(frozen=True)
class AdapterRef:
    """A user's trained LoRA adapter, as the engine needs to find and prompt it."""

    token: str
    class_word: str
    path: str
    # The strength it is applied at: its <lora:TOKEN:WEIGHT> tag's, 1 for a bare token.
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.weight <= MAX_WEIGHT:
            raise ValueError(
                f"adapter {self.token!r}: `weight` has to be between 0 and {MAX_WEIGHT:g} but is {self.weight}"
            )


@dataclass(frozen=True)
class TrainJob:
    """A DreamBooth LoRA training; every value is checked here, once, wherever the job is made."""

    type: ClassVar[str] = "train"
    job_id: str
    token: str
    class_word: str
    # Prepared square PNGs at the training resolution (see bot.intake).
    photos: list[str]
    # Receives adapter.safetensors, training.json, checkpoints/ and samples/.
    output_dir: str
    # None: steps_per_photo per photo (+ extra under 10 photos), capped at [training] max_steps.
    steps: int | None = None
    # Continue from the newest checkpoint in output_dir when there is one.
    resume: bool = True

    def __post_init__(self) -> None:
        if not TOKEN_PATTERN.fullmatch(self.token):
            raise ValueError(f"`token` has to be 3-20 lowercase letters or digits but is {self.token!r}")
        if not CLASS_WORD_PATTERN.fullmatch(self.class_word):
            raise ValueError(
                f"`class_word` has to be 1-3 lowercase words like 'person' or 'dog' but is {self.class_word!r}"
            )
        if not self.photos:
            raise ValueError("`photos` has to name at least one photo but is empty")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"`steps` has to be at least 1 but is {self.steps!r}")


@dataclass(frozen=True)
class GenerateJob:
    """Text-to-image, a variation or an upscale; every value is checked here, once, wherever the job
    is made (the bot before queuing, the engine on arrival). The engine checks the files."""

    type: ClassVar[str] = "generate"
    job_id: str
    # In A1111's prompt language (engine.contract.prompt_syntax); its <lora:...> tags name adapters below.
    prompt: str
    output_dir: str
    negative_prompt: str = ""
    # Image i of the batch is made with seed + i.
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5
    width: int = 512
    height: int = 512
    # Images made in ONE batched pipeline call.
    count: int = 1
    adapters: list[AdapterRef] = field(default_factory=list)
    # A variation (img2img at `strength`, resized to width x height) or, with upscale, the image to
    # upscale 2x (width and height are then ignored).
    init_image: str | None = None
    strength: float | None = None
    upscale: bool = False

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ValueError(f"`prompt` has to be a non-empty string but is {self.prompt!r}")
        if not 1 <= self.count <= MAX_IMAGES:
            raise ValueError(f"`count` has to be between 1 and {MAX_IMAGES} but is {self.count}")
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"`steps` has to be between 1 and {MAX_STEPS} but is {self.steps}")
        if not 0 <= self.guidance <= MAX_GUIDANCE:
            raise ValueError(f"`guidance` has to be between 0 and {MAX_GUIDANCE:g} but is {self.guidance}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"`seed` has to be between 0 and {MAX_SEED} but is {self.seed}")
        for name, side in (("width", self.width), ("height", self.height)):
            if side % 8 or not MIN_SIDE <= side <= MAX_SIDE:
                raise ValueError(
                    f"`{name}` has to be a multiple of 8 between {MIN_SIDE} and {MAX_SIDE} but is {side}"
                )
        tokens = [adapter.token for adapter in self.adapters]
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"`adapters` has to name each token once but names {tokens}")
        for token in tokens:
            # Tokens become peft adapter names and are matched as words in the prompt.
            if not TOKEN_PATTERN.fullmatch(token):
                raise ValueError(f"adapter token {token!r} has to be 3-20 lowercase letters or digits")
        # PromptSyntaxError is a ValueError: its message says what does not read.
        tagged = parse_prompt(self.prompt).lora_weights
        parse_prompt(self.negative_prompt, loras=False)
        weights = {adapter.token: adapter.weight for adapter in self.adapters}
        for token, weight in tagged.items():
            if weights.get(token) != weight:
                raise ValueError(
                    f"the prompt's <lora:{token}:{weight:g}> has to name one of `adapters` at that weight "
                    f"but `adapters` has {weights}"
                )
        if self.upscale and self.init_image is None:
            raise ValueError("`upscale` needs an `init_image` but `init_image` is None")
        if self.init_image is None:
            return
        if self.strength is None or not 0 < self.strength <= 1:
            raise ValueError(f"`strength` has to be in (0, 1] with an `init_image` but is {self.strength}")
        # img2img runs int(steps * strength) of the steps (as A1111 does); zero would be an error.
        if int(self.steps * self.strength) < 1:
            raise ValueError(
                f"`steps`={self.steps} at `strength`={self.strength} leaves no denoising step "
                "(steps x strength has to be at least 1)"
            )

    @property
    def batch_key(self) -> tuple[int, int, int, float, bool] | None:
        """Jobs with equal keys can share one UNet batch (engine.generate.Generator.generate_batch),
        whatever member's adapter each uses; None: this job runs alone.

        Text to image with at most one adapter, at its full weight (a batch gives each image one
        adapter, and an adapter's weight is one for every image it is in), the same size, steps and
        guidance (one denoising loop), and a negative prompt in all or in none (SDXL encodes "none"
        as zeros, not as the empty prompt).
        """
        if self.init_image is not None or len(self.adapters) > 1:
            return None
        if any(adapter.weight != 1 for adapter in self.adapters):
            return None
        return self.width, self.height, self.steps, self.guidance, bool(self.negative_prompt)

    @property
    def effective_strength(self) -> float | None:
        """The img2img strength used; None for text-to-image."""
        return None if self.init_image is None else self.strength

    def output_size(self, init_width: int, init_height: int) -> tuple[int, int]:
        """(width, height) of the images made from an init image of the given size."""
        if not self.upscale:
            return self.width, self.height
        # Latents need multiples of 8: round the 2x size down.
        return (init_width * UPSCALE_FACTOR) // 8 * 8, (init_height * UPSCALE_FACTOR) // 8 * 8


@dataclass(frozen=True)
class CancelJob:
    type: ClassVar[str] = "cancel"
    job_id: str


@dataclass(frozen=True)
class ShutdownJob:
    type: ClassVar[str] = "shutdown"


# ---------------------------------------------------------------------------------------------
# Events: worker -> bot


@dataclass(frozen=True)
class Ready:
    """The worker has loaded its base model and takes jobs."""

    type: ClassVar[str] = "ready"
    device: str
    base_model: str


@dataclass(frozen=True)
class Accepted:
    type: ClassVar[str] = "accepted"
    job_id: str


@dataclass(frozen=True)
class Progress:
    type: ClassVar[str] = "progress"
    job_id: str
    # What is running: "class images", "training", "samples" or "generating".
    phase: str
    step: int
    total: int
    loss: float | None = None
    eta_seconds: float | None = None
    # A small picture of the job so far (engine.preview), under its output_dir; None in most events.
    preview: str | None = None


@dataclass(frozen=True)
class TrainingDone:
    """A training's result. The bot stores these fields as the job's result (JobRow.outcome)."""

    type: ClassVar[str] = "trained"
    job_id: str
    # The sample images, in order.
    files: list[str]
    adapter_path: str
    metadata_path: str
    metadata: dict[str, Any]
    steps: int
    seconds: float


@dataclass(frozen=True)
class GenerationDone:
    """A generation's result, one entry per image in each list."""

    type: ClassVar[str] = "generated"
    job_id: str
    files: list[str]
    # Image i is reproducible alone with seeds[i].
    seeds: list[int]
    # The A1111 "parameters" text written into each PNG.
    parameters: list[str]
    # The base's safety checker flagged the image (all False without a checker); the bot never
    # posts a flagged one.
    nsfw: list[bool]
    seconds: float


Result = TrainingDone | GenerationDone


ErrorCode = Literal[
    "cancelled", "out_of_memory", "disk_full", "bad_model", "bad_adapter", "bad_request", "internal"
]


@dataclass(frozen=True)
class Error:
    type: ClassVar[str] = "error"
    # None when the error is not about one job (a line that could not be read, a failed start).
    job_id: str | None
    # Fit to show to a Discord member as it is.
    message: str
    code: ErrorCode = "internal"


Job = TrainJob | GenerateJob | CancelJob | ShutdownJob
Event = Ready | Accepted | Progress | TrainingDone | GenerationDone | Error

_MESSAGE_TYPES: dict[str, type] = {
    cls.type: cls
    for cls in (
        TrainJob,
        GenerateJob,
        CancelJob,
        ShutdownJob,
        Ready,
        Accepted,
        Progress,
        TrainingDone,
        GenerationDone,
        Error,
    )
}
# The result each kind of job ends with.
RESULT_TYPES: dict[str, type[TrainingDone] | type[GenerationDone]] = {
    TrainJob.type: TrainingDone,
    GenerateJob.type: GenerationDone,
}


# Where a training keeps its checkpoints under its output_dir (step-NNNNNN/, the newest only).
CHECKPOINTS_DIR = "checkpoints"


def named_paths(event: Event) -> list[str]:
    """The files an event names (previews, samples, pictures, the adapter and its metadata), which the
    bot reads, posts and deletes: each must lie in the folder of the event's job (bot.jobs checks)."""
    if isinstance(event, Progress):
        return [] if event.preview is None else [event.preview]
    if isinstance(event, TrainingDone):
        return [*event.files, event.adapter_path, event.metadata_path]
    if isinstance(event, GenerationDone):
        return list(event.files)
    return []


class ProtocolError(ValueError):
    """A line that is not a well-formed message; `job_id` is the job it was about, when it says."""

    def __init__(self, message: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


def encode(message: Job | Event) -> str:
    """One JSON line (without the newline) for a job or an event."""
    return json.dumps({"type": message.type, **dataclasses.asdict(message)}, separators=(",", ":"))


def decode(line: str, *, checked: bool = True) -> Job | Event:
    """The job or event a line holds; ProtocolError says what is wrong with a bad line.

    Unchecked, a job's values are not checked again (nor its prompt parsed again): for a line this
    side wrote from a job it made, whose values were checked then (the bot's job rows). Whatever
    comes from the other side is checked, once, on arrival."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as error:
        raise ProtocolError(f"not JSON: {error}: {line[:200]!r}") from None
    if not isinstance(raw, dict) or "type" not in raw:
        raise ProtocolError(f"expected an object with a 'type', got {line[:200]!r}")
    kind = raw.pop("type")
    cls = _MESSAGE_TYPES.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r} (expected one of {', '.join(_MESSAGE_TYPES)})")
    try:
        return _build(cls, raw, checked=checked)
    except (TypeError, ValueError) as error:
        job_id = raw.get("job_id")
        raise ProtocolError(
            f"bad {kind!r} message: {error}", job_id if isinstance(job_id, str) else None
        ) from None


def _build(cls: type, raw: dict[str, Any], *, checked: bool) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise TypeError(f"unknown fields {sorted(unknown)}")
    values = dict(raw)
    # The only nested dataclass in the protocol.
    if hints.get("adapters") == list[AdapterRef] and "adapters" in values:
        values["adapters"] = [AdapterRef(**item) for item in values["adapters"]]
    if checked:
        return cls(**values)
    # As the dataclass's __init__ would, without its __post_init__ (the checks).
    message = object.__new__(cls)
    for name, spec in fields.items():
        if name in values:
            value = values[name]
        elif spec.default is not dataclasses.MISSING:
            value = spec.default
        elif spec.default_factory is not dataclasses.MISSING:
            value = spec.default_factory()
        else:
            raise TypeError(f"missing field {name!r}")
        object.__setattr__(message, name, value)
    return message

"""The line protocol between the bot (or CLI) and an engine worker: one JSON object a line.

Jobs go to the worker on its stdin, events come back on its stdout. Every message carries a `type`
field naming its dataclass below. Images never travel in the pipe, only paths under the data
directory. This module imports neither torch nor discord, so both sides can use it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

# What a member's token and class word may be: the bot refuses others before queuing, the engine
# before training. A token also names the adapter on the pipeline.
TOKEN_PATTERN = re.compile(r"[a-z0-9]{3,20}")
CLASS_WORD_PATTERN = re.compile(r"[a-z]+(?: [a-z]+){0,2}")
# The bot and its engine workers write their logs to one stderr, in this one format.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"

# ---------------------------------------------------------------------------------------------
# Jobs: bot -> worker


@dataclass(frozen=True)
class AdapterRef:
    """A user's trained LoRA adapter, as the engine needs to find and prompt it."""

    token: str
    class_word: str
    path: str


@dataclass(frozen=True)
class TrainJob:
    type: ClassVar[str] = "train"
    job_id: str
    token: str
    class_word: str
    # Prepared square PNGs at the training resolution (see engine.intake).
    photos: list[str]
    # Receives adapter.safetensors, training.json, checkpoints/ and samples/.
    output_dir: str
    # None: steps_per_photo per photo (+ extra under 10 photos), capped at [training] max_steps.
    steps: int | None = None
    # Continue from the newest checkpoint in output_dir when there is one.
    resume: bool = True


@dataclass(frozen=True)
class GenerateJob:
    type: ClassVar[str] = "generate"
    job_id: str
    prompt: str
    output_dir: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5
    width: int = 512
    height: int = 512
    count: int = 1
    adapters: list[AdapterRef] = field(default_factory=list)
    # A variation (img2img at `strength`) or, with upscale, a 2x hires-fix of this image.
    init_image: str | None = None
    strength: float | None = None
    upscale: bool = False


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


@dataclass(frozen=True)
class Result:
    type: ClassVar[str] = "result"
    job_id: str
    # Images written, in order (training: samples; generation: one PNG per image).
    files: list[str]
    # Job-kind specific facts: for training the adapter and metadata paths and the metadata itself;
    # for generation the seed and the A1111 parameters line of each image.
    data: dict[str, Any] = field(default_factory=dict)


ErrorCode = Literal["cancelled", "out_of_memory", "bad_model", "bad_adapter", "bad_request", "internal"]


@dataclass(frozen=True)
class Error:
    type: ClassVar[str] = "error"
    # None when the error is not about one job (a line that could not be read, a failed start).
    job_id: str | None
    # Fit to show to a Discord member as it is.
    message: str
    code: ErrorCode = "internal"


Job = TrainJob | GenerateJob | CancelJob | ShutdownJob
Event = Ready | Accepted | Progress | Result | Error

_MESSAGE_TYPES: dict[str, type] = {
    cls.type: cls
    for cls in (TrainJob, GenerateJob, CancelJob, ShutdownJob, Ready, Accepted, Progress, Result, Error)
}


class ProtocolError(ValueError):
    """A line that is not a well-formed message."""


def encode(message: Job | Event) -> str:
    """One JSON line (without the newline) for a job or an event."""
    return json.dumps({"type": message.type, **dataclasses.asdict(message)}, separators=(",", ":"))


def decode(line: str) -> Job | Event:
    """The job or event a line holds; ProtocolError says what is wrong with a bad line."""
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
        return _build(cls, raw)
    except (TypeError, ValueError) as error:
        raise ProtocolError(f"bad {kind!r} message: {error}") from None


def _build(cls: type, raw: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise TypeError(f"unknown fields {sorted(unknown)}")
    values = dict(raw)
    # The only nested dataclass in the protocol.
    if hints.get("adapters") == list[AdapterRef] and "adapters" in values:
        values["adapters"] = [AdapterRef(**item) for item in values["adapters"]]
    return cls(**values)

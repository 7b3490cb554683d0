"""The generation parameters a picture carries: ours and AUTOMATIC1111's `parameters` text, ComfyUI's graph.

Our PNGs carry A1111's `parameters` text (engine/generate.py writes it), so one parser reads ours and
A1111's alike; A1111 puts the same text in a JPEG's or WebP's EXIF UserComment, and our own
re-encoded JPEGs (bot/uploads.py) in the JPEG comment. ComfyUI saves its `prompt` graph (API format:
node id -> {"class_type", "inputs"}, a link being [node id, output index]), summarised here in
A1111's words. Nothing here decodes pixels: a picture's size comes from its header.

Any member can send any file, so every reader here is linear in its input and bounded (text length,
graph nodes, links and depth), and what is larger than a real picture's settings is refused as too
large to read: a regular expression runs in C holding the GIL, so a slow one in a worker thread
would still stop the bot's event loop.
"""

from __future__ import annotations

import io
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard

import PIL.Image

# Members' files are read whole into memory: anything larger is refused before it is downloaded.
MAX_PICTURE_BYTES = 20 * 1024 * 1024

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# The most settings read from one picture: A1111's text (a long prompt and every extension's settings
# are a few thousand characters), and a ComfyUI graph's nodes, their inputs and the links followed
# from one input (real workflows have hundreds of nodes; ComfyUI's own examples, tens).
MAX_PARAMETERS_CHARS = 64 * 1024
MAX_GRAPH_NODES = 2_000
MAX_GRAPH_INPUTS = 20_000
MAX_GRAPH_DEPTH = 64

# The key of one of A1111's `re_param` pairs (modules/infotext_utils.py), "key: ", read where a pair
# may start: at the line's start or after a pair's comma.
_PARAM_KEY_RE = re.compile(r"\s*(\w[\w \-/]+):\s*")
# A JSON-quoted value.
_QUOTED_RE = re.compile(r'"(?:\\.|[^\\"])++"')
# A1111's prompt syntax for a LoRA: <lora:NAME> or <lora:NAME:WEIGHT> (a second weight for the text
# encoder may follow). Possessive, and never across a "<": each try scans to the next "<" or ">" once.
_LORA_TAG_RE = re.compile(r"<lora:([^:<>]++)(?::([^:<>]*+))?+[^<>]*+>", re.IGNORECASE)

_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286

MadeWith = Literal["dreambot", "AUTOMATIC1111", "ComfyUI"]


class PictureError(ValueError):
    """A file that is not a picture this module reads; the message completes "That file ..."."""


class TooLargeError(PictureError):
    """Settings beyond this module's bounds (MAX_PARAMETERS_CHARS, MAX_GRAPH_*)."""


@dataclass(frozen=True)
class Lora:
    name: str
    weight: str


@dataclass(frozen=True)
class Parameters:
    """How a picture was made, in A1111's words whatever made it.

    `settings` are A1111's "Key: value" pairs in their order ("Steps", "Sampler", "CFG scale", "Seed",
    "Size", "Model", ...); a ComfyUI graph is summarised under the same keys.
    """

    made_with: MadeWith
    prompt: str
    negative_prompt: str
    settings: dict[str, str] = field(default_factory=dict)
    loras: tuple[Lora, ...] = ()


@dataclass(frozen=True)
class Picture:
    format: Literal["PNG", "JPEG", "WEBP"]
    width: int
    height: int
    # None: the picture carries no parameters (never saved with them, or stripped since).
    parameters: Parameters | None


# -- A1111's text ------------------------------------------------------------------------------


def _unquote(value: str) -> str:
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def settings_pairs(line: str) -> list[tuple[str, str]]:
    """A1111's "Key: value, Key: "quoted, value", ..." line as (key, raw value) pairs, in one scan.

    As A1111's `re_param`, a value is JSON-quoted text followed by a comma or the line's end, else
    everything up to the next comma. Unlike its `findall`, which retries at every character (and so
    takes quadratic time on a long line that holds no pair), text that is no pair is skipped up to
    the next comma.
    """
    pairs: list[tuple[str, str]] = []
    position = 0
    # Once a quoted value has no closing quote, none after it has one either (the scan that found
    # none passed over them, in step with their escapes): not looked for again.
    quotes_close = True
    while position < len(line):
        comma = line.find(",", position)
        next_pair = len(line) if comma < 0 else comma + 1
        key = _PARAM_KEY_RE.match(line, position)
        if key is None:
            position = next_pair
            continue
        start = key.end()
        quoted = _QUOTED_RE.match(line, start) if quotes_close and line.startswith('"', start) else None
        if quoted is None and line.startswith('"', start):
            quotes_close = False
        if quoted is not None and (quoted.end() == len(line) or line[quoted.end()] == ","):
            pairs.append((key[1], quoted[0]))
            position = quoted.end() + 1
            continue
        end = line.find(",", start)
        end = len(line) if end < 0 else end
        pairs.append((key[1], line[start:end]))
        position = end + 1
    return pairs


def parse_a1111(text: str) -> Parameters:
    """A1111's `parameters` text read back (its `parse_generation_parameters`).

    The prompt's lines, then lines from "Negative prompt:" on, then one line of "Key: value" pairs
    (values with commas or colons JSON-quoted). As in A1111, a last line with fewer than 3 pairs
    is part of the prompt.
    """
    *lines, last = text.strip().split("\n")
    pairs = settings_pairs(last)
    if len(pairs) < 3:
        lines.append(last)
        pairs = []
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            negative.append(line.removeprefix("Negative prompt:").strip())
        else:
            (negative if negative else prompt).append(line)
    settings = {key: _unquote(value) for key, value in pairs}
    made_with: MadeWith = (
        "dreambot" if settings.get("Version", "").startswith("dreambot") else "AUTOMATIC1111"
    )
    prompt_text = "\n".join(prompt)
    loras = tuple(
        Lora(name.strip(), (weight or "1").strip()) for name, weight in _LORA_TAG_RE.findall(prompt_text)
    )
    return Parameters(made_with, prompt_text, "\n".join(negative), settings, loras)


def without_lora_tags(prompt: str) -> str:
    """The prompt without A1111's <lora:...> tags, which only A1111 reads (here tokens pick models),
    nor the commas they leave empty on their lines."""
    lines = []
    for line in prompt.split("\n"):
        if _LORA_TAG_RE.search(line):
            line = re.sub(r",(?:[ \t]*,)+", ",", _LORA_TAG_RE.sub("", line))
            line = re.sub(r"[ \t]{2,}", " ", line).strip(" \t,")
        lines.append(line)
    return "\n".join(lines).strip()


# -- ComfyUI's graph ---------------------------------------------------------------------------

_SAMPLERS = ("KSampler", "KSamplerAdvanced")
_LORA_LOADERS = ("LoraLoader", "LoraLoaderModelOnly")


def _is_link(value: object) -> TypeGuard[list[Any]]:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _ordered(graph: Mapping[str, Any], class_types: tuple[str, ...]) -> list[dict[str, Any]]:
    """The graph's nodes of these types, by node id (numeric ids in number order)."""
    ids = sorted(graph, key=lambda node_id: (len(node_id), node_id))
    return [graph[node_id] for node_id in ids if graph[node_id].get("class_type") in class_types]


def _too_deep() -> TooLargeError:
    return TooLargeError(
        f"carries a ComfyUI graph whose links run more than {MAX_GRAPH_DEPTH} nodes deep, too large to read"
    )


class _Resolver:
    """Follows one graph's links, each node at most once: a node's value is remembered, so that a
    graph whose nodes link to each other every way is read in time linear in its size."""

    def __init__(self, graph: Mapping[str, Any]) -> None:
        self.graph = graph
        # node id -> its value; None while it is being resolved (a cycle) or when it holds none.
        self._values: dict[str, object] = {}
        self._texts_seen: set[str] = set()

    def scalar(self, value: object, depth: int = 0) -> object:
        """A node input's value; one that is a link to a node holding a single value (a primitive,
        a string node) is that node's value."""
        if not _is_link(value):
            return value
        if depth > MAX_GRAPH_DEPTH:
            raise _too_deep()
        node_id = str(value[0])
        if node_id in self._values or node_id not in self.graph:
            return self._values.get(node_id)
        self._values[node_id] = None
        for input_value in self.graph[node_id].get("inputs", {}).values():
            resolved = self.scalar(input_value, depth + 1)
            if isinstance(resolved, str | int | float) and not isinstance(resolved, bool):
                self._values[node_id] = resolved
                return resolved
        return None

    def conditioning_texts(self, link: object, depth: int = 0) -> list[str]:
        """The texts of the CLIPTextEncode nodes a conditioning input comes from, through combining
        nodes; each node is visited once per graph."""
        if not _is_link(link):
            return []
        if depth > MAX_GRAPH_DEPTH:
            raise _too_deep()
        node_id = str(link[0])
        node = self.graph.get(node_id)
        if node is None or node_id in self._texts_seen:
            return []
        self._texts_seen.add(node_id)
        inputs = node.get("inputs", {})
        if str(node.get("class_type", "")).startswith("CLIPTextEncode"):
            # CLIPTextEncode has "text"; SDXL's variant "text_g" and "text_l".
            texts = [self.scalar(inputs.get(key)) for key in ("text", "text_g", "text_l")]
            return [text for text in dict.fromkeys(texts) if isinstance(text, str) and text]
        found: list[str] = []
        for value in inputs.values():
            found += self.conditioning_texts(value, depth + 1)
        return found


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def summarize_comfyui(graph: object) -> Parameters:
    """A ComfyUI `prompt` graph summarised: the prompts of the CLIPTextEncode nodes feeding the
    (first) KSampler's positive and negative inputs, its seed, steps, cfg and sampler, the size of
    its EmptyLatentImage, the CheckpointLoaderSimple's checkpoint and the LoraLoaders' LoRAs.

    TooLargeError for a graph beyond MAX_GRAPH_NODES, MAX_GRAPH_INPUTS or MAX_GRAPH_DEPTH."""
    if not isinstance(graph, dict) or not all(
        isinstance(node, dict) and isinstance(node.get("inputs", {}), dict) for node in graph.values()
    ):
        raise ValueError(f"a ComfyUI prompt is an object of nodes, got {str(graph)[:80]!r}")
    inputs_count = sum(len(node.get("inputs", {})) for node in graph.values())
    if len(graph) > MAX_GRAPH_NODES or inputs_count > MAX_GRAPH_INPUTS:
        raise TooLargeError(
            f"carries a ComfyUI graph of {len(graph):,} nodes and {inputs_count:,} inputs, too large to "
            f"read (I read up to {MAX_GRAPH_NODES:,} nodes and {MAX_GRAPH_INPUTS:,} inputs)"
        )
    resolver = _Resolver(graph)
    settings: dict[str, str] = {}
    prompt = negative = ""
    samplers = _ordered(graph, _SAMPLERS)
    if samplers:
        inputs = samplers[0].get("inputs", {})
        prompt = "\n".join(resolver.conditioning_texts(inputs.get("positive")))
        negative = "\n".join(resolver.conditioning_texts(inputs.get("negative")))
        values = {
            "Steps": inputs.get("steps"),
            "Sampler": inputs.get("sampler_name"),
            "Schedule type": inputs.get("scheduler"),
            "CFG scale": inputs.get("cfg"),
            # KSamplerAdvanced calls it noise_seed.
            "Seed": inputs.get("seed", inputs.get("noise_seed")),
        }
        latent = inputs.get("latent_image")
        if _is_link(latent):
            source = graph.get(str(latent[0]), {})
            size = source.get("inputs", {})
            width, height = resolver.scalar(size.get("width")), resolver.scalar(size.get("height"))
            if source.get("class_type") == "EmptyLatentImage" and width is not None and height is not None:
                values["Size"] = f"{_number(width)}x{_number(height)}"
        if inputs.get("denoise") not in (None, 1, 1.0):
            values["Denoising strength"] = inputs.get("denoise")
        for key, value in values.items():
            resolved = resolver.scalar(value)
            if resolved is not None:
                settings[key] = _number(resolved)
    checkpoints = _ordered(graph, ("CheckpointLoaderSimple",))
    if checkpoints and isinstance(
        name := resolver.scalar(checkpoints[0].get("inputs", {}).get("ckpt_name")), str
    ):
        settings["Model"] = name
    loras = tuple(
        Lora(
            str(resolver.scalar(loader.get("lora_name"))),
            _number(resolver.scalar(loader.get("strength_model", 1))),
        )
        for loader in (node.get("inputs", {}) for node in _ordered(graph, _LORA_LOADERS))
    )
    return Parameters("ComfyUI", prompt, negative, settings, loras)


# -- files ---------------------------------------------------------------------------------------


def picture_format(data: bytes) -> Literal["PNG", "JPEG", "WEBP"] | None:
    """The format by the file's magic bytes (never by its name or the type it was sent with)."""
    if data.startswith(PNG_SIGNATURE):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _user_comment(raw: object) -> str:
    """EXIF's UserComment: an 8-byte charset name, then the text (A1111 writes UNICODE, UTF-16 BE)."""
    if isinstance(raw, str):
        return raw.strip("\0")
    if not isinstance(raw, bytes):
        return ""
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\0":
        encoding = "utf-16" if body[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-16-be"
        return body.decode(encoding, errors="replace").strip("\0")
    return body.decode("utf-8", errors="replace").strip("\0")


def _parameters(image: PIL.Image.Image, format: str) -> Parameters | None:
    info = image.info
    if format == "PNG":
        # tEXt, zTXt and iTXt chunks before the pixels are read on open (A1111, ComfyUI and we
        # write them there); Pillow bounds their size.
        text = info.get("parameters")
        if isinstance(text, str) and text.strip():
            return parse_a1111(_bounded(text))
        graph = info.get("prompt")
        if isinstance(graph, str):
            try:
                return summarize_comfyui(json.loads(graph))
            except TooLargeError:
                raise
            except (ValueError, RecursionError):
                # Not JSON (or JSON nested deeper than the parser follows), or not a graph.
                return None
        return None
    text = _user_comment(image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT))
    if not text.strip() and isinstance(comment := info.get("comment"), bytes):
        text = comment.decode("utf-8", errors="replace")
    return parse_a1111(_bounded(text)) if text.strip() else None


def _bounded(text: str) -> str:
    if len(text) > MAX_PARAMETERS_CHARS:
        raise TooLargeError(
            f"carries {len(text):,} characters of settings, too many to read "
            f"(I read up to {MAX_PARAMETERS_CHARS:,})"
        )
    return text


def read_picture(data: bytes) -> Picture:
    """A PNG's, JPEG's or WebP's size and parameters; PictureError for anything else."""
    if len(data) > MAX_PICTURE_BYTES:
        raise PictureError(
            f"is {len(data) / 1024 / 1024:.0f} MB: I read pictures of up to {MAX_PICTURE_BYTES // 1024 // 1024} MB"
        )
    format = picture_format(data)
    if format is None:
        raise PictureError("isn't a PNG, JPEG or WebP picture")
    try:
        with PIL.Image.open(io.BytesIO(data), formats=[format]) as image:
            width, height = image.size
            parameters = _parameters(image, format)
    except PictureError:
        raise
    # What Pillow raises on a broken file (a member's file may be anything).
    except (
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        struct.error,
        PIL.Image.DecompressionBombError,
    ) as error:
        raise PictureError(f"looks like a {format} but I can't read it ({error})") from error
    return Picture(format, width, height, parameters)

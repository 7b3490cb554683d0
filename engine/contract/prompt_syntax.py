"""AUTOMATIC1111's prompt language, read without torch: the bot checks prompts with it before queuing,
the engine reads them with it to encode them (engine.prompt_embeds).

What it reads, as A1111 does (stable-diffusion-webui, modules/prompt_parser.py
`parse_prompt_attention`, modules/extra_networks.py `parse_prompt`, modules/sd_hijack_clip.py):

- `(words)` weighs words 1.1 times, `[words]` 1/1.1 times, `(words:1.3)` 1.3 times; nested brackets
  multiply; `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the characters themselves.
- `BREAK` (in capitals) ends the current 75-token chunk: what follows starts a new one.
- `<lora:NAME:WEIGHT>` applies the adapter NAME at WEIGHT (`<lora:NAME>`: weight 1) and is not
  part of the text.

Where A1111 guesses, this refuses with a message for the member: a bracket never closed or closing
nothing, crossed brackets, a weight that is not a number or is outside 0..MAX_WEIGHT (A1111 takes
any), A1111's prompt editing `[a:b:0.5]` and alternation `[a|b]` (not supported), and tags other
than `<lora:...>`. A BREAK inside brackets is a BREAK too (A1111 then reads the word "BREAK").
A prompt of more than MAX_PROMPT_CHUNKS chunks is refused too (A1111 takes any number): each chunk
lengthens what every denoising step attends to.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

# A1111 takes any weight; past 2 a picture falls apart (compel: "values >1.6 tend to produce garbage
# output" on SD 1.5), so a larger one is almost always a slip of the keyboard.
MAX_WEIGHT = 2.0
ROUND_BRACKETS = 1.1
SQUARE_BRACKETS = 1 / 1.1
# The most 75-token chunks a prompt is drawn with (600 tokens; 1,000 characters of plain words make
# about 4). Each BREAK starts a chunk, so the bot counts sections before any tokenizer is at hand;
# the engine counts the chunks its text encoders make.
MAX_PROMPT_CHUNKS = 8
CHUNK_TOKENS = 75

# extra_networks.re_extra_net, with an empty argument list let in (and then refused by name).
_TAG = re.compile(r"<(\w+):([^>]*)>")
_UNCLOSED_TAG = re.compile(r"<lora:[^>]*$", re.IGNORECASE)
# prompt_parser.re_attention: escapes, brackets, a ":weight)" that closes a round bracket, text.
_ATTENTION = re.compile(
    r"""
    \\\(|\\\)|\\\[|\\]|\\\\|\\|
    \(|\[|
    :\s*([+-]?[.\d]+)\s*\)|
    \)|]|
    [^\\()\[\]:]+|
    :
    """,
    re.VERBOSE,
)
# prompt_parser.re_break
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


class PromptSyntaxError(ValueError):
    """A prompt that does not read; the message says what and where, for the member who wrote it."""


@dataclass(frozen=True)
class Fragment:
    text: str
    weight: float = 1.0


@dataclass(frozen=True)
class LoraTag:
    # Lowercase, as tokens are.
    name: str
    weight: float


@dataclass(frozen=True)
class ParsedPrompt:
    # The text between BREAKs, each a run of weighted fragments that starts a new chunk; at least one
    # (empty for an empty text). Runs of one weight are merged, whitespace-only fragments dropped.
    sections: tuple[tuple[Fragment, ...], ...]
    loras: tuple[LoraTag, ...]

    @property
    def text(self) -> str:
        """The words as the text encoder reads them, without brackets, weights and tags."""
        return " ".join("".join(fragment.text for fragment in section) for section in self.sections)

    @property
    def lora_weights(self) -> dict[str, float]:
        return {tag.name: tag.weight for tag in self.loras}


# A request's prompt is read by several checks on its way (the bot's, the job's, the engine's): it is
# parsed once, and its (immutable) reading shared. A prompt that does not read raises each time.
@functools.lru_cache(maxsize=1024)
def parse_prompt(prompt: str, *, loras: bool = True) -> ParsedPrompt:
    """Read a prompt in A1111's language; PromptSyntaxError says what does not read.

    Without `loras` a `<lora:...>` tag is refused (a negative prompt takes none)."""
    if not loras and (tag := _TAG.search(prompt)):
        raise PromptSyntaxError(f"“{tag.group(0)}”: tags go in the prompt, not here")
    return ParsedPrompt(_attention_sections(_TAG.sub("", prompt)), _lora_tags(prompt))


def outside_tags(prompt: str, change: Callable[[str], str]) -> str:
    """The prompt with `change` applied to the text around its `<...:...>` tags, the tags kept as written."""
    pieces = []
    end = 0
    for match in _TAG.finditer(prompt):
        pieces += [change(prompt[end : match.start()]), match.group(0)]
        end = match.end()
    return "".join([*pieces, change(prompt[end:])])


def _lora_tags(prompt: str) -> tuple[LoraTag, ...]:
    if unclosed := _UNCLOSED_TAG.search(_TAG.sub("", prompt)):
        raise PromptSyntaxError(f"“{_snippet(unclosed.group(0))}” has no closing “>”")
    tags: dict[str, LoraTag] = {}
    for match in _TAG.finditer(prompt):
        written, kind, arguments = match.group(0), match.group(1), match.group(2).split(":")
        if kind.lower() != "lora":
            raise PromptSyntaxError(
                f"“{written}”: the only tags I know are LoRA tags, like `<lora:NAME:0.8>`"
            )
        name = arguments[0].strip().lower()
        if not name:
            raise PromptSyntaxError(f"“{written}” names no model: write `<lora:NAME:0.8>`")
        if len(arguments) > 2:
            raise PromptSyntaxError(f"“{written}”: a LoRA tag takes one weight, like `<lora:{name}:0.8>`")
        weight = _weight(arguments[1], written) if len(arguments) == 2 else 1.0
        if name in tags and tags[name].weight != weight:
            raise PromptSyntaxError(
                f"the prompt gives `<lora:{name}>` two weights, {tags[name].weight:g} and {weight:g}: keep one"
            )
        tags[name] = LoraTag(name, weight)
    return tuple(tags.values())


def _weight(written: str, context: str) -> float:
    try:
        weight = float(written)
    except ValueError:
        raise PromptSyntaxError(f"“{written.strip()}” in “{context}” is not a number") from None
    if not 0 <= weight <= MAX_WEIGHT:
        raise PromptSyntaxError(
            f"the weight {weight:g} in “{context}” is outside 0 to {MAX_WEIGHT:g} "
            "(past 2 the picture falls apart)"
        )
    return weight


# A piece of the text with its weight; None marks a BREAK.
_Piece = list[str | float] | None


def _attention_sections(text: str) -> tuple[tuple[Fragment, ...], ...]:
    """parse_prompt_attention, refusing what it would guess at; then split at BREAKs."""
    pieces: list[_Piece] = []
    # Open brackets: the bracket, where it is in `text`, the first piece inside it.
    open_brackets: list[tuple[str, int, int]] = []

    def close(kind: str, position: int, multiplier: float) -> None:
        closing = ")" if kind == "(" else "]"
        if not open_brackets:
            raise PromptSyntaxError(
                f"“{closing}” at the end of “{_leading_up_to(text, position)}” closes nothing: remove it, "
                f"or write `\\{closing}` for the character itself"
            )
        opened, opened_at, start = open_brackets.pop()
        if opened != kind:
            raise PromptSyntaxError(
                f"“{opened}” in “{_snippet(text, opened_at)}” is closed by a “{closing}”: brackets may not cross"
            )
        for piece in pieces[start:]:
            if piece is not None:
                piece[1] = float(piece[1]) * multiplier

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        inside_square = bool(open_brackets) and open_brackets[-1][0] == "["
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token in ("(", "["):
            open_brackets.append((token, match.start(), len(pieces)))
        elif weight is not None and not inside_square:
            close("(", match.end() - 1, _weight(weight, _snippet(text, _opening(open_brackets, match))))
        elif token == ")":
            close("(", match.start(), ROUND_BRACKETS)
        elif token == "]":
            close("[", match.start(), SQUARE_BRACKETS)
        elif inside_square and (token.startswith(":") or "|" in token):
            start = open_brackets[-1][1]
            raise PromptSyntaxError(
                f"“{_snippet(text, start)}”: A1111's prompt editing `[a:b:0.5]` and alternation `[a|b]` "
                "are not supported here; `[words]` makes words weaker, `(words:1.2)` stronger"
            )
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index:
                    pieces.append(None)
                pieces.append([part, 1.0])
    if open_brackets:
        opened, opened_at, _ = open_brackets[-1]
        closing = ")" if opened == "(" else "]"
        raise PromptSyntaxError(
            f"“{opened}” in “{_snippet(text, opened_at)}” is never closed: add a “{closing}”, "
            f"or write `\\{opened}` for the character itself"
        )
    sections = _sections(pieces)
    if len(sections) > MAX_PROMPT_CHUNKS:
        raise PromptSyntaxError(too_many_chunks(len(sections), "its BREAKs start"))
    return sections


def too_many_chunks(chunks: int, made_by: str) -> str:
    """Why a prompt of `chunks` chunks is refused; `made_by` says what made them."""
    return (
        f"the prompt is {chunks} chunks of {CHUNK_TOKENS} tokens ({made_by} that many), and I draw at "
        f"most {MAX_PROMPT_CHUNKS}: shorten it or use fewer BREAKs"
    )


def _opening(open_brackets: list[tuple[str, int, int]], match: re.Match[str]) -> int:
    """Where the bracket that a ":weight)" closes opens (the weight's own place when there is none)."""
    return open_brackets[-1][1] if open_brackets else match.start()


def _sections(pieces: list[_Piece]) -> tuple[tuple[Fragment, ...], ...]:
    sections: list[list[Fragment]] = [[]]
    for piece in pieces:
        if piece is None:
            sections.append([])
            continue
        text, weight = str(piece[0]), float(piece[1])
        section = sections[-1]
        if not text.strip():
            # Kept as the space it is, so that the words either side stay apart.
            if section:
                section[-1] = Fragment(section[-1].text + text, section[-1].weight)
            continue
        if weight > MAX_WEIGHT:
            raise PromptSyntaxError(
                f"“{text.strip()}” ends up at weight {weight:.3g} (nested brackets multiply): "
                f"at most {MAX_WEIGHT:g}"
            )
        if section and section[-1].weight == weight:
            section[-1] = Fragment(section[-1].text + text, weight)
        else:
            section.append(Fragment(text, weight))
    # As A1111: a BREAK at the end starts no chunk.
    if len(sections) > 1 and not sections[-1]:
        sections.pop()
    return tuple(tuple(section) for section in sections)


def _snippet(text: str, start: int = 0, length: int = 30) -> str:
    """The text from `start` on, cut to `length`."""
    piece = text[start : start + length]
    return piece + "…" if start + length < len(text) else piece


def _leading_up_to(text: str, end: int, length: int = 30) -> str:
    """The text up to and with the character at `end`, cut to `length`."""
    start = max(0, end + 1 - length)
    return ("…" if start else "") + text[start : end + 1]

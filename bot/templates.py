"""Prompt templates: `[SUBJECT]` (or `[me]`) stands for the member's own model, other bracketed words
in capitals (`[ARTIST]`, `[CHARACTER]`) are placeholders the member fills in.

A1111's prompt language (engine.contract.prompt_syntax) reads `[words]` as "words, weaker", so a placeholder is
only `[` + one UPPER-CASE word (letters, digits, underscores) + `]`, never preceded by a backslash
(`\\[ARTIST\\]` is the text itself); `[BREAK]` is A1111's BREAK. `[SUBJECT]` and `[me]` are matched
in any case. Inside a LoRA tag, `<lora:[SUBJECT]:0.7>` names the model. No torch, no Discord: /imagine,
the buttons and the CLI share these rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from bot.db import ModelRow
from engine.contract.prompt_syntax import outside_tags

SUBJECT = "[SUBJECT]"

_SUBJECT = re.compile(r"(?<!\\)\[(?:subject|me)\]", re.IGNORECASE)
_SUBJECT_TAG = re.compile(r"<lora:\s*\[(?:subject|me)\]", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"(?<!\\)\[([A-Z][A-Z0-9_]*)\]")
# Words in capitals that are not placeholders: the subject itself, and A1111's chunk break.
_NOT_PLACEHOLDERS = {"SUBJECT", "ME", "BREAK"}
# How to describe a placeholder where "a character" would not say enough.
_DESCRIPTIONS = {"ARTIST": "an artist's name"}


class TemplateError(ValueError):
    """A template that cannot be drawn yet; the message tells the member what to do."""


def uses_subject(prompt: str) -> bool:
    """Whether the prompt has `[SUBJECT]` or `[me]` in it (in its text or a LoRA tag)."""
    return bool(_SUBJECT.search(prompt))


def placeholders(prompt: str) -> list[str]:
    """The placeholders still to fill (`[ARTIST]`, ...), each once, in the order they appear."""
    found = [f"[{word}]" for word in _PLACEHOLDER.findall(prompt) if word not in _NOT_PLACEHOLDERS]
    return list(dict.fromkeys(found))


def unfilled_message(names: list[str]) -> str:
    """What a member is told about a prompt with placeholders left in it."""
    parts = [f"{name} with {_describe(name)}" for name in names]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"Your prompt is a template: replace {listed}, then send it again."


def no_model_message() -> str:
    return (
        f"{SUBJECT} (or [me]) in a prompt stands for your own model, and you have no trained model in "
        "this server yet: teach me your face with `/train` (5-20 selfies and a made-up name), then try again."
    )


def fill(prompt: str, subject: ModelRow | None) -> str:
    """The prompt as the engine takes it: `[SUBJECT]`/`[me]` become the model's "token class" (its
    token alone in a LoRA tag). TemplateError for placeholders left to fill, or a subject and no model."""
    if names := placeholders(prompt):
        raise TemplateError(unfilled_message(names))
    if not uses_subject(prompt):
        return prompt
    if subject is None:
        raise TemplateError(no_model_message())
    return _put_subject(prompt, subject.token, f"{subject.token} {subject.class_word}")


def with_stand_in(prompt: str) -> str:
    """The template with a plain word where the subject goes, to check that it reads as a prompt
    before anyone's model fills it (placeholders such as [ARTIST] stay for the reader to fill)."""
    return _put_subject(prompt, "subject", "subject")


def _put_subject(prompt: str, token: str, phrase: str) -> str:
    tagged = _SUBJECT_TAG.sub(lambda _: f"<lora:{token}", prompt)
    return outside_tags(tagged, lambda text: _SUBJECT.sub(lambda _: phrase, text))


def template_form(prompt: str, models: Iterable[ModelRow]) -> str:
    """The prompt as anyone may reuse it: `[me]` written as `[SUBJECT]` (her "me" is not the reader's),
    and these models as `[SUBJECT]`: their token (and its class word after it, which `[SUBJECT]`
    brings back) in the text, their name in a LoRA tag."""
    prompt = _SUBJECT.sub(lambda _: SUBJECT, prompt)
    for model in models:
        token = re.escape(model.token)
        in_text = re.compile(
            rf"(?<![A-Za-z0-9]){token}(?:\s+{re.escape(model.class_word)})?(?![A-Za-z0-9])", re.IGNORECASE
        )
        in_tag = re.compile(rf"<lora:\s*{token}(?=\s*[:>])", re.IGNORECASE)
        prompt = in_tag.sub(lambda _: f"<lora:{SUBJECT}", prompt)
        prompt = outside_tags(prompt, lambda text, pattern=in_text: pattern.sub(lambda _: SUBJECT, text))
    return prompt


def _describe(name: str) -> str:
    word = name.strip("[]")
    if word in _DESCRIPTIONS:
        return _DESCRIPTIONS[word]
    words = word.lower().replace("_", " ")
    return ("an " if words[0] in "aeiou" else "a ") + words

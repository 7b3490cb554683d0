"""Prompt checks before anything is queued: pure functions over text and the [safety] config.

Words match whole words only, case-insensitively, ignoring punctuation and prompt syntax, so that
"(NSFW:1.2)" and "nude_photo" are caught while "Essex" or "sextant" are not. A listed word also
matches its plural ("nudes"); a listed phrase ("bad word") matches with any spacing between words.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from bot.config import SafetySection


def _normalized(text: str) -> str:
    # Anything that is not a letter or digit separates words; "_" counts as a separator too.
    return " ".join(re.split(r"[\W_]+", text.lower())).strip()


def find_words(text: str, words: Iterable[str]) -> list[str]:
    """The listed words (as listed) that occur in `text`, in list order."""
    haystack = f" {_normalized(text)} "
    found = []
    for word in words:
        needle = _normalized(word)
        if needle and re.search(rf" {re.escape(needle)}(?:s|es)? ", haystack):
            found.append(word)
    return found


def prompt_refusal(
    prompt: str, negative_prompt: str, safety: SafetySection, *, nsfw_channel: bool
) -> str | None:
    """Why this prompt may not be generated here (a message for the member), or None when it may.

    Blocked words are refused everywhere, in the negative prompt too (both are posted publicly).
    NSFW words are looked for in the prompt only: "nude" in a negative prompt steers away from it.
    """
    blocked = find_words(f"{prompt} {negative_prompt}", safety.blocked_words)
    if blocked:
        return f"Sorry, this server doesn't allow prompts with “{blocked[0]}”. Please rephrase and try again."
    nsfw = find_words(prompt, safety.nsfw_words)
    if nsfw and not (safety.allow_nsfw and nsfw_channel):
        where = (
            "only in age-restricted channels"
            if safety.allow_nsfw
            else "nowhere on this server (NSFW generation is turned off)"
        )
        return f"“{nsfw[0]}” reads as NSFW, which is allowed {where}. Please rephrase and try again."
    return None


def merge_negative(default: str, member: str | None) -> str:
    """The server's default negative prompt followed by the member's own terms, without repeats.

    Merging is idempotent, so a stored merged prompt can be merged again on a reroll.
    """
    terms: list[str] = []
    seen: set[str] = set()
    for part in f"{default},{member or ''}".split(","):
        term = " ".join(part.split())
        if term and term.lower() not in seen:
            seen.add(term.lower())
            terms.append(term)
    return ", ".join(terms)

"""The prompt checks in bot/safety.py: pure functions over text and the [safety] config."""

from __future__ import annotations

import pytest

from bot.config import SafetySection
from bot.safety import find_words, merge_negative, prompt_refusal

SAFETY = SafetySection(blocked_words=["gore", "bad word"], allow_nsfw=False)
NSFW_ALLOWED = SafetySection(blocked_words=["gore"], allow_nsfw=True)


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("a NUDE statue", ["nude"]),
        ("(nsfw:1.3), portrait", ["nsfw"]),
        ("nude_photo of abraza", ["nude"]),
        ("two nudes in a museum", ["nude"]),
        ("sexes and genders", ["sex"]),
        ("a trip to Essex, with a sextant", []),
        ("denuded hills, unsexy", []),
        ("", []),
    ],
)
def test_find_words_matches_whole_words_and_plurals(text: str, found: list[str]) -> None:
    assert find_words(text, ["nsfw", "nude", "sex"]) == found


def test_find_words_matches_phrases_across_spacing_and_punctuation() -> None:
    assert find_words("a  BAD,word here", ["bad word"]) == ["bad word"]
    assert find_words("bad words", ["bad word"]) == ["bad word"]
    assert find_words("badword", ["bad word"]) == []
    # An empty or punctuation-only entry in the config matches nothing rather than everything.
    assert find_words("anything", ["", "  ", "!!"]) == []


def test_blocked_words_are_refused_everywhere_even_in_the_negative_prompt() -> None:
    refusal = prompt_refusal("abraza covered in GORE", "", SAFETY, nsfw_channel=True)
    assert refusal is not None and "gore" in refusal
    assert prompt_refusal("abraza as thor", "gore", SAFETY, nsfw_channel=False) is not None
    assert prompt_refusal("abraza said a bad word", "", SAFETY, nsfw_channel=False) is not None
    assert prompt_refusal("abraza as thor", "blurry", SAFETY, nsfw_channel=False) is None


def test_nsfw_is_refused_unless_allowed_and_in_an_age_restricted_channel() -> None:
    off = prompt_refusal("nude abraza", "", SAFETY, nsfw_channel=True)
    assert off is not None and "turned off" in off
    not_here = prompt_refusal("nude abraza", "", NSFW_ALLOWED, nsfw_channel=False)
    assert not_here is not None and "age-restricted" in not_here
    assert prompt_refusal("nude abraza", "", NSFW_ALLOWED, nsfw_channel=True) is None
    # Blocked words stay blocked in age-restricted channels.
    assert prompt_refusal("nude gore", "", NSFW_ALLOWED, nsfw_channel=True) is not None


def test_nsfw_words_in_the_negative_prompt_steer_away_and_are_fine() -> None:
    assert prompt_refusal("abraza at the beach", "nsfw, nude", SAFETY, nsfw_channel=False) is None


def test_merge_negative_puts_the_default_first_without_repeats() -> None:
    assert merge_negative("lowres, blurry", None) == "lowres, blurry"
    assert merge_negative("lowres, blurry", "") == "lowres, blurry"
    assert (
        merge_negative("lowres, blurry", "Blurry,  extra   fingers, ,hat")
        == "lowres, blurry, extra fingers, hat"
    )
    assert merge_negative("", "hat") == "hat"


def test_merge_negative_is_idempotent() -> None:
    once = merge_negative("lowres, blurry", "hat, blurry")
    assert merge_negative("lowres, blurry", once) == once

"""engine.contract.prompt_syntax: A1111's prompt language read as A1111 reads it, refused where A1111 would guess."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bot.cogs.help import HELP_TEXT
from engine.contract.prompt_syntax import (
    MAX_PROMPT_CHUNKS,
    MAX_WEIGHT,
    Fragment,
    LoraTag,
    PromptSyntaxError,
    outside_tags,
    parse_prompt,
)


def fragments(prompt: str) -> list[tuple[str, float]]:
    """The one section of a prompt as (text, weight) pairs, weights rounded for comparing."""
    (section,) = parse_prompt(prompt).sections
    return [(fragment.text, round(fragment.weight, 6)) for fragment in section]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a photo of a cat", [("a photo of a cat", 1.0)]),
        ("a (cat) sat", [("a ", 1.0), ("cat", 1.1), (" sat", 1.0)]),
        ("a (cat:1.5) sat", [("a ", 1.0), ("cat", 1.5), (" sat", 1.0)]),
        ("a ( cat : 0.25 ) sat", [("a ", 1.0), (" cat ", 0.25), (" sat", 1.0)]),
        ("a [cat] sat", [("a ", 1.0), ("cat", round(1 / 1.1, 6)), (" sat", 1.0)]),
        # Nested brackets multiply, as A1111's multiply_range does.
        ("((cat))", [("cat", 1.21)]),
        ("((cat:1.5) on a mat)", [("cat", 1.65), (" on a mat", 1.1)]),
        ("[(cat)]", [("cat", 1.0)]),
        # Escapes are the characters themselves, at weight 1.
        (r"\(cat\) \[dog\] a\\b", [(r"(cat) [dog] a\b", 1.0)]),
        (r"(a \(cat\))", [("a (cat)", 1.1)]),
        # A colon that closes no weight is text, as in A1111.
        ("(style: baroque)", [("style: baroque", 1.1)]),
        # Runs of one weight are one fragment; an empty bracket keeps the words apart.
        ("(a)(b) c( )d", [("ab", 1.1), (" c d", 1.0)]),
    ],
)
def test_weights_are_a1111s(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert fragments(prompt) == expected


def test_square_brackets_are_one_over_1_1_and_the_limits_are_accepted() -> None:
    assert parse_prompt("[cat]").sections[0][0].weight == 1 / 1.1
    # A space alone has no tokens: it joins the fragment before it.
    assert fragments(f"(cat:{MAX_WEIGHT:g}) (dog:0)") == [("cat ", MAX_WEIGHT), ("dog", 0.0)]
    # Seven nested brackets are 1.1**7 = 1.95: still under the cap.
    assert fragments("(((((((cat)))))))") == [("cat", round(1.1**7, 6))]


def test_break_starts_a_new_section_as_a1111_starts_a_new_chunk() -> None:
    parsed = parse_prompt("a cat BREAK (a dog) BREAK\na bird")
    assert parsed.sections == (
        (Fragment("a cat"),),
        (Fragment("a dog", 1.1),),
        (Fragment("a bird"),),
    )
    assert parsed.text == "a cat a dog a bird"
    # A BREAK inside brackets breaks too, and the words after it keep the brackets' weight.
    assert parse_prompt("(a BREAK b)").sections == ((Fragment("a", 1.1),), (Fragment("b", 1.1),))
    # As A1111: a BREAK first gives an empty chunk, two in a row one more, one at the end none.
    assert parse_prompt("BREAK cat").sections == ((), (Fragment("cat"),))
    assert len(parse_prompt("a BREAK BREAK b").sections) == 3
    assert parse_prompt("cat BREAK").sections == ((Fragment("cat"),),)
    # Only the word in capitals.
    assert len(parse_prompt("break a BREAKfast").sections) == 1


def test_lora_tags_name_models_at_a_weight_and_are_not_text() -> None:
    parsed = parse_prompt("abraza as thor <lora:abraza:0.5>, <LORA:Sabafry> in (rain:1.2)")
    assert parsed.loras == (LoraTag("abraza", 0.5), LoraTag("sabafry", 1.0))
    assert parsed.lora_weights == {"abraza": 0.5, "sabafry": 1.0}
    assert parsed.text == "abraza as thor ,  in rain"
    # The same tag twice at one weight is one tag.
    assert parse_prompt("<lora:abraza:0.5> x <lora:abraza:0.50>").loras == (LoraTag("abraza", 0.5),)
    assert parse_prompt("a (cat:1.2)").loras == ()


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a (cat", r"“\(” in “\(cat” is never closed: add a “\)”, or write `\\\(` for the character itself"),
        ("a [cat", r"“\[” in “\[cat” is never closed: add a “\]”"),
        ("a cat)", r"“\)” at the end of “a cat\)” closes nothing: remove it, or write `\\\)`"),
        ("a cat:1.2)", r"“\)” at the end of “a cat:1.2\)” closes nothing"),
        ("a cat]", r"“\]” at the end of “a cat\]” closes nothing"),
        ("([cat)]", r"“\[” in “\[cat\)\]” is closed by a “\)”: brackets may not cross"),
        ("(cat:50)", r"the weight 50 in “\(cat:50\)” is outside 0 to 2"),
        ("(cat:-1)", r"the weight -1 in “\(cat:-1\)” is outside 0 to 2"),
        ("(cat:1.2.3)", r"“1.2.3” in “\(cat:1.2.3\)” is not a number"),
        ("((((((((cat))))))))", r"“cat” ends up at weight 2.14 \(nested brackets multiply\): at most 2"),
        ("((cat:1.9))", r"“cat” ends up at weight 2.09"),
        ("[cat:dog:0.5]", r"“\[cat:dog:0.5\]”: A1111's prompt editing `\[a:b:0.5\]` and alternation"),
        ("[cat|dog]", r"alternation `\[a\|b\]` are not supported here"),
        ("[cat:0.5]", r"prompt editing"),
        ("<lora:abraza:5>", r"the weight 5 in “<lora:abraza:5>” is outside 0 to 2"),
        ("<lora:abraza:lots>", r"“lots” in “<lora:abraza:lots>” is not a number"),
        ("<lora:abraza:0.5:1>", r"a LoRA tag takes one weight, like `<lora:abraza:0.8>`"),
        ("<lora::0.5>", r"names no model"),
        ("<hypernet:abraza:1>", r"the only tags I know are LoRA tags"),
        ("abraza <lora:abraza:0.5", r"“<lora:abraza:0.5” has no closing “>”"),
        ("<lora:abraza:0.5> <lora:abraza:1>", r"gives `<lora:abraza>` two weights, 0.5 and 1: keep one"),
    ],
)
def test_bad_syntax_is_refused_saying_what_and_where(prompt: str, message: str) -> None:
    with pytest.raises(PromptSyntaxError, match=message):
        parse_prompt(prompt)


def test_a_negative_prompt_takes_no_tags() -> None:
    assert parse_prompt("(blurry:1.3), lowres", loras=False).sections[0][0] == Fragment("blurry", 1.3)
    with pytest.raises(PromptSyntaxError, match="“<lora:abraza:1>”: tags go in the prompt, not here"):
        parse_prompt("lowres <lora:abraza:1>", loras=False)


def test_outside_tags_changes_the_text_and_keeps_the_tags() -> None:
    assert outside_tags("abraza <lora:abraza:0.5> abraza", str.upper) == "ABRAZA <lora:abraza:0.5> ABRAZA"
    assert outside_tags("no tags", str.upper) == "NO TAGS"


def test_the_examples_in_the_readme_and_help_read_as_they_say() -> None:
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    for text in (readme, HELP_TEXT):
        assert "(word:1.3)" in text and "[word]" in text and "BREAK" in text and "<lora:abraza:0.7>" in text
    for example in re.findall(r"`([^`]+)`", HELP_TEXT.split("prompt syntax works:")[1].split("\n")[0]):
        parse_prompt(example)
    assert parse_prompt("(word:1.3)").sections[0][0].weight == 1.3
    assert parse_prompt("<lora:abraza:0.7>").loras == (LoraTag("abraza", 0.7),)
    assert "`[a:b:0.5]` and alternation `[a|b]` are not supported" in readme
    for unsupported in ("[a:b:0.5]", "[a|b]"):
        with pytest.raises(PromptSyntaxError, match="not supported"):
            parse_prompt(unsupported)


def test_a_prompt_of_more_breaks_than_chunks_drawn_is_refused_saying_the_limit() -> None:
    assert len(parse_prompt(" BREAK ".join(["cat"] * MAX_PROMPT_CHUNKS)).sections) == MAX_PROMPT_CHUNKS
    with pytest.raises(PromptSyntaxError) as refused:
        parse_prompt("abraza " + "BREAK " * 160)
    assert str(refused.value) == (
        "the prompt is 160 chunks of 75 tokens (its BREAKs start that many), and I draw at most 8: "
        "shorten it or use fewer BREAKs"
    )

"""Prompt templates (bot/templates.py), and the member settings and default model they read (bot/db.py,
bot/service.py), on a database of their own."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bot.cogs.help import HELP_TEXT
from bot.config import BotConfig
from bot.db import Database, MemberSettings, ModelRow
from bot.service import (
    ImageRequest,
    UserFacingError,
    check_generation_request,
    check_member_settings,
    choose_default_model,
    default_model,
    fill_template,
)
from bot.templates import TemplateError, fill, placeholders, template_form, unfilled_message, uses_subject
from engine.contract.prompt_syntax import parse_prompt


def model(token: str = "abraza", class_word: str = "person") -> ModelRow:
    return ModelRow(
        id=1, guild_id=1, owner_id=42, token=token, class_word=class_word, state="ready", shared=False,
        adapter_path="/x/adapter.safetensors", samples=[], metadata={}, error=None, created_at=time.time(),
    )  # fmt: skip


def test_subject_and_me_become_the_models_token_and_class_in_any_case() -> None:
    assert fill("portrait of [SUBJECT] as thor", model()) == "portrait of abraza person as thor"
    assert (
        fill("[me] and [Me], (([subject]:1.2))", model())
        == "abraza person and abraza person, ((abraza person:1.2))"
    )
    # In a LoRA tag the model is named by its token alone.
    assert fill("<lora:[SUBJECT]:0.7> [me] at dusk", model()) == "<lora:abraza:0.7> abraza person at dusk"
    assert parse_prompt(fill("<lora:[me]:0.7> [me]", model())).lora_weights == {"abraza": 0.7}


def test_a_prompt_without_a_template_is_left_as_it_is() -> None:
    for prompt in (
        "a castle, [blurry], (towers:1.2)",
        "\\[SUBJECT\\] on a sign",
        "a [Tall] tower BREAK [BREAK]",
    ):
        assert not uses_subject(prompt) and placeholders(prompt) == []
        assert fill(prompt, None) == prompt


def test_placeholders_are_bracketed_upper_case_words_only() -> None:
    prompt = "[SUBJECT] as [CHARACTER], art by [ARTIST] and [ARTIST], [soft light], [ART_2], \\[NOPE\\]"
    assert placeholders(prompt) == ["[CHARACTER]", "[ARTIST]", "[ART_2]"]
    with pytest.raises(TemplateError) as refused:
        fill(prompt, model())
    assert str(refused.value) == (
        "Your prompt is a template: replace [CHARACTER] with a character, [ARTIST] with an artist's name "
        "and [ART_2] with an art 2, then send it again."
    )
    assert unfilled_message(["[ARTIST]"]) == (
        "Your prompt is a template: replace [ARTIST] with an artist's name, then send it again."
    )


def test_a_template_without_a_model_points_to_train() -> None:
    with pytest.raises(
        TemplateError, match=r"no trained model in this server yet: teach me your face with `/train`"
    ):
        fill("[me] as a viking", None)


def test_template_form_writes_the_authors_tokens_as_subject() -> None:
    authors = [model("abraza"), model("quorbly", "dog")]
    prompt = "Abraza person and abraza's dog quorbly dog, not abrazatron <lora:abraza:0.5> (abraza:1.2)"
    assert template_form(prompt, authors) == (
        "[SUBJECT] and [SUBJECT]'s dog [SUBJECT], not abrazatron <lora:[SUBJECT]:0.5> ([SUBJECT]:1.2)"
    )
    # Filled again with someone else's model, it reads as hers.
    filled = fill(template_form("abraza as thor <lora:abraza:0.5>", authors), model("zorblat"))
    assert filled == "zorblat person as thor <lora:zorblat:0.5>"
    assert template_form("a photo of abraza", []) == "a photo of abraza"
    assert template_form("[me] and [Subject] by [ARTIST]", []) == "[SUBJECT] and [SUBJECT] by [ARTIST]"


# -- with the database ---------------------------------------------------------------------------


def ready_model(db: Database, user_id: int, token: str, guild_id: int = 1) -> ModelRow:
    db.ensure_user(user_id, f"user{user_id}")
    row = db.add_model(guild_id=guild_id, owner_id=user_id, token=token, class_word="person")
    return db.update_model(row.id, state="ready", adapter_path=f"/x/{token}.safetensors")


def request(prompt: str) -> ImageRequest:
    return ImageRequest(
        prompt=prompt, negative_prompt="", seed=1, count=1, width=64, height=64, steps=2, guidance=7
    )


def test_the_default_model_is_the_chosen_one_else_the_newest_and_is_per_server(tmp_path: Path) -> None:
    db = Database.in_data_dir(tmp_path)
    assert default_model(db, 1, 42) is None
    first = ready_model(db, 42, "abraza")
    newest = ready_model(db, 42, "quorbly")
    ready_model(db, 42, "elsewhere", guild_id=2)
    assert default_model(db, 1, 42) == newest
    assert choose_default_model(db, 1, 42, "Abraza") == first
    assert default_model(db, 1, 42) == first
    assert default_model(db, 2, 42).token == "elsewhere"
    filled = fill_template(db, 1, 42, request("[me] as thor"))
    assert (filled.prompt, filled.template) == ("abraza person as thor", "[me] as thor")
    assert fill_template(db, 1, 42, filled) == filled
    # Someone else's model, or one that is gone, is no default.
    ready_model(db, 7, "zorblat")
    with pytest.raises(UserFacingError, match="You have no model called “zorblat”"):
        choose_default_model(db, 1, 42, "zorblat")
    db.delete_model(first.id)
    assert db.default_model(42, 1) is None and default_model(db, 1, 42) == newest
    with pytest.raises(UserFacingError, match="/train"):
        fill_template(db, 1, 8, request("[SUBJECT]"))


def test_a_placeholder_never_reaches_the_engine(tmp_path: Path) -> None:
    db = Database.in_data_dir(tmp_path)
    with pytest.raises(UserFacingError, match=r"replace \[ARTIST\] with an artist's name"):
        check_generation_request(db, BotConfig(), 1, 42, request("a castle by [ARTIST]"), nsfw_allowed=False)
    with pytest.raises(UserFacingError, match=r"replace \[ARTIST\]"):
        fill_template(db, 1, 42, request("[me] by [ARTIST]"))


def test_member_settings_are_stored_and_checked(tmp_path: Path) -> None:
    db = Database.in_data_dir(tmp_path)
    assert db.member_settings(42) == MemberSettings()
    db.ensure_user(42, "alice")
    mine = MemberSettings(
        aspect="portrait", steps=30, guidance=0.0, negative_prompt="blurry", count=2, gallery=False
    )
    db.set_member_settings(42, mine)
    assert db.member_settings(42) == mine and db.member_settings(7) == MemberSettings()
    for wrong, message in (
        (
            MemberSettings(aspect="round"),
            "The aspect has to be one of square, portrait, landscape, not “round”.",
        ),
        (MemberSettings(steps=500), "Steps go from 1 to 100, not 500."),
        (MemberSettings(guidance=31.0), "Guidance goes from 0 to 30, not 31."),
        (MemberSettings(count=0), "The count goes from 1 to 4, not 0."),
        (MemberSettings(negative_prompt="(blurry"), "I can't read your negative prompt: “(” in “(blurry”"),
    ):
        with pytest.raises(UserFacingError) as refused:
            check_member_settings(wrong)
        assert str(refused.value).startswith(message)
    check_member_settings(mine)


def test_readme_and_help_promise_what_the_templates_do() -> None:
    readme = " ".join(
        (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8").split()
    )
    example = "Portrait of [SUBJECT] as [CHARACTER], art by [ARTIST]"
    assert f"in `{example}`, `[SUBJECT]` (or `[me]`, in any case) stands for your own model" in readme
    assert example in HELP_TEXT and "`[me]` or `[SUBJECT]` stands for your own model" in HELP_TEXT
    assert "/settings" in HELP_TEXT and "`/settings show`, `/settings set [model] [aspect]" in readme
    # What they promise: "token class", placeholders refused, A1111's [word] and \[ARTIST\] left alone.
    assert fill("Portrait of [SUBJECT]", model()) == "Portrait of abraza person"
    assert placeholders(example) == ["[CHARACTER]", "[ARTIST]"]
    assert placeholders("a [word] and \\[ARTIST\\]") == []


def test_a_template_with_a_stand_in_reads_as_a_prompt() -> None:
    from bot.templates import with_stand_in

    assert with_stand_in("[SUBJECT] as thor, <lora:[me]:0.7>, by [ARTIST]") == (
        "subject as thor, <lora:subject:0.7>, by [ARTIST]"
    )

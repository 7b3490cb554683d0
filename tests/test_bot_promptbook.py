"""The shared prompt book end to end: the real bot and engine (tiny model) against the fake Discord."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from botharness import JOB_TIMEOUT, BotHarness, SharedBot, answer, button, imagine, is_post, running_bot
from fakediscord import FakeMessage, modal_text_fields

from bot.cogs.help import HELP_TEXT

README = Path(__file__).resolve().parent.parent / "README.md"


def cards(h: BotHarness, title: str) -> list[FakeMessage]:
    """The cards of that title up in the prompts channel."""
    return [
        m
        for m in h.fake.messages_in(h.prompts_channel_id)
        if not m.deleted and m.embeds and m.embeds[0].get("title") == title
    ]


def page(message: FakeMessage) -> tuple[str, str]:
    """(title, "n / total") of a /prompt browse page."""
    embed = message.embeds[0]
    return embed["title"], embed["footer"]["text"].split(" · ")[0]


async def browse(h: BotHarness, user_id: int, **options: Any) -> FakeMessage:
    ix = await h.fake.slash(user_id, h.general_channel_id, "prompt browse", **options)
    return await ix.wait_original()


async def rendered(h: BotHarness, prompt: str) -> FakeMessage:
    """The picture posted in #prompts for this prompt."""
    return await h.fake.wait_message(
        h.prompts_channel_id,
        lambda m: m.files and m.embeds and m.embeds[0].get("description") == prompt,
        timeout=JOB_TIMEOUT,
    )


@pytest.mark.slow
def test_prompt_book_save_browse_use_try_delete_and_forget(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_bot(tmp_path) as h:
            h.trained_model(h.alice, "abraza")
            h.trained_model(h.bob, "zorvik")
            picture = await imagine(h, h.alice, prompt="abraza as a knight in shining armour")

            # "Save prompt" under a picture is its author's: anyone else is told what to do instead.
            ix = await h.fake.click(h.bob, picture, button(picture, "Save prompt"))
            refusal = await ix.wait_original()
            assert refusal.ephemeral and "Only the member who made this picture" in refusal.content
            ix = await h.fake.click(h.alice, picture, button(picture, "Save prompt"))
            modal = await ix.wait_modal()
            title_field, note_field = modal_text_fields(modal)
            ix = await h.fake.submit_modal(
                h.alice, h.prompts_channel_id, modal["custom_id"],
                {title_field: "Knight", note_field: "best at 30 steps"},
            )  # fmt: skip
            saved = await ix.wait_original()
            assert saved.ephemeral and saved.content.startswith("Saved **Knight** to the prompt book.")
            # Her own model became [SUBJECT]; the card, once, with the picture, note, author and button.
            (knight,) = cards(h, "Knight")
            assert knight.embeds[0]["description"] == "[SUBJECT] as a knight in shining armour"
            assert knight.files and knight.embeds[0]["image"]["url"].startswith("http")
            assert "What works best at 30 steps" in knight.text and f"Author <@{h.alice}>" in knight.text
            assert str(knight.id) in saved.content and button(knight, "Try with my face")

            # Typed, from #general: the card still goes to #prompts, without a picture.
            typed = await answer(
                h,
                h.bob,
                "prompt save",
                title="Dragon",
                prompt="a red dragon over a castle",
                note="add (wings:1.2)",
            )
            assert typed.content.startswith("Saved **Dragon**")
            (dragon,) = cards(h, "Dragon")
            assert not dragon.files and "wings" in dragon.text
            taken = await answer(h, h.bob, "prompt save", title="KNIGHT", prompt="a knight")
            assert (
                taken.content == "The prompt book already has a prompt called **KNIGHT**: pick another title."
            )
            assert len(cards(h, "Knight")) == 1

            # ⭐ on a card ranks it (not the bot's own star); browse searches and sorts.
            h.fake.add_reaction(knight, h.bob, "⭐")
            h.fake.add_reaction(knight, h.admin, "⭐")
            h.fake.add_reaction(dragon, h.alice, "👍")
            await h.fake.flush()
            await h.fake.wait_until(lambda: h.db.prompt_by_title(h.guild_id, "knight").stars == 2)  # type: ignore[union-attr]
            assert page(await browse(h, h.alice)) == ("Dragon", "1 / 2")
            top = await browse(h, h.alice, sort="top")
            assert page(top) == ("Knight", "1 / 2") and "Stars ⭐ 2" in top.text and top.files
            ix = await h.fake.click(h.alice, top, button(top, "Next"))
            await ix.wait_callback()
            assert page(top) == ("Dragon", "2 / 2")
            assert page(await browse(h, h.alice, search="wings")) == ("Dragon", "1 / 1")
            nothing = await browse(h, h.alice, search="unicorn")
            assert nothing.ephemeral and nothing.content == "No saved prompt matches that."

            # Use: bob's face goes where it says [SUBJECT]; a member without a model is sent to /train.
            ix = await h.fake.slash(h.bob, h.prompts_channel_id, "prompt use", title="knight")
            post = await ix.wait_original(is_post, timeout=JOB_TIMEOUT)
            assert post.embeds[0]["description"] == "zorvik person as a knight in shining armour"
            assert "Model zorvik" in post.text
            no_model = await answer(h, h.admin, "prompt use", title="Knight")
            assert (
                "you have no trained model in this server yet" in no_model.content
                and "`/train`" in no_model.content
            )
            used = await browse(h, h.alice, sort="used")
            assert page(used) == ("Knight", "1 / 2") and "Uses 1" in used.text

            # "Try with my face" on the card still works after a restart, with the clicker's face.
            await h.restart()
            ix = await h.fake.click(h.alice, knight, button(knight, "Try with my face"))
            await rendered(h, "abraza person as a knight in shining armour")
            assert h.db.prompt_by_title(h.guild_id, "Knight").uses == 2  # type: ignore[union-attr]

            # Only the author deletes an entry, after confirming; its card goes with it.
            refused = await answer(h, h.bob, "prompt delete", title="Knight")
            assert refused.content == f"**Knight** is <@{h.alice}>'s: only its author can delete it."
            question = await answer(h, h.alice, "prompt delete", title="knight")
            await h.fake.click(h.alice, question, button(question, "Delete"))
            await h.fake.wait_until(lambda: question.content.startswith("Deleted"))
            assert question.content == "Deleted **Knight** from the prompt book and took its card down."
            assert knight.deleted and h.db.prompt_by_title(h.guild_id, "Knight") is None

            # /forget takes a member's entries and cards.
            question = await answer(h, h.bob, "forget")
            await h.fake.click(h.bob, question, button(question, "Delete everything"))
            await h.fake.wait_until(lambda: question.content.startswith("Done."), timeout=90)
            assert "1 saved prompt (their cards too)" in question.content
            assert dragon.deleted and h.db.search_prompts(h.guild_id)[1] == 0
            assert h.fake.errors == []

    asyncio.run(scenario())


@pytest.mark.slow
def test_a_prompt_saved_in_an_age_restricted_channel_is_carded_and_drawn_only_in_one(
    shared_bot: SharedBot,
) -> None:
    async def scenario(h: BotHarness) -> None:
        h.trained_model(h.alice, "abraza")
        ix = await h.fake.slash(
            h.alice, h.nsfw_channel_id, "prompt save", title="Midnight", prompt="abraza at midnight"
        )
        saved = await ix.wait_original()
        # #prompts is not age-restricted: the card goes up where it was saved.
        card = await h.fake.wait_message(
            h.nsfw_channel_id, lambda m: bool(m.embeds) and m.embeds[0]["title"] == "Midnight"
        )
        assert str(card.id) in saved.content and cards(h, "Midnight") == []

        # Its picture would be posted in #prompts: refused, from wherever it is asked for.
        refusal = (
            "That prompt comes from an age-restricted channel, so it's only shown in age-restricted "
            f"channels, and <#{h.prompts_channel_id}> isn't one."
        )
        for channel_id in (h.nsfw_channel_id, h.general_channel_id):
            ix = await h.fake.slash(h.alice, channel_id, "prompt use", title="Midnight")
            refused = await ix.wait_original()
            assert refused.ephemeral and refused.content == refusal
        ix = await h.fake.click(h.alice, card, button(card, "Try with my face"))
        assert (await ix.wait_original()).content == refusal
        assert h.db.jobs_of(h.alice) == [] and h.fake.errors == []

    shared_bot.run(scenario)


def test_readme_and_help_describe_the_prompt_book() -> None:
    readme = " ".join(README.read_text(encoding="utf-8").split())
    for promise in (
        "Your model's name in it is saved as `[SUBJECT]`, so whoever uses it gets their own face.",
        "Each saved prompt is posted once in the prompts channel as a card with its example picture, author, "
        "note and a **Try with my face** button",
        "| `/prompt delete title` | deletes one of your saved prompts and takes its card down |",
    ):
        assert promise in readme
    assert "`/prompt use` render one with your face" in " ".join(HELP_TEXT.split())

"""/gallery and ⭐ stars, end to end: the real bot and engine (tiny model) against the fake Discord."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from botharness import (
    JOB_TIMEOUT,
    BotHarness,
    fake_discord,
    imagine,
    is_post,
    responsive_throughout,
    running_bot,
)
from fakediscord import FakeInteraction, FakeMessage, modal_text_fields, new_snowflake

from bot.cogs.gallery import message_url
from bot.db import DATABASE_FILE, MIGRATIONS

# Every test here runs the bot with an engine worker.
pytestmark = pytest.mark.slow


def page(message: FakeMessage) -> tuple[str, str]:
    """(prompt, "n / total") of a pager message."""
    embed = message.embeds[0]
    return embed["description"], embed["footer"]["text"].split(" · ")[0]


def prompt_page(message: FakeMessage) -> tuple[str, str]:
    """(title, "n / total") of a /prompt browse page."""
    embed = message.embeds[0]
    return embed["title"], embed["footer"]["text"].split(" · ")[0]


def field(message: FakeMessage, name: str) -> str:
    return next(f["value"] for f in message.embeds[0]["fields"] if f["name"] == name)


def button(message: FakeMessage, label: str) -> dict[str, Any]:
    return next(c for row in message.components for c in row["components"] if c.get("label") == label)


async def turn(h: BotHarness, user_id: int, pager: FakeMessage, label: str) -> FakeInteraction:
    ix = await h.fake.click(user_id, pager, button(pager, label)["custom_id"])
    await ix.wait_callback()
    return ix


async def gallery(h: BotHarness, user_id: int, **options: Any) -> FakeInteraction:
    return await h.fake.slash(user_id, h.general_channel_id, "gallery", **options)


def test_gallery_pages_searches_filters_and_sorts_by_stars(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_bot(tmp_path) as h:
            h.trained_model(h.alice, "abraza")
            castle = await imagine(h, h.alice, prompt="abraza at a castle")
            await imagine(h, h.alice, prompt="abraza on a beach")
            await imagine(h, h.bob, prompt="a red dragon")
            await h.fake.wait_until(
                lambda: all(h.db.generation(i).gallery_message_id for i in (1, 2, 3)), timeout=10
            )
            mirrors = {i: h.fake.message(h.db.generation(i).gallery_message_id) for i in (1, 2, 3)}

            # Newest first, one per page, with the image, stars, author and a link to the post.
            ix = await gallery(h, h.alice)
            pager = await ix.wait_original()
            assert page(pager) == ("a red dragon", "1 / 3")
            assert pager.files and pager.embeds[0]["image"]["url"].startswith("http")
            assert field(pager, "Stars") == "⭐ 0" and field(pager, "Author") == f"<@{h.bob}>"
            assert button(pager, "Previous").get("disabled") and not button(pager, "Next").get("disabled")
            dragon = h.db.generation(3)
            assert message_url(h.guild_id, h.prompts_channel_id, dragon.message_id or 0) in field(
                pager, "Original"
            )

            # Only the member who opened it turns its pages.
            stranger = await h.fake.click(h.bob, pager, button(pager, "Next")["custom_id"])
            refusal = await stranger.wait_original()
            assert refusal.ephemeral and "someone else's gallery" in refusal.content
            assert page(pager) == ("a red dragon", "1 / 3")

            await turn(h, h.alice, pager, "Next")
            assert page(pager) == ("abraza on a beach", "2 / 3")
            await turn(h, h.alice, pager, "Next")
            assert page(pager) == ("abraza at a castle", "3 / 3") and button(pager, "Next").get("disabled")
            await turn(h, h.alice, pager, "Previous")
            assert page(pager) == ("abraza on a beach", "2 / 3")

            # Search (full text), member and model filters.
            assert page(await (await gallery(h, h.alice, search="dragon")).wait_original()) == (
                "a red dragon",
                "1 / 1",
            )
            assert (
                page(await (await gallery(h, h.alice, search="CASTLE abraza")).wait_original())[1] == "1 / 1"
            )
            assert page(await (await gallery(h, h.alice, user=h.bob)).wait_original())[1] == "1 / 1"
            assert page(await (await gallery(h, h.alice, model="abraza")).wait_original())[1] == "1 / 2"
            nothing = await (await gallery(h, h.alice, search='unicorn" OR *')).wait_original()
            assert nothing.ephemeral and "No images match" in nothing.content

            # ⭐ on the gallery copies counts (not the bot's own, not other emoji); "top" sorts by it.
            h.fake.add_reaction(mirrors[1], h.bob, "⭐")
            h.fake.add_reaction(mirrors[1], h.admin, "⭐")
            h.fake.add_reaction(mirrors[2], h.alice, "⭐")
            h.fake.add_reaction(mirrors[3], h.bob, "👍")
            await h.fake.flush()
            await h.fake.wait_until(lambda: h.db.generation(1).stars == 2 and h.db.generation(2).stars == 1)
            top = await (await gallery(h, h.alice, sort="top")).wait_original()
            assert page(top) == ("abraza at a castle", "1 / 3") and field(top, "Stars") == "⭐ 2"
            await turn(h, h.alice, top, "Next")
            assert page(top) == ("abraza on a beach", "2 / 3")
            h.fake.remove_reaction(mirrors[1], h.admin, "⭐")
            await h.fake.flush()
            await h.fake.wait_until(lambda: h.db.generation(1).stars == 1)
            assert h.db.generation(3).stars == 0

            # Stars given and taken back while the bot was offline never arrive as events: the bot
            # counts them from the posts' reactions when it starts again.
            await h.stop()
            h.fake.add_reaction(mirrors[3], h.alice, "⭐", offline=True)
            h.fake.add_reaction(mirrors[3], h.admin, "⭐", offline=True)
            h.fake.remove_reaction(mirrors[1], h.bob, "⭐", offline=True)
            await h.start()
            await h.fake.wait_until(lambda: h.db.generation(3).stars == 2 and h.db.generation(1).stars == 0)
            assert h.db.generation(2).stars == 1

            # "Use prompt" from the pager, outside #prompts: the image is made and posted in #prompts.
            mine = await (await gallery(h, h.bob, search="castle")).wait_original()
            ix = await h.fake.click(h.bob, mine, button(mine, "Use prompt")["custom_id"])
            modal = await ix.wait_modal()
            text_input = modal["components"][0]["components"][0]
            assert text_input["value"] == "[SUBJECT] at a castle"  # her model is offered as his own face
            ix = await h.fake.submit_modal(
                h.bob, h.general_channel_id, modal["custom_id"], {text_input["custom_id"]: "a castle at dusk"}
            )
            queued = await ix.wait_original()
            assert queued.ephemeral and f"<#{h.prompts_channel_id}>" in queued.content
            post = await h.fake.wait_message(
                h.prompts_channel_id,
                lambda m: m.files and m.embeds[0]["description"] == "a castle at dusk",
                timeout=JOB_TIMEOUT,
            )
            assert post.allowed_mentions == {"parse": [], "users": [h.bob]} and f"<@{h.bob}>" in post.content
            assert castle.id != post.id and not h.fake.errors

    asyncio.run(scenario())


async def made(h: BotHarness, user_id: int, channel_id: int, prompt: str) -> FakeMessage:
    """/imagine in that channel; the finished post."""
    ix = await h.fake.slash(user_id, channel_id, "imagine", prompt=prompt)
    return await ix.wait_original(is_post, timeout=JOB_TIMEOUT)


async def refusal(ix: FakeInteraction) -> str:
    message = await ix.wait_original()
    assert message.ephemeral and not message.embeds and not message.files
    return message.content


def only_in_age_restricted(what: str, channel_id: int) -> str:
    return f"{what}, so it's only shown in age-restricted channels, and <#{channel_id}> isn't one."


def test_what_comes_from_age_restricted_channels_is_shown_only_in_them(tmp_path: Path) -> None:
    async def scenario() -> None:
        # /imagine anywhere, NSFW allowed by the server: then only in age-restricted channels.
        async with running_bot(tmp_path, discord={"prompts_channel": ""}, safety={"allow_nsfw": True}) as h:
            ix = await h.fake.slash(h.alice, h.general_channel_id, "imagine", prompt="a nude statue")
            refused = await ix.wait_original()
            assert refused.ephemeral and "allowed only in age-restricted channels" in refused.content

            # Pictures made in #after-dark, in a thread of it, and in #general.
            nude = await made(h, h.alice, h.nsfw_channel_id, "a nude statue")
            thread = h.fake.open_thread(h.alice, h.nsfw_channel_id, "late night")
            dusk = await made(h, h.alice, thread, "a bronze statue at dusk")
            await made(h, h.bob, h.general_channel_id, "a marble statue")
            assert [h.db.generation(i).age_restricted for i in (1, 2, 3)] == [True, True, False]

            # The gallery channel is not age-restricted: only the ordinary picture is mirrored there.
            mirror = await h.fake.wait_message(h.gallery_channel_id, lambda m: m.files, timeout=JOB_TIMEOUT)
            assert mirror.embeds[0]["description"] == "a marble statue"
            assert [m.embeds[0]["description"] for m in h.fake.messages_in(h.gallery_channel_id)] == [
                "a marble statue"
            ]
            # /gallery, browsing or searching, shows the others only in age-restricted channels, a
            # thread of one included; the bot answers everyone meanwhile.
            async with responsive_throughout(h, h.admin):
                assert page(await (await gallery(h, h.bob)).wait_original()) == ("a marble statue", "1 / 1")
                searched = await (await gallery(h, h.bob, search="statue")).wait_original()
                assert page(searched) == ("a marble statue", "1 / 1")
                for channel_id in (h.nsfw_channel_id, thread):
                    ix = await h.fake.slash(h.bob, channel_id, "gallery", search="statue")
                    assert page(await ix.wait_original()) == ("a marble statue", "1 / 3")

            # Where it was made, Info, Picture info and Use prompt show it.
            ix = await h.fake.click(h.bob, dusk, button(dusk, "Info")["custom_id"])
            info = await ix.wait_original()
            assert info.embeds[0]["title"] == "Picture info · generation #2"
            ix = await h.fake.message_command(h.bob, thread, "Picture info", dusk)
            assert (await ix.wait_original()).embeds == info.embeds
            ix = await h.fake.click(h.bob, dusk, button(dusk, "Use prompt")["custom_id"])
            assert (await ix.wait_modal())["components"][0]["components"][0][
                "value"
            ] == "a bronze statue at dusk"

            # Saved from it, the prompt's card goes up in the thread (there is no prompts channel).
            ix = await h.fake.click(h.alice, dusk, button(dusk, "Save prompt")["custom_id"])
            modal = await ix.wait_modal()
            title_field, _ = modal_text_fields(modal)
            ix = await h.fake.submit_modal(h.alice, thread, modal["custom_id"], {title_field: "Dusk"})
            assert (await ix.wait_original()).content.startswith("Saved **Dusk** to the prompt book.")
            card = await h.fake.wait_message(
                thread, lambda m: bool(m.embeds) and m.embeds[0]["title"] == "Dusk"
            )
            assert card.files
            ix = await h.fake.slash(
                h.bob, h.general_channel_id, "prompt save", title="Dragon", prompt="a dragon"
            )
            assert (await ix.wait_original()).content.startswith("Saved **Dragon**")
            dusk_entry, dragon_entry = (
                h.db.prompt_by_title(h.guild_id, "Dusk"),
                h.db.prompt_by_title(h.guild_id, "Dragon"),
            )
            assert (
                dusk_entry and dusk_entry.age_restricted and dragon_entry and not dragon_entry.age_restricted
            )

            # /prompt browse and /prompt use's titles show it only in age-restricted channels.
            ix = await h.fake.slash(h.bob, h.general_channel_id, "prompt browse")
            assert prompt_page(await ix.wait_original()) == ("Dragon", "1 / 1")
            ix = await h.fake.autocomplete(h.bob, h.general_channel_id, "prompt use", "title", "")
            await ix.wait_callback()
            assert [choice["value"] for choice in ix.choices or []] == ["Dragon"]
            ix = await h.fake.slash(h.bob, h.nsfw_channel_id, "prompt browse", sort="new")
            book = await ix.wait_original()
            assert prompt_page(book) == ("Dragon", "1 / 2")
            await turn(h, h.bob, book, "Next")
            assert prompt_page(book) == ("Dusk", "2 / 2") and book.files

            # Rendered only where its picture may be shown.
            ix = await h.fake.slash(h.bob, h.general_channel_id, "prompt use", title="Dusk")
            assert await refusal(ix) == only_in_age_restricted(
                "That prompt comes from an age-restricted channel", h.general_channel_id
            )
            ix = await h.fake.slash(h.alice, thread, "prompt use", title="Dusk")
            await ix.wait_original(is_post, timeout=JOB_TIMEOUT)
            assert len(h.db.jobs_of(h.bob)) == 1 and h.db.generation(4).age_restricted

            # A moderator lifts #after-dark's age restriction: what was made there, and in its thread,
            # still came from an age-restricted channel.
            h.fake.set_nsfw(h.nsfw_channel_id, False)
            await h.fake.wait_until(lambda: not h.bot.get_channel(h.nsfw_channel_id).is_nsfw())  # type: ignore[union-attr]
            picture = "That picture was made in an age-restricted channel"
            for user_id, post, label in (
                (h.bob, dusk, "Info"),
                (h.bob, nude, "Use prompt"),
                (h.bob, dusk, "Reroll"),
                (h.bob, nude, "Upscale"),
                (h.alice, nude, "Save prompt"),
            ):
                ix = await h.fake.click(user_id, post, button(post, label)["custom_id"])
                assert await refusal(ix) == only_in_age_restricted(picture, post.channel_id), label
            ix = await h.fake.message_command(h.bob, h.nsfw_channel_id, "Picture info", nude)
            assert await refusal(ix) == only_in_age_restricted(picture, h.nsfw_channel_id)
            assert len(h.db.jobs_of(h.bob)) == 1
            ix = await h.fake.slash(h.bob, h.nsfw_channel_id, "gallery")
            assert page(await ix.wait_original()) == ("a marble statue", "1 / 1")
            ix = await h.fake.slash(h.bob, h.nsfw_channel_id, "prompt browse")
            assert prompt_page(await ix.wait_original()) == ("Dragon", "1 / 1")
            assert h.fake.errors == []

    asyncio.run(scenario())


def test_pictures_made_before_rows_said_where_get_their_channels_age_restriction_at_start_up(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with fake_discord(tmp_path) as h:
            guild = h.fake.guilds[h.guild_id]
            chat = guild.add_thread(h.general_channel_id, "chat")
            # Archived: not among the threads Discord sends at start-up, so the bot asks for it.
            old_night = guild.add_thread(h.nsfw_channel_id, "old night", archived=True)
            deleted = new_snowflake()
            # A database of the schema before: nothing in it says which channels were age-restricted.
            h.data_dir.mkdir(parents=True)
            old = sqlite3.connect(h.data_dir / DATABASE_FILE)
            old.executescript(f"{'; '.join(MIGRATIONS[:4])}; PRAGMA user_version = 4;")
            old.execute("INSERT INTO users (id, name, created_at) VALUES (?, 'alice', 0)", [h.alice])
            pictures = {
                h.general_channel_id: "a marble statue",
                chat: "a castle",
                h.nsfw_channel_id: "a nude statue",
                old_night: "a nude dancer",
                deleted: "a statue of who knows what",
            }
            for channel_id, prompt in pictures.items():
                old.execute(
                    "INSERT INTO generations (job_id, guild_id, user_id, channel_id, prompt, seed, steps, "
                    "guidance, width, height, kind, created_at) "
                    "VALUES ('j', ?, ?, ?, ?, 1, 2, 7.5, 64, 64, 'txt2img', 0)",
                    [h.guild_id, h.alice, channel_id, prompt],
                )
            old.commit()
            old.close()

            await h.start()
            try:
                await h.fake.wait_until(lambda: not h.db.channels_without_age_restriction(), timeout=30)
                made_in = {row.channel_id: row.age_restricted for row in h.db.generations_of(h.alice)}
                # A channel deleted since may have been either: its pictures count as age-restricted.
                assert made_in == {
                    h.general_channel_id: False,
                    chat: False,
                    h.nsfw_channel_id: True,
                    old_night: True,
                    deleted: True,
                }
                # Only the channels not in the cache were asked for.
                asked = [
                    r.params["channel_id"] for r in h.fake.requests if r.matches("GET /channels/{channel_id}")
                ]
                assert sorted(asked) == sorted([str(old_night), str(deleted)])
                ordinary = await (await gallery(h, h.bob, search="statue")).wait_original()
                assert page(ordinary) == ("a marble statue", "1 / 1")
                ix = await h.fake.slash(h.bob, h.nsfw_channel_id, "gallery", search="statue")
                assert page(await ix.wait_original())[1] == "1 / 3"
                assert h.fake.errors == []
            finally:
                await h.stop()

    asyncio.run(scenario())

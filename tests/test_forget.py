"""What /forget and /model delete leave behind: no message about the member on Discord, and no byte
of her in the database files. End to end against the fake Discord, and the database on its own."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import discord
import pytest
from botharness import (
    TRAIN_TIMEOUT,
    BotHarness,
    answer,
    button,
    delete_picture,
    imagine,
    running_bot,
    start_training,
)
from fakediscord import FakeMessage

from bot.cogs.help import HELP_TEXT
from bot.db import DATABASE_FILE, Database

README = Path(__file__).resolve().parent.parent / "README.md"


def run(scenario: Coroutine[Any, Any, None]) -> None:
    asyncio.run(scenario)


def jump_url(h: BotHarness, message: FakeMessage) -> str:
    return f"https://discord.com/channels/{h.guild_id}/{message.channel_id}/{message.id}"


def deny_bot(h: BotHarness, channel_id: int, permissions: discord.Permissions) -> None:
    h.fake.guilds[h.guild_id].set_overwrite(channel_id, h.fake.bot_id, deny=permissions)


def allow_bot(h: BotHarness, channel_id: int) -> None:
    h.fake.guilds[h.guild_id].channels[channel_id].overwrites.pop(h.fake.bot_id)


def messages_naming(h: BotHarness, user_id: int) -> set[int]:
    """The ids of the bot's messages still up anywhere (channels and DMs) that ping or are sent to
    `user_id`."""
    dm_channels = {c.id for c in h.fake.dm_channels.values() if c.recipient_id == user_id}
    return {
        m.id
        for m in h.fake.messages.values()
        if m.author_id == h.fake.bot_id
        and not m.deleted
        and not m.ephemeral
        and (f"<@{user_id}>" in m.text or m.channel_id in dm_channels)
    }


def ids(*messages: FakeMessage) -> set[int]:
    return {message.id for message in messages}


async def forget(h: BotHarness, user_id: int) -> FakeMessage:
    question = await answer(h, user_id, "forget")
    await h.fake.click(user_id, question, button(question, "Delete everything"))
    await h.fake.wait_until(lambda: question.content.startswith("Done."), timeout=90)
    return question


# -- messages on Discord --------------------------------------------------------------------------


@pytest.mark.slow
def test_model_delete_and_forget_take_down_every_message_about_her(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_bot(tmp_path) as h:
            # abraza trains in #general, which stops letting the bot post: its samples go by DM.
            first = await start_training(h, h.alice, "abraza")
            deny_bot(h, h.general_channel_id, discord.Permissions(send_messages=True))
            photos = h.selfies(3)
            ix = await h.fake.slash(
                h.alice, h.nsfw_channel_id, "train", name="quorbly", subject="person",
                photo1=photos[0], photo2=photos[1], photo3=photos[2],
            )  # fmt: skip
            await ix.wait_followups(1, timeout=30)
            second = await h.fake.wait_message(
                h.nsfw_channel_id, lambda m: "Training **quorbly**" in m.content
            )
            by_dm = await h.fake.wait_dm(h.alice, lambda m: m.files, timeout=TRAIN_TIMEOUT)
            samples = await h.fake.wait_message(
                h.nsfw_channel_id,
                lambda m: m.files and "**quorbly** is ready" in m.content,
                timeout=TRAIN_TIMEOUT,
            )
            assert "**abraza** is ready" in by_dm.content
            allow_bot(h, h.general_channel_id)
            picture = await imagine(h, h.alice, prompt="quorbly as a viking")
            copy = await h.fake.wait_message(h.gallery_channel_id, lambda m: m.files, timeout=30)
            assert messages_naming(h, h.alice) == ids(first, by_dm, second, samples, picture, copy)

            # /model delete takes down that model's messages, and only those.
            question = await answer(h, h.alice, "model delete", name="abraza")
            await h.fake.click(h.alice, question, button(question, "Delete"))
            await h.fake.wait_until(lambda: "Deleted **abraza**" in question.content, timeout=30)
            assert first.deleted and by_dm.deleted
            assert question.content == "Deleted **abraza**, its samples and its training messages."
            assert messages_naming(h, h.alice) == ids(second, samples, picture, copy)

            # A moderator already deleted one by hand (404: down all the same); the bot can no longer
            # see #after-dark (403): those messages are named to her, with their links.
            h.fake.delete_message(copy)
            deny_bot(h, h.nsfw_channel_id, discord.Permissions(view_channel=True))
            done = await forget(h, h.alice)
            assert picture.deleted
            assert messages_naming(h, h.alice) == ids(second, samples)
            assert done.content.endswith(
                "Nothing of yours is left in my records.\n⚠️ Discord didn't let me delete 2 messages of mine, "
                f"as I can no longer see their channel: {jump_url(h, second)} {jump_url(h, samples)}\n"
                "Ask a server manager to delete them."
            )
            assert h.db.posts_to_forget(h.alice) == []

            # Once nothing refuses, the same answer promises the channels are clean too.
            done = await forget(h, h.bob)
            assert done.content.endswith("Nothing of yours is left in my records or in the channels.")
            assert h.fake.errors == []

    run(scenario())


@pytest.mark.slow
def test_a_picture_the_bot_can_no_longer_delete_is_named_to_the_member(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_bot(tmp_path) as h:
            picture = await imagine(h, h.alice, prompt="a lighthouse in a storm")
            copy = await h.fake.wait_message(h.gallery_channel_id, lambda m: m.files, timeout=30)
            deny_bot(h, h.prompts_channel_id, discord.Permissions(view_channel=True))
            refusal = await delete_picture(h, h.alice, picture)
            assert refusal.content == (
                f"Discord didn't let me delete {jump_url(h, picture)}: I can no longer see that channel. "
                "Ask a server manager to delete it, or to let me back in."
            )
            # Nothing was forgotten: once the bot sees the channel again, the button works.
            assert copy.deleted and not picture.deleted and h.db.generations_of(h.alice)
            allow_bot(h, h.prompts_channel_id)
            assert "Deleted" in (await delete_picture(h, h.alice, picture)).content
            assert picture.deleted and h.db.generations_of(h.alice) == []
            assert h.fake.errors == []

    run(scenario())


# -- bytes in the database files --------------------------------------------------------------------


def sqlite_varint(value: int) -> bytes:
    """`value` as SQLite writes a rowid in a cell (big-endian groups of 7 bits, 9 bytes at most)."""
    if value >= 1 << 56:
        groups = [(value >> (8 + 7 * i)) & 0x7F for i in range(8)]
        return bytes(0x80 | group for group in reversed(groups)) + bytes([value & 0xFF])
    groups = [value & 0x7F]
    while value := value >> 7:
        groups.append(value & 0x7F)
    return bytes([*(0x80 | group for group in reversed(groups[1:])), groups[0]])


def traces(path: Path, needles: dict[str, bytes]) -> dict[str, int]:
    """How often each needle occurs in the database file, its -wal and its -shm, together."""
    contents = b"".join(
        Path(f"{path}{suffix}").read_bytes() if Path(f"{path}{suffix}").exists() else b""
        for suffix in ("", "-wal", "-shm")
    )
    return {name: contents.count(needle) for name, needle in needles.items()}


def id_needles(name: str, value: int) -> dict[str, bytes]:
    """An id as text, as the 8-byte big-endian integer of a column, and as a rowid varint."""
    return {
        f"{name} (text)": str(value).encode(),
        f"{name} (integer)": struct.pack(">q", value),
        f"{name} (rowid)": sqlite_varint(value),
    }


@pytest.mark.slow
def test_forget_leaves_no_byte_of_the_member_in_the_database_files(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_bot(tmp_path, training={"max_steps": 500}) as h:
            h.trained_model(h.alice, "abraza", shared=True)
            h.trained_model(h.bob, "zorvik")
            # Her settings (a negative prompt of her own, her default model) go with her too.
            saved = await answer(h, h.alice, "settings set", model="abraza", negative="quinquiremic")
            await h.fake.wait_until(lambda: saved.content.startswith("Saved."))
            picture = await imagine(
                h, h.alice, prompt="abraza xylophonic marmalade castle", negative="gorgonzolic"
            )
            # Bob's picture with her (shared) model shows her face: it goes with her.
            with_her_face = await imagine(h, h.bob, prompt="abraza beside zorvik on a bicycle")
            bobs = await imagine(h, h.bob, prompt="zorvik bobsword lighthouse")
            progress = await start_training(h, h.alice, "quorbly")
            # Her entry in the prompt book, with its card, and bob's that names her model.
            await answer(
                h,
                h.alice,
                "prompt save",
                title="zanzibarine",
                prompt="a quixotical harbour",
                note="mellifluent",
            )
            await answer(h, h.bob, "prompt save", title="duel", prompt="abraza fights a dragon")
            hers, naming_her = (h.db.prompt_by_title(h.guild_id, title) for title in ("zanzibarine", "duel"))
            assert hers is not None and naming_her is not None and hers.prompt == "a quixotical harbour"
            cards = [h.fake.message(entry.card_message_id or 0) for entry in (hers, naming_her)]
            needles = {
                word: word.encode()
                for word in (
                    "xylophonic", "marmalade", "gorgonzolic", "quinquiremic", "abraza", "quorbly", "alice",
                    "zanzibarine", "quixotical", "mellifluent",
                )
            }  # fmt: skip
            needles |= id_needles("her user id", h.alice)
            for message in (picture, progress):
                needles |= id_needles(f"message {message.id}", message.id)
            for job in h.db.jobs_of(h.alice):
                needles[f"job {job.id}"] = job.id.encode()
            database = h.data_dir / DATABASE_FILE
            before = traces(database, needles)
            assert before["xylophonic"] and before["alice"] and before["her user id (integer)"]
            assert h.db.member_settings(h.alice).negative_prompt == "quinquiremic" and before["quinquiremic"]
            assert before["quixotical"] and before["mellifluent"]

            # The rebuild runs on a connection and thread of its own: the bot's (on the event loop)
            # never waits for it.
            on_the_loop: list[str] = []
            h.db.db.conn.set_trace_callback(on_the_loop.append)
            done = await forget(h, h.alice)
            h.db.db.conn.set_trace_callback(None)
            assert any(statement.startswith("DELETE FROM users") for statement in on_the_loop)
            assert not any(
                "VACUUM" in statement or "wal_checkpoint" in statement for statement in on_the_loop
            )
            assert {name: count for name, count in traces(database, needles).items() if count} == {}
            assert "2 models, 3 jobs, 2 pictures" in done.content
            assert h.db.db["member_settings"].count == 0 and h.db.db["default_models"].count == 0
            assert picture.deleted and with_her_face.deleted and progress.deleted and not bobs.deleted
            assert all(card.deleted for card in cards) and h.db.search_prompts(h.guild_id)[1] == 0
            # Bob's post about the picture of her face went with it; the one about his own stays.
            assert {post.job_id for post in h.db.posts_to_forget(h.bob)} == {
                job.id for job in h.db.jobs_of(h.bob)
            }
            # The search does find what is left: bob's words, model and id.
            bob = traces(database, {"word": b"bobsword", "model": b"zorvik", **id_needles("id", h.bob)})
            assert bob["word"] and bob["model"] and bob["id (integer)"] and bob["id (rowid)"]
            assert Path(f"{database}-wal").stat().st_size == 0
            assert h.fake.errors == []

    run(scenario())


def test_forget_user_leaves_no_rowid_in_the_inner_pages(tmp_path: Path) -> None:
    db = Database.in_data_dir(tmp_path)
    first = 1189325781297651712
    # Enough members that the users table has inner pages, whose divider keys are rowids: deleting a
    # row leaves its rowid there (only a rebuild of the table removes it). She is such a divider.
    for offset in range(1000):
        db.ensure_user(first + offset, f"member{offset}")
    db.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = db.path.read_bytes()
    her = next(user for user in range(first, first + 1000) if raw.count(sqlite_varint(user)) == 2)
    db.ensure_user(her, "zenobia")

    db.forget_user(her)
    db.scrub()

    assert traces(db.path, {"name": b"zenobia", **id_needles("id", her)}) == dict.fromkeys(
        ["name", "id (text)", "id (integer)", "id (rowid)"], 0
    )
    assert traces(db.path, {"neighbour": sqlite_varint(her + 1)})["neighbour"]
    assert db.db["users"].count == 999


# -- the promises -------------------------------------------------------------------------------------


def test_readme_and_help_promise_what_these_tests_check() -> None:
    readme = " ".join(README.read_text(encoding="utf-8").split())
    for promise in (
        "`/forget` deletes your training photos, models and pictures, the pictures others made with "
        "your models, and every record of you, and takes down every message the bot posted about them",
        "one in a channel the bot can no longer see is named to you with its link",
        "No byte of your prompts, names or ids is left in the database file or its WAL.",
        "`/model delete` takes down that model's samples and training messages.",
        "Your saved prompts and their cards go too, and those others saved from a picture of your face "
        "or that name your models.",
    ):
        assert promise in readme
    assert (
        "`/forget` delete everything I keep about you: your photos, models and pictures, the pictures "
        "others made with your models, your saved prompts and their cards, every message I posted about "
        "them, and every record of you"
    ) in " ".join(HELP_TEXT.split())

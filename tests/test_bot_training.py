"""Training from Discord: token rules and progress text, then /train end to end against a fake Discord."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from botharness import PHOTOS_DIR, TRAIN_TIMEOUT, BotHarness, SharedBot, files_under, running_bot
from fakediscord import FakeInteraction

from bot.cogs.training import (
    PROGRESS_EDIT_INTERVAL,
    format_duration,
    loss_trend,
    progress_bar,
    progress_status,
)
from bot.words import (
    CLASS_WORDS,
    COMMON_WORDS,
    normalize_subject,
    normalize_token,
    subject_problem,
    token_problem,
)

# -- pure logic --------------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["abraza", "zorvik7", "qx3", "a" * 20, "k9zz"])
def test_made_up_tokens_are_accepted(token: str) -> None:
    assert token_problem(token) is None


@pytest.mark.parametrize("token", ["ab", "a" * 21, "my name", "abc!", "ab-cd", "émile", ""])
def test_badly_formed_tokens_are_refused_with_the_rule(token: str) -> None:
    problem = token_problem(token)
    assert problem is not None
    assert "3 to 20 lowercase letters or digits" in problem


def test_an_all_digit_token_needs_a_letter() -> None:
    assert "at least one letter" in (token_problem("12345") or "")


@pytest.mark.parametrize("token", ["dog", "person", "king", "photo", "water", "viking", "woman", "sks"])
def test_common_and_class_words_are_refused_with_the_reason(token: str) -> None:
    problem = token_problem(token)
    assert problem is not None
    assert "common word" in problem
    assert "abraza" in problem  # the refusal suggests a made-up word


def test_the_word_list_is_large_lowercase_and_holds_the_class_words() -> None:
    assert len(COMMON_WORDS) >= 1000
    assert all(re.fullmatch(r"[a-z]+", word) for word in COMMON_WORDS)
    assert set(CLASS_WORDS) <= COMMON_WORDS
    assert "abraza" not in COMMON_WORDS


def test_tokens_and_subjects_are_normalized() -> None:
    assert normalize_token("  Abraza ") == "abraza"
    assert normalize_subject("  Golden   Retriever ") == "golden retriever"


@pytest.mark.parametrize("subject", ["person", "golden retriever", "small black dog"])
def test_subjects_of_one_to_three_words_are_accepted(subject: str) -> None:
    assert subject_problem(subject) is None


@pytest.mark.parametrize("subject", ["", "a very small black dog", "dog2", "r2-d2"])
def test_other_subjects_are_refused(subject: str) -> None:
    assert "1 to 3 lowercase words" in (subject_problem(subject) or "")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 s"),
        (42.4, "42 s"),
        (59.6, "1 min"),
        (150, "2 min"),
        (3599, "1 h"),
        (3600 + 25 * 60, "1 h 25 min"),
    ],
)
def test_durations_read_naturally(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_the_progress_bar_fills_with_the_fraction() -> None:
    assert progress_bar(0) == "░" * 20
    assert progress_bar(0.5) == "█" * 10 + "░" * 10
    assert progress_bar(1) == "█" * 20
    assert progress_bar(1.7) == "█" * 20  # never overflows


def test_the_loss_trend_is_the_newest_loss_and_its_direction() -> None:
    assert loss_trend([0.2, 0.18, 0.142]) == "loss 0.142 ↘"
    assert loss_trend([0.1, 0.12]) == "loss 0.120 ↗"
    assert loss_trend([0.1, 0.101]) == "loss 0.101 →"
    assert loss_trend([0.1]) == "loss 0.100 →"
    assert "step 3/10 (30%) · loss 0.142 ↘ · about" in progress_status("training", 3, 10, 60, [0.2, 0.142])


def test_progress_status_shows_phase_step_percent_eta_and_bar() -> None:
    text = progress_status("training", 120, 400, 95)
    first, bar = text.split("\n")
    assert first == "Training: step 120/400 (30%) · about 2 min left"
    assert bar == "`" + "█" * 6 + "░" * 14 + "`"
    assert progress_status("samples", 4, 4, 0).startswith("Drawing samples: step 4/4 (100%)\n")
    assert "left" not in progress_status("samples", 4, 4, 0)
    assert progress_status("class images", 1, 2, None).startswith(
        "Preparing reference images: step 1/2 (50%)"
    )


# -- end to end: the real bot and engine worker against the fake Discord ----------------------------

PROGRESS_MARK = "🎨 Training **"


def run(scenario: Coroutine[Any, Any, None]) -> None:
    asyncio.run(scenario)


@pytest.mark.slow
def test_train_reports_each_photo_then_posts_the_samples(shared_bot: SharedBot) -> None:
    async def scenario(h: BotHarness) -> None:
        fake = h.fake
        selfies = h.selfies(3)
        cat = fake.add_attachment("my cat.png", (PHOTOS_DIR / "chelsea.png").read_bytes(), "image/png")
        ix = await fake.slash(
            h.alice, h.general_channel_id, "train",
            name="Abraza", subject="person", photo1=selfies[0], photo2=cat, photo3=selfies[1], photo4=selfies[2],
        )  # fmt: skip
        assert (await ix.wait_callback()).json["type"] == 5  # deferred at once
        report = await ix.wait_original(timeout=30)
        assert report.ephemeral
        assert "❌ `my_cat.png`: no face found" in report.content
        assert report.content.count("✅ `selfie") == 3
        assert "Ready: 3 photos will be used for training." in report.content
        (queued,) = await ix.wait_followups(1, timeout=10)
        assert queued.ephemeral and "**abraza** is" in queued.content

        progress = await fake.wait_message(h.general_channel_id, lambda m: PROGRESS_MARK in m.content)
        assert not progress.ephemeral and f"<@{h.alice}>" in progress.content
        done = await fake.wait_message(
            h.general_channel_id, lambda m: "is ready" in m.content, timeout=TRAIN_TIMEOUT
        )
        assert done.content.startswith(f"<@{h.alice}> your model **abraza** is ready!")
        assert "`/imagine abraza as a viking`" in done.content
        # Only the member is pinged.
        assert done.allowed_mentions == {"users": [h.alice], "parse": []}
        assert [name.endswith(".png") for name, _ in done.files] == [True]

        # The progress message went from queued to done, editing no more often than every ~5 s.
        await fake.wait_until(lambda: "✅ Done" in progress.content, timeout=10)
        assert "Waiting in the queue" in progress.history[0]["content"]
        # The [training] preview_at sample was attached to it on the way.
        versions = [*progress.history, progress.payload]
        assert any(a["filename"] == "preview.png" for v in versions for a in v.get("attachments") or [])
        edits = [r.time for r in fake.requests if r.method == "PATCH" and r.message is progress]
        assert len(edits) >= 2
        assert all(b - a >= PROGRESS_EDIT_INTERVAL - 0.2 for a, b in itertools.pairwise(edits[:-1]))

        # The prepared photos are deleted once the model is trained; the adapter stays.
        await fake.wait_until(lambda: not files_under(h.data_dir / "photos"), timeout=10)
        adapters = files_under(h.data_dir / "adapters" / str(h.guild_id) / "abraza")
        assert any(path.name == "adapter.safetensors" for path in adapters)
        assert fake.errors == []

    shared_bot.run(scenario)


@pytest.mark.slow
def test_a_set_that_is_not_ok_queues_nothing_and_leaves_nothing(shared_bot: SharedBot) -> None:
    async def scenario(h: BotHarness) -> None:
        fake = h.fake
        selfie = h.selfies(1)[0]
        notes = fake.add_attachment("notes.txt", b"hello there", "text/plain")
        cup = fake.add_attachment("cup.png", (PHOTOS_DIR / "coffee.png").read_bytes(), "image/png")
        before = len(fake.messages_in(h.general_channel_id))
        # discord.py's word that the command's handler has returned: whatever it would have queued,
        # posted or left on disk, it has by then. Asked before the command, so that it cannot be missed.
        handled = asyncio.create_task(
            h.bot.wait_for(
                "app_command_completion",
                check=lambda interaction, command: (
                    interaction.guild_id == h.guild_id and command.name == "train"
                ),
                timeout=30,
            )
        )
        ix = await fake.slash(
            h.alice, h.general_channel_id, "train", name="zorvik", subject="person",
            photo1=selfie, photo2=notes, photo3=cup,
        )  # fmt: skip
        report = await ix.wait_original(timeout=30)
        await handled
        assert "✅ `selfie0.jpg`" in report.content
        assert "❌ `notes.txt`: not an image" in report.content
        assert "❌ `cup.png`: no face found" in report.content
        assert "Not ready: 1 of 3 photos accepted" in report.content
        assert ix.followups == []  # nothing was queued ...
        assert len(fake.messages_in(h.general_channel_id)) == before + 1  # ... and nothing posted
        assert h.db.models_of(h.alice) == [] and h.db.active_jobs(h.alice) == []
        assert files_under(h.data_dir / "photos") == []

    shared_bot.run(scenario)


@pytest.mark.slow
def test_photo_sets_take_turns_one_per_member_and_a_few_in_all(shared_bot: SharedBot) -> None:
    async def scenario(h: BotHarness) -> None:
        fake = h.fake
        assert h.config.intake.max_concurrent == 2
        carol = fake.guilds[h.guild_id].add_member("carol")
        limit = h.config.intake.max_bytes
        # Said to be small, but over the limit: its download stops there.
        liar = fake.add_attachment("huge.jpg", b"\xff\xd8\xff" + bytes(limit), "image/jpeg")
        liar["size"] = 1000

        def fetched(photos: list[dict[str, Any]]) -> list[bool]:
            paths = [request.path for request in fake.cdn_requests]
            return [any(f"/{photo['id']}/" in path for path in paths) for photo in photos]

        async def train(user: int, name: str, photos: list[dict[str, Any]]) -> FakeInteraction:
            options = {f"photo{number}": photo for number, photo in enumerate(photos, start=1)}
            return await fake.slash(
                user, h.general_channel_id, "train", name=name, subject="person", **options
            )

        alice_first, alice_second, bob_set, admin_set = h.selfies(2), h.selfies(2), h.selfies(2), h.selfies(2)
        bob_set.append(liar)
        fake.hold_downloads()
        try:
            first = await train(h.alice, "abraza", alice_first)
            await fake.wait_until(lambda: all(fetched(alice_first)))
            # Alice's second set waits for her first, though a turn is free ...
            second = await train(h.alice, "zorvik", alice_second)
            assert "waiting their turn" in (await second.wait_original()).content
            # ... which bob's set takes.
            bobs = await train(h.bob, "qwyxel", bob_set)
            await fake.wait_until(lambda: all(fetched(bob_set)))
            # Both turns are taken: the admin's set waits.
            admins = await train(h.admin, "quorbly", admin_set)
            assert "waiting their turn" in (await admins.wait_original()).content
            assert not any(fetched(alice_second + admin_set))
            # Everyone else is answered meanwhile.
            listing = await fake.slash(carol, h.general_channel_id, "queue")
            assert "nothing waiting" in (await listing.wait_original(timeout=3)).content
        finally:
            fake.release_downloads()

        # Every set is checked in the end, none lost.
        reports = [
            (await first.wait_original(timeout=60)).content,
            (await second.wait_followups(1, timeout=60))[0].content,
            (await bobs.wait_original(timeout=60)).content,
            (await admins.wait_followups(1, timeout=60))[0].content,
        ]
        assert all(report.count("✅ `selfie") == 2 for report in reports), reports
        assert all("Not ready: 2 of" in report for report in reports), reports
        assert f"❌ `huge.jpg`: the file is too big: over the limit of {limit // 2**20} MB" in reports[2]
        # The downloads are gone once checked.
        assert files_under(h.data_dir / "incoming") == []

    shared_bot.run(scenario)


@pytest.mark.slow
def test_name_and_limit_refusals(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_bot(tmp_path, limits={"max_models_per_user": 1}) as h:
            fake = h.fake
            h.trained_model(h.bob, "zorvik")

            async def refusal(user: int, name: str, subject: str = "person") -> str:
                ix = await fake.slash(
                    user, h.general_channel_id, "train", name=name, subject=subject, photo1=h.selfies(1)[0]
                )
                message = await ix.wait_original()
                assert message.ephemeral
                return message.content

            assert "common word" in await refusal(h.alice, "water")
            assert "made-up word like 'abraza'" in await refusal(h.alice, "king")
            assert "already taken" in await refusal(h.alice, "zorvik")
            assert "You already have a model called **zorvik**" in await refusal(h.bob, "Zorvik")
            assert "3 to 20 lowercase letters or digits" in await refusal(h.alice, "ab cd")
            assert "1 to 3 lowercase words" in await refusal(h.alice, "abraza", "a very big black dog")
            # Bob's one model is his limit in this server.
            capped = await refusal(h.bob, "qwyxel")
            assert "You already have 1 model in this server, the limit is 1" in capped
            assert h.db.active_jobs() == [] and files_under(h.data_dir / "photos") == []

    run(scenario())


@pytest.mark.slow
def test_train_on_these_photos_from_a_message(tmp_path: Path) -> None:
    async def scenario() -> None:
        limits = {"max_queued_jobs_per_user": 1}
        async with running_bot(tmp_path, training={"max_steps": 500}, limits=limits) as h:
            fake = h.fake
            post = fake.post_user_message(h.general_channel_id, h.alice, "me!", attachments=h.selfies(3))
            bare = fake.post_user_message(h.general_channel_id, h.alice, "no photos here")
            await fake.flush()

            ix = await fake.message_command(h.bob, h.general_channel_id, "Train on these photos", post)
            assert "Only your own photos" in (await ix.wait_original()).content
            ix = await fake.message_command(h.alice, h.general_channel_id, "Train on these photos", bare)
            assert "no photos attached" in (await ix.wait_original()).content

            ix = await fake.message_command(h.alice, h.general_channel_id, "Train on these photos", post)
            modal = await ix.wait_modal()
            fields = [c for row in modal["components"] for c in row.get("components", [row.get("component")])]
            name_id, subject_id = (field["custom_id"] for field in fields)
            submit = await fake.submit_modal(
                h.alice, h.general_channel_id, modal["custom_id"], {name_id: "quorbly", subject_id: "woman"}
            )
            report = await submit.wait_original(timeout=30)
            assert "Ready: 3 photos will be used for training." in report.content
            (queued,) = await submit.wait_followups(1, timeout=10)
            assert "**quorbly** is" in queued.content
            progress = await fake.wait_message(
                h.general_channel_id, lambda m: "**quorbly** (woman)" in m.content
            )

            # The training fills alice's one queue slot.
            ix = await fake.slash(
                h.alice,
                h.general_channel_id,
                "train",
                name="zorvik",
                subject="person",
                photo1=h.selfies(1)[0],
            )
            assert (
                "You already have 1 job waiting or running, the limit is 1"
                in (await ix.wait_original()).content
            )

            # Cancelled from /queue: the model and its photos go, the progress message says so.
            listing = await (await fake.slash(h.alice, h.general_channel_id, "queue")).wait_original()
            (custom_id,) = listing.custom_ids
            clicked = await fake.click(h.alice, listing, custom_id)
            assert "Cancelled: training **quorbly**" in (await clicked.wait_original()).content
            await fake.wait_until(lambda: "⏹️ Cancelled" in progress.content, timeout=30)
            await fake.wait_until(lambda: not h.db.models_of(h.alice), timeout=10)
            await fake.wait_until(lambda: not files_under(h.data_dir / "photos"), timeout=10)
            assert files_under(h.data_dir / "adapters") == []

    run(scenario())

"""A member's models and jobs: pure helpers first, then the commands end to end against a fake Discord."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from botharness import (
    BotHarness,
    SharedBot,
    answer,
    button,
    files_under,
    is_post,
    running_bot,
    start_training,
)
from fakediscord import CommandUnavailable, FakeMessage, modal_text_fields
from fakehub import FakeHub, assert_token_kept_nowhere

from bot.config import BotConfig
from bot.db import Database
from bot.storage import remove_path
from bot.views import CANCEL_TEMPLATE, CancelJobButton, describe_job
from engine.contract.config import StorageSection
from engine.contract.kohya import DIFFUSERS_ADAPTER_FILE, is_kohya_adapter
from engine.contract.protocol import GenerateJob, TrainJob, encode

# -- pure logic --------------------------------------------------------------------------------


def test_cancel_buttons_carry_the_job_id_in_a_stable_custom_id() -> None:
    button = CancelJobButton("0a1b2c3d4e5f", label="Cancel 1")
    assert button.custom_id == "dreambot:cancel:0a1b2c3d4e5f"
    match = re.fullmatch(CANCEL_TEMPLATE, button.custom_id)
    assert match is not None and match["job_id"] == "0a1b2c3d4e5f"


def test_jobs_are_described_by_model_or_prompt(tmp_path: Path) -> None:
    db = Database(tmp_path / "db.sqlite3")
    db.ensure_user(1, "alice")
    train = db.add_job(
        kind="train",
        user_id=1,
        guild_id=5,
        channel_id=6,
        payload=encode(
            TrainJob(job_id="aa", token="abraza", class_word="person", photos=["p.png"], output_dir="x")
        ),
        job_id="aa",
    )
    prompt = "abraza as a *viking* on a longship in a storm, oil painting, dramatic light, very detailed"
    generate = db.add_job(
        kind="generate",
        user_id=1,
        guild_id=5,
        channel_id=6,
        payload=encode(GenerateJob(job_id="bb", prompt=prompt, output_dir="x")),
        job_id="bb",
    )
    assert describe_job(train) == "training **abraza**"
    described = describe_job(generate)
    assert described.startswith("image “abraza as a \\*viking\\*")  # markdown escaped
    assert described.endswith("…”") and len(described) < 80


def test_remove_path_stays_inside_the_data_directory(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = BotConfig(storage=StorageSection(data_dir=str(data)))
    model = data / "adapters" / "5" / "abraza"
    (model / "samples").mkdir(parents=True)
    (model / "adapter.safetensors").write_bytes(b"x")
    (model / "samples" / "0.png").write_bytes(b"x")
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")

    assert remove_path(config, outside) == 0
    assert remove_path(config, data / ".." / "outside.txt") == 0
    assert remove_path(config, data / "adapters") == 0  # a top-level folder is never removed
    assert outside.exists() and model.exists()

    assert remove_path(config, model) == 2
    assert not (data / "adapters" / "5").exists()  # emptied parents go too ...
    assert (data / "adapters").is_dir()  # ... up to the top-level folder
    assert remove_path(config, model) == 0


# -- end to end: the real bot and engine worker against the fake Discord ----------------------------


def run(scenario: Coroutine[Any, Any, None]) -> None:
    asyncio.run(scenario)


@pytest.mark.slow
def test_models_share_export_and_publish(
    shared_bot: SharedBot,
    fake_hub: FakeHub,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.INFO)  # the bot's level (`dreambot run`); discord.py's DEBUG logs every event
    hub_token = "hf_aliceWriteToken0123456789"
    fake_hub.tokens[hub_token] = "alice"

    async def publish(h: BotHarness, repo: str) -> FakeMessage:
        ix = await h.fake.slash(h.alice, h.general_channel_id, "model publish", name="abraza", repo=repo)
        form = await ix.wait_modal()
        [field] = modal_text_fields(form)
        submitted = await h.fake.submit_modal(
            h.alice, h.general_channel_id, form["custom_id"], {field: hub_token}
        )
        return await submitted.wait_original(lambda m: m.content, timeout=60)

    async def scenario(h: BotHarness) -> None:
        model = h.trained_model(h.alice, "abraza")
        h.trained_model(h.bob, "zorvik")

        listing = await answer(h, h.alice, "models")
        assert "**abraza** (person): ready · shared: off" in listing.content
        assert "zorvik" not in listing.content
        assert "no models here yet" in (await answer(h, h.admin, "models")).content

        shared = await answer(h, h.alice, "model share", name="abraza", state="on")
        assert "anyone in this server can use it" in shared.content
        assert "shared: on" in (await answer(h, h.alice, "models")).content
        private = await answer(h, h.alice, "model share", name="abraza", state="off")
        assert "Nobody else renders your face unless you say so" in private.content
        # Another member's model is not theirs to change.
        assert (
            "no model called **abraza**"
            in (await answer(h, h.bob, "model share", name="abraza", state="on")).content
        )

        sent = await answer(h, h.alice, "model export", name="abraza")
        assert "Sent **abraza** to you by DM" in sent.content
        dm = await h.fake.wait_dm(h.alice)
        # The adapter was in the old diffusers format: converted first, then sent as it is stored now.
        adapter = Path(model.adapter_path or "")
        assert is_kohya_adapter(adapter)
        assert dm.files == [("abraza.safetensors", adapter.read_bytes())]
        for where in ("`models/Lora`", "`<lora:abraza:0.8>`", "`models/loras`", "LoraLoader"):
            assert where in dm.content
        assert "Trigger words: write `abraza person` in the prompt" in dm.content

        # Publishing: a form for the member's own token, then one private repo.
        done = await publish(h, "abraza-lora")
        assert done.ephemeral and done.content.startswith(
            f"Published **abraza** to <{fake_hub.url}/alice/abraza-lora> (private: only you see it)"
        )
        repo = fake_hub.repos["alice/abraza-lora"]
        assert repo.private and sorted(repo.files) == [
            "README.md",
            "abraza.safetensors",
            DIFFUSERS_ADAPTER_FILE,
        ]
        assert repo.files["abraza.safetensors"] == adapter.read_bytes()
        # A Hub answer nobody expected: the central handler logs it, the repo made for it goes again.
        fake_hub.fail_commit = 200
        assert "Something went wrong on my side" in (await publish(h, "abraza-2")).content
        assert "alice/abraza-2" not in fake_hub.repos and fake_hub.deleted == ["alice/abraza-2"]
        assert len(h.fake.errors) == 1
        h.fake.errors.clear()
        ix = await h.fake.slash(h.alice, h.general_channel_id, "model publish", name="abraza", repo="a/b/c")
        assert "is not a Hugging Face repo name" in (await ix.wait_original()).content
        assert_token_kept_nowhere(hub_token, h.data_dir, caplog.text, *capfd.readouterr())

        h.fake.user(h.bob).dms_open = False
        closed = await answer(h, h.bob, "model export", name="zorvik")
        assert "I couldn't DM you" in closed.content
        assert h.fake.dms_to(h.bob) == []

        ix = await h.fake.autocomplete(h.alice, h.general_channel_id, "model delete", "name", "ab")
        await ix.wait_callback()
        assert [choice["value"] for choice in ix.choices or []] == ["abraza"]
        assert h.fake.errors == []

    shared_bot.run(scenario)


@pytest.mark.slow
def test_model_delete_asks_first(shared_bot: SharedBot) -> None:
    async def scenario(h: BotHarness) -> None:
        h.trained_model(h.alice, "abraza")
        folder = h.data_dir / "adapters" / str(h.guild_id) / "abraza"

        question = await answer(h, h.alice, "model delete", name="abraza")
        assert "Delete **abraza** for good?" in question.content
        await h.fake.click(h.alice, question, button(question, "Keep it"))
        await h.fake.wait_until(lambda: "Kept: nothing was deleted." in question.content)
        assert question.components == [] and files_under(folder)

        question = await answer(h, h.alice, "model delete", name="abraza")
        await h.fake.click(h.alice, question, button(question, "Delete"))
        await h.fake.wait_until(lambda: "Deleted **abraza**" in question.content, timeout=30)
        assert not (h.data_dir / "adapters" / str(h.guild_id)).exists()
        assert "no models here yet" in (await answer(h, h.alice, "models")).content
        assert h.fake.errors == []

    shared_bot.run(scenario)


@pytest.mark.slow
def test_queue_cancel_buttons_work_after_a_restart_and_for_admins(tmp_path: Path) -> None:
    async def scenario() -> None:
        # Long trainings: they are cancelled long before they could finish.
        async with running_bot(tmp_path, training={"max_steps": 500}) as h:
            assert "nothing waiting or running" in (await answer(h, h.alice, "queue")).content
            first = await start_training(h, h.alice, "abraza")
            second = await start_training(h, h.alice, "zorvik")

            listing = await answer(h, h.alice, "queue")
            assert "1. training **abraza**" in listing.content and "2. training **zorvik**" in listing.content
            jobs = {job.request.token: job.id for job in h.db.active_jobs(h.alice)}  # type: ignore[union-attr]
            assert listing.custom_ids == [
                f"dreambot:cancel:{jobs['abraza']}",
                f"dreambot:cancel:{jobs['zorvik']}",
            ]
            # Someone else's job (force: the list is alice's ephemeral message).
            ix = await h.fake.click(h.bob, listing, listing.custom_ids[0], force=True)
            assert "That's not your job" in (await ix.wait_original()).content

            # The buttons live in their custom_ids: a new bot process still knows them.
            await h.restart()
            ix = await h.fake.click(h.alice, listing, listing.custom_ids[0])
            assert "Cancelled: training **abraza**" in (await ix.wait_original(timeout=30)).content
            await h.fake.wait_until(lambda: "⏹️ Cancelled" in first.content, timeout=60)
            ix = await h.fake.click(h.alice, listing, listing.custom_ids[0])
            assert "already finished" in (await ix.wait_original()).content

            # A server manager sees and cancels anyone's job; the member hears of it, pinged alone.
            everyone = await answer(h, h.admin, "admin queue")
            assert (
                f"<@{h.alice}> · training **zorvik**" in everyone.content and "abraza" not in everyone.content
            )
            cancelled = await answer(h, h.admin, "admin cancel", job_id=jobs["zorvik"])
            assert f"Cancelled <@{h.alice}>'s training **zorvik**" in cancelled.content
            notice = await h.fake.wait_message(
                h.general_channel_id, lambda m: "a server manager cancelled" in m.content
            )
            assert notice.allowed_mentions == {"parse": [], "users": [h.alice]}
            await h.fake.wait_until(lambda: "⏹️ Cancelled" in second.content, timeout=60)
            await h.fake.wait_until(lambda: not h.db.models_of(h.alice), timeout=30)
            await h.fake.wait_until(lambda: not files_under(h.data_dir / "photos"), timeout=30)
            assert files_under(h.data_dir / "adapters") == []
            assert "nothing waiting or running" in (await answer(h, h.alice, "queue")).content
            assert h.fake.errors == []

    run(scenario())


@pytest.mark.slow
def test_forget_leaves_no_file_or_row_behind(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_bot(tmp_path, training={"max_steps": 500}) as h:
            h.trained_model(h.alice, "abraza")
            h.trained_model(h.bob, "zorvik")
            ix = await h.fake.slash(h.alice, h.prompts_channel_id, "imagine", prompt="abraza as a viking")
            post = await ix.wait_original(is_post, timeout=120)
            mirror = await h.fake.wait_message(h.gallery_channel_id, lambda m: m.files, timeout=30)
            await start_training(h, h.alice, "quorbly")
            assert files_under(h.data_dir / "generations") and files_under(h.data_dir / "photos")
            bobs = files_under(h.data_dir / "adapters" / str(h.guild_id) / "zorvik")

            question = await answer(h, h.alice, "forget")
            await h.fake.click(h.alice, question, button(question, "Delete everything"))
            await h.fake.wait_until(lambda: question.content.startswith("Done."), timeout=90)
            assert "2 models" in question.content and "2 jobs" in question.content
            assert "1 picture (their posts and gallery copies too)" in question.content
            assert post.deleted and mirror.deleted

            assert h.db.models_of(h.alice) == [] and h.db.active_jobs(h.alice) == []
            assert h.db.search_generations(h.guild_id, user_id=h.alice, limit=10) == ([], 0)
            assert files_under(h.data_dir / "photos") == []
            assert files_under(h.data_dir / "generations") == []
            assert files_under(h.data_dir / "adapters") == bobs  # only bob's model is left
            assert "no models here yet" in (await answer(h, h.alice, "models")).content
            assert h.fake.errors == []

    run(scenario())


@pytest.mark.slow
def test_admin_commands_need_manage_server(shared_bot: SharedBot) -> None:
    async def scenario(h: BotHarness) -> None:
        # Discord hides the commands from members; one who calls them anyway is refused by the bot.
        with pytest.raises(CommandUnavailable):
            await h.fake.slash(h.alice, h.general_channel_id, "admin limits")
        for command in ("admin queue", "admin limits"):
            ix = await h.fake.slash(h.alice, h.general_channel_id, command, force=True)
            assert "Only server managers" in (await ix.wait_original()).content
        ix = await h.fake.slash(h.alice, h.general_channel_id, "admin cancel", job_id="abc", force=True)
        assert "Only server managers" in (await ix.wait_original()).content

        shown = await answer(h, h.admin, "admin limits")
        assert (
            "jobs waiting or running at once: **3**" in shown.content
            and "jobs in every server count" in shown.content
            and "models kept: **3**" in shown.content
        )
        changed = await answer(h, h.admin, "admin limits", max_models=1, max_queued_jobs=2)
        assert "Limits updated" in changed.content
        assert "at once: **2**" in changed.content and "models kept: **1**" in changed.content
        assert "**2**" in (await answer(h, h.admin, "admin limits")).content
        assert "Nothing is waiting or running" in (await answer(h, h.admin, "admin queue")).content
        assert "no job `abc`" in (await answer(h, h.admin, "admin cancel", job_id="abc")).content

        # The new limit applies to /train at once.
        h.trained_model(h.alice, "abraza")
        refusal = await answer(h, h.alice, "train", name="zorvik", subject="person", photo1=h.selfies(1)[0])
        assert "the limit is 1" in refusal.content
        assert h.fake.errors == []

    shared_bot.run(scenario)


@pytest.mark.slow
def test_help(shared_bot: SharedBot) -> None:
    async def scenario(h: BotHarness) -> None:
        text = (await answer(h, h.bob, "help")).text
        for part in (
            "How it works",
            "/train",
            "Train on these photos",
            "/queue",
            "/forget",
            "Tips for good photos",
            "`/model publish` to your own Hugging Face account (private by default)",
        ):
            assert part in text

    shared_bot.run(scenario)

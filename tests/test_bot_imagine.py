"""/imagine and its buttons: the pure helpers here, end to end through the fake Discord below."""

from __future__ import annotations

import asyncio
import io
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from botharness import (
    JOB_TIMEOUT,
    BotHarness,
    SharedBot,
    button,
    delete_picture,
    imagine,
    is_post,
    running_bot,
)
from fakediscord import FakeInteraction, FakeMessage
from PIL import Image

from bot.cogs.imagine import base_size, generation_view, make_grid
from bot.db import GenerationRow, new_job_id
from bot.views import GRID_FILE, generation_embed, post_image
from engine.contract import prompt_syntax
from engine.contract.protocol import GenerateJob, GenerationDone, encode


def _row(tmp_path: Path, **changes: Any) -> GenerationRow:
    values: dict[str, Any] = {
        "id": 7,
        "job_id": "abc123",
        "guild_id": 1,
        "user_id": 42,
        "channel_id": 2,
        "prompt": "abraza as *thor*",
        "negative_prompt": "lowres",
        "seed": 1234,
        "steps": 20,
        "guidance": 7.5,
        "width": 64,
        "height": 96,
        "tokens": ["abraza"],
        "files": [],
        "kind": "txt2img",
        "parent_id": None,
        "message_id": None,
        "gallery_message_id": None,
        "stars": 0,
        "created_at": time.time(),
    }
    return GenerationRow(**{**values, **changes})


def _images(folder: Path, count: int, size: tuple[int, int] = (64, 96)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"{index}.png"
        Image.new("RGB", size, (60 * index, 10, 200)).save(path)
        paths.append(path)
    return paths


# -- pure helpers --------------------------------------------------------------------------------


def test_make_grid_puts_four_images_two_a_row(tmp_path: Path) -> None:
    paths = _images(tmp_path, 4)
    grid = make_grid(paths, tmp_path / GRID_FILE)
    with Image.open(grid) as image:
        assert image.format == "PNG"
        assert image.size == (128, 192)
        # Each cell holds its own image: the red channel tells them apart.
        assert [image.getpixel((x, y))[0] for x, y in [(5, 5), (70, 5), (5, 100), (70, 100)]] == [
            0,
            60,
            120,
            180,
        ]


@pytest.mark.parametrize(("count", "size"), [(2, (128, 96)), (3, (128, 192))])
def test_make_grid_for_two_and_three(tmp_path: Path, count: int, size: tuple[int, int]) -> None:
    with Image.open(make_grid(_images(tmp_path, count), tmp_path / GRID_FILE)) as image:
        assert image.size == size


def test_post_image_is_the_only_image_or_the_grid(tmp_path: Path) -> None:
    data_dir = tmp_path
    folder = data_dir / "generations" / "abc123"
    single = _images(folder, 1)
    assert post_image(_row(tmp_path, files=[str(single[0])])) == single[0]
    several = _row(tmp_path, files=[str(path) for path in _images(folder, 2)])
    assert post_image(several) is None  # no grid made yet
    make_grid([Path(path) for path in several.files], folder / GRID_FILE)
    assert post_image(several) == folder / GRID_FILE
    assert post_image(_row(tmp_path, files=[])) is None


def test_base_size_halves_an_upscale(tmp_path: Path) -> None:
    assert base_size(_row(tmp_path)) == (64, 96)
    assert base_size(_row(tmp_path, kind="upscale", width=128, height=192)) == (64, 96)


def test_generation_view_custom_ids_carry_the_generation(tmp_path: Path) -> None:
    four = generation_view(_row(tmp_path, files=["a", "b", "c", "d"]))
    custom_ids = [item.custom_id for item in four.children]  # type: ignore[attr-defined]
    assert custom_ids == [
        "dreambot:reroll:7",
        "dreambot:prompt:7",
        "dreambot:info:7",
        "dreambot:delete:7",
        *(f"dreambot:vary:7:{index}" for index in range(4)),
        *(f"dreambot:upscale:7:{index}" for index in range(4)),
        "dreambot:saveprompt:7",
    ]
    labels = [item.item.label for item in four.children]  # type: ignore[attr-defined]
    assert labels[:4] == ["Reroll", "Use prompt", "Info", "Delete"]
    assert labels[4:] == ["V1", "V2", "V3", "V4", "U1", "U2", "U3", "U4", "Save prompt"]
    # A row of its own: Discord allows five buttons a row, and the V and U rows are full.
    assert four.children[-1].item.row == 3  # type: ignore[attr-defined]
    assert four.timeout is None

    one = generation_view(_row(tmp_path, files=["a"]))
    assert [item.item.label for item in one.children][4:] == ["Variations", "Upscale", "Save prompt"]  # type: ignore[attr-defined]
    upscaled = generation_view(_row(tmp_path, files=["a"], kind="upscale"))
    labels = [item.item.label for item in upscaled.children]  # type: ignore[attr-defined]
    assert labels == ["Reroll", "Use prompt", "Info", "Delete", "Save prompt"]  # no V and U of an upscale


def test_generation_embed_shows_prompt_seed_model(tmp_path: Path) -> None:
    embed = generation_embed(_row(tmp_path), "dreambot-7.png")
    fields = {field.name: field.value for field in embed.fields}
    assert embed.description == "abraza as \\*thor\\*"
    assert fields["Seed"] == "1234" and fields["Model"] == "abraza" and fields["Author"] == "<@42>"
    assert embed.image.url == "attachment://dreambot-7.png"
    assert generation_embed(_row(tmp_path, tokens=[]), None).fields[1].value == "base model"


# -- end to end: the real bot, a real engine on the tiny model, the fake Discord ----------------------


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def image_size(message: FakeMessage, index: int = 0) -> tuple[int, int]:
    with Image.open(io.BytesIO(message.files[index][1])) as image:
        return image.size


def field(message: FakeMessage, name: str) -> str:
    return next(f["value"] for f in message.embeds[0]["fields"] if f["name"] == name)


async def click_for_post(h: BotHarness, user_id: int, message: FakeMessage, custom_id: str) -> FakeMessage:
    ix = await h.fake.click(user_id, message, custom_id)
    # The post, not a preview on the way (a slow machine shows some): only the post has an embed.
    return await ix.wait_original(is_post, timeout=JOB_TIMEOUT)


async def refusal(ix: FakeInteraction) -> str:
    message = await ix.wait_original()
    assert message.ephemeral
    return message.content


async def deliver_flagged(h: BotHarness, cog: Any, prompt: str, nsfw: list[bool]) -> list[str]:
    """Hand the cog a finished job as the engine would, with `nsfw` flags from its safety checker."""
    job_id = new_job_id()
    folder = h.data_dir / "generations" / job_id
    files = [str(path) for path in _images(folder, len(nsfw), (64, 64))]
    request = GenerateJob(job_id=job_id, prompt=prompt, output_dir=str(folder), seed=7, count=len(nsfw))
    job = h.db.add_job(
        kind="generate",
        user_id=h.alice,
        guild_id=h.guild_id,
        channel_id=h.prompts_channel_id,
        payload=encode(request),
        job_id=job_id,
        context={"parent_id": None},
    )
    # Finished already: the queue must not run it.
    job = h.db.update_job(job.id, state="done")
    seeds = [7 + index for index in range(len(nsfw))]
    parameters = [f"parameters {index}" for index in range(len(nsfw))]
    await cog.on_generation_finished(job, GenerationDone(job_id, files, seeds, parameters, nsfw, 0.1))
    return files


@pytest.mark.slow
def test_imagine_posts_a_grid_mirrors_it_and_every_button_works(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_bot(tmp_path) as h:
            h.trained_model(h.alice, "abraza")
            h.trained_model(h.bob, "zorblat")

            post = await imagine(h, h.alice, prompt="abraza as thor", count=4, seed=42)
            # One 2x2 grid of 64 px images, the prompt, seed and model, and every button.
            assert len(post.files) == 1 and image_size(post) == (128, 128)
            assert post.embeds[0]["description"] == "abraza as thor"
            assert field(post, "Seed") == "42" and field(post, "Model") == "abraza"
            assert post.custom_ids[:4] == [
                "dreambot:reroll:1",
                "dreambot:prompt:1",
                "dreambot:info:1",
                "dreambot:delete:1",
            ]
            assert [c for c in post.custom_ids if ":vary:" in c or ":upscale:" in c] == [
                *(f"dreambot:vary:1:{i}" for i in range(4)),
                *(f"dreambot:upscale:1:{i}" for i in range(4)),
            ]
            # Only the author is pinged.
            assert post.allowed_mentions == {"parse": [], "users": [h.alice]}
            row = await h.fake.wait_until(
                lambda: h.db.generation(1).message_id == post.id and h.db.generation(1)
            )
            assert len(row.files) == 4 and row.seed == 42 and row.tokens == ["abraza"]

            gallery = await h.fake.wait_message(h.gallery_channel_id, lambda m: m.files)
            assert gallery.allowed_mentions == {"parse": []}
            assert f"<@{h.alice}>" in gallery.content
            assert str(post.id) in field(gallery, "Original") and image_size(gallery) == (128, 128)
            await h.fake.wait_until(lambda: h.db.generation(1).gallery_message_id == gallery.id)
            await h.fake.wait_until(lambda: gallery.reactions.get("⭐") == [h.fake.bot_id])

            # Reroll: the same prompt, a new seed, a new post.
            rerolled = await click_for_post(h, h.alice, post, "dreambot:reroll:1")
            assert rerolled.id != post.id and rerolled.embeds[0]["description"] == "abraza as thor"
            assert field(rerolled, "Seed") != "42" and image_size(rerolled) == (128, 128)

            # V2: one image from the second picture, with its own Variations and Upscale buttons.
            varied = await click_for_post(h, h.alice, post, "dreambot:vary:1:1")
            variation = h.db.generation(int(varied.custom_ids[0].rsplit(":", 1)[1]))
            assert variation.kind == "variation" and variation.parent_id == 1
            assert image_size(varied) == (64, 64) and varied.embeds[0]["title"] == "Variation"
            assert f"dreambot:vary:{variation.id}:0" in varied.custom_ids

            # U1: twice the size; an upscale has no further V/U buttons.
            upscaled = await click_for_post(h, h.alice, post, "dreambot:upscale:1:0")
            assert image_size(upscaled) == (128, 128) and upscaled.embeds[0]["title"] == "Upscaled"
            assert not [c for c in upscaled.custom_ids if ":vary:" in c or ":upscale:" in c]

            # Use prompt, by bob: alice's token is offered as [SUBJECT] (his face goes in), and it runs as his.
            ix = await h.fake.click(h.bob, post, "dreambot:prompt:1")
            modal = await ix.wait_modal()
            text_input = modal["components"][0]["components"][0]
            assert text_input["value"] == "[SUBJECT] as thor"
            ix = await h.fake.submit_modal(
                h.bob, h.prompts_channel_id, modal["custom_id"], {text_input["custom_id"]: "zorblat as loki"}
            )
            bobs = await ix.wait_original(is_post, timeout=JOB_TIMEOUT)
            assert bobs.embeds[0]["description"] == "zorblat as loki" and field(bobs, "Model") == "zorblat"
            assert bobs.allowed_mentions == {"parse": [], "users": [h.bob]}

            # Delete: refused to a stranger, allowed to the author (post, gallery copy, row and files).
            ix = await h.fake.click(h.bob, post, "dreambot:delete:1")
            assert "Only the member who made this image" in await refusal(ix)
            assert not post.deleted and h.db.find_generation(1) is not None
            folder = h.data_dir / "generations" / row.job_id
            assert folder.is_dir()
            # Asked first: "Keep it" keeps everything.
            ix = await h.fake.click(h.alice, post, "dreambot:delete:1")
            question = await ix.wait_original(lambda m: bool(m.components))
            await h.fake.click(h.alice, question, button(question, "Keep it"))
            await ix.wait_original(lambda m: m.content == "Kept: nothing was deleted.")
            assert not post.deleted and h.db.find_generation(1) is not None and folder.is_dir()
            deleted = await delete_picture(h, h.alice, post)
            assert (
                deleted.ephemeral
                and deleted.content == "Deleted: the post, its gallery copy and the image files."
            )
            assert post.deleted and gallery.deleted
            assert h.db.find_generation(1) is None and not folder.exists()
            # A server manager may delete anyone's.
            bobs_id = int(bobs.custom_ids[0].rsplit(":", 1)[1])
            assert bobs.custom_ids[3] == f"dreambot:delete:{bobs_id}"
            await delete_picture(h, h.admin, bobs)
            assert bobs.deleted and h.db.find_generation(bobs_id) is None
            # The variation made from the deleted image stays; only its link to the parent is cleared.
            assert h.db.generation(variation.id).parent_id is None
            assert not h.fake.errors

    run(scenario)


@pytest.mark.slow
def test_imagine_refusals(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_bot(tmp_path, safety={"blocked_words": ["gore"], "allow_nsfw": True}) as h:
            h.trained_model(h.bob, "zorblat")

            ix = await h.fake.slash(h.alice, h.general_channel_id, "imagine", prompt="a castle")
            assert f"<#{h.prompts_channel_id}>" in await refusal(ix)

            ix = await h.fake.slash(h.alice, h.prompts_channel_id, "imagine", prompt="zorblat as a pirate")
            text = await refusal(ix)
            assert "zorblat" in text and "hasn't shared it" in text

            ix = await h.fake.slash(h.alice, h.prompts_channel_id, "imagine", prompt="a castle, GORE")
            assert "gore" in await refusal(ix)
            # A1111's prompt language: what does not read is refused, saying what and where.
            for prompt, problem in (
                ("a castle (at dusk", "I can't read your prompt: “(” in “(at dusk” is never closed"),
                ("a castle, (towers:50)", "the weight 50 in “(towers:50)” is outside 0 to 2"),
                ("a castle <lora:nobody:0.5>", "`<lora:nobody>` names no trained model in this server"),
            ):
                ix = await h.fake.slash(h.alice, h.prompts_channel_id, "imagine", prompt=prompt)
                assert problem in await refusal(ix)
            ix = await h.fake.slash(
                h.alice, h.prompts_channel_id, "imagine", prompt="a castle", negative="[blurry"
            )
            assert "I can't read your negative prompt: “[” in “[blurry” is never closed" in await refusal(ix)
            # NSFW is allowed on this server, but #prompts is not age-restricted.
            ix = await h.fake.slash(h.alice, h.prompts_channel_id, "imagine", prompt="a nude statue")
            assert "age-restricted" in await refusal(ix)

            # The queue cap, here lowered by an admin setting: a job left running fills alice's one slot.
            h.db.set_setting(h.guild_id, "max_queued_jobs_per_user", 1)
            h.db.ensure_user(h.alice, "alice")
            stuck = h.db.add_job(
                kind="generate", user_id=h.alice, guild_id=h.guild_id, channel_id=0, payload="{}"
            )
            h.db.update_job(stuck.id, state="running")
            ix = await h.fake.slash(h.alice, h.prompts_channel_id, "imagine", prompt="a castle")
            assert "the limit is 1" in await refusal(ix)
            h.db.update_job(stuck.id, state="done")
            assert not any(m.files for m in h.fake.messages_in(h.prompts_channel_id))

            share = await h.fake.slash(h.bob, h.prompts_channel_id, "model share", name="zorblat", state="on")
            await share.wait_original()
            # A model shared with her, at the weight of her tag: the PNG keeps the tag as she typed it.
            post = await imagine(
                h, h.alice, prompt="zorblat as a (pirate:1.2) <lora:zorblat:0.5>", aspect="portrait"
            )
            assert field(post, "Model") == "zorblat" and image_size(post) == (64, 96)
            row = h.db.generation(int(post.custom_ids[0].rsplit(":", 1)[1]))
            request = h.db.job(row.job_id).request
            assert [(a.token, a.weight) for a in request.adapters] == [("zorblat", 0.5)]
            with Image.open(io.BytesIO(post.files[0][1])) as image:
                written = image.text["parameters"].splitlines()[0]
            assert written == "zorblat person as a (pirate:1.2) <lora:zorblat:0.5>"
            assert post.allowed_mentions == {"parse": [], "users": [h.alice]}
            assert not h.fake.errors

    run(scenario)


@pytest.mark.slow
def test_late_results_errors_and_buttons_after_a_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_bot(tmp_path) as h:
            h.trained_model(h.alice, "abraza")
            post = await imagine(h, h.alice, prompt="abraza in the rain")

            # A job whose interaction has expired is posted in the channel, pinging its author,
            # and its "queued" message goes away.
            # (load_extension executes the module afresh: patch the copy the bot runs.)
            loaded = sys.modules[type(h.bot.get_cog("Imagine")).__module__]
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(loaded, "INTERACTION_LIFETIME", 0)
                ix = await h.fake.slash(h.alice, h.prompts_channel_id, "imagine", prompt="abraza on mars")
                late = await h.fake.wait_message(
                    h.prompts_channel_id, lambda m: m.files and m.interaction is None, timeout=JOB_TIMEOUT
                )
            assert late.embeds[0]["description"] == "abraza on mars"
            assert (
                late.allowed_mentions == {"parse": [], "users": [h.alice]} and f"<@{h.alice}>" in late.content
            )
            await h.fake.wait_until(lambda: ix.original is not None and ix.original.deleted)

            # An engine error reaches the member, naming only them.
            broken = h.db.add_model(
                guild_id=h.guild_id, owner_id=h.alice, token="ghosty", class_word="person"
            )
            missing = h.data_dir / "adapters" / str(h.guild_id) / "ghosty" / "adapter.safetensors"
            h.db.update_model(broken.id, state="ready", adapter_path=str(missing))
            ix = await h.fake.slash(h.alice, h.prompts_channel_id, "imagine", prompt="ghosty as a knight")
            failed = await ix.wait_original(lambda m: "couldn't make" in m.content, timeout=JOB_TIMEOUT)
            assert failed.allowed_mentions == {"parse": [], "users": [h.alice]}
            assert not failed.files and not failed.custom_ids

            # Pictures the engine's safety checker flagged are never posted, and their files are deleted.
            cog = h.bot.get_cog("Imagine")
            posted = await deliver_flagged(h, cog, "abraza at noon", [True, False])
            message = await h.fake.wait_message(h.prompts_channel_id, lambda m: "hid 1 picture" in m.content)
            assert len(message.files) == 1 and image_size(message) == (64, 64)
            assert not Path(posted[0]).exists() and Path(posted[1]).exists()
            row = h.db.generation(int(message.custom_ids[0].rsplit(":", 1)[1]))
            assert row.files == [posted[1]] and row.parameters == ["parameters 1"]
            posted = await deliver_flagged(h, cog, "abraza at midnight", [True, True])
            await h.fake.wait_message(
                h.prompts_channel_id, lambda m: "flagged 2 pictures as NSFW" in m.content
            )
            assert not Path(posted[0]).parent.exists()
            assert not any("midnight" in m.text for m in h.fake.messages_in(h.prompts_channel_id))

            # After a restart the buttons of an old post still work: their state is in the custom_id.
            await h.restart()
            rerolled = await click_for_post(h, h.alice, post, "dreambot:reroll:1")
            assert rerolled.embeds[0]["description"] == "abraza in the rain"
            ix = await h.fake.click(h.bob, post, "dreambot:delete:1")
            assert "Only the member who made this image" in await refusal(ix)
            assert not h.fake.errors

    run(scenario)


@pytest.mark.slow
def test_settings_and_templates(shared_bot: SharedBot) -> None:
    async def scenario(h: BotHarness) -> None:
        h.trained_model(h.alice, "quorbly")
        h.trained_model(h.alice, "abraza")
        # Bob has no model yet: [me] points him to /train.
        ix = await h.fake.slash(h.bob, h.prompts_channel_id, "imagine", prompt="[me] as a viking")
        assert "you have no trained model in this server yet: teach me your face with `/train`" in (
            await refusal(ix)
        )
        ix = await h.fake.slash(h.alice, h.prompts_channel_id, "imagine", prompt="[me] as thor by [ARTIST]")
        assert await refusal(ix) == (
            "Your prompt is a template: replace [ARTIST] with an artist's name, then send it again."
        )

        ix = await h.fake.slash(
            h.alice, h.general_channel_id, "settings set", model="quorbly", aspect="portrait", steps=3,
            guidance=4.5, negative="soggy fog", count=2, gallery=False,
        )  # fmt: skip
        saved = await ix.wait_original(lambda m: m.content.startswith("Saved."))
        for line in ("Model for [SUBJECT] and [me] in this server: **quorbly** (chosen)", "Aspect: portrait",
                     "Steps: 3", "Guidance: 4.5", "Pictures at a time: 2", "Negative prompt: soggy fog",
                     "Gallery: your pictures stay out"):  # fmt: skip
            assert line in saved.content.splitlines()
        ix = await h.fake.slash(h.alice, h.general_channel_id, "settings show")
        shown = await ix.wait_original(lambda m: m.content.startswith("**Your settings**"))
        assert shown.ephemeral and shown.content == saved.content.removeprefix("Saved.\n")

        # /imagine without options: her settings, and [me] is her chosen model (not her newest).
        post = await imagine(h, h.alice, prompt="[me] as a viking")
        row = h.db.generation(int(post.custom_ids[0].rsplit(":", 1)[1]))
        request = h.db.job(row.job_id).request
        assert (request.steps, request.guidance, request.count) == (3, 4.5, 2)
        assert (request.width, request.height) == (64, 96) and request.negative_prompt.endswith(", soggy fog")
        assert request.prompt == "quorbly person as a viking"
        assert [adapter.token for adapter in request.adapters] == ["quorbly"]
        assert row.template == "[me] as a viking" and field(post, "Model") == "quorbly"

        # Bob (now with a model) reuses her picture: [SUBJECT] is offered, and his face goes in.
        h.trained_model(h.bob, "zorblat")
        ix = await h.fake.click(h.bob, post, button(post, "Use prompt"))
        modal = await ix.wait_modal()
        text_input = modal["components"][0]["components"][0]
        assert text_input["value"] == "[SUBJECT] as a viking"
        ix = await h.fake.submit_modal(
            h.bob,
            h.prompts_channel_id,
            modal["custom_id"],
            {text_input["custom_id"]: text_input["value"]},
        )
        bobs = await ix.wait_original(is_post, timeout=JOB_TIMEOUT)
        bobs_row = h.db.generation(int(bobs.custom_ids[0].rsplit(":", 1)[1]))
        bobs_request = h.db.job(bobs_row.job_id).request
        assert bobs_request.prompt == "zorblat person as a viking"
        assert [adapter.token for adapter in bobs_request.adapters] == ["zorblat"]
        assert bobs_row.template == "[SUBJECT] as a viking"

        # Bob's picture goes to the gallery; hers, posted before it, stayed out.
        copy = await h.fake.wait_message(h.gallery_channel_id, lambda m: m.files)
        assert f"<@{h.bob}>" in copy.content
        assert [m.id for m in h.fake.messages_in(h.gallery_channel_id) if m.files] == [copy.id]
        assert h.db.generation(row.id).gallery_message_id is None
        assert not h.fake.errors

    shared_bot.run(scenario)


@pytest.mark.slow
def test_a_slow_render_shows_previews_before_the_picture(tmp_path: Path) -> None:
    async def scenario() -> None:
        # 150 steps on the tiny model take several seconds: long enough for a preview or more.
        async with running_bot(tmp_path, generation={"steps": 150}) as h:
            started = time.monotonic()
            ix = await h.fake.slash(h.alice, h.prompts_channel_id, "imagine", prompt="a lighthouse")
            post = await ix.wait_original(lambda m: m.embeds and m.files, timeout=JOB_TIMEOUT)
            elapsed = time.monotonic() - started
            previews = [
                version
                for version in post.history
                if "🎨 step " in (version.get("content") or "") and version.get("attachments")
            ]
            assert previews, [version.get("content") for version in post.history]
            assert all(v["attachments"][0]["filename"] == "preview.jpg" for v in previews)
            assert "/150" in previews[0]["content"]
            # At most one preview edit every 2 s.
            assert len(previews) <= elapsed / 2 + 1
            # The final picture replaced the preview.
            assert [a["filename"] for a in post.attachments] != ["preview.jpg"]
            assert "step" not in post.content
            assert not h.fake.errors

    run(scenario)


def test_one_imagine_parses_its_prompt_once_on_the_bot_side(
    shared_bot: SharedBot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its checks read one parse (prompt_syntax shares it); its row is read back without parsing it
    again, whether to send it, to check its models at each event, or to keep its pictures."""
    prompt = f"a quillwort castle {time.monotonic_ns()}"
    parses: list[str] = []
    attention_sections = prompt_syntax._attention_sections

    def counting(text: str) -> tuple[tuple[prompt_syntax.Fragment, ...], ...]:
        if text == prompt:
            parses.append(text)
        return attention_sections(text)

    monkeypatch.setattr(prompt_syntax, "_attention_sections", counting)

    async def scenario(h: BotHarness) -> None:
        post = await imagine(h, h.alice, prompt=prompt)
        assert post.embeds[0]["description"] == prompt

    shared_bot.run(scenario)
    assert len(parses) == 1

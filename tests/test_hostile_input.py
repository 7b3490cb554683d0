"""What any member may send, or any engine may answer, and still the bot answers everyone (issue 17)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from botharness import JOB_TIMEOUT, BotHarness, SharedBot, answer, button, responsive_throughout
from fakediscord import FakeMessage

from bot.prompts import MAX_COMMAND_STEPS
from bot.storage import generation_dir


def test_chat_that_mentions_the_bot_is_no_command_no_error_and_no_reply(shared_bot: SharedBot) -> None:
    async def scenario(h: BotHarness) -> None:
        mark = h.fake.mark()
        async with responsive_throughout(h, h.alice):
            for content in (f"<@{h.fake.bot_id}> hello!", f"<@{h.fake.bot_id}> imagine me as thor", "hi all"):
                h.fake.post_user_message(h.general_channel_id, h.bob, content)
            await h.fake.flush()
        # The /queue that ends the block was answered after the messages were handled, in order.
        assert h.fake.errors == []
        assert [r.route for r in h.fake.requests[mark:] if r.interaction is None] == []

    shared_bot.run(scenario)


def test_a_prompt_of_breaks_is_refused_up_front_saying_the_limit(shared_bot: SharedBot) -> None:
    async def scenario(h: BotHarness) -> None:
        async with responsive_throughout(h, h.alice):
            ix = await h.fake.slash(h.bob, h.prompts_channel_id, "imagine", prompt="me " + "BREAK " * 165)
            refusal = await ix.wait_original(timeout=30)
        assert refusal.ephemeral and "I draw at most 8" in refusal.content
        assert "165 chunks of 75 tokens" in refusal.content
        assert h.db.count_active_jobs(h.bob) == 0

    shared_bot.run(scenario)


async def _withdrawn_while_waiting(h: BotHarness, withdraw: Callable[[], Awaitable[object]]) -> FakeMessage:
    """bob asks for alice's shared model while the engine draws alice's slow picture; `withdraw` runs
    while his waits. His answer, once his job has ended."""
    slow = await h.fake.slash(
        h.alice, h.prompts_channel_id, "imagine", prompt="a castle", steps=MAX_COMMAND_STEPS
    )
    await slow.wait_original(lambda m: m.content == "🎨 Drawing…", timeout=JOB_TIMEOUT)
    asked = await h.fake.slash(h.bob, h.prompts_channel_id, "imagine", prompt="abraza as thor")
    await asked.wait_original(timeout=30)
    job = h.db.active_jobs(h.bob)[0]
    await withdraw()
    await h.bot.jobs.wait_finished([job.id], timeout=JOB_TIMEOUT)
    await slow.wait_original(lambda m: m.files, timeout=JOB_TIMEOUT)
    return await asked.wait_original(lambda m: "couldn't make your image" in m.content, timeout=30)


def _pictures_of(h: BotHarness, user_id: int) -> list[FakeMessage]:
    return [
        message
        for channel in (h.prompts_channel_id, h.gallery_channel_id)
        for message in h.fake.messages_in(channel)
        if message.files and f"<@{user_id}>" in message.content
    ]


def test_a_model_withdrawn_while_a_picture_with_it_waits_is_never_drawn_posted_or_named_by_path(
    shared_bot: SharedBot,
) -> None:
    async def scenario(h: BotHarness) -> None:
        model = h.trained_model(h.alice, "abraza", shared=True)

        async def stop_sharing() -> None:
            assert (
                "is private" in (await answer(h, h.alice, "model share", name="abraza", state="off")).content
            )

        answer_after_unsharing = await _withdrawn_while_waiting(h, stop_sharing)
        assert answer_after_unsharing.content == (
            f"<@{h.bob}> I couldn't make your image: the owner of “abraza” stopped sharing it before your "
            "picture was drawn."
        )
        h.db.update_model(model.id, shared=1)

        async def delete_model() -> None:
            question = await answer(h, h.alice, "model delete", name="abraza")
            await h.fake.click(h.alice, question, button(question, "Delete"))
            await h.fake.wait_until(lambda: h.db.model_by_token(h.guild_id, "abraza") is None)

        answer_after_deleting = await _withdrawn_while_waiting(h, delete_model)
        assert answer_after_deleting.content == (
            f"<@{h.bob}> I couldn't make your image: the model “abraza” was deleted before your picture was drawn."
        )
        assert (
            _pictures_of(h, h.bob) == [] and len(_pictures_of(h, h.alice)) == 4
        )  # 2 posts, 2 gallery copies
        rows, _ = h.db.search_generations(h.guild_id, limit=10)
        assert [row.user_id for row in rows] == [h.alice, h.alice]
        bobs_jobs = h.db.jobs_of(h.bob)
        assert [job.state for job in bobs_jobs] == ["failed", "failed"]
        assert not any(generation_dir(h.config, job.id).exists() for job in bobs_jobs)

    shared_bot.run(scenario)

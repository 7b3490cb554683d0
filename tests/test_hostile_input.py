"""What any member may send, or any engine may answer, and still the bot answers everyone (issue 17)."""

from __future__ import annotations

from botharness import BotHarness, SharedBot, responsive_throughout


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

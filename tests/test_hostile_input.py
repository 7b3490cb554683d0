"""What any member may send, or any engine may answer, and still the bot answers everyone (issue 17)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest
from botharness import (
    JOB_TIMEOUT,
    BotHarness,
    SharedBot,
    answer,
    button,
    fake_discord,
    is_post,
    responsive_throughout,
    start_training,
)
from fakediscord import FakeMessage

from bot.db import DATABASE_FILE
from bot.jobs import STRAY_FILES_MESSAGE
from bot.prompts import MAX_COMMAND_STEPS
from bot.storage import generation_dir
from bot.workers import EngineWorker, PoolSlots, WorkerPool
from engine.contract.config import Config
from engine.contract.protocol import (
    Accepted,
    Event,
    GenerateJob,
    GenerationDone,
    Job,
    Progress,
    Ready,
    ShutdownJob,
    TrainingDone,
    TrainJob,
)


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
    async with responsive_throughout(h, h.admin):
        await withdraw()
        await h.bot.jobs.wait_finished([job.id], timeout=JOB_TIMEOUT)
    await slow.wait_original(is_post, timeout=JOB_TIMEOUT)
    return await asked.wait_original(lambda m: "couldn't make your image" in m.content, timeout=30)


def _pictures_of(h: BotHarness, user_id: int) -> list[FakeMessage]:
    return [
        message
        for channel in (h.prompts_channel_id, h.gallery_channel_id)
        for message in h.fake.messages_in(channel)
        if message.files and f"<@{user_id}>" in message.content
    ]


@pytest.mark.slow
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


class HostileWorker(EngineWorker):
    """An engine that answers each job naming `targets`, files that are not its job's (the bot's
    database, another member's adapter, a system file): a broken engine, or a hostile Ray node."""

    def __init__(self, config: Config, targets: list[Path]) -> None:
        super().__init__(config, "hostile")
        self.targets = [str(target) for target in targets]
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._running = False

    @property
    def alive(self) -> bool:
        return self._running

    async def run(self, on_event: Callable[[EngineWorker, Event], Awaitable[None]]) -> int:
        self._running = True
        await self.deliver(on_event, Ready("cpu", "tiny"))
        while (event := await self._events.get()) is not None:
            await self.deliver(on_event, event)
        self._running = False
        return 0

    async def send(self, job: Job) -> None:
        if isinstance(job, ShutdownJob):
            await self.kill()
            return
        assert isinstance(job, GenerateJob | TrainJob)
        count = len(self.targets)
        result: Event = (
            GenerationDone(job.job_id, self.targets, [1] * count, ["x"] * count, [False] * count, 0.1)
            if isinstance(job, GenerateJob)
            else TrainingDone(job.job_id, self.targets, self.targets[0], self.targets[1], {}, 1, 0.1)
        )
        for event in (
            Accepted(job.job_id),
            Progress(job.job_id, "drawing", 1, 2, preview=self.targets[0]),
            result,
        ):
            self._events.put_nowait(event)

    async def shutdown(self, timeout: float) -> None:
        await self.kill()

    async def kill(self) -> None:
        self._events.put_nowait(None)

    async def forget_adapters(self, files: Sequence[Path]) -> None:
        """It keeps no copies."""


class HostilePool(WorkerPool):
    def __init__(self, worker: HostileWorker) -> None:
        self._worker = worker

    async def slots(self) -> PoolSlots:
        return PoolSlots(("hostile",), nodes=1)

    def worker(self, slot: str) -> EngineWorker:
        return self._worker

    async def close(self) -> None:
        """Nothing to release."""


def test_files_an_engine_names_outside_its_jobs_folder_are_never_posted_read_or_deleted(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with fake_discord(tmp_path) as h:
            bobs = h.data_dir / "adapters" / str(h.guild_id) / "zorblat" / "pytorch_lora_weights.safetensors"
            bobs.parent.mkdir(parents=True)
            bobs.write_bytes(b"bob's face")
            database = h.data_dir / DATABASE_FILE
            targets = [database, bobs, Path("/etc/hostname")]
            await h.start(HostilePool(HostileWorker(h.config, targets)))
            try:
                mark = h.fake.mark()
                async with responsive_throughout(h, h.bob):
                    ix = await h.fake.slash(h.alice, h.prompts_channel_id, "imagine", prompt="a castle")
                    answer = await ix.wait_original(
                        lambda m: "couldn't make your image" in m.content, timeout=30
                    )
                    progress = await start_training(h, h.alice, "abraza")
                    failed = await h.fake.wait_message(
                        progress.channel_id, lambda m: "Failed" in m.content, timeout=30
                    )
                assert answer.content == f"<@{h.alice}> I couldn't make your image: {STRAY_FILES_MESSAGE}"
                assert failed.id == progress.id and STRAY_FILES_MESSAGE in failed.content
                model = h.db.model_by_token(h.guild_id, "abraza")
                assert model is not None and model.state == "failed" and model.adapter_path is None
                uploaded = [f.data for request in h.fake.requests[mark:] for f in request.files]
                assert uploaded == []
                assert bobs.read_bytes() == b"bob's face" and database.exists()
                assert sum("named files outside the folder of job" in error for error in h.fake.errors) == 4
            finally:
                await h.stop()

    asyncio.run(asyncio.wait_for(scenario(), timeout=300))


def test_readme_promises_what_these_tests_check() -> None:
    readme = " ".join(
        (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8").split()
    )
    for promise in (
        "share it no more, or delete the model, and pictures of it still waiting are not drawn, or not posted",
        "whose settings are up to 64 KiB of text or a graph of up to 2,000 nodes (a larger one is answered "
        "as too large to read)",
        "up to 8 chunks: a prompt that makes more (its words, or its BREAKs) is refused saying so",
        "chat that mentions the bot is not a command.",
        "two pictures at a time whoever asks",
        "No message a member reads names a server path or an exception.",
        "are used only inside the folder of the job they belong to.",
        "A database file that is damaged or not a database is named in one line at start, with what to do "
        "(restore a backup, or move it aside), and left as it is.",
        "`[intake] max_concurrent` sets (2 by default) are checked at once, each member's one at a time, and "
        "a member whose photos wait is told so",
        'the training stops with "the server\'s disk is full"',
        "the member or a server manager presses **Try again** on the post, and the training resumes from "
        "its newest checkpoint.",
        '"engine pool: N slots on M nodes" at start and at each change, and with no slot why',
        "new `/imagine` and `/train` are refused at once until an engine is back.",
    ):
        assert promise in readme, promise

"""`dreambot run` as a process against the fake Discord: a clean stop on SIGTERM, one-line start errors.

These start the real bot with tests/botprocess.py (discord.py pointed at the fake), so what is
checked is what an operator sees: the exit status, the log on stderr, the gateway's close frame.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
from botharness import JOB_TIMEOUT, TRAIN_TIMEOUT, BotHarness, fake_discord, start_training, write_config
from botprocess import start_bot_process
from test_bot_resilience import training_steps

from bot.cli import main
from bot.storage import adapter_dir
from engine.config import DEFAULT_BASE_MODEL

# Every test here starts an engine process (and the bot, where it runs one).
pytestmark = pytest.mark.slow

# Long enough for the resumed run to show its steps in the progress message.
STEPS = 80
TRAINING = {"steps_per_photo": 30, "max_steps": STEPS}
# `docker stop` sends SIGTERM, then kills the container after 10 s.
DOCKER_STOP_GRACE = 10.0
# A bot that cannot log in exits by itself; this only bounds a test that would otherwise hang.
EXIT_TIMEOUT = 120.0
# The line format of every log line, the bot's and the engine's: "2026-12-01 08:24:06,230 INFO bot.jobs[123]: ..."
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+\[\d+\]: ", re.MULTILINE)


def run(scenario: Any) -> None:
    asyncio.run(scenario())


async def start_bot(h: BotHarness, log: Path, **env: str) -> asyncio.subprocess.Process:
    assert h.config.source is not None
    return await start_bot_process(h.fake.base_url, h.config.source, log, token=h.fake.token, env=env)


async def stop_bot(bot: asyncio.subprocess.Process) -> int:
    """SIGTERM, as `docker stop` sends it; the exit status, which must come before docker's kill."""
    bot.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(bot.wait(), DOCKER_STOP_GRACE)
    except TimeoutError:
        bot.kill()
        await bot.wait()
        raise AssertionError(f"the bot did not exit within {DOCKER_STOP_GRACE:.0f} s of SIGTERM") from None


def test_sigterm_checkpoints_the_training_closes_the_gateway_exits_0_and_the_training_resumes(
    tmp_path: Path,
) -> None:
    log = tmp_path / "bot.log"

    async def scenario() -> None:
        # No periodic checkpoint: the one the training resumes from is the one SIGTERM wrote.
        async with fake_discord(tmp_path, training={**TRAINING, "checkpoint_every": 1000}) as h:
            bot = await start_bot(h, log)
            await h.fake.wait_ready(timeout=JOB_TIMEOUT)
            progress = await start_training(h, h.alice, "abraza")
            # Past the class images, into the steps.
            await h.fake.wait_until(lambda: any(training_steps(progress, total=STEPS)), timeout=JOB_TIMEOUT)
            gateway = h.fake.connections[-1]
            assert main(["health", "--config", str(h.config.source)]) == 0

            assert await stop_bot(bot) == 0
            # The gateway got a close frame: the connection was not just dropped.
            assert gateway.closed and gateway.close_frame is not None
            assert main(["health", "--config", str(h.config.source)]) == 1
            checkpoints = list((adapter_dir(h.config, h.guild_id, "abraza") / "checkpoints").iterdir())
            assert len(checkpoints) == 1, checkpoints
            stopped_at = int(checkpoints[0].name.removeprefix("step-"))
            assert 0 < stopped_at < STEPS
            # The versions of the progress message from the next edit on (history[seen] will be this one).
            seen = len(progress.history) + 1

            bot = await start_bot(h, log)
            try:
                done = await h.fake.wait_message(
                    h.general_channel_id,
                    lambda m: "your model **abraza** is ready" in m.content,
                    timeout=TRAIN_TIMEOUT,
                )
                assert done.files
                resumed = training_steps(progress, since=seen, total=STEPS)
                assert resumed and resumed[0] > stopped_at, (resumed, stopped_at)
            finally:
                assert await stop_bot(bot) == 0

    run(scenario)
    output = log.read_text()
    assert "Traceback" not in output, output
    # One log format for the bot and its engines, timestamps included.
    lines = [line for line in output.splitlines() if re.match(r"^\S+ \S+ [A-Z]+ (bot|engine)\.", line)]
    assert {line.split()[3].split(".")[0] for line in lines} == {"bot", "engine"}, output
    assert all(LOG_LINE.match(line) for line in lines), output


def test_a_wrong_token_is_one_line_that_says_discord_refused_it(tmp_path: Path) -> None:
    log = tmp_path / "bot.log"

    async def scenario() -> None:
        async with fake_discord(tmp_path) as h:
            assert h.config.source is not None
            bot = await start_bot_process(h.fake.base_url, h.config.source, log, token="not-the-token")
            assert await asyncio.wait_for(bot.wait(), EXIT_TIMEOUT) == 1
            assert [r.status for r in h.fake.requests if r.route == "GET /users/@me"] == [401]

    run(scenario)
    output = log.read_text()
    assert "Traceback" not in output, output
    (line,) = [line for line in output.splitlines() if line.startswith("dreambot:")]
    assert line.startswith(
        "dreambot: Discord refused the token: check that DISCORD_TOKEN holds the bot's token"
    )


def test_an_unreachable_discord_is_one_line_that_says_check_the_network(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.toml", tmp_path / "data", [1], {})
    log = tmp_path / "bot.log"
    with socket.socket() as probe:  # a port nothing listens on once this closes
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]

    async def scenario() -> None:
        bot = await start_bot_process(f"http://127.0.0.1:{closed_port}", config, log, token="a-token")
        assert await asyncio.wait_for(bot.wait(), EXIT_TIMEOUT) == 1

    run(scenario)
    output = log.read_text()
    assert "Traceback" not in output, output
    (line,) = [line for line in output.splitlines() if line.startswith("dreambot:")]
    assert line.startswith("dreambot: cannot reach Discord: check the network ("), line


def test_a_base_model_that_is_not_downloaded_is_explained_once(tmp_path: Path) -> None:
    log = tmp_path / "bot.log"
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}

    async def scenario() -> None:
        async with fake_discord(tmp_path, model={"base": DEFAULT_BASE_MODEL}) as h:
            bot = await start_bot(h, log, **offline)
            await h.fake.wait_ready(timeout=JOB_TIMEOUT)
            # The member hears it too: the engine cannot start, and why.
            ix = await h.fake.slash(h.alice, h.prompts_channel_id, "imagine", prompt="a castle")
            answer = await ix.wait_original(lambda m: "cannot start" in m.content, timeout=JOB_TIMEOUT)
            assert "is not downloaded yet" in answer.content
            assert await stop_bot(bot) == 0

    run(scenario)
    output = log.read_text()
    assert output.count(f"the base model '{DEFAULT_BASE_MODEL}' is not downloaded yet") == 1, output
    assert "Start once with a network connection (and without HF_HUB_OFFLINE) to download it" in output
    assert "local_files_only" not in output and "Traceback" not in output, output

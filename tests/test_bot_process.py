"""`dreambot run` as a process against the fake Discord: a clean stop on SIGTERM, one-line start errors.

These start the real bot with tests/botprocess.py (discord.py pointed at the fake), so what is
checked is what an operator sees: the exit status, the log on stderr, the gateway's close frame.
"""

from __future__ import annotations

import asyncio
import errno
import re
import shlex
import shutil
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from botharness import (
    JOB_TIMEOUT,
    TRAIN_TIMEOUT,
    BotHarness,
    button,
    fake_discord,
    files_under,
    start_training,
    write_config,
)
from botprocess import start_bot_process
from test_bot_resilience import training_steps

from bot.cli import main
from bot.storage import adapter_dir
from engine.contract.config import DEFAULT_BASE_MODEL

# Every test here starts an engine process (and the bot, where it runs one).
pytestmark = pytest.mark.slow

# Long enough for the resumed run to show its steps in the progress message.
STEPS = 80
TRAINING = {"steps_per_photo": 30, "max_steps": STEPS}
# `docker stop` sends SIGTERM, then kills the container after 10 s.
DOCKER_STOP_GRACE = 10.0
# A bot that cannot log in exits by itself; this only bounds a test that would otherwise hang.
EXIT_TIMEOUT = 120.0
# The size of each small disk a full-disk test gives the bot: room for the tiny model's checkpoints.
SMALL_DISK = "16m"
# The line format of every log line, the bot's and the engine's: "2026-12-01 08:24:06,230 INFO bot.jobs[123]: ..."
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+\[\d+\]: ", re.MULTILINE)


def run(scenario: Any) -> None:
    asyncio.run(scenario())


async def start_bot(
    h: BotHarness, log: Path, prefix: Sequence[str] = (), **env: str
) -> asyncio.subprocess.Process:
    assert h.config.source is not None
    return await start_bot_process(
        h.fake.base_url, h.config.source, log, token=h.fake.token, env=env, prefix=prefix
    )


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


# -- a full disk ---------------------------------------------------------------------------------
# The bot runs in a user and mount namespace of its own, where folders of its data directory are
# small tmpfs disks; the test fills them for real (writes fail with ENOSPC in the bot and its engine
# alike) and frees them again. No privilege is needed where unprivileged user namespaces are allowed.


def namespace_problem() -> str | None:
    """Why a bot cannot be given small disks of its own here; None when it can."""
    if shutil.which("unshare") is None:
        return "util-linux's unshare is not installed"
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True, text=True
    )
    return None if probe.returncode == 0 else f"no user namespaces here: {probe.stderr.strip()}"


def on_small_disks(folders: Sequence[Path]) -> list[str]:
    """A start_bot_process prefix: the bot (its engine too) sees each of `folders` as an empty tmpfs
    of SMALL_DISK; the test reaches them through seen_by."""
    mounts = " && ".join(
        f"mount -t tmpfs -o size={SMALL_DISK} dreambot-test {shlex.quote(str(folder))}" for folder in folders
    )
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", f'{mounts} && exec "$0" "$@"']


def seen_by(process: asyncio.subprocess.Process, path: Path) -> Path:
    """`path` as `process` sees it, in its mount namespace."""
    return Path(f"/proc/{process.pid}/root") / path.relative_to("/")


def fill(folder: Path) -> Path:
    """Write a file in `folder` until its disk is full; delete it to give the space back."""
    filler = folder / "filler"
    block = bytes(2**20)
    with filler.open("wb", buffering=0) as file:
        try:
            while True:
                file.write(block)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
    return filler


def test_a_full_disk_stops_a_training_that_keeps_its_photos_and_try_again_resumes_it(tmp_path: Path) -> None:
    if (problem := namespace_problem()) is not None:
        pytest.skip(problem)
    log = tmp_path / "bot.log"
    stopped_at = 0

    async def scenario() -> None:
        nonlocal stopped_at
        async with fake_discord(tmp_path, training={**TRAINING, "checkpoint_every": 2}) as h:
            # The engine writes trainings under adapters/, intake its downloads under incoming/.
            disks = [h.data_dir / "adapters", h.data_dir / "incoming"]
            for disk in disks:
                disk.mkdir(parents=True)
            bot = await start_bot(h, log, prefix=on_small_disks(disks))
            try:
                await h.fake.wait_ready(timeout=JOB_TIMEOUT)
                progress = await start_training(h, h.alice, "abraza")
                photos = files_under(h.data_dir / "photos")
                assert photos
                checkpoints = seen_by(bot, adapter_dir(h.config, h.guild_id, "abraza") / "checkpoints")
                await h.fake.wait_until(lambda: any(checkpoints.glob("step-*")), timeout=TRAIN_TIMEOUT)
                fillers = [fill(seen_by(bot, disk)) for disk in disks]
                # The bot answers another member meanwhile.
                listing = await h.fake.slash(h.bob, h.general_channel_id, "queue")
                assert "nothing waiting" in (await listing.wait_original(timeout=3)).content

                # The training's outcome, whatever it says.
                stopped = await h.fake.wait_message(
                    h.general_channel_id,
                    lambda m: m.content.startswith(f"<@{h.alice}> training **abraza**"),
                    timeout=TRAIN_TIMEOUT,
                )
                assert stopped.content == (
                    f"<@{h.alice}> training **abraza** stopped: the server's disk is full. Your photos and the "
                    "steps done so far are kept: once there is room again, press **Try again** (you or a "
                    "server manager) and it picks up where it stopped."
                )
                await h.fake.wait_until(lambda: "⏸️ Stopped: the server's disk is full." in progress.content)
                # A member whose photos cannot be saved now is told why, and nothing of theirs is kept.
                selfies = h.selfies(3)
                ix = await h.fake.slash(
                    h.bob, h.general_channel_id, "train", name="zorvik", subject="person",
                    photo1=selfies[0], photo2=selfies[1], photo3=selfies[2],
                )  # fmt: skip
                assert (await ix.wait_original(timeout=30)).content == (
                    "I can't take your photos right now: the server's disk is full (its admins can see it "
                    "in the log). Please try again later."
                )
                # Alice's photos and her newest checkpoint are kept for the retry.
                assert files_under(h.data_dir / "photos") == photos
                (newest,) = checkpoints.glob("step-*")
                stopped_at = int(newest.name.removeprefix("step-"))
                assert 0 < stopped_at < STEPS

                retry = button(stopped, "Try again")
                other = await h.fake.click(h.bob, stopped, retry)
                assert "That's not your training" in (await other.wait_original()).content
                for filler in fillers:
                    filler.unlink()  # room again
                clicked = await h.fake.click(h.alice, stopped, retry)
                (answer,) = await clicked.wait_followups(1)
                assert answer.ephemeral and "it picks up where it stopped" in answer.content
                assert not stopped.components
                await h.fake.wait_message(
                    h.general_channel_id,
                    lambda m: "your model **abraza** is ready" in m.content,
                    timeout=TRAIN_TIMEOUT,
                )
                # The photos were kept until the model was saved, and no longer.
                await h.fake.wait_until(lambda: not files_under(h.data_dir / "photos"), timeout=10)
            finally:
                assert await stop_bot(bot) == 0

    run(scenario)
    output = log.read_text()
    # The admin reads what happened, in one line each, and the run resumed where it stopped.
    assert "stopped: a write failed, the disk is full ([Errno 28] No space left on device)" in output, output
    assert "a member's photos could not be saved ([Errno 28] No space left on device)" in output, output
    assert f"abraza from step {stopped_at}" in output, output
    assert "Traceback" not in output, output

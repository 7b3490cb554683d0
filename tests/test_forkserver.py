"""bot.forkserver and `python -m engine.forkserver`: engine workers forked from one server that
imported the engine once, each behaving as a `python -m engine` the bot started itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from botharness import write_engine_config

from bot import forkserver
from engine.contract.protocol import Error, GenerateJob, Ready, decode, encode
from engine.memory import TEST_OOM_VARIABLE
from engine.worker import EXIT_BAD_CONFIG

# Every test here starts the server, which imports the engine.
pytestmark = pytest.mark.slow

LINE_LIMIT = 1 << 20


def parent_of(pid: int) -> int:
    # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after it.
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@contextlib.contextmanager
def stderr_into(path: Path) -> Iterator[None]:
    """fd 2 points at `path` meanwhile, as the bot's stderr would point at its log."""
    saved = os.dup(2)
    with path.open("wb") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


async def next_event(process: forkserver.ForkedProcess) -> object:
    async with asyncio.timeout(120):
        return decode((await process.stdout.readline()).decode())


def test_workers_fork_from_one_server_in_the_bots_folder_and_environment_and_report_their_exit(
    tmp_path: Path, tiny_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_engine_config(tmp_path / "engine.toml", tiny_data_dir)
    # A relative config path finds the file only from the bot's folder of now, and the simulated
    # out-of-memory comes only with the bot's environment of now: the server started before both.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(TEST_OOM_VARIABLE, "generate:1")

    async def scenario() -> None:
        with stderr_into(tmp_path / "stderr.log"):
            first = await forkserver.spawn(["--config", "missing.toml"], LINE_LIMIT)
            second = await forkserver.spawn(["--config", "engine.toml", "--device", "cpu"], LINE_LIMIT)
        server = parent_of(second.pid)
        assert server != os.getpid()

        error = await next_event(first)
        assert isinstance(error, Error) and "missing.toml" in error.message
        assert await first.wait() == EXIT_BAD_CONFIG

        assert isinstance(await next_event(second), Ready)
        output_dir = tiny_data_dir / "generations" / f"forkserver-{os.getpid()}"
        job = GenerateJob(
            job_id="g1", prompt="a castle", output_dir=str(output_dir), steps=2, width=64, height=64
        )
        second.stdin.write((encode(job) + "\n").encode())
        await second.stdin.drain()
        while not isinstance(event := await next_event(second), Error):
            pass
        assert event.code == "out_of_memory", event
        # Its log went where the bot's stderr pointed when it was forked.
        assert "ready: tiny on cpu" in (tmp_path / "stderr.log").read_text()

        # A restart is another fork of the same server; a killed worker reports the signal.
        third = await forkserver.spawn(["--config", "engine.toml"], LINE_LIMIT)
        assert parent_of(third.pid) == server
        for process in (second, third):
            process.kill()
            assert await process.wait() == -signal.SIGKILL

        # A worker outlives its server; its end is still seen, with its status unknown (as killed).
        orphan = await forkserver.spawn(["--config", "engine.toml"], LINE_LIMIT)
        assert isinstance(await next_event(orphan), Ready)
        os.kill(server, signal.SIGKILL)
        orphan.stdin.close()
        async with asyncio.timeout(120):
            assert await orphan.wait() == -signal.SIGKILL

        # A dead server is started again for the next worker.
        fourth = await forkserver.spawn(["--config", "missing.toml"], LINE_LIMIT)
        assert parent_of(fourth.pid) not in (server, os.getpid())
        assert await fourth.wait() == EXIT_BAD_CONFIG

    asyncio.run(scenario())


def test_the_server_ends_with_the_bots_end_of_its_socket_and_ignores_a_message_without_pipes() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with theirs:
        server = subprocess.Popen(
            [sys.executable, "-m", "engine.forkserver"], stdin=theirs, stderr=subprocess.PIPE, text=True
        )
    with ours:
        ours.send(json.dumps({"argv": [], "env": {}, "cwd": "/"}).encode())
    assert server.wait(timeout=120) == 0
    assert server.stderr is not None
    assert "a message with 0 file descriptors, not 4: ignored" in server.stderr.read()

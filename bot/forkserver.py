"""Engine worker processes, forked by one `python -m engine.forkserver` per bot process.

The server pays for the engine's imports once (engine.forkserver says why and how); each worker is
then a process of its own, as if started with `python -m engine`: its pid can be signalled, its
stdin and stdout are pipes to the bot, its stderr is the bot's, and its exit status comes back.
The server lives as long as the bot's process, across queues (a test suite starts many), and is
started again if it died.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_lock = threading.Lock()
_server: tuple[subprocess.Popen[bytes], socket.socket] | None = None


class ForkedProcess:
    """A forked engine worker: what SubprocessWorker uses of an asyncio subprocess."""

    def __init__(
        self,
        pid: int,
        stdin: asyncio.StreamWriter,
        stdout: asyncio.StreamReader,
        status: asyncio.StreamReader,
    ) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.returncode: int | None = None
        self._status = status
        self._exit: asyncio.Future[int] | None = None

    async def wait(self) -> int:
        # Shared: the worker's supervisor and a shutdown may wait at once, for the one status line.
        if self._exit is None:
            self._exit = asyncio.ensure_future(self._read_exit())
        return await asyncio.shield(self._exit)

    async def _read_exit(self) -> int:
        line = await self._status.readline()
        if line:
            self.returncode = int(json.loads(line)["status"])
        else:
            # The server died: the worker is now init's child, and only its end can be seen, not
            # its status (reported as killed).
            while _exists(self.pid):
                await asyncio.sleep(0.1)
            self.returncode = -signal.SIGKILL
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


async def spawn(argv: list[str], limit: int) -> ForkedProcess:
    """Fork `python -m engine *argv` from the server, in the bot's environment and folder of now."""
    message = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    for _ in range(2):
        server, process = await _fork(message, limit)
        if process is not None:
            return process
        # The server died before it forked (killed, or out of memory): once more, from a new one.
        _forget_server(server)
    raise OSError("the engine fork server died twice before it could fork a worker")


async def _fork(message: bytes, limit: int) -> tuple[subprocess.Popen[bytes] | None, ForkedProcess | None]:
    """The server asked, and the worker it forked; no worker if the server is gone."""
    loop = asyncio.get_running_loop()
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()
    status_read, status_write = os.pipe()
    theirs = [stdin_read, stdout_write, os.dup(2), status_write]
    try:
        server = await asyncio.to_thread(_send, message, theirs)
    finally:
        for fd in theirs:
            os.close(fd)
    if server is None:
        for fd in (stdin_write, stdout_read, status_read):
            os.close(fd)
        return None, None
    status = await _reader(loop, status_read, limit)
    stdout = await _reader(loop, stdout_read, limit)
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(stdin_write, "wb", buffering=0)
    )
    stdin = asyncio.StreamWriter(transport, protocol, None, loop)
    line = await status.readline()
    if not line:
        stdin.close()
        return server, None
    return server, ForkedProcess(int(json.loads(line)["pid"]), stdin, stdout, status)


def _send(message: bytes, fds: list[int]) -> subprocess.Popen[bytes] | None:
    """Send one fork request, starting the server first if there is none: the server sent to,
    None if it is gone."""
    global _server
    with _lock:
        if _server is None or _server[0].poll() is not None:
            _server = _start_server()
        try:
            socket.send_fds(_server[1], [message], fds)
        except OSError:
            _server[1].close()
            _server = None
            return None
        return _server[0]


def _forget_server(server: subprocess.Popen[bytes] | None) -> None:
    global _server
    with _lock:
        if _server is not None and _server[0] is server:
            with contextlib.suppress(ProcessLookupError):
                _server[0].kill()
            _server[0].wait()
            _server[1].close()
            _server = None


def _start_server() -> tuple[subprocess.Popen[bytes], socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with theirs:
        process = subprocess.Popen(
            [sys.executable, "-m", "engine.forkserver"], stdin=theirs, start_new_session=True
        )
    log.info("engine fork server started (pid %d)", process.pid)
    return process, ours


async def _reader(loop: asyncio.AbstractEventLoop, fd: int, limit: int) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=limit)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    return reader


def _exists(pid: int) -> bool:
    """Whether `pid` still runs: a zombie counts as gone (its new parent may never reap it)."""
    try:
        # /proc/PID/stat: "pid (comm) state ..."; comm may hold spaces and parentheses.
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"

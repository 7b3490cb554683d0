"""`python -m engine.forkserver`: the engine's imports, done once; every engine worker is a fork of it.

An engine worker spends seconds importing torch, diffusers and transformers before it even reads
its config (about 4 s of CPU here; more on a loaded machine). The bot starts this server once, and
each worker, the first one and every restart after a crash or an out-of-memory kill, is forked from
it: a restart costs the model load alone. The server itself never touches a GPU (CUDA does not
survive a fork), runs no event loop and no jobs; torch's own thread pools are made for a fork after
its import (as its DataLoader workers are).

Protocol, on fd 0, a Unix SOCK_SEQPACKET socket from the bot (bot.forkserver): each message is one
JSON object {"argv": [...], "env": {...}, "cwd": "..."} carrying four file descriptors: the new worker's stdin,
stdout and stderr, and a status pipe. On the status pipe the server writes one line {"pid": N} once
the worker is forked, then {"status": S} when it exits (S as Popen's returncode: -N for signal N).
The worker runs `python -m engine` with that argv, in the folder and environment sent (what a library reads
only at its import is the server's, which is the bot's at its start). The server ends when the bot's
end of the socket closes; its workers do not: each one ends on EOF of its stdin, as it always has.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import sys
import traceback
from typing import Any

import torch

import engine.worker

log = logging.getLogger("engine.forkserver")

# One message: the worker's argv and environment (a few KiB) and its four descriptors.
MAX_MESSAGE_BYTES = 1 << 20
DESCRIPTORS = 4
# How often finished workers are looked for while no message comes (seconds).
REAP_INTERVAL = 0.1


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=engine.worker.LOG_FORMAT)
    if torch.cuda.is_initialized():
        # An import touched the GPU: every fork would fail on its first CUDA call. Say why, once.
        log.error("CUDA was initialised while importing the engine: no worker can be forked from here")
        return 1
    server = socket.socket(fileno=0)
    # The status pipe of each running worker, by pid.
    status_pipes: dict[int, int] = {}
    log.info("engine fork server ready (pid %d)", os.getpid())
    while True:
        readable, _, _ = select.select([server], [], [], REAP_INTERVAL)
        _report_exits(status_pipes)
        if not readable:
            continue
        message, fds, _, _ = socket.recv_fds(server, MAX_MESSAGE_BYTES, DESCRIPTORS)
        if not message:
            return 0
        if len(fds) != DESCRIPTORS:
            log.warning("a message with %d file descriptors, not %d: ignored", len(fds), DESCRIPTORS)
            for fd in fds:
                os.close(fd)
            continue
        request = json.loads(message)
        stdin, stdout, stderr, status = fds
        pid = os.fork()
        if pid == 0:
            server.close()
            os.close(status)
            for pipe in status_pipes.values():
                os.close(pipe)
            _run_worker(request, stdin, stdout, stderr)
        for fd in (stdin, stdout, stderr):
            os.close(fd)
        status_pipes[pid] = status
        _write_line(status, {"pid": pid})


def _run_worker(request: dict[str, Any], stdin: int, stdout: int, stderr: int) -> None:
    """In the forked child: become `python -m engine *argv` as requested, then exit."""
    os.setsid()  # a session of its own, as the bot starts its workers: a Ctrl-C is the bot's
    for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 (the process's own stdio)
    sys.stdout = open(1, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(request["env"])
    code = 1
    try:
        os.chdir(request["cwd"])
        sys.argv = [engine.worker.__file__, *request["argv"]]
        code = engine.worker.main(request["argv"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)


def _report_exits(status_pipes: dict[int, int]) -> None:
    while status_pipes:
        pid, wait_status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        pipe = status_pipes.pop(pid, None)
        if pipe is not None:
            _write_line(pipe, {"status": os.waitstatus_to_exitcode(wait_status)})
            os.close(pipe)


def _write_line(fd: int, value: dict[str, int]) -> None:
    # An OSError: the bot closed its end, and nobody waits for this worker any more.
    with contextlib.suppress(OSError):
        os.write(fd, (json.dumps(value) + "\n").encode())


if __name__ == "__main__":
    sys.exit(main())

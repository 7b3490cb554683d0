"""The real bot as a process of its own (`dreambot run`), pointed at a fake Discord.

    python tests/botprocess.py http://127.0.0.1:PORT [dreambot run options]

is `dreambot run [options]` with discord.py's REST, gateway and CDN bases pointed at PORT
(fakediscord.patch_discord, as the in-process tests do): the bot has no setting for them, and none
is wanted outside tests. It is for what only a process shows: how it takes a signal, how it exits,
what it writes to stderr.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


async def start_bot_process(
    base_url: str,
    config: Path,
    log: Path,
    *,
    token: str,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> asyncio.subprocess.Process:
    """`dreambot run --config CONFIG` against the fake Discord at `base_url`; stdout and stderr go
    to `log` (appended to, so a restarted bot's lines follow the first one's). `prefix` is a command
    that runs the bot (its arguments follow), e.g. one that sets up namespaces: it must exec it, so
    that the process returned is the bot's."""
    environment = {
        **os.environ,
        **(env or {}),
        "DISCORD_TOKEN": token,
        # The bot and the engine workers it starts import this checkout, whatever the folder.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    }
    with log.open("ab") as output:
        return await asyncio.create_subprocess_exec(
            *prefix,
            sys.executable,
            __file__,
            base_url,
            "--config",
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            env=environment,
            cwd=config.parent,
        )


if __name__ == "__main__":
    from fakediscord import patch_discord  # tests/ is on sys.path: it is this script's folder

    from bot.cli import main

    with patch_discord(sys.argv[1]):
        sys.exit(main(["run", *sys.argv[2:]]))

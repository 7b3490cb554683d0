"""FakeDiscord: the aiohttp server made of its parts (state, gateway, CDN, messages, REST routes, user
actions), started and stopped, with a bot run against it; run_async runs a test's coroutine."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import discord
from aiohttp import web

from fakediscord.actions import UserActions
from fakediscord.errors import WaitTimeout
from fakediscord.model import MiB
from fakediscord.patching import DiscordPatch
from fakediscord.rest import RestApi

_T = TypeVar("_T")


class FakeDiscord(UserActions, RestApi):
    """The fake Discord server. See the package docstring for an example.

    Its constructor is FakeState's; each of its parts (gateway, CDN, messages, REST, user actions) is
    a class of its own module that adds behaviour over that state.

    :param guild: the guild to serve (default: ``FakeGuild()``); ``guilds`` adds more.
    :param bot_permissions: the permissions of the bot's managed role in every guild.
    :param upload_limit: max bytes per file for DMs (guilds use ``FakeGuild.upload_limit``); larger -> 413/40005.
    :param interaction_timeout: if set, callbacks later than this many seconds get 404/10062 like Discord's 3 s.
    :param dispatch_message_events: send MESSAGE_CREATE/UPDATE/DELETE for the bot's own messages too.
    """

    async def start(self, *, patch: bool = True) -> FakeDiscord:
        """Listen on a free port; with ``patch`` also point discord.py at it (undone by ``stop``)."""
        app = web.Application(client_max_size=1024 * MiB)
        app.router.add_get("/", self._ws_handler)
        app.router.add_route("*", "/api/{tail:.*}", self._api_handler)
        app.router.add_get("/attachments/{tail:.*}", self._cdn_handler)
        app.router.add_get("/ephemeral-attachments/{tail:.*}", self._cdn_handler)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        self._outbox_event = asyncio.Event()
        self._writer_task = asyncio.create_task(self._writer(), name="fakediscord:gateway-writer")
        if patch:
            self.patch()
        return self

    async def stop(self) -> None:
        self.unpatch()
        for conn in self.connections:
            if not conn.closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.ws.close(code=1001, message=b"fake discord stopping"), 2)
        if self._writer_task is not None:
            self._writer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task
            self._writer_task = None
        for _, _, fut in self._outbox:
            fut.cancel()
        self._outbox.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._notify()

    async def __aenter__(self) -> FakeDiscord:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def patch(self) -> None:
        """Point discord.py at this server (``Route.BASE``, ``DEFAULT_GATEWAY``, ``Asset.BASE``)."""
        if self._patch is None:
            self._patch = DiscordPatch(self.base_url)
            self._patch.apply()

    def unpatch(self) -> None:
        if self._patch is not None:
            self._patch.restore()
            self._patch = None

    @contextlib.asynccontextmanager
    async def run_bot(
        self,
        bot: discord.Client,
        *,
        timeout: float = 15.0,
        commands: bool = True,
        guild_ready_timeout: float | None = 0.05,
    ) -> AsyncIterator[discord.Client]:
        """Run ``bot.start(token)`` until it is ready (and, with ``commands``, has synced), then close it.

        ``guild_ready_timeout`` replaces discord.py's 2 s wait after the last GUILD_CREATE (None: keep it).
        ERROR log records meanwhile are collected in ``self.errors``.
        """
        if guild_ready_timeout is not None:
            state = bot._connection
            state.guild_ready_timeout = min(state.guild_ready_timeout, guild_ready_timeout)
        capture = _ErrorCapture(self.errors)
        logging.getLogger().addHandler(capture)
        readies = self._ready_count
        task = asyncio.create_task(bot.start(self.token), name="fakediscord:bot")
        try:
            ready = self.wait_ready(timeout=timeout, commands=commands, after=readies)
            await self._race(ready, task, timeout)
            await self._race(bot.wait_until_ready(), task, timeout)
            yield bot
        finally:
            try:
                await asyncio.wait_for(bot.close(), 10)
                done, _ = await asyncio.wait({task}, timeout=10)
                if not done:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                elif not task.cancelled() and task.exception() is not None:
                    self.errors.append(f"bot.start() raised {task.exception()!r}")
            finally:
                logging.getLogger().removeHandler(capture)

    async def _race(self, awaitable: Awaitable[Any], task: asyncio.Task[Any], timeout: float) -> Any:
        waiter = asyncio.ensure_future(awaitable)
        done, _ = await asyncio.wait({waiter, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            return waiter.result()
        waiter.cancel()
        with contextlib.suppress(BaseException):
            await waiter
        if task in done:
            exc = None if task.cancelled() else task.exception()
            raise RuntimeError(f"the bot stopped before it was ready: {exc!r}\n{self._report('')}") from exc
        raise WaitTimeout(self._report("the bot to become ready"))

    async def wait_ready(self, *, timeout: float = 10.0, commands: bool = True, after: int = 0) -> None:
        """A bot identified (more than ``after`` times in all), got READY + GUILD_CREATE, and, with
        ``commands``, commands were synced at least once (a restarted bot need not sync again)."""
        await self.wait_until(
            lambda: self._ready_count > after and (not commands or self.sync_count > 0),
            timeout=timeout,
            what="IDENTIFY" + (" and a command sync" if commands else ""),
        )


class _ErrorCapture(logging.Handler):
    """Collects ERROR log records (the bot's, discord.py's, the fake's) while ``run_bot`` runs."""

    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.sink = sink
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.sink.append(self.format(record))


def run_async(
    test: Callable[[], Coroutine[Any, Any, _T]], *, timeout: float = 30.0, check_leaks: bool = True
) -> _T:
    """``asyncio.run(test())`` for plain pytest tests (no plugin), bounded by ``timeout``.

    With ``check_leaks`` it fails if tasks are still pending when ``test()`` returns (e.g. a discord.py
    view with a timeout, or a job worker the bot never stopped), if the loop reported errors (exceptions
    never retrieved ...) or if ResourceWarnings (unclosed sessions/sockets) were emitted.
    """
    problems: list[str] = []

    async def main() -> _T:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: problems.append(str(context.get("message"))))
        result = await asyncio.wait_for(test(), timeout)
        await asyncio.sleep(0)
        current = asyncio.current_task()
        problems.extend(f"pending task: {t!r}" for t in asyncio.all_tasks() if t is not current)
        return result

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        result = asyncio.run(main())
        gc.collect()
    problems.extend(str(w.message) for w in caught if issubclass(w.category, ResourceWarning))
    if check_leaks and problems:
        raise AssertionError("the test left things behind:\n  " + "\n  ".join(problems))
    return result

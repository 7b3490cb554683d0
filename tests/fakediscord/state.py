"""What the fake serves and records (guilds, users, messages, interactions, requests, connections),
the lookups over it, and waiting until something is recorded. FakeDiscord is this state with the
behaviour of its parts (server.py puts them together)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import discord
from aiohttp import web

from fakediscord.connection import GatewayConnection, Session
from fakediscord.errors import WaitTimeout
from fakediscord.model import (
    DEFAULT_BOT_PERMISSIONS,
    DEFAULT_UPLOAD_LIMIT,
    JSON,
    FakeChannel,
    FakeGuild,
    FakeUser,
    new_snowflake,
    permission_bits,
)
from fakediscord.patching import DiscordPatch
from fakediscord.records import FakeInteraction, FakeMessage, RateLimitRule, Request, StoredFile

_T = TypeVar("_T")


class FakeState:
    """The fake's state; its constructor is FakeDiscord's (see there for the parameters). Every part
    of the fake (gateway, CDN, messages, REST, user actions) is a subclass that adds behaviour only."""

    def __init__(
        self,
        guild: FakeGuild | None = None,
        *,
        guilds: Sequence[FakeGuild] = (),
        bot_name: str = "DreamBot",
        application_id: int | None = None,
        token: str = "fake-bot-token",
        bot_permissions: int | discord.Permissions | None = None,
        heartbeat_interval: int = 41250,
        upload_limit: int = DEFAULT_UPLOAD_LIMIT,
        interaction_timeout: float | None = None,
        dispatch_message_events: bool = True,
        host: str = "127.0.0.1",
    ) -> None:
        all_guilds = ([guild] if guild is not None else []) + list(guilds)
        self.guilds: dict[int, FakeGuild] = {g.id: g for g in (all_guilds or [FakeGuild()])}
        self.guild: FakeGuild = next(iter(self.guilds.values()))
        self.application_id: int = application_id or new_snowflake()
        self.bot_user = FakeUser(self.application_id, bot_name, bot=True)
        self.token = token
        self.heartbeat_interval = heartbeat_interval
        self.upload_limit = upload_limit
        self.interaction_timeout = interaction_timeout
        self.dispatch_message_events = dispatch_message_events
        self.host = host
        bot_perms = permission_bits(bot_permissions, DEFAULT_BOT_PERMISSIONS)
        for g in self.guilds.values():
            g._add_bot(self.bot_user, bot_perms)
        self.extra_users: dict[int, FakeUser] = {}
        self.dm_channels: dict[int, FakeChannel] = {}  # by channel id

        # what happened
        self.requests: list[Request] = []
        self.unhandled: list[Request] = []
        self.cdn_requests: list[Request] = []
        self.connections: list[GatewayConnection] = []
        self.identifies: list[JSON] = []
        self.resumes: list[JSON] = []
        self.suppressed_events: list[tuple[str, JSON]] = []  # not sent: the bot lacks the intent
        self.errors: list[str] = []  # ERROR log records while run_bot() runs
        self.commands: dict[int | None, list[JSON]] = {}  # guild id (None: global) -> synced commands
        self.messages: dict[int, FakeMessage] = {}
        self.interactions: dict[int, FakeInteraction] = {}
        self.sync_count = 0

        self._by_token: dict[str, FakeInteraction] = {}
        self._files: dict[int, StoredFile] = {}
        # While set (hold_downloads), attachment downloads are recorded, then wait for it to be set.
        self._downloads_open: asyncio.Event | None = None
        self._command_ids: dict[tuple[int | None, int, str], int] = {}
        self._modals: dict[str, tuple[JSON, FakeInteraction]] = {}
        self._rate_limits: list[RateLimitRule] = []
        self._sessions: dict[str, Session] = {}
        self.session: Session | None = None
        self._active: GatewayConnection | None = None
        self._ready_count = 0  # IDENTIFYs answered with READY + GUILD_CREATE
        self._outbox: deque[tuple[str, JSON, asyncio.Future[None]]] = deque()
        self._outbox_event: asyncio.Event | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._runner: web.AppRunner | None = None
        self._patch: DiscordPatch | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://{self.host}:{self.port}/"

    @property
    def bot_id(self) -> int:
        return self.bot_user.id

    # -- waiting
    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait_until(
        self, condition: Callable[[], _T], *, timeout: float = 5.0, what: str | None = None
    ) -> _T:
        """Return ``condition()`` once truthy. Re-checked whenever the fake records something (and every 50 ms
        for conditions on bot-side state); raises ``WaitTimeout`` with a report of recent requests."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = condition()
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise WaitTimeout(self._report(what or repr(condition)))
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            try:
                await asyncio.wait({fut}, timeout=min(remaining, 0.05))
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)

    def mark(self) -> int:
        """Index for ``wait_for(..., since=fake.mark())``: only requests made after now."""
        return len(self.requests)

    async def wait_for(
        self, predicate: Callable[[Request], Any] | str, *, timeout: float = 5.0, since: int = 0
    ) -> Request:
        """The first recorded request (from index ``since``) matching ``predicate`` (or a ``Request.matches`` spec)."""
        pred = (lambda r: r.matches(predicate)) if isinstance(predicate, str) else predicate
        return await self.wait_until(
            lambda: next((r for r in self.requests[since:] if pred(r)), None),
            timeout=timeout,
            what=f"a request matching {predicate!r}",
        )

    async def wait_message(
        self, channel_id: int, predicate: Callable[[FakeMessage], Any] | None = None, *, timeout: float = 5.0
    ) -> FakeMessage:
        """The first (not loading, not deleted) message in ``channel_id`` matching ``predicate``."""
        return await self.wait_until(
            lambda: next(
                (
                    m
                    for m in self.messages_in(channel_id)
                    if not m.loading and (predicate is None or predicate(m))
                ),
                None,
            ),
            timeout=timeout,
            what=f"a message in channel {channel_id}",
        )

    async def wait_dm(
        self, user_id: int, predicate: Callable[[FakeMessage], Any] | None = None, *, timeout: float = 5.0
    ) -> FakeMessage:
        return await self.wait_until(
            lambda: next((m for m in self.dms_to(user_id) if predicate is None or predicate(m)), None),
            timeout=timeout,
            what=f"a DM to user {user_id}",
        )

    def _report(self, what: str) -> str:
        lines = [f"timed out waiting for {what}"] if what else []
        lines.append("last requests:")
        for req in self.requests[-15:]:
            code = f" code={req.code}" if req.code else ""
            lines.append(f"  {req.method} {req.path} -> {req.status}{code}")
        if self.unhandled:
            lines.append("unhandled: " + ", ".join(f"{r.method} {r.path}" for r in self.unhandled[-10:]))
        if self.errors:
            lines.append("bot errors:")
            lines += ["  " + e.replace("\n", "\n  ") for e in self.errors[-5:]]
        return "\n".join(lines)

    # -- lookups
    def user(self, user_id: int) -> FakeUser:
        if user_id == self.bot_user.id:
            return self.bot_user
        for g in self.guilds.values():
            if user_id in g.members:
                return g.members[user_id].user
        if user_id in self.extra_users:
            return self.extra_users[user_id]
        raise KeyError(f"unknown user {user_id}")

    def add_user(self, name: str, *, dms_open: bool = True, bot: bool = False) -> int:
        """A user who is in no guild (e.g. to DM the bot)."""
        user = FakeUser(
            new_snowflake(), name, bot=bot, global_name=None if bot else name.title(), dms_open=dms_open
        )
        self.extra_users[user.id] = user
        return user.id

    def channel(self, channel_id: int) -> tuple[FakeChannel, FakeGuild | None]:
        for g in self.guilds.values():
            if channel_id in g.channels:
                return g.channels[channel_id], g
        if channel_id in self.dm_channels:
            return self.dm_channels[channel_id], None
        raise KeyError(f"unknown channel {channel_id}")

    def channel_payload(self, channel_id: int) -> JSON:
        channel, guild = self.channel(channel_id)
        if guild is not None:
            return guild.channel_payload(channel)
        return {
            "id": str(channel.id),
            "type": 1,
            "last_message_id": str(channel.last_message_id) if channel.last_message_id else None,
            "flags": 0,
            "recipients": [self.user(channel.recipient_id or 0).to_payload()],
        }

    def dm_channel_id(self, user_id: int) -> int:
        """The DM channel between the bot and ``user_id`` (created if needed)."""
        for channel in self.dm_channels.values():
            if channel.recipient_id == user_id:
                return channel.id
        self.user(user_id)
        channel = FakeChannel(new_snowflake(), "", type=1, recipient_id=user_id)
        self.dm_channels[channel.id] = channel
        return channel.id

    def message(self, message_id: int) -> FakeMessage:
        return self.messages[message_id]

    def messages_in(
        self, channel_id: int, *, ephemeral: bool = True, deleted: bool = False, author_id: int | None = None
    ) -> list[FakeMessage]:
        """Messages in a channel, oldest first (including ephemeral interaction responses by default)."""
        return sorted(
            (
                m
                for m in self.messages.values()
                if m.channel_id == channel_id
                and (ephemeral or not m.ephemeral)
                and (deleted or not m.deleted)
                and (author_id is None or m.author_id == author_id)
            ),
            key=lambda m: m.id,
        )

    def dms_to(self, user_id: int) -> list[FakeMessage]:
        """Messages the bot sent in its DM channel with ``user_id``."""
        channels = {c.id for c in self.dm_channels.values() if c.recipient_id == user_id}
        return sorted(
            (
                m
                for m in self.messages.values()
                if m.channel_id in channels and m.author_id == self.bot_id and not m.deleted
            ),
            key=lambda m: m.id,
        )

    def responses_to(self, interaction: FakeInteraction) -> list[Request]:
        """Callback, followups and @original/followup edits and deletes for ``interaction``, in order."""
        return [r for r in self.requests if r.interaction is interaction]

    def command(self, name: str, *, guild_id: int | None = None, type: int = 1) -> JSON:
        """A synced command (guild commands first when ``guild_id`` is given, then global)."""
        for gid in ([guild_id] if guild_id is not None else []) + [None]:
            for cmd in self.commands.get(gid, []):
                if cmd["name"] == name and cmd.get("type", 1) == type:
                    return cmd
        synced = {gid: [c["name"] for c in cmds] for gid, cmds in self.commands.items()}
        raise LookupError(f"no synced command {name!r} (type {type}); synced: {synced}")

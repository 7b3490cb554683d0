"""A fake Discord (REST + gateway + CDN) on 127.0.0.1 that a real discord.py bot can run against.

``FakeDiscord`` is an aiohttp server: REST under ``/api/v10``, the gateway websocket at ``/`` (HELLO,
IDENTIFY -> READY + GUILD_CREATE, heartbeats, RESUME, zlib-stream compression) and a CDN for attachments.
While it runs, discord.py is patched to talk to it (``Route.BASE``, ``DiscordWebSocket.DEFAULT_GATEWAY``,
``Asset.BASE``). Tests act as users (slash commands, buttons, modals, context menus, messages, reactions)
and assert on what the bot sent, which the fake records as ``Request`` objects and stores as
``FakeMessage`` objects (``.content``, ``.embeds``, ``.components``, ``.files``, ``.flags`` ...)::

    from fakediscord import FakeDiscord, FakeGuild, run_async   # tests/ is on sys.path under pytest

    guild = FakeGuild("Dream Lab")                       # has #general, @everyone and an owner
    art = guild.add_channel("art")
    after_dark = guild.add_channel("after-dark", nsfw=True)
    alice = guild.add_member("alice")
    mod = guild.add_member("mod", admin=True)            # a role with MANAGE_GUILD

    async def scenario() -> None:
        async with FakeDiscord(guild) as fake:           # server up + discord.py patched
            async with fake.run_bot(make_bot()):         # bot.start(); READY; commands synced
                ix = await fake.slash(alice, art, "imagine", prompt="abraza as thor", count=2)
                assert (await ix.wait_callback()).json["type"] == 5          # deferred
                msg = await ix.wait_original(lambda m: len(m.files) == 2)   # (filename, bytes)
                assert msg.files[0][1].startswith(b"\x89PNG") and not msg.ephemeral
                photo = fake.add_attachment("me.jpg", jpeg_bytes, "image/jpeg")
                ix = await fake.slash(alice, art, "model train", name="abraza", photo=photo)
                panel = await fake.wait_message(art, lambda m: m.custom_ids)
                await (await fake.click(alice, panel, "panel:name")).wait_modal()

    run_async(scenario)                                  # asyncio.run + leak checks, no pytest plugin

Notes: interaction helpers (``slash``, ``click``, ``submit_modal``, ``message_command`` ...) are coroutines
that return a ``FakeInteraction`` once INTERACTION_CREATE has been written to the socket; its
``wait_callback``/``wait_original``/``wait_followups``/``wait_modal`` wait for the bot's answers.
``post_user_message`` and ``add_reaction`` are plain functions that queue their gateway event (delivered in
order before anything queued later; ``await fake.flush()`` waits for delivery). Like Discord, a deferred
(type 5) response's first followup fills the "thinking" message, which is ``ix.original``; attachment
filenames get spaces replaced by underscores; the client enforces ``default_member_permissions`` and nsfw
commands, so ``slash`` raises ``CommandUnavailable`` (``force=True`` skips the check). Unknown routes
answer 404 and land in ``fake.unhandled``; ERROR logs during ``run_bot`` land in ``fake.errors``.
``hold_downloads``/``release_downloads`` keep attachment downloads waiting (each recorded in ``cdn_requests``).
``run_bot`` lowers discord.py's ``guild_ready_timeout`` (2 s by default) to 0.05 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import hashlib
import io
import itertools
import json
import logging
import mimetypes
import re
import secrets
import socket
import time
import warnings
import zlib
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import discord
import discord.asset
import discord.gateway
import discord.http
import yarl
from aiohttp import BodyPartReader, WSMsgType, web

__all__ = [
    "DEFAULT_UPLOAD_LIMIT",
    "CommandUnavailable",
    "FakeChannel",
    "FakeDiscord",
    "FakeGuild",
    "FakeInteraction",
    "FakeMember",
    "FakeMessage",
    "FakeRole",
    "FakeUser",
    "GatewayConnection",
    "Request",
    "UploadedFile",
    "WaitTimeout",
    "patch_discord",
    "run_async",
]

_T = TypeVar("_T")
JSON = dict[str, Any]

MiB = 1024 * 1024
DEFAULT_UPLOAD_LIMIT = 10 * MiB
DISCORD_EPOCH_MS = 1420070400000

# Gateway intents (bits) that decide which events the fake sends.
INTENT_GUILD_MEMBERS = 1 << 1
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_GUILD_MESSAGE_REACTIONS = 1 << 10
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_DIRECT_MESSAGE_REACTIONS = 1 << 13
INTENT_MESSAGE_CONTENT = 1 << 15

# Message flags.
FLAG_SUPPRESS_EMBEDS = 1 << 2
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7
FLAG_SUPPRESS_NOTIFICATIONS = 1 << 12
FLAG_COMPONENTS_V2 = 1 << 15

# Permissions.
P_ALL = discord.Permissions.all().value
P_ADMINISTRATOR = discord.Permissions(administrator=True).value
P_MANAGE_GUILD = discord.Permissions(manage_guild=True).value
P_VIEW_CHANNEL = discord.Permissions(view_channel=True).value
P_SEND_MESSAGES = discord.Permissions(send_messages=True).value
P_SEND_IN_THREADS = discord.Permissions(send_messages_in_threads=True).value
P_ATTACH_FILES = discord.Permissions(attach_files=True).value
P_ADD_REACTIONS = discord.Permissions(add_reactions=True).value
P_READ_HISTORY = discord.Permissions(read_message_history=True).value
P_MANAGE_MESSAGES = discord.Permissions(manage_messages=True).value
P_CREATE_PUBLIC_THREADS = discord.Permissions(create_public_threads=True).value
P_CREATE_PRIVATE_THREADS = discord.Permissions(create_private_threads=True).value

DEFAULT_EVERYONE_PERMISSIONS = discord.Permissions(
    create_instant_invite=True,
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    create_public_threads=True,
    create_private_threads=True,
    embed_links=True,
    attach_files=True,
    add_reactions=True,
    read_message_history=True,
    use_external_emojis=True,
    use_external_stickers=True,
    use_application_commands=True,
    connect=True,
    speak=True,
    stream=True,
    use_voice_activation=True,
    change_nickname=True,
).value
DEFAULT_BOT_PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    create_public_threads=True,
    manage_threads=True,
    manage_messages=True,
    embed_links=True,
    attach_files=True,
    add_reactions=True,
    read_message_history=True,
    use_external_emojis=True,
    use_application_commands=True,
).value

_APP_FLAGS = (1 << 15) | (1 << 19) | (1 << 23)  # GATEWAY_*_LIMITED privileged intents + COMMAND_BADGE
_THREAD_TYPES = (10, 11, 12)
_NO_CONTENT = object()
_MISSING: Any = object()

_log = logging.getLogger("fakediscord")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# ----------------------------------------------------------------------------------------------- ids


class _Snowflakes:
    def __init__(self) -> None:
        self._last = 0

    def __call__(self) -> int:
        value = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        if value <= self._last:
            value = self._last + 1
        self._last = value
        return value


new_snowflake = _Snowflakes()


def _iso(snowflake: int | None = None) -> str:
    """ISO 8601 UTC timestamp like Discord's (``2025-01-02T03:04:05.678000+00:00``)."""
    ms = (snowflake >> 22) + DISCORD_EPOCH_MS if snowflake else int(time.time() * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}000+00:00"


def _perm_value(value: int | discord.Permissions | None, default: int) -> int:
    if value is None:
        return default
    return value.value if isinstance(value, discord.Permissions) else int(value)


def _id_of(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"expected an id, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, FakeMember):
        return value.user.id
    if isinstance(value, dict) and "id" in value:
        return int(value["id"])
    if hasattr(value, "id"):
        return int(value.id)
    raise TypeError(f"expected an id, got {value!r}")


def _sanitize_filename(name: str) -> str:
    return re.sub(r"\s", "_", name.strip()) or "unknown"


def _image_size(data: bytes) -> tuple[int, int] | None:
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:
        return None


# -------------------------------------------------------------------------------------------- errors


class WaitTimeout(AssertionError):
    """Raised by the ``wait_*`` helpers; the message lists the latest requests and bot errors."""


class CommandUnavailable(Exception):
    """The Discord client would not let this user do that (permissions, nsfw, disabled button ...)."""


class _ApiError(Exception):
    def __init__(self, status: int, code: int, message: str, errors: JSON | None = None) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors

    def body(self) -> JSON:
        body: JSON = {"message": self.message, "code": self.code}
        if self.errors:
            body["errors"] = self.errors
        return body


_Problem = tuple[tuple[Any, ...], str, str]


def _form_error(problems: Sequence[_Problem]) -> _ApiError:
    root: JSON = {}
    for path, code, message in problems:
        node = root
        for key in path:
            node = node.setdefault(str(key), {})
        node.setdefault("_errors", []).append({"code": code, "message": message})
    return _ApiError(400, 50035, "Invalid Form Body", root)


def _not_found(kind: str, code: int) -> _ApiError:
    return _ApiError(404, code, f"Unknown {kind}")


# --------------------------------------------------------------------------------------- guild model


@dataclass
class FakeUser:
    id: int
    name: str
    bot: bool = False
    global_name: str | None = None
    dms_open: bool = True

    def to_payload(self) -> JSON:
        payload: JSON = {
            "id": str(self.id),
            "username": self.name,
            "discriminator": "0",
            "global_name": self.global_name,
            "avatar": None,
            "avatar_decoration_data": None,
            "banner": None,
            "accent_color": None,
            "public_flags": 0,
            "flags": 0,
            "primary_guild": None,
            "collectibles": None,
        }
        if self.bot:
            payload["bot"] = True
        return payload


@dataclass
class FakeRole:
    id: int
    name: str
    permissions: int = 0
    position: int = 0
    color: int = 0
    hoist: bool = False
    mentionable: bool = False
    bot_id: int | None = None

    def to_payload(self) -> JSON:
        payload: JSON = {
            "id": str(self.id),
            "name": self.name,
            "color": self.color,
            "colors": {"primary_color": self.color, "secondary_color": None, "tertiary_color": None},
            "hoist": self.hoist,
            "icon": None,
            "unicode_emoji": None,
            "position": self.position,
            "permissions": str(self.permissions),
            "managed": self.bot_id is not None,
            "mentionable": self.mentionable,
            "flags": 0,
        }
        if self.bot_id is not None:
            payload["tags"] = {"bot_id": str(self.bot_id)}
        return payload


@dataclass
class FakeChannel:
    id: int
    name: str
    type: int = 0
    guild_id: int | None = None
    nsfw: bool = False
    topic: str | None = None
    position: int = 0
    parent_id: int | None = None
    overwrites: dict[int, tuple[int, int]] = field(default_factory=dict)  # target id -> (allow, deny)
    rate_limit_per_user: int = 0
    recipient_id: int | None = None  # DM channels
    owner_id: int | None = None  # threads
    archived: bool = False  # threads: not in GUILD_CREATE, fetched by id
    last_message_id: int | None = None

    @property
    def is_thread(self) -> bool:
        return self.type in _THREAD_TYPES


@dataclass
class FakeMember:
    user: FakeUser
    roles: list[int] = field(default_factory=list)
    nick: str | None = None
    joined_at: str = field(default_factory=_iso)

    def to_payload(self, *, with_user: bool = True, permissions: int | None = None) -> JSON:
        payload: JSON = {
            "nick": self.nick,
            "avatar": None,
            "banner": None,
            "roles": [str(r) for r in self.roles],
            "joined_at": self.joined_at,
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "communication_disabled_until": None,
            "unusual_dm_activity_until": None,
        }
        if with_user:
            payload["user"] = self.user.to_payload()
        if permissions is not None:
            payload["permissions"] = str(permissions)
        return payload


_UPLOAD_LIMITS = {0: DEFAULT_UPLOAD_LIMIT, 1: DEFAULT_UPLOAD_LIMIT, 2: 50 * MiB, 3: 100 * MiB}


class FakeGuild:
    """A guild to serve in GUILD_CREATE. Build it before the bot connects.

    It starts with the ``@everyone`` role (id == guild id), an owner member (all permissions) and the
    channels named in ``channels``. ``add_*`` return the new object's id.
    """

    def __init__(
        self,
        name: str = "Dream Lab",
        *,
        id: int | None = None,
        owner: str = "owner",
        channels: Iterable[str] = ("general",),
        everyone_permissions: int | discord.Permissions | None = None,
        premium_tier: int = 0,
        upload_limit: int | None = None,
        locale: str = "en-US",
    ) -> None:
        self.id: int = id or new_snowflake()
        self.name = name
        self.premium_tier = premium_tier
        self.upload_limit: int = upload_limit or _UPLOAD_LIMITS.get(premium_tier, DEFAULT_UPLOAD_LIMIT)
        self.locale = locale
        self.joined_at = _iso()
        self.roles: dict[int, FakeRole] = {
            self.id: FakeRole(
                self.id, "@everyone", _perm_value(everyone_permissions, DEFAULT_EVERYONE_PERMISSIONS)
            )
        }
        self.channels: dict[int, FakeChannel] = {}
        self.members: dict[int, FakeMember] = {}
        self._admin_role: int | None = None
        self.owner_id: int = self.add_member(owner, admin=True)
        for channel in channels:
            self.add_channel(channel)

    # -- building
    def add_role(
        self,
        name: str,
        permissions: int | discord.Permissions = 0,
        *,
        color: int = 0,
        hoist: bool = False,
        mentionable: bool = False,
        bot_id: int | None = None,
    ) -> int:
        role = FakeRole(
            new_snowflake(),
            name,
            _perm_value(permissions, 0),
            len(self.roles),
            color,
            hoist,
            mentionable,
            bot_id,
        )
        self.roles[role.id] = role
        return role.id

    def add_channel(
        self,
        name: str,
        *,
        nsfw: bool = False,
        topic: str | None = None,
        type: int = 0,
        category: int | None = None,
        overwrites: Mapping[int, tuple[int | discord.Permissions, int | discord.Permissions]] | None = None,
        slowmode: int = 0,
    ) -> int:
        """Add a channel (0 text, 2 voice, 4 category, 5 news). ``overwrites``: {role/member id: (allow, deny)}."""
        channel = FakeChannel(
            id=new_snowflake(),
            name=name,
            type=type,
            guild_id=self.id,
            nsfw=nsfw,
            topic=topic,
            position=sum(1 for c in self.channels.values() if not c.is_thread),
            parent_id=category,
            rate_limit_per_user=slowmode,
        )
        for target, (allow, deny) in (overwrites or {}).items():
            channel.overwrites[target] = (_perm_value(allow, 0), _perm_value(deny, 0))
        self.channels[channel.id] = channel
        return channel.id

    def add_category(self, name: str) -> int:
        return self.add_channel(name, type=4)

    def add_thread(
        self, parent_id: int, name: str, *, owner_id: int | None = None, archived: bool = False
    ) -> int:
        """Add a public thread of a text channel, opened by ``owner_id`` (the guild's owner by default);
        ``archived``: left out of GUILD_CREATE, as Discord does."""
        thread = FakeChannel(
            id=new_snowflake(),
            name=name,
            type=11,
            guild_id=self.id,
            parent_id=parent_id,
            owner_id=owner_id or self.owner_id,
            archived=archived,
        )
        self.channels[thread.id] = thread
        return thread.id

    def set_overwrite(
        self,
        channel_id: int,
        target_id: int,
        *,
        allow: int | discord.Permissions = 0,
        deny: int | discord.Permissions = 0,
    ) -> None:
        self.channels[channel_id].overwrites[target_id] = (_perm_value(allow, 0), _perm_value(deny, 0))

    def add_member(
        self,
        name: str,
        *,
        admin: bool = False,
        roles: Iterable[int] = (),
        bot: bool = False,
        nick: str | None = None,
        dms_open: bool = True,
        id: int | None = None,
    ) -> int:
        """Add a member. ``admin=True`` gives an "Admin" role with MANAGE_GUILD (not ADMINISTRATOR)."""
        user = FakeUser(id or new_snowflake(), name, bot=bot, global_name=None if bot else name.title())
        user.dms_open = dms_open
        role_ids = list(roles)
        if admin:
            if self._admin_role is None:
                self._admin_role = self.add_role("Admin", P_MANAGE_GUILD, color=0xE67E22, hoist=True)
            role_ids.append(self._admin_role)
        self.members[user.id] = FakeMember(user, role_ids, nick)
        return user.id

    def _add_bot(self, user: FakeUser, permissions: int) -> None:
        if user.id in self.members:
            return
        role = self.add_role(user.name, permissions, bot_id=user.id)
        self.members[user.id] = FakeMember(user, [role])

    # -- lookups
    def channel_id(self, name: str) -> int:
        return next(c.id for c in self.channels.values() if c.name == name)

    def member_id(self, name: str) -> int:
        return next(m.user.id for m in self.members.values() if m.user.name == name)

    def role_id(self, name: str) -> int:
        return next(r.id for r in self.roles.values() if r.name == name)

    @property
    def text_channels(self) -> list[FakeChannel]:
        return [c for c in self.channels.values() if c.type in (0, 5)]

    # -- permissions (Discord's algorithm: base from roles, then channel overwrites)
    def base_permissions(self, member_id: int) -> int:
        if member_id == self.owner_id:
            return P_ALL
        member = self.members[member_id]
        perms = self.roles[self.id].permissions
        for role_id in member.roles:
            if role_id in self.roles:
                perms |= self.roles[role_id].permissions
        return P_ALL if perms & P_ADMINISTRATOR else perms

    def permissions_for(self, member_id: int, channel_id: int | None = None) -> int:
        perms = self.base_permissions(member_id)
        if perms & P_ADMINISTRATOR or channel_id is None:
            return perms
        channel = self.channels[channel_id]
        if channel.is_thread and channel.parent_id in self.channels:
            channel = self.channels[channel.parent_id]
        member = self.members[member_id]
        if self.id in channel.overwrites:
            allow, deny = channel.overwrites[self.id]
            perms = (perms & ~deny) | allow
        allow = deny = 0
        for role_id in member.roles:
            if role_id in channel.overwrites:
                allow |= channel.overwrites[role_id][0]
                deny |= channel.overwrites[role_id][1]
        perms = (perms & ~deny) | allow
        if member_id in channel.overwrites:
            allow, deny = channel.overwrites[member_id]
            perms = (perms & ~deny) | allow
        return perms

    # -- payloads
    def channel_payload(self, channel: FakeChannel) -> JSON:
        payload: JSON = {
            "id": str(channel.id),
            "type": channel.type,
            "guild_id": str(self.id),
            "name": channel.name,
            "parent_id": str(channel.parent_id) if channel.parent_id else None,
            "nsfw": channel.nsfw,
            "flags": 0,
            "rate_limit_per_user": channel.rate_limit_per_user,
        }
        if channel.is_thread:
            payload.update(
                owner_id=str(channel.owner_id) if channel.owner_id else None,
                last_message_id=str(channel.last_message_id) if channel.last_message_id else None,
                message_count=0,
                member_count=1,
                total_message_sent=0,
                thread_metadata={
                    "archived": channel.archived,
                    "auto_archive_duration": 1440,
                    "archive_timestamp": _iso(channel.id),
                    "locked": False,
                    "create_timestamp": _iso(channel.id),
                },
            )
            return payload
        payload.update(
            position=channel.position,
            permission_overwrites=[
                {
                    "id": str(target),
                    "type": 0 if target in self.roles else 1,
                    "allow": str(allow),
                    "deny": str(deny),
                }
                for target, (allow, deny) in channel.overwrites.items()
            ],
        )
        if channel.type in (0, 5):
            payload.update(
                topic=channel.topic,
                last_message_id=str(channel.last_message_id) if channel.last_message_id else None,
                default_auto_archive_duration=1440,
            )
        elif channel.type == 2:
            payload.update(bitrate=64000, user_limit=0, rtc_region=None, last_message_id=None)
        return payload

    def payload(self, *, full: bool = True, members: Iterable[int] | None = None) -> JSON:
        """The guild object; ``full`` adds the GUILD_CREATE extras (members, channels, threads ...)."""
        text = self.text_channels
        payload: JSON = {
            "id": str(self.id),
            "name": self.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(self.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": self.premium_tier,
            "premium_subscription_count": 0,
            "premium_progress_bar_enabled": False,
            "preferred_locale": self.locale,
            "roles": [r.to_payload() for r in self.roles.values()],
            "emojis": [],
            "stickers": [],
            "features": [],
            "application_id": None,
            "system_channel_id": str(text[0].id) if text else None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "safety_alerts_channel_id": None,
            "vanity_url_code": None,
            "max_members": 500000,
            "max_video_channel_users": 25,
            "incidents_data": None,
        }
        if full:
            ids = list(self.members) if members is None else [m for m in members if m in self.members]
            payload.update(
                joined_at=self.joined_at,
                large=False,
                unavailable=False,
                lazy=True,
                member_count=len(self.members),
                members=[self.members[m].to_payload() for m in ids],
                channels=[self.channel_payload(c) for c in self.channels.values() if not c.is_thread],
                threads=[
                    self.channel_payload(c) for c in self.channels.values() if c.is_thread and not c.archived
                ],
                presences=[],
                voice_states=[],
                stage_instances=[],
                guild_scheduled_events=[],
                soundboard_sounds=[],
                embedded_activities=[],
            )
        return payload


# ------------------------------------------------------------------------------------------- records


@dataclass
class UploadedFile:
    field: str
    filename: str
    data: bytes
    content_type: str | None

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass
class Request:
    """One REST call the bot made (also 429s and errors). ``json`` is the JSON body or the parsed
    ``payload_json`` part of a multipart body; ``route`` is the template, e.g. ``POST /channels/{channel_id}/messages``."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    files: list[UploadedFile] = field(default_factory=list)
    multipart: bool = False
    route: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    status: int = 0
    response: Any = None
    interaction: FakeInteraction | None = None
    message: FakeMessage | None = None
    time: float = field(default_factory=time.monotonic)

    @property
    def code(self) -> int | None:
        """Discord's JSON error code for a failed call (e.g. 40005, 50035), else None."""
        return self.response.get("code") if isinstance(self.response, dict) and self.status >= 400 else None

    def matches(self, spec: str) -> bool:
        """``"POST /channels/{channel_id}/messages"`` (a route) or ``"POST /channels/123/messages"`` (a path)."""
        method, _, target = spec.partition(" ")
        if method.upper() not in (self.method, "*"):
            return False
        return target in (self.route.partition(" ")[2] if self.route else None, self.path)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path} -> {self.status}>"


def modal_text_fields(modal: JSON) -> list[str]:
    """The custom_ids of a modal's text inputs (``ix.wait_modal()``'s data), for ``submit_modal``."""
    return [c["custom_id"] for c in _walk_components(modal.get("components") or []) if c.get("type") == 4]


def _walk_components(components: Iterable[JSON]) -> Iterator[JSON]:
    for component in components:
        yield component
        yield from _walk_components(component.get("components") or [])
        for key in ("component", "accessory"):
            if isinstance(component.get(key), dict):
                yield from _walk_components([component[key]])


class FakeMessage:
    """A message stored by the fake. ``payload`` is the Discord message object as the bot last saw it."""

    def __init__(
        self,
        fake: FakeDiscord,
        payload: JSON,
        *,
        interaction: FakeInteraction | None = None,
        allowed_mentions: JSON | None = None,
    ) -> None:
        self._fake = fake
        self.payload = payload
        self.interaction = interaction
        self.allowed_mentions = allowed_mentions
        self.deleted = False
        self.history: list[JSON] = []  # earlier versions of payload, oldest first
        self.reactions: dict[str, list[int]] = {}  # emoji key ("👍" or "name:id") -> user ids

    id = property(lambda self: int(self.payload["id"]))
    channel_id = property(lambda self: int(self.payload["channel_id"]))
    author_id = property(lambda self: int(self.payload["author"]["id"]))
    content = property(lambda self: self.payload.get("content") or "")
    embeds = property(lambda self: self.payload.get("embeds") or [])
    components = property(lambda self: self.payload.get("components") or [])
    attachments = property(lambda self: self.payload.get("attachments") or [])
    flags = property(lambda self: int(self.payload.get("flags") or 0))
    ephemeral = property(lambda self: bool(self.flags & FLAG_EPHEMERAL))
    loading = property(lambda self: bool(self.flags & FLAG_LOADING))
    edited = property(lambda self: bool(self.history))

    @property
    def files(self) -> list[tuple[str, bytes]]:
        return [(a["filename"], self._fake.file_bytes(a)) for a in self.attachments]

    @property
    def custom_ids(self) -> list[str]:
        return [c["custom_id"] for c in _walk_components(self.components) if c.get("custom_id")]

    def component(self, custom_id: str) -> JSON | None:
        return next((c for c in _walk_components(self.components) if c.get("custom_id") == custom_id), None)

    @property
    def text(self) -> str:
        """Content plus embed titles/descriptions/fields and text displays, for loose assertions."""
        parts = [self.content]
        for embed in self.embeds:
            parts += [embed.get("title") or "", embed.get("description") or ""]
            parts += [f"{f.get('name')} {f.get('value')}" for f in embed.get("fields") or []]
        parts += [c.get("content") or "" for c in _walk_components(self.components) if c.get("type") == 10]
        return "\n".join(p for p in parts if p)

    def __repr__(self) -> str:
        extra = " ephemeral" if self.ephemeral else ""
        extra += " loading" if self.loading else ""
        extra += " deleted" if self.deleted else ""
        return f"<FakeMessage {self.id} in {self.channel_id}{extra} content={self.content[:60]!r} files={len(self.attachments)}>"


class FakeInteraction:
    """An interaction the test sent; collects the bot's callback, original response and followups."""

    def __init__(
        self, fake: FakeDiscord, payload: JSON, *, message: FakeMessage | None, size_limit: int
    ) -> None:
        self._fake = fake
        self.payload = payload
        self.id = int(payload["id"])
        self.token: str = payload["token"]
        self.type: int = payload["type"]
        user = payload["member"]["user"] if "member" in payload else payload["user"]
        self.user_id = int(user["id"])
        self.channel_id = int(payload["channel_id"])
        self.guild_id = int(payload["guild_id"]) if "guild_id" in payload else None
        self.message = message  # the message a component was on
        self.size_limit = size_limit
        self.created = time.monotonic()
        self.callback: Request | None = None
        self.callback_type: int | None = None
        self.original: FakeMessage | None = None
        self.followups: list[FakeMessage] = []
        self.modal: JSON | None = None
        self.choices: list[JSON] | None = None  # autocomplete result
        self._fill_pending = False  # deferred with type 5: the first followup fills the original

    @property
    def requests(self) -> list[Request]:
        return self._fake.responses_to(self)

    @property
    def messages(self) -> list[FakeMessage]:
        own = [self.original] if self.original is not None and self.original is not self.message else []
        return own + self.followups

    async def wait_callback(self, *, timeout: float = 5.0) -> Request:
        """The interaction callback request (``.json["type"]``: 4 message, 5 defer, 6, 7 update, 9 modal)."""
        return await self._fake.wait_until(
            lambda: self.callback, timeout=timeout, what=f"a callback to {self}"
        )

    async def wait_original(
        self, predicate: Callable[[FakeMessage], Any] | None = None, *, timeout: float = 5.0
    ) -> FakeMessage:
        """The original response once it is no longer "thinking" (and matches ``predicate``)."""

        def ready() -> FakeMessage | None:
            msg = self.original
            ok = msg is not None and not msg.loading and (predicate is None or predicate(msg))
            return msg if ok else None

        return await self._fake.wait_until(ready, timeout=timeout, what=f"the original response of {self}")

    async def wait_followups(self, count: int = 1, *, timeout: float = 5.0) -> list[FakeMessage]:
        return await self._fake.wait_until(
            lambda: self.followups[:count] if len(self.followups) >= count else None,
            timeout=timeout,
            what=f"{count} followup(s) of {self}",
        )

    async def wait_message(
        self, predicate: Callable[[FakeMessage], Any], *, timeout: float = 5.0
    ) -> FakeMessage:
        """Any response message (original or followup, not loading) matching ``predicate``."""
        return await self._fake.wait_until(
            lambda: next((m for m in self.messages if not m.loading and predicate(m)), None),
            timeout=timeout,
            what=f"a response message of {self} matching {predicate}",
        )

    async def wait_modal(self, *, timeout: float = 5.0) -> JSON:
        """The modal the bot opened (type 9 callback data: custom_id, title, components)."""
        return await self._fake.wait_until(lambda: self.modal, timeout=timeout, what=f"a modal from {self}")

    def __repr__(self) -> str:
        kind = {2: "command", 3: "component", 4: "autocomplete", 5: "modal submit"}.get(self.type, self.type)
        name = self.payload["data"].get("name") or self.payload["data"].get("custom_id")
        return f"<FakeInteraction {kind} {name!r} id={self.id} callback={self.callback_type}>"


# ------------------------------------------------------------------------------------------- gateway


@dataclass
class _Session:
    id: str
    intents: int | None
    identify: JSON
    seq: int = 0


class GatewayConnection:
    """One websocket connection from the bot."""

    def __init__(self, ws: web.WebSocketResponse, query: Mapping[str, str]) -> None:
        self.ws = ws
        self.query = dict(query)
        self.compress: str | None = self.query.get("compress")
        self.received: list[JSON] = []
        self.sent: list[JSON] = []
        self.binary_frames = 0
        self.text_frames = 0
        self.closed = False
        self.close_code: int | None = None
        # The code of the close frame the bot sent; None if it dropped the connection without one.
        self.close_frame: int | None = None
        self.session: _Session | None = None
        self._lock = asyncio.Lock()
        self._compress = self._compressor(self.compress)

    @staticmethod
    def _compressor(kind: str | None) -> Callable[[bytes], bytes] | None:
        if kind == "zlib-stream":
            zobj = zlib.compressobj()
            return lambda raw: zobj.compress(raw) + zobj.flush(zlib.Z_SYNC_FLUSH)
        if kind == "zstd-stream":  # discord.py uses zstd if `zstandard` / 3.14's compression.zstd exists
            try:
                import zstandard

                zstd_obj = zstandard.ZstdCompressor().compressobj()
                return lambda raw: zstd_obj.compress(raw) + zstd_obj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
            except ImportError:
                from compression import zstd  # type: ignore[import-not-found]

                zstd_c = zstd.ZstdCompressor()
                return lambda raw: zstd_c.compress(raw, mode=zstd.ZstdCompressor.FLUSH_BLOCK)
        return None

    async def send(self, payload: JSON, *, seq_for: _Session | None = None) -> None:
        async with self._lock:
            if seq_for is not None:
                seq_for.seq += 1
                payload["s"] = seq_for.seq
            raw = _dumps(payload)
            if self._compress is not None:
                await self.ws.send_bytes(self._compress(raw.encode()))
                self.binary_frames += 1
            else:
                await self.ws.send_str(raw)
                self.text_frames += 1
            self.sent.append(payload)

    async def send_dispatch(self, event: str, data: Any) -> None:
        await self.send({"op": 0, "t": event, "s": None, "d": data}, seq_for=self.session)

    def __repr__(self) -> str:
        return f"<GatewayConnection compress={self.compress} closed={self.closed} code={self.close_code}>"


# ------------------------------------------------------------------------------------------ patching


class _Patch:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._saved: tuple[str, yarl.URL, str] | None = None

    def apply(self) -> None:
        if self._saved is not None:
            return
        route, gateway, asset = discord.http.Route, discord.gateway.DiscordWebSocket, discord.asset.Asset
        self._saved = (route.BASE, gateway.DEFAULT_GATEWAY, asset.BASE)
        route.BASE = f"{self.base_url}/api/v{discord.http.INTERNAL_API_VERSION}"
        gateway.DEFAULT_GATEWAY = yarl.URL(self.base_url.replace("http://", "ws://", 1) + "/")
        asset.BASE = self.base_url

    def restore(self) -> None:
        if self._saved is None:
            return
        (
            discord.http.Route.BASE,
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY,
            discord.asset.Asset.BASE,
        ) = self._saved
        self._saved = None


@contextlib.contextmanager
def patch_discord(base_url: str) -> Iterator[None]:
    """Point discord.py's REST base, default gateway URL and CDN base at ``base_url`` (http://host:port)."""
    patch = _Patch(base_url)
    patch.apply()
    try:
        yield
    finally:
        patch.restore()


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


class _ErrorCapture(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.sink = sink
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.sink.append(self.format(record))


# ------------------------------------------------------------------------------------ the fake server


@dataclass
class _Route:
    method: str
    template: str
    parts: list[str]
    handler: Callable[[Request, dict[str, str]], Awaitable[Any]]
    auth: bool


@dataclass
class _StoredFile:
    filename: str
    data: bytes
    content_type: str | None


@dataclass
class _RateLimitRule:
    spec: str
    remaining: int
    retry_after: float
    is_global: bool


class FakeDiscord:
    """The fake Discord server. See the module docstring for an example.

    :param guild: the guild to serve (default: ``FakeGuild()``); ``guilds`` adds more.
    :param bot_permissions: the permissions of the bot's managed role in every guild.
    :param upload_limit: max bytes per file for DMs (guilds use ``FakeGuild.upload_limit``); larger -> 413/40005.
    :param interaction_timeout: if set, callbacks later than this many seconds get 404/10062 like Discord's 3 s.
    :param dispatch_message_events: send MESSAGE_CREATE/UPDATE/DELETE for the bot's own messages too.
    """

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
        bot_perms = _perm_value(bot_permissions, DEFAULT_BOT_PERMISSIONS)
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
        self._files: dict[int, _StoredFile] = {}
        # While set (hold_downloads), attachment downloads are recorded, then wait for it to be set.
        self._downloads_open: asyncio.Event | None = None
        self._command_ids: dict[tuple[int | None, int, str], int] = {}
        self._modals: dict[str, tuple[JSON, FakeInteraction]] = {}
        self._rate_limits: list[_RateLimitRule] = []
        self._sessions: dict[str, _Session] = {}
        self.session: _Session | None = None
        self._active: GatewayConnection | None = None
        self._ready_count = 0  # IDENTIFYs answered with READY + GUILD_CREATE
        self._outbox: deque[tuple[str, JSON, asyncio.Future[None]]] = deque()
        self._outbox_event: asyncio.Event | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._runner: web.AppRunner | None = None
        self._patch: _Patch | None = None
        self.port = 0
        self._routes = self._build_routes()

    # ================================================================================ lifecycle
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
            self._patch = _Patch(self.base_url)
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

    # ================================================================================ waiting
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

    async def flush(self, *, timeout: float = 5.0) -> None:
        """Wait until every queued gateway event has been written to the bot's socket."""
        pending = [fut for _, _, fut in self._outbox]
        if pending:
            _, not_done = await asyncio.wait(pending, timeout=timeout)
            if not_done:
                raise WaitTimeout(self._report("queued gateway events to be delivered"))

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

    # ================================================================================ accessors
    @property
    def intents(self) -> int | None:
        return self.session.intents if self.session else None

    def _has_intent(self, bit: int) -> bool:
        intents = self.intents
        return intents is None or bool(intents & bit)

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

    def file_bytes(self, attachment: JSON | int) -> bytes:
        att_id = _id_of(attachment)
        return self._files[att_id].data

    # ================================================================================ test controls
    def rate_limit(
        self, route: str, count: int = 1, *, retry_after: float = 0.05, is_global: bool = False
    ) -> None:
        """Answer the next ``count`` requests matching ``route`` (see ``Request.matches``; ``"*"`` = any)
        with 429 + X-RateLimit-* headers and ``retry_after`` seconds."""
        self._rate_limits.append(_RateLimitRule(route, count, retry_after, is_global))

    def hold_downloads(self) -> None:
        """Attachment downloads from now on are recorded in ``cdn_requests`` (and wake waiters) but
        answered only at ``release_downloads()``: a test sees whose photos are being fetched."""
        self._downloads_open = asyncio.Event()

    def release_downloads(self) -> None:
        if self._downloads_open is not None:
            self._downloads_open.set()
            self._downloads_open = None

    def add_attachment(
        self,
        filename: str,
        data: bytes,
        content_type: str | None = None,
        *,
        description: str | None = None,
        width: int | None = None,
        height: int | None = None,
        channel_id: int | None = None,
    ) -> JSON:
        """Register bytes on the fake CDN and return the attachment object (to pass as a slash option or
        in ``post_user_message``). Image width/height are read with Pillow when not given."""
        att_id = new_snowflake()
        filename = _sanitize_filename(filename)
        content_type = content_type or mimetypes.guess_type(filename)[0]
        self._files[att_id] = _StoredFile(filename, bytes(data), content_type)
        if channel_id is None:
            path = f"/ephemeral-attachments/{self.application_id}/{att_id}/{quote(filename)}"
        else:
            path = f"/attachments/{channel_id}/{att_id}/{quote(filename)}"
        sig = hashlib.sha256(f"{att_id}".encode()).hexdigest()
        url = f"{self.base_url}{path}?ex={int(time.time()) + 86400:x}&is={int(time.time()):x}&hm={sig}&"
        payload: JSON = {
            "id": str(att_id),
            "filename": filename,
            "size": len(data),
            "url": url,
            "proxy_url": url,
        }
        if content_type:
            payload["content_type"] = content_type
        if description:
            payload["description"] = description
        if content_type and content_type.startswith("image/"):
            size = (width, height) if width and height else _image_size(data)
            if size:
                payload["width"], payload["height"] = size
        if channel_id is None:
            payload["ephemeral"] = True
        return payload

    def _coerce_attachment(self, value: Any, *, channel_id: int | None = None) -> JSON:
        if isinstance(value, dict):
            if int(value["id"]) not in self._files:
                raise ValueError(f"attachment {value['id']} was not registered with add_attachment()")
            return value
        if isinstance(value, tuple) and len(value) in (2, 3):
            return self.add_attachment(*value, channel_id=channel_id)
        raise TypeError(
            f"an attachment is add_attachment()'s dict or (filename, bytes[, content_type]), not {value!r}"
        )

    # ================================================================================ gateway side
    async def _writer(self) -> None:
        assert self._outbox_event is not None
        while True:
            await self._outbox_event.wait()
            self._outbox_event.clear()
            while self._outbox and self._active is not None and not self._active.closed:
                event, data, fut = self._outbox[0]
                conn = self._active
                try:
                    await conn.send_dispatch(event, data)
                except Exception as exc:
                    _log.debug("gateway send failed (%r); waiting for a new connection", exc)
                    conn.closed = True
                    if self._active is conn:
                        self._active = None
                    break
                self._outbox.popleft()
                if not fut.done():
                    fut.set_result(None)
            self._notify()

    def _enqueue(self, event: str, data: JSON) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outbox.append((event, data, fut))
        if self._outbox_event is not None:
            self._outbox_event.set()
        return fut

    def _enqueue_if(self, event: str, data: JSON, intent: int | None) -> asyncio.Future[None] | None:
        if intent is not None and not self._has_intent(intent):
            self.suppressed_events.append((event, data))
            return None
        return self._enqueue(event, data)

    async def dispatch(self, event: str, data: JSON, *, timeout: float = 5.0) -> None:
        """Send any gateway event (``t`` = ``event``, ``d`` = ``data``) and wait until it is written."""
        fut = self._enqueue(event, data)
        await asyncio.wait({fut}, timeout=timeout)
        if not fut.done():
            raise WaitTimeout(self._report(f"a gateway connection to deliver {event}"))

    async def reconnect(self, *, timeout: float = 10.0) -> None:
        """Send op 7 RECONNECT and wait until the bot has resumed (or re-identified)."""
        conn = self._active
        if conn is None:
            raise RuntimeError("no active gateway connection")
        before = len(self.resumes) + len(self.identifies)
        await conn.send({"op": 7, "d": None, "s": None, "t": None})
        await self.wait_until(
            lambda: len(self.resumes) + len(self.identifies) > before and self._active not in (None, conn),
            timeout=timeout,
            what="the bot to reconnect",
        )

    async def _ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0, autoping=True)
        await ws.prepare(request)
        conn = GatewayConnection(ws, request.query)
        self.connections.append(conn)
        try:
            if request.query.get("encoding", "json") != "json":
                await ws.close(code=4002, message=b"the fake only speaks encoding=json")
                return ws
            await conn.send(
                {"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval}, "s": None, "t": None}
            )
            # ws.receive(), not `async for`, which swallows the bot's close frame.
            ends = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)
            while (msg := await ws.receive()).type not in ends:
                if msg.type == WSMsgType.TEXT:
                    try:
                        await self._on_gateway(conn, json.loads(msg.data))
                    except Exception:
                        _log.exception("fake gateway failed to handle %s", msg.data[:200])
                elif msg.type == WSMsgType.ERROR:
                    break
            if msg.type == WSMsgType.CLOSE:
                conn.close_frame = msg.data
        finally:
            conn.closed = True
            conn.close_code = ws.close_code
            if self._active is conn:
                self._active = None
            self._notify()
        return ws

    async def _on_gateway(self, conn: GatewayConnection, payload: JSON) -> None:
        conn.received.append(payload)
        op, data = payload.get("op"), payload.get("d")
        if op == 1:
            await conn.send({"op": 11, "d": None, "s": None, "t": None})
        elif op == 2:
            await self._identify(conn, data)
        elif op == 6:
            await self._resume(conn, data)
        elif op == 8:
            self._request_members(data)
        self._notify()

    async def _identify(self, conn: GatewayConnection, data: JSON) -> None:
        self.identifies.append(data)
        if data.get("token") != self.token:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        session = _Session(secrets.token_hex(16), data.get("intents"), data)
        self._sessions[session.id] = session
        self.session = conn.session = session
        shard = data.get("shard") or [0, 1]
        guilds = [g for g in self.guilds.values() if (g.id >> 22) % shard[1] == shard[0]]
        ready: JSON = {
            "v": 10,
            "user": {**self.bot_user.to_payload(), "verified": True, "mfa_enabled": False, "email": None},
            "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.application_id), "flags": _APP_FLAGS},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": ["fake"],
            "user_settings": {},
            "_trace": ["fakediscord"],
        }
        if data.get("shard"):
            ready["shard"] = shard
        await conn.send_dispatch("READY", ready)
        members_intent = self._has_intent(INTENT_GUILD_MEMBERS)
        for g in guilds:
            await conn.send_dispatch(
                "GUILD_CREATE", g.payload(members=None if members_intent else [self.bot_id])
            )
        self._activate(conn)
        self._ready_count += 1

    async def _resume(self, conn: GatewayConnection, data: JSON) -> None:
        self.resumes.append(data)
        session = self._sessions.get(data.get("session_id", ""))
        if session is None or data.get("token") != self.token:
            await conn.send({"op": 9, "d": False, "s": None, "t": None})
            return
        self.session = conn.session = session
        await conn.send_dispatch("RESUMED", {"_trace": ["fakediscord"]})
        self._activate(conn)

    def _activate(self, conn: GatewayConnection) -> None:
        self._active = conn
        if self._outbox_event is not None:
            self._outbox_event.set()

    def _request_members(self, data: JSON) -> None:
        guild_ids = data.get("guild_id")
        for gid in guild_ids if isinstance(guild_ids, list) else [guild_ids]:
            guild = self.guilds.get(int(gid))
            if guild is None:
                continue
            query, limit, user_ids = data.get("query"), data.get("limit") or 0, data.get("user_ids")
            wanted = [
                int(u) for u in (user_ids if isinstance(user_ids, list) else [user_ids] if user_ids else [])
            ]
            members = [
                m
                for m in guild.members.values()
                if (not wanted or m.user.id in wanted)
                and (not query or m.user.name.lower().startswith(query.lower()))
            ]
            if limit:
                members = members[:limit]
            chunk: JSON = {
                "guild_id": str(guild.id),
                "members": [m.to_payload() for m in members],
                "chunk_index": 0,
                "chunk_count": 1,
                "not_found": [str(u) for u in wanted if u not in guild.members],
            }
            if data.get("presences"):
                chunk["presences"] = []
            if data.get("nonce") is not None:
                chunk["nonce"] = data["nonce"]
            self._enqueue("GUILD_MEMBERS_CHUNK", chunk)

    # ================================================================================ REST plumbing
    def _build_routes(self) -> list[_Route]:
        table: list[tuple[str, str, Callable[[Request, dict[str, str]], Awaitable[Any]], bool]] = [
            ("GET", "/gateway", self._r_gateway, False),
            ("GET", "/gateway/bot", self._r_gateway, True),
            ("GET", "/users/@me", self._r_me, True),
            ("POST", "/users/@me/channels", self._r_create_dm, True),
            ("GET", "/users/{user_id}", self._r_user, True),
            ("GET", "/oauth2/applications/@me", self._r_appinfo, True),
            ("GET", "/applications/@me", self._r_appinfo, True),
            ("GET", "/applications/{application_id}/commands", self._r_get_commands, True),
            ("PUT", "/applications/{application_id}/commands", self._r_put_commands, True),
            ("POST", "/applications/{application_id}/commands", self._r_post_command, True),
            ("GET", "/applications/{application_id}/guilds/{guild_id}/commands", self._r_get_commands, True),
            ("PUT", "/applications/{application_id}/guilds/{guild_id}/commands", self._r_put_commands, True),
            ("POST", "/applications/{application_id}/guilds/{guild_id}/commands", self._r_post_command, True),
            (
                "GET",
                "/applications/{application_id}/guilds/{guild_id}/commands/permissions",
                self._r_empty,
                True,
            ),
            ("GET", "/applications/{application_id}/entitlements", self._r_empty, True),
            ("POST", "/interactions/{interaction_id}/{interaction_token}/callback", self._r_callback, False),
            ("POST", "/webhooks/{application_id}/{interaction_token}", self._r_followup, False),
            (
                "GET",
                "/webhooks/{application_id}/{interaction_token}/messages/{message_id}",
                self._r_wh_get,
                False,
            ),
            (
                "PATCH",
                "/webhooks/{application_id}/{interaction_token}/messages/{message_id}",
                self._r_wh_edit,
                False,
            ),
            (
                "DELETE",
                "/webhooks/{application_id}/{interaction_token}/messages/{message_id}",
                self._r_wh_del,
                False,
            ),
            ("GET", "/channels/{channel_id}", self._r_get_channel, True),
            ("GET", "/channels/{channel_id}/messages", self._r_history, True),
            ("POST", "/channels/{channel_id}/messages", self._r_send, True),
            ("POST", "/channels/{channel_id}/typing", self._r_typing, True),
            ("POST", "/channels/{channel_id}/threads", self._r_thread, True),
            ("GET", "/channels/{channel_id}/messages/{message_id}", self._r_get_message, True),
            ("PATCH", "/channels/{channel_id}/messages/{message_id}", self._r_edit_message, True),
            ("DELETE", "/channels/{channel_id}/messages/{message_id}", self._r_delete_message, True),
            ("POST", "/channels/{channel_id}/messages/{message_id}/threads", self._r_thread, True),
            (
                "PUT",
                "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me",
                self._r_react,
                True,
            ),
            (
                "DELETE",
                "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/{user_id}",
                self._r_unreact,
                True,
            ),
            ("GET", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}", self._r_reactors, True),
            (
                "DELETE",
                "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}",
                self._r_clear_reacts,
                True,
            ),
            ("DELETE", "/channels/{channel_id}/messages/{message_id}/reactions", self._r_clear_reacts, True),
            ("GET", "/guilds/{guild_id}", self._r_guild, True),
            ("GET", "/guilds/{guild_id}/channels", self._r_guild_channels, True),
            ("GET", "/guilds/{guild_id}/roles", self._r_guild_roles, True),
            ("GET", "/guilds/{guild_id}/members", self._r_guild_members, True),
            ("GET", "/guilds/{guild_id}/members/{user_id}", self._r_guild_member, True),
        ]
        return [_Route(m, t, t.strip("/").split("/"), h, a) for m, t, h, a in table]

    def _match(self, method: str, raw_parts: list[str]) -> tuple[_Route, dict[str, str]] | None:
        for route in self._routes:
            if route.method != method or len(route.parts) != len(raw_parts):
                continue
            params: dict[str, str] = {}
            for want, got in zip(route.parts, raw_parts, strict=True):
                if want.startswith("{"):
                    params[want[1:-1]] = unquote(got)
                elif want != unquote(got):
                    break
            else:
                return route, params
        return None

    async def _read_body(self, request: web.Request) -> tuple[Any, list[UploadedFile], bool]:
        if not request.body_exists:
            return None, [], False
        if request.content_type.startswith("multipart/"):
            body: Any = None
            files: list[UploadedFile] = []
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    continue
                data = bytes(await part.read())
                if part.name == "payload_json":
                    body = json.loads(data.decode())
                elif part.filename is not None:
                    files.append(
                        UploadedFile(part.name or "", part.filename, data, part.headers.get("Content-Type"))
                    )
                else:
                    body = body if isinstance(body, dict) else {}
                    body[part.name or ""] = data.decode(errors="replace")
            return body, files, True
        raw = await request.read()
        if not raw:
            return None, [], False
        try:
            return json.loads(raw), [], False
        except ValueError:
            return raw.decode(errors="replace"), [], False

    def _take_rate_limit(self, req: Request) -> _RateLimitRule | None:
        for rule in self._rate_limits:
            if rule.remaining > 0 and (rule.spec == "*" or req.matches(rule.spec)):
                rule.remaining -= 1
                return rule
        return None

    @staticmethod
    def _headers(route: str | None, *, limited: _RateLimitRule | None = None) -> dict[str, str]:
        bucket = hashlib.md5((route or "unknown").encode()).hexdigest()
        reset_after = limited.retry_after if limited else 1.0
        headers = {
            "Via": "1.1 google",
            "X-RateLimit-Bucket": bucket,
            "X-RateLimit-Limit": "5" if limited else "50",
            "X-RateLimit-Remaining": "0" if limited else "49",
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
        }
        if limited:
            headers["Retry-After"] = str(max(1, round(limited.retry_after)))
            headers["X-RateLimit-Scope"] = "global" if limited.is_global else "user"
            if limited.is_global:
                headers["X-RateLimit-Global"] = "true"
        return headers

    async def _api_handler(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.rel_url.raw_path
        match = re.match(r"^/api(?:/v\d+)?(/.*)?$", raw_path)
        sub = (match.group(1) if match else None) or "/"
        body, files, multipart = await self._read_body(request)
        req = Request(request.method, unquote(sub), dict(request.query), body, files, multipart)
        found = self._match(request.method, sub.strip("/").split("/"))
        limited: _RateLimitRule | None = None
        result: Any
        try:
            if found is None:
                self.unhandled.append(req)
                raise _ApiError(404, 0, "404: Not Found")
            route, params = found
            req.route, req.params = f"{route.method} {route.template}", params
            req.interaction = self._by_token.get(params.get("interaction_token", ""))
            limited = self._take_rate_limit(req)
            if limited is not None:
                raise _ApiError(429, 0, "You are being rate limited.")
            if route.auth and request.headers.get("Authorization") != f"Bot {self.token}":
                raise _ApiError(401, 0, "401: Unauthorized")
            result = await route.handler(req, params)
            status = 204 if result is _NO_CONTENT else 200
        except _ApiError as exc:
            status, result = exc.status, exc.body()
            if limited is not None:
                result = {
                    "message": exc.message,
                    "retry_after": limited.retry_after,
                    "global": limited.is_global,
                }
                if limited.is_global:
                    result["code"] = 0
        except Exception as exc:
            _log.exception("fake discord failed on %s %s", req.method, req.path)
            status, result = 500, {"message": f"fake discord bug: {exc!r}", "code": 0}
        req.status = status
        req.response = None if result is _NO_CONTENT else result
        self.requests.append(req)
        self._notify()
        headers = self._headers(req.route, limited=limited)
        if result is _NO_CONTENT:
            return web.Response(status=204, headers=headers)
        # discord.py's json_or_text() compares content-type to exactly "application/json" (no charset)
        headers["Content-Type"] = "application/json"
        return web.Response(body=_dumps(result).encode(), status=status, headers=headers)

    async def _cdn_handler(self, request: web.Request) -> web.StreamResponse:
        parts = request.match_info["tail"].split("/")
        req = Request("GET", request.path, dict(request.query), None)
        stored = None
        if len(parts) == 3 and parts[1].isdigit():
            stored = self._files.get(int(parts[1]))
            if stored is not None and stored.filename != unquote(parts[2]):
                stored = None
        req.status = 200 if stored else 404
        self.cdn_requests.append(req)
        self._notify()
        if self._downloads_open is not None:
            await self._downloads_open.wait()
        if stored is None:
            return web.Response(status=404, text="This content is no longer available.")
        return web.Response(body=stored.data, content_type=stored.content_type or "application/octet-stream")

    # ================================================================================ REST: basics
    async def _r_empty(self, req: Request, p: dict[str, str]) -> Any:
        return []

    async def _r_gateway(self, req: Request, p: dict[str, str]) -> Any:
        url = self.gateway_url.rstrip("/")
        if req.path.endswith("/bot"):
            limit = {"total": 1000, "remaining": 999, "reset_after": 14400000, "max_concurrency": 1}
            return {"url": url, "shards": 1, "session_start_limit": limit}
        return {"url": url}

    async def _r_me(self, req: Request, p: dict[str, str]) -> Any:
        return {
            **self.bot_user.to_payload(),
            "verified": True,
            "mfa_enabled": False,
            "locale": "en-US",
            "email": None,
        }

    async def _r_user(self, req: Request, p: dict[str, str]) -> Any:
        try:
            return self.user(int(p["user_id"])).to_payload()
        except (KeyError, ValueError):
            raise _not_found("User", 10013) from None

    async def _r_appinfo(self, req: Request, p: dict[str, str]) -> Any:
        owner = self.user(self.guild.owner_id)
        return {
            "id": str(self.application_id),
            "name": self.bot_user.name,
            "icon": None,
            "description": "",
            "summary": "",
            "type": None,
            "hook": True,
            "bot_public": True,
            "bot_require_code_grant": False,
            "verify_key": "0" * 64,
            "flags": _APP_FLAGS,
            "owner": owner.to_payload(),
            "team": None,
            "bot": self.bot_user.to_payload(),
            "tags": [],
            "redirect_uris": [],
            "interactions_endpoint_url": None,
            "role_connections_verification_url": None,
            "approximate_guild_count": len(self.guilds),
            "integration_types_config": {"0": {}},
        }

    async def _r_create_dm(self, req: Request, p: dict[str, str]) -> Any:
        try:
            user_id = int((req.json or {})["recipient_id"])
            self.user(user_id)
        except (KeyError, TypeError, ValueError):
            raise _ApiError(400, 50033, "Invalid Recipient(s)") from None
        return self.channel_payload(self.dm_channel_id(user_id))

    # ================================================================================ REST: guilds
    def _guild_of(self, p: dict[str, str]) -> FakeGuild:
        try:
            return self.guilds[int(p["guild_id"])]
        except (KeyError, ValueError):
            raise _not_found("Guild", 10004) from None

    async def _r_guild(self, req: Request, p: dict[str, str]) -> Any:
        guild = self._guild_of(p)
        payload = guild.payload(full=False)
        if req.query.get("with_counts") in ("true", "1", "True"):
            payload.update(approximate_member_count=len(guild.members), approximate_presence_count=0)
        return payload

    async def _r_guild_channels(self, req: Request, p: dict[str, str]) -> Any:
        guild = self._guild_of(p)
        return [guild.channel_payload(c) for c in guild.channels.values() if not c.is_thread]

    async def _r_guild_roles(self, req: Request, p: dict[str, str]) -> Any:
        return [r.to_payload() for r in self._guild_of(p).roles.values()]

    async def _r_guild_members(self, req: Request, p: dict[str, str]) -> Any:
        guild = self._guild_of(p)
        after = int(req.query.get("after", 0))
        limit = int(req.query.get("limit", 1))
        members = sorted((m for m in guild.members.values() if m.user.id > after), key=lambda m: m.user.id)
        return [m.to_payload() for m in members[:limit]]

    async def _r_guild_member(self, req: Request, p: dict[str, str]) -> Any:
        guild = self._guild_of(p)
        member = guild.members.get(int(p["user_id"])) if p["user_id"].isdigit() else None
        if member is None:
            raise _not_found("Member", 10007)
        return member.to_payload()

    # ================================================================================ REST: commands
    async def _r_get_commands(self, req: Request, p: dict[str, str]) -> Any:
        self._check_app(p)
        return self.commands.get(int(p["guild_id"]) if "guild_id" in p else None, [])

    async def _r_put_commands(self, req: Request, p: dict[str, str]) -> Any:
        self._check_app(p)
        guild_id = self._guild_of(p).id if "guild_id" in p else None
        payload = req.json if isinstance(req.json, list) else []
        problems = self._command_problems(payload)
        if problems:
            raise _form_error(problems)
        self.commands[guild_id] = [self._store_command(c, guild_id) for c in payload]
        self.sync_count += 1
        return self.commands[guild_id]

    async def _r_post_command(self, req: Request, p: dict[str, str]) -> Any:
        self._check_app(p)
        guild_id = self._guild_of(p).id if "guild_id" in p else None
        problems = self._command_problems([req.json])
        if problems:
            raise _form_error(problems)
        stored = self._store_command(req.json, guild_id)
        cmds = [
            c
            for c in self.commands.get(guild_id, [])
            if (c["name"], c["type"]) != (stored["name"], stored["type"])
        ]
        self.commands[guild_id] = [*cmds, stored]
        return stored

    def _check_app(self, p: dict[str, str]) -> None:
        if p.get("application_id") != str(self.application_id):
            raise _not_found("Application", 10002)

    def _store_command(self, data: JSON, guild_id: int | None) -> JSON:
        cmd = copy.deepcopy(data)
        cmd_type = cmd.setdefault("type", 1)
        key = (guild_id, cmd_type, cmd["name"])
        cmd_id = self._command_ids.setdefault(key, new_snowflake())
        cmd.update(id=str(cmd_id), application_id=str(self.application_id), version=str(new_snowflake()))
        cmd.setdefault("description", "")
        perms = cmd.get("default_member_permissions")
        cmd["default_member_permissions"] = None if perms is None else str(perms)  # Discord answers a string
        cmd.setdefault("nsfw", False)
        cmd.setdefault("integration_types", [0])
        cmd.setdefault("contexts", None)
        if guild_id is not None:
            cmd["guild_id"] = str(guild_id)
        return cmd

    _NAME_RE = re.compile(r"^[-_'\w]{1,32}$")

    def _command_problems(self, payload: list[Any]) -> list[_Problem]:
        problems: list[_Problem] = []
        seen: set[tuple[int, str]] = set()
        for i, cmd in enumerate(payload):
            if not isinstance(cmd, dict) or not isinstance(cmd.get("name"), str):
                problems.append(((i, "name"), "BASE_TYPE_REQUIRED", "This field is required"))
                continue
            cmd_type, name = cmd.get("type", 1), cmd["name"]
            if cmd_type == 1:
                if not self._NAME_RE.match(name) or name != name.lower():
                    problems.append(
                        ((i, "name"), "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")
                    )
                if not 1 <= len(cmd.get("description") or "") <= 100:
                    problems.append(
                        ((i, "description"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")
                    )
                problems += self._option_problems(cmd.get("options") or [], (i, "options"))
            elif not 1 <= len(name) <= 32:
                problems.append(((i, "name"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 32 in length."))
            if (cmd_type, name) in seen:
                problems.append(
                    ((i, "name"), "APPLICATION_COMMANDS_DUPLICATE_NAME", f"Duplicate name {name!r}")
                )
            seen.add((cmd_type, name))
        return problems

    def _option_problems(self, options: list[JSON], path: tuple[Any, ...]) -> list[_Problem]:
        problems: list[_Problem] = []
        if len(options) > 25:
            problems.append((path, "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length."))
        optional_seen = False
        names: set[str] = set()
        for j, opt in enumerate(options):
            name = opt.get("name") or ""
            if not self._NAME_RE.match(name) or name != name.lower():
                problems.append(
                    ((*path, j, "name"), "APPLICATION_COMMAND_INVALID_NAME", "Option name is invalid")
                )
            if name in names:
                problems.append(
                    ((*path, j, "name"), "APPLICATION_COMMAND_OPTIONS_NAME_ALREADY_EXISTS", "Duplicate")
                )
            names.add(name)
            if not 1 <= len(opt.get("description") or "") <= 100:
                problems.append(
                    (
                        (*path, j, "description"),
                        "BASE_TYPE_BAD_LENGTH",
                        "Must be between 1 and 100 in length.",
                    )
                )
            if opt.get("type") in (1, 2):
                problems += self._option_problems(opt.get("options") or [], (*path, j, "options"))
                continue
            if opt.get("required"):
                if optional_seen:
                    problems.append(
                        (
                            (*path, j),
                            "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                            "Required options must be first",
                        )
                    )
            else:
                optional_seen = True
            if len(opt.get("choices") or []) > 25:
                problems.append(
                    ((*path, j, "choices"), "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
                )
        return problems

    # ================================================================================ REST: channels
    def _channel_or_404(self, p: dict[str, str]) -> tuple[FakeChannel, FakeGuild | None]:
        try:
            return self.channel(int(p["channel_id"]))
        except (KeyError, ValueError):
            raise _not_found("Channel", 10003) from None

    def _require(self, channel: FakeChannel, guild: FakeGuild | None, perms: int) -> None:
        if guild is None:
            return
        have = guild.permissions_for(self.bot_id, channel.id)
        if not have & P_VIEW_CHANNEL:
            raise _ApiError(403, 50001, "Missing Access")
        if have & perms != perms:
            raise _ApiError(403, 50013, "Missing Permissions")

    def _message_or_404(self, p: dict[str, str]) -> FakeMessage:
        msg = self.messages.get(int(p["message_id"])) if p["message_id"].isdigit() else None
        if msg is None or msg.deleted or msg.ephemeral or msg.channel_id != int(p["channel_id"]):
            raise _not_found("Message", 10008)
        return msg

    async def _r_get_channel(self, req: Request, p: dict[str, str]) -> Any:
        channel, guild = self._channel_or_404(p)
        self._require(channel, guild, 0)
        return self.channel_payload(channel.id)

    async def _r_typing(self, req: Request, p: dict[str, str]) -> Any:
        channel, guild = self._channel_or_404(p)
        self._require(channel, guild, P_SEND_IN_THREADS if channel.is_thread else P_SEND_MESSAGES)
        return _NO_CONTENT

    async def _r_history(self, req: Request, p: dict[str, str]) -> Any:
        channel, guild = self._channel_or_404(p)
        self._require(channel, guild, P_READ_HISTORY)
        limit = max(1, min(100, int(req.query.get("limit", 50))))
        msgs = self.messages_in(channel.id, ephemeral=False)
        if "before" in req.query:
            msgs = [m for m in msgs if m.id < int(req.query["before"])]
            msgs = msgs[-limit:]
        elif "after" in req.query:
            msgs = [m for m in msgs if m.id > int(req.query["after"])][:limit]
        elif "around" in req.query:
            around = int(req.query["around"])
            older = [m for m in msgs if m.id <= around][-((limit + 1) // 2) :]
            newer = [m for m in msgs if m.id > around][: limit - len(older)]
            msgs = older + newer
        else:
            msgs = msgs[-limit:]
        return [m.payload for m in reversed(msgs)]

    async def _r_get_message(self, req: Request, p: dict[str, str]) -> Any:
        channel, guild = self._channel_or_404(p)
        self._require(channel, guild, P_READ_HISTORY)
        msg = self._message_or_404(p)
        req.message = msg
        return msg.payload

    async def _r_send(self, req: Request, p: dict[str, str]) -> Any:
        channel, guild = self._channel_or_404(p)
        if channel.type == 4:
            raise _ApiError(400, 50008, "Cannot send messages in a non-text channel")
        body = req.json if isinstance(req.json, dict) else {}
        need = P_SEND_IN_THREADS if channel.is_thread else P_SEND_MESSAGES
        self._require(channel, guild, need | (P_ATTACH_FILES if req.files else 0))
        if guild is None and not self.user(channel.recipient_id or 0).dms_open:
            raise _ApiError(403, 50007, "Cannot send messages to this user")
        limit = guild.upload_limit if guild else self.upload_limit
        msg = self._create_message(channel, guild, body, req.files, author=self.bot_user, limit=limit)
        req.message = msg
        return msg.payload

    async def _r_edit_message(self, req: Request, p: dict[str, str]) -> Any:
        _, guild = self._channel_or_404(p)
        msg = self._message_or_404(p)
        if msg.author_id != self.bot_id:
            raise _ApiError(403, 50005, "Cannot edit a message authored by another user")
        limit = guild.upload_limit if guild else self.upload_limit
        self._edit_message(msg, req.json if isinstance(req.json, dict) else {}, req.files, limit=limit)
        req.message = msg
        return msg.payload

    async def _r_delete_message(self, req: Request, p: dict[str, str]) -> Any:
        channel, guild = self._channel_or_404(p)
        # Like Discord: a channel the bot cannot see refuses to delete even its own messages (403).
        self._require(channel, guild, 0)
        msg = self._message_or_404(p)
        if msg.author_id != self.bot_id:
            self._require(channel, guild, P_MANAGE_MESSAGES)
        self._delete_message(msg)
        req.message = msg
        return _NO_CONTENT

    async def _r_thread(self, req: Request, p: dict[str, str]) -> Any:
        channel, guild = self._channel_or_404(p)
        if guild is None or channel.type not in (0, 5):
            raise _ApiError(400, 50024, "Cannot execute action on this channel type")
        body = req.json if isinstance(req.json, dict) else {}
        name = str(body.get("name") or "")
        if not 1 <= len(name) <= 100:
            raise _form_error([(("name",), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")])
        start = self._message_or_404(p) if "message_id" in p else None
        thread_type = 11 if start else int(body.get("type", 12))
        self._require(
            channel, guild, P_CREATE_PUBLIC_THREADS if thread_type == 11 else P_CREATE_PRIVATE_THREADS
        )
        thread = FakeChannel(
            id=start.id if start else new_snowflake(),
            name=name,
            type=thread_type,
            guild_id=guild.id,
            parent_id=channel.id,
            owner_id=self.bot_id,
            rate_limit_per_user=int(body.get("rate_limit_per_user") or 0),
        )
        guild.channels[thread.id] = thread
        payload = guild.channel_payload(thread)
        if start is not None:
            start.payload["thread"] = payload
        self._enqueue("THREAD_CREATE", {**payload, "newly_created": True})
        return payload

    # -- reactions
    @staticmethod
    def _emoji_payload(key: str) -> JSON:
        name, _, emoji_id = key.rpartition(":")
        if emoji_id.isdigit() and name:
            return {"id": emoji_id, "name": name, "animated": False}
        return {"id": None, "name": key}

    @staticmethod
    def _emoji_key(emoji: str) -> str:
        """``"👍"`` stays; custom emoji (``<:name:id>``, ``:name:id``, ``a:name:id``) become ``"name:id"``."""
        parts = emoji.strip("<>").split(":")
        if len(parts) >= 2 and parts[-1].isdigit():
            return f"{parts[-2]}:{parts[-1]}"
        return emoji

    def _sync_reactions(self, msg: FakeMessage) -> None:
        for key in [k for k, users in msg.reactions.items() if not users]:
            del msg.reactions[key]
        reactions = []
        for key, users in msg.reactions.items():
            if users:
                reactions.append(
                    {
                        "emoji": self._emoji_payload(key),
                        "count": len(users),
                        "count_details": {"burst": 0, "normal": len(users)},
                        "burst_colors": [],
                        "me": self.bot_id in users,
                        "me_burst": False,
                        "burst_me": False,
                        "burst_count": 0,
                    }
                )
        if reactions:
            msg.payload["reactions"] = reactions
        else:
            msg.payload.pop("reactions", None)

    def _reaction_event(self, msg: FakeMessage, user_id: int, key: str, *, added: bool) -> None:
        _, guild = self.channel(msg.channel_id)
        data: JSON = {
            "user_id": str(user_id),
            "channel_id": str(msg.channel_id),
            "message_id": str(msg.id),
            "emoji": self._emoji_payload(key),
            "burst": False,
            "type": 0,
        }
        if guild is not None:
            data["guild_id"] = str(guild.id)
            if added and user_id in guild.members:
                data["member"] = guild.members[user_id].to_payload()
        if added:
            data["message_author_id"] = str(msg.author_id)
            data["burst_colors"] = []
        intent = INTENT_GUILD_MESSAGE_REACTIONS if guild else INTENT_DIRECT_MESSAGE_REACTIONS
        self._enqueue_if("MESSAGE_REACTION_ADD" if added else "MESSAGE_REACTION_REMOVE", data, intent)

    async def _r_react(self, req: Request, p: dict[str, str]) -> Any:
        channel, guild = self._channel_or_404(p)
        msg = self._message_or_404(p)
        key = self._emoji_key(p["emoji"])
        self._require(channel, guild, P_READ_HISTORY | (0 if msg.reactions.get(key) else P_ADD_REACTIONS))
        users = msg.reactions.setdefault(key, [])
        if self.bot_id not in users:
            users.append(self.bot_id)
            self._sync_reactions(msg)
            self._reaction_event(msg, self.bot_id, key, added=True)
        return _NO_CONTENT

    async def _r_unreact(self, req: Request, p: dict[str, str]) -> Any:
        channel, guild = self._channel_or_404(p)
        msg = self._message_or_404(p)
        user_id = self.bot_id if p["user_id"] == "@me" else int(p["user_id"])
        if user_id != self.bot_id:
            self._require(channel, guild, P_MANAGE_MESSAGES)
        key = self._emoji_key(p["emoji"])
        if user_id in msg.reactions.get(key, []):
            msg.reactions[key].remove(user_id)
            self._sync_reactions(msg)
            self._reaction_event(msg, user_id, key, added=False)
        return _NO_CONTENT

    async def _r_reactors(self, req: Request, p: dict[str, str]) -> Any:
        channel, guild = self._channel_or_404(p)
        self._require(channel, guild, P_READ_HISTORY)
        msg = self._message_or_404(p)
        users = sorted(msg.reactions.get(self._emoji_key(p["emoji"]), []))
        after = int(req.query.get("after", 0))
        limit = max(1, min(100, int(req.query.get("limit", 25))))
        return [self.user(u).to_payload() for u in users if u > after][:limit]

    async def _r_clear_reacts(self, req: Request, p: dict[str, str]) -> Any:
        channel, guild = self._channel_or_404(p)
        self._require(channel, guild, P_MANAGE_MESSAGES)
        msg = self._message_or_404(p)
        if "emoji" in p:
            msg.reactions.pop(self._emoji_key(p["emoji"]), None)
        else:
            msg.reactions.clear()
        self._sync_reactions(msg)
        return _NO_CONTENT

    # ================================================================================ messages
    def _check_uploads(self, files: Sequence[UploadedFile], limit: int) -> None:
        if any(f.size > limit for f in files):
            raise _ApiError(413, 40005, "Request entity too large")
        if len(files) > 10:
            raise _form_error([(("files",), "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")])

    def _build_attachments(
        self,
        channel_id: int,
        body: JSON,
        files: Sequence[UploadedFile],
        existing: list[JSON] | None,
        ephemeral: bool,
    ) -> list[JSON] | None:
        def store(upload: UploadedFile, entry: JSON | None) -> JSON:
            name = (entry or {}).get("filename") or upload.filename
            att = self.add_attachment(
                name,
                upload.data,
                mimetypes.guess_type(_sanitize_filename(name))[0],
                description=(entry or {}).get("description"),
                channel_id=None if ephemeral else channel_id,
            )
            if not ephemeral:
                att.pop("ephemeral", None)
            return att

        uploads: dict[str, UploadedFile] = {}
        for position, upload in enumerate(files):
            index = re.fullmatch(r"files?\[(\d+)\]", upload.field)
            uploads[index.group(1) if index else str(position)] = upload
        spec = body.get("attachments")
        if spec is None:
            if not files:
                return None
            return list(existing or []) + [store(u, None) for u in uploads.values()]
        kept = {a["id"]: a for a in existing or []}
        result: list[JSON] = []
        problems: list[_Problem] = []
        for i, entry in enumerate(spec):
            att_id = str(entry.get("id"))
            if att_id in kept:
                result.append(kept[att_id])
            elif att_id in uploads:
                result.append(store(uploads.pop(att_id), entry))
            else:
                problems.append(
                    (("attachments", i, "id"), "ATTACHMENT_NOT_FOUND", f"Unknown attachment {att_id}")
                )
        if problems:
            raise _form_error(problems)
        return result + [store(u, None) for u in uploads.values()]

    def _normalize_embeds(self, embeds: list[JSON], attachments: list[JSON]) -> list[JSON]:
        by_name = {a["filename"]: a for a in attachments}
        out = []
        for embed in embeds:
            embed = copy.deepcopy(embed)
            embed.setdefault("type", "rich")
            embed.setdefault("content_scan_version", 0)
            for key in ("image", "thumbnail"):
                media = embed.get(key)
                if isinstance(media, dict) and str(media.get("url", "")).startswith("attachment://"):
                    att = by_name.get(_sanitize_filename(media["url"][len("attachment://") :]))
                    if att is not None:
                        media.update(url=att["url"], proxy_url=att["proxy_url"], flags=0)
                        if "width" in att:
                            media.update(width=att["width"], height=att["height"])
                        if "content_type" in att:
                            media["content_type"] = att["content_type"]
            out.append(embed)
        return out

    @staticmethod
    def _normalize_components(components: list[JSON], attachments: list[JSON]) -> list[JSON]:
        """Number components like Discord and resolve ``attachment://`` media of v2 components."""
        components = copy.deepcopy(components)
        by_name = {a["filename"]: a for a in attachments}
        counter = itertools.count(1)
        for component in _walk_components(components):
            if "id" not in component:
                component["id"] = next(counter)
            media = [component.get("media"), component.get("file")]
            media += [item.get("media") for item in component.get("items") or [] if isinstance(item, dict)]
            for unfurled in media:
                url = unfurled.get("url", "") if isinstance(unfurled, dict) else ""
                att = (
                    by_name.get(_sanitize_filename(url[len("attachment://") :]))
                    if url.startswith("attachment://")
                    else None
                )
                if att is not None:
                    unfurled.update(url=att["url"], proxy_url=att["proxy_url"], attachment_id=att["id"])
                    unfurled.update({k: att[k] for k in ("width", "height", "content_type") if k in att})
        return components

    def _message_problems(self, body: JSON, flags: int) -> list[_Problem]:
        problems: list[_Problem] = []
        content = body.get("content")
        if isinstance(content, str) and len(content) > 2000:
            problems.append((("content",), "BASE_TYPE_MAX_LENGTH", "Must be 2000 or fewer in length."))
        embeds = body.get("embeds") or []
        if len(embeds) > 10:
            problems.append((("embeds",), "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length."))
        total = 0
        limits = {"title": 256, "description": 4096}
        for i, embed in enumerate(embeds):
            for key, limit in limits.items():
                value = embed.get(key) or ""
                total += len(value)
                if len(value) > limit:
                    problems.append(
                        (("embeds", i, key), "BASE_TYPE_MAX_LENGTH", f"Must be {limit} or fewer in length.")
                    )
            fields = embed.get("fields") or []
            if len(fields) > 25:
                problems.append(
                    (("embeds", i, "fields"), "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
                )
            for j, fld in enumerate(fields):
                for key, limit in (("name", 256), ("value", 1024)):
                    value = fld.get(key)
                    if not value:
                        problems.append(
                            (("embeds", i, "fields", j, key), "BASE_TYPE_REQUIRED", "This field is required")
                        )
                    elif len(value) > limit:
                        problems.append(
                            (
                                ("embeds", i, "fields", j, key),
                                "BASE_TYPE_MAX_LENGTH",
                                f"Must be {limit} or fewer in length.",
                            )
                        )
                    total += len(value or "")
            for key, sub, limit in (("footer", "text", 2048), ("author", "name", 256)):
                value = (embed.get(key) or {}).get(sub) or ""
                total += len(value)
                if len(value) > limit:
                    problems.append(
                        (
                            ("embeds", i, key, sub),
                            "BASE_TYPE_MAX_LENGTH",
                            f"Must be {limit} or fewer in length.",
                        )
                    )
        if total > 6000:
            problems.append(
                (("embeds",), "MAX_EMBED_SIZE_EXCEEDED", "Embed size exceeds maximum size of 6000")
            )
        components = body.get("components") or []
        if flags & FLAG_COMPONENTS_V2:
            if content or embeds:
                problems.append(
                    (("content",), "MESSAGE_CANNOT_USE_LEGACY_FIELDS_WITH_COMPONENTS_V2", "Not allowed")
                )
        else:
            if len(components) > 5:
                problems.append((("components",), "BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length."))
            for i, row in enumerate(components):
                children = row.get("components") or []
                if row.get("type") != 1:
                    problems.append(
                        (("components", i, "type"), "UNION_TYPE_CHOICES", "Must be an action row (1).")
                    )
                elif not 1 <= len(children) <= 5 or (
                    len(children) > 1 and any(c.get("type") != 2 for c in children)
                ):
                    problems.append(
                        (("components", i, "components"), "COMPONENT_LAYOUT_WIDTH_EXCEEDED", "Too wide")
                    )
        problems += self._component_problems(components, ("components",))
        return problems

    @staticmethod
    def _component_problems(components: list[JSON], path: tuple[Any, ...]) -> list[_Problem]:
        problems: list[_Problem] = []
        seen: set[str] = set()
        for component in _walk_components(components):
            custom_id = component.get("custom_id")
            if custom_id is not None:
                if not 1 <= len(custom_id) <= 100:
                    problems.append(
                        ((*path, "custom_id"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")
                    )
                if custom_id in seen:
                    problems.append(
                        ((*path, "custom_id"), "COMPONENT_CUSTOM_ID_DUPLICATED", f"Duplicate {custom_id!r}")
                    )
                seen.add(custom_id)
            if component.get("type") == 2:
                if len(component.get("label") or "") > 80:
                    problems.append(
                        ((*path, "label"), "BASE_TYPE_MAX_LENGTH", "Must be 80 or fewer in length.")
                    )
                if component.get("style") == 5 and not component.get("url"):
                    problems.append(((*path, "url"), "BASE_TYPE_REQUIRED", "Link buttons need a url"))
                if component.get("style") in (1, 2, 3, 4) and custom_id is None:
                    problems.append(((*path, "custom_id"), "BASE_TYPE_REQUIRED", "Buttons need a custom_id"))
            if component.get("type") in (3,) and len(component.get("options") or []) > 25:
                problems.append(
                    ((*path, "options"), "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
                )
        return problems

    def _mentions(self, content: str, guild: FakeGuild | None) -> tuple[list[JSON], list[str]]:
        users: list[JSON] = []
        for uid in dict.fromkeys(int(m) for m in re.findall(r"<@!?(\d+)>", content)):
            with contextlib.suppress(KeyError):
                user = self.user(uid).to_payload()
                if guild is not None and uid in guild.members:
                    user["member"] = guild.members[uid].to_payload(with_user=False)
                users.append(user)
        roles = [
            r for r in dict.fromkeys(re.findall(r"<@&(\d+)>", content)) if guild and int(r) in guild.roles
        ]
        return users, roles

    def _create_message(
        self,
        channel: FakeChannel,
        guild: FakeGuild | None,
        body: JSON,
        files: Sequence[UploadedFile],
        *,
        author: FakeUser,
        limit: int,
        interaction: FakeInteraction | None = None,
        flags: int | None = None,
        loading: bool = False,
    ) -> FakeMessage:
        """Create a stored message from a create-message body (REST or interaction callback data)."""
        if flags is None:
            allowed = FLAG_SUPPRESS_EMBEDS | FLAG_SUPPRESS_NOTIFICATIONS | FLAG_COMPONENTS_V2
            flags = int(body.get("flags") or 0) & (allowed | (FLAG_EPHEMERAL if interaction else 0))
        if loading:
            flags |= FLAG_LOADING
        self._check_uploads(files, limit)
        problems = self._message_problems(body, flags)
        if problems:
            raise _form_error(problems)
        ephemeral = bool(flags & FLAG_EPHEMERAL)
        attachments = self._build_attachments(channel.id, body, files, None, ephemeral) or []
        has_body = (
            body.get("content") or body.get("embeds") or body.get("components") or body.get("sticker_ids")
        )
        if not (loading or has_body or attachments or body.get("poll")):
            raise _ApiError(400, 50006, "Cannot send an empty message")
        msg_id = new_snowflake()
        content = str(body.get("content") or "")
        mentions, mention_roles = self._mentions(content, guild)
        payload: JSON = {
            "id": str(msg_id),
            "channel_id": str(channel.id),
            "type": 0,
            "content": content,
            "author": author.to_payload(),
            "attachments": attachments,
            "embeds": self._normalize_embeds(body.get("embeds") or [], attachments),
            "components": self._normalize_components(body.get("components") or [], attachments),
            "mentions": mentions,
            "mention_roles": mention_roles,
            "mention_everyone": False,
            "pinned": False,
            "tts": bool(body.get("tts")),
            "timestamp": _iso(msg_id),
            "edited_timestamp": None,
            "flags": flags,
        }
        if body.get("nonce") is not None:
            payload["nonce"] = body["nonce"]
        if body.get("poll"):
            payload["poll"] = body["poll"]
        ref = body.get("message_reference")
        if isinstance(ref, dict) and ref.get("message_id"):
            payload["type"] = 19
            payload["message_reference"] = {"type": 0, "channel_id": str(channel.id), **ref}
            target = self.messages.get(int(ref["message_id"]))
            payload["referenced_message"] = copy.deepcopy(target.payload) if target else None
        if interaction is not None:
            self._add_interaction_fields(payload, interaction)
        msg = FakeMessage(
            self, payload, interaction=interaction, allowed_mentions=body.get("allowed_mentions")
        )
        self.messages[msg_id] = msg
        if not ephemeral:
            channel.last_message_id = msg_id
            if self.dispatch_message_events or author.id != self.bot_id:
                self._message_event("MESSAGE_CREATE", msg)
        return msg

    def _add_interaction_fields(self, payload: JSON, ix: FakeInteraction) -> None:
        user = ix.payload["member"]["user"] if "member" in ix.payload else ix.payload["user"]
        data = ix.payload["data"]
        payload.update(webhook_id=str(self.application_id), application_id=str(self.application_id))
        metadata: JSON = {
            "id": str(ix.id),
            "type": ix.type,
            "user": user,
            "authorizing_integration_owners": ix.payload["authorizing_integration_owners"],
        }
        if ix.type == 2:
            payload["type"] = 20 if data.get("type", 1) == 1 else 23
            metadata.update(name=data["name"], command_type=data.get("type", 1))
            if data.get("type") == 3:
                metadata["target_message_id"] = data["target_id"]
            elif data.get("type") == 2:
                metadata["target_user"] = data["resolved"]["users"][data["target_id"]]
            payload["interaction"] = {"id": str(ix.id), "type": 2, "name": data["name"], "user": user}
        elif ix.message is not None:
            metadata["interacted_message_id"] = str(ix.message.id)
        payload["interaction_metadata"] = metadata

    def _edit_message(
        self, msg: FakeMessage, body: JSON, files: Sequence[UploadedFile], *, limit: int
    ) -> None:
        self._check_uploads(files, limit)
        _, guild = self.channel(msg.channel_id)
        flags = msg.flags
        if body.get("flags") is not None:
            flags = (flags & ~FLAG_SUPPRESS_EMBEDS) | (
                int(body["flags"]) & (FLAG_SUPPRESS_EMBEDS | FLAG_COMPONENTS_V2)
            )
        was_loading = msg.loading
        flags &= ~FLAG_LOADING
        merged = {k: msg.payload.get(k) for k in ("content", "embeds", "components")}
        merged.update({k: body[k] for k in ("content", "embeds", "components") if k in body})
        problems = self._message_problems(merged, flags)
        if problems:
            raise _form_error(problems)
        new = copy.deepcopy(msg.payload)
        attachments = self._build_attachments(msg.channel_id, body, files, new["attachments"], msg.ephemeral)
        if attachments is not None:
            new["attachments"] = attachments
        if "content" in body:
            new["content"] = str(body["content"] or "")
            new["mentions"], new["mention_roles"] = self._mentions(new["content"], guild)
        if "embeds" in body:
            new["embeds"] = self._normalize_embeds(body["embeds"] or [], new["attachments"])
        if "components" in body:
            new["components"] = self._normalize_components(body["components"] or [], new["attachments"])
        if not (
            new["content"] or new["embeds"] or new["components"] or new["attachments"] or new.get("poll")
        ):
            raise _ApiError(400, 50006, "Cannot send an empty message")
        new["flags"] = flags
        if not was_loading:
            new["edited_timestamp"] = _iso()
        msg.history.append(msg.payload)
        msg.payload = new
        if "allowed_mentions" in body:
            msg.allowed_mentions = body["allowed_mentions"]
        if not msg.ephemeral and (self.dispatch_message_events or msg.author_id != self.bot_id):
            self._message_event("MESSAGE_UPDATE", msg)

    def _delete_message(self, msg: FakeMessage) -> None:
        msg.deleted = True
        if msg.ephemeral:
            return
        _, guild = self.channel(msg.channel_id)
        data: JSON = {"id": str(msg.id), "channel_id": str(msg.channel_id)}
        if guild is not None:
            data["guild_id"] = str(guild.id)
        self._enqueue_if("MESSAGE_DELETE", data, INTENT_GUILD_MESSAGES if guild else INTENT_DIRECT_MESSAGES)

    def _message_event(self, event: str, msg: FakeMessage) -> asyncio.Future[None] | None:
        _, guild = self.channel(msg.channel_id)
        data = copy.deepcopy(msg.payload)
        if guild is not None:
            data["guild_id"] = str(guild.id)
            if msg.author_id in guild.members:
                data["member"] = guild.members[msg.author_id].to_payload(with_user=False)
            mentioned = any(int(u["id"]) == self.bot_id for u in data["mentions"])
            if (
                not self._has_intent(INTENT_MESSAGE_CONTENT)
                and msg.author_id != self.bot_id
                and not mentioned
            ):
                data.update(content="", embeds=[], attachments=[], components=[])
                data.pop("poll", None)
        return self._enqueue_if(event, data, INTENT_GUILD_MESSAGES if guild else INTENT_DIRECT_MESSAGES)

    # ================================================================================ REST: interactions
    def _interaction_for(self, p: dict[str, str], req: Request) -> FakeInteraction:
        ix = self._by_token.get(p["interaction_token"])
        if ix is None or ("interaction_id" in p and p["interaction_id"] != str(ix.id)):
            raise _not_found("interaction", 10062) if "interaction_id" in p else _not_found("Webhook", 10015)
        if "application_id" in p and p["application_id"] != str(self.application_id):
            raise _not_found("Webhook", 10015)
        req.interaction = ix
        return ix

    def _invalid_response_type(self, ix: FakeInteraction, callback_type: int) -> _ApiError:
        return _form_error(
            [
                (
                    ("type",),
                    "INTERACTION_RESPONSE_TYPE_INVALID",
                    f"Response type {callback_type} is not valid for interaction type {ix.type}",
                )
            ]
        )

    async def _r_callback(self, req: Request, p: dict[str, str]) -> Any:
        ix = self._interaction_for(p, req)
        if ix.callback is not None:
            raise _ApiError(400, 40060, "Interaction has already been acknowledged.")
        if self.interaction_timeout is not None and time.monotonic() - ix.created > self.interaction_timeout:
            raise _not_found("interaction", 10062)
        body = req.json if isinstance(req.json, dict) else {}
        callback_type = body.get("type")
        data = body.get("data") or {}
        channel, guild = self.channel(ix.channel_id)
        resource: JSON | None = {"type": callback_type}
        message_ix = ix.type in (2, 3, 5)
        if callback_type in (4, 5) and message_ix:
            flags = int(data.get("flags") or 0) & (
                FLAG_EPHEMERAL | FLAG_SUPPRESS_EMBEDS | FLAG_SUPPRESS_NOTIFICATIONS
            )
            if callback_type == 4:
                flags |= int(data.get("flags") or 0) & FLAG_COMPONENTS_V2
                msg = self._create_message(
                    channel,
                    guild,
                    data,
                    req.files,
                    author=self.bot_user,
                    limit=ix.size_limit,
                    interaction=ix,
                    flags=flags,
                )
            else:
                msg = self._create_message(
                    channel,
                    guild,
                    {},
                    [],
                    author=self.bot_user,
                    limit=ix.size_limit,
                    interaction=ix,
                    flags=flags,
                    loading=True,
                )
                ix._fill_pending = True
            ix.original = msg
            resource["message"] = msg.payload
        elif callback_type in (6, 7) and ix.type in (3, 5) and ix.message is not None:
            ix.original = ix.message
            if callback_type == 7:
                self._edit_message(ix.message, data, req.files, limit=ix.size_limit)
                resource["message"] = ix.message.payload
            else:
                resource = None
        elif callback_type == 8 and ix.type == 4:
            ix.choices = list(data.get("choices") or [])
            resource = None
        elif callback_type == 9 and ix.type in (2, 3):
            problems = self._modal_problems(data)
            if problems:
                raise _form_error(problems)
            ix.modal = data
            self._modals[data["custom_id"]] = (data, ix)
            resource = None
        else:
            raise self._invalid_response_type(ix, callback_type)
        ix.callback, ix.callback_type = req, callback_type
        req.message = ix.original if callback_type in (4, 5, 7) else None
        if "with_response" not in req.query:
            return _NO_CONTENT
        result: JSON = {"interaction": {"id": str(ix.id), "type": ix.type}}
        if ix.original is not None and callback_type in (4, 5, 7):
            result["interaction"].update(
                response_message_id=str(ix.original.id),
                response_message_loading=ix.original.loading,
                response_message_ephemeral=ix.original.ephemeral,
            )
        if resource is not None:
            result["resource"] = resource
        return result

    @staticmethod
    def _modal_problems(data: JSON) -> list[_Problem]:
        problems: list[_Problem] = []
        if not 1 <= len(data.get("title") or "") <= 45:
            problems.append(
                (("data", "title"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 45 in length.")
            )
        if not 1 <= len(data.get("custom_id") or "") <= 100:
            problems.append(
                (("data", "custom_id"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")
            )
        components = data.get("components") or []
        if not 1 <= len(components) <= 5:
            problems.append(
                (("data", "components"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 5 in length.")
            )
        for i, top in enumerate(components):
            label = top.get("label") if top.get("type") == 18 else None
            inputs = [top["component"]] if top.get("type") == 18 else top.get("components") or []
            for field_ in inputs:
                text = label if label is not None else field_.get("label")
                if field_.get("type") == 4 and not 1 <= len(text or "") <= 45:
                    problems.append(
                        (("data", "components", i), "BASE_TYPE_BAD_LENGTH", "Labels: 1 to 45 characters.")
                    )
                if field_.get("type") == 4 and int(field_.get("max_length") or 0) > 4000:
                    problems.append(
                        (("data", "components", i), "NUMBER_TYPE_MAX", "max_length is at most 4000.")
                    )
        problems += FakeDiscord._component_problems(components, ("data", "components"))
        return problems

    async def _r_followup(self, req: Request, p: dict[str, str]) -> Any:
        ix = self._interaction_for(p, req)
        if ix.callback is None or ix.callback_type == 9:
            raise _not_found("Webhook", 10015)
        body = req.json if isinstance(req.json, dict) else {}
        if ix._fill_pending and ix.original is not None:  # Discord: the first followup replaces "thinking..."
            full = {"content": "", "embeds": [], "components": [], **body}
            full.setdefault("attachments", [{"id": i} for i in range(len(req.files))])
            self._edit_message(ix.original, full, req.files, limit=ix.size_limit)
            ix._fill_pending = False
            msg = ix.original
        else:
            channel, guild = self.channel(ix.channel_id)
            msg = self._create_message(
                channel, guild, body, req.files, author=self.bot_user, limit=ix.size_limit, interaction=ix
            )
            ix.followups.append(msg)
        req.message = msg
        wait = req.query.get("wait", "false").lower() in ("1", "true")
        return msg.payload if wait else _NO_CONTENT

    def _webhook_message(self, ix: FakeInteraction, p: dict[str, str]) -> FakeMessage:
        if p["message_id"] == "@original":
            msg = ix.original
        else:
            msg = next(
                (m for m in [ix.original, *ix.followups] if m is not None and str(m.id) == p["message_id"]),
                None,
            )
        if msg is None or msg.deleted:
            raise _not_found("Message", 10008)
        return msg

    async def _r_wh_get(self, req: Request, p: dict[str, str]) -> Any:
        msg = self._webhook_message(self._interaction_for(p, req), p)
        req.message = msg
        return msg.payload

    async def _r_wh_edit(self, req: Request, p: dict[str, str]) -> Any:
        ix = self._interaction_for(p, req)
        msg = self._webhook_message(ix, p)
        self._edit_message(
            msg, req.json if isinstance(req.json, dict) else {}, req.files, limit=ix.size_limit
        )
        if msg is ix.original:
            ix._fill_pending = False
        req.message = msg
        return msg.payload

    async def _r_wh_del(self, req: Request, p: dict[str, str]) -> Any:
        ix = self._interaction_for(p, req)
        msg = self._webhook_message(ix, p)
        self._delete_message(msg)
        req.message = msg
        return _NO_CONTENT

    # ================================================================================ acting as users
    def _context(self, user_id: int, channel_id: int) -> tuple[FakeChannel, FakeGuild | None]:
        channel, guild = self.channel(channel_id)
        if guild is not None and user_id not in guild.members:
            raise ValueError(f"user {user_id} is not a member of guild {guild.name!r}")
        if guild is None and channel.recipient_id != user_id:
            raise ValueError(f"channel {channel_id} is not the bot's DM channel with user {user_id}")
        return channel, guild

    def _interaction_payload(
        self,
        ix_type: int,
        user_id: int,
        channel: FakeChannel,
        guild: FakeGuild | None,
        data: JSON,
        *,
        message: FakeMessage | None,
        locale: str,
        size_limit: int,
    ) -> JSON:
        payload: JSON = {
            "id": str(new_snowflake()),
            "application_id": str(self.application_id),
            "type": ix_type,
            "data": data,
            "token": "aW50ZXJhY3Rpb24" + secrets.token_urlsafe(64),
            "version": 1,
            "locale": locale,
            "entitlements": [],
            "entitlement_sku_ids": [],
            "attachment_size_limit": size_limit,
            "channel_id": str(channel.id),
        }
        if guild is not None:
            member_perms = guild.permissions_for(user_id, channel.id)
            payload.update(
                guild_id=str(guild.id),
                guild={"id": str(guild.id), "locale": guild.locale, "features": []},
                guild_locale=guild.locale,
                member=guild.members[user_id].to_payload(permissions=member_perms),
                app_permissions=str(guild.permissions_for(self.bot_id, channel.id)),
                channel={**guild.channel_payload(channel), "permissions": str(member_perms)},
                authorizing_integration_owners={"0": str(guild.id)},
                context=0,
            )
        else:
            payload.update(
                user=self.user(user_id).to_payload(),
                app_permissions=str(DEFAULT_BOT_PERMISSIONS),
                channel=self.channel_payload(channel.id),
                authorizing_integration_owners={"0": "0"},
                context=1,
            )
        if message is not None:
            payload["message"] = copy.deepcopy(message.payload)
        return payload

    async def _send_interaction(
        self,
        ix_type: int,
        user_id: int,
        channel: FakeChannel,
        guild: FakeGuild | None,
        data: JSON,
        *,
        message: FakeMessage | None = None,
        locale: str = "en-US",
        size_limit: int | None = None,
    ) -> FakeInteraction:
        if size_limit is None:
            size_limit = guild.upload_limit if guild else self.upload_limit
        payload = self._interaction_payload(
            ix_type, user_id, channel, guild, data, message=message, locale=locale, size_limit=size_limit
        )
        ix = FakeInteraction(self, payload, message=message, size_limit=size_limit)
        self.interactions[ix.id] = ix
        self._by_token[ix.token] = ix
        await self.dispatch("INTERACTION_CREATE", payload)
        return ix

    def _check_access(self, cmd: JSON, user_id: int, channel: FakeChannel, guild: FakeGuild | None) -> None:
        contexts = cmd.get("contexts")
        label = f"/{cmd['name']}"
        if guild is None:
            if (contexts is not None and 1 not in contexts) or cmd.get("dm_permission") is False:
                raise CommandUnavailable(f"{label} cannot be used in DMs")
            return
        if contexts is not None and 0 not in contexts:
            raise CommandUnavailable(f"{label} cannot be used in guilds")
        perms = guild.permissions_for(user_id, channel.id)
        if not perms & P_VIEW_CHANNEL:
            raise CommandUnavailable(f"user {user_id} cannot see channel {channel.name!r}")
        required = cmd.get("default_member_permissions")
        if required is not None and not perms & P_ADMINISTRATOR:
            bits = int(required)
            if bits == 0 or perms & bits != bits:
                missing = (
                    [n for n, v in discord.Permissions(bits & ~perms) if v] if bits else ["administrator"]
                )
                raise CommandUnavailable(f"{label} needs {missing} (default_member_permissions={required})")
        if cmd.get("nsfw") and not channel.nsfw:
            raise CommandUnavailable(f"{label} is age-restricted and #{channel.name} is not")

    def _find_command(self, name: str, cmd_type: int, guild: FakeGuild | None) -> JSON:
        return self.command(name, guild_id=guild.id if guild else None, type=cmd_type)

    async def slash(
        self,
        user_id: int,
        channel_id: int,
        command: str,
        /,
        *,
        options: Mapping[str, Any] | None = None,
        locale: str = "en-US",
        attachment_size_limit: int | None = None,
        force: bool = False,
        **kwargs: Any,
    ) -> FakeInteraction:
        """Invoke a synced slash command: ``"imagine"`` or ``"model delete"`` (subcommand/group path).

        Options are typed from the synced definition: str, int, float, bool, users/channels/roles by id,
        attachments as ``add_attachment()`` dicts or ``(filename, bytes[, content_type])``. Use ``options=``
        for option names that clash with this method's keywords.
        """
        channel, guild = self._context(user_id, channel_id)
        path = command.strip().lstrip("/").split()
        cmd = self._find_command(path[0], 1, guild)
        if not force:
            self._check_access(cmd, user_id, channel, guild)
        values = {**(options or {}), **kwargs}
        resolved: JSON = {}
        data: JSON = {"id": cmd["id"], "name": cmd["name"], "type": 1}
        data_options = self._command_options(cmd, path[1:], values, resolved, user_id, guild)
        if data_options:
            data["options"] = data_options
        if resolved:
            data["resolved"] = resolved
        if cmd.get("guild_id"):
            data["guild_id"] = cmd["guild_id"]
        return await self._send_interaction(
            2, user_id, channel, guild, data, locale=locale, size_limit=attachment_size_limit
        )

    async def autocomplete(
        self,
        user_id: int,
        channel_id: int,
        command: str,
        focused: str,
        typed: str,
        /,
        *,
        options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> FakeInteraction:
        """Send an autocomplete interaction (type 4) for option ``focused`` with the partial text ``typed``;
        the bot's answer lands in ``ix.choices`` (await ``ix.wait_callback()``)."""
        channel, guild = self._context(user_id, channel_id)
        path = command.strip().lstrip("/").split()
        cmd = self._find_command(path[0], 1, guild)
        values = {**(options or {}), **kwargs}
        resolved: JSON = {}
        data_options = self._command_options(
            cmd, path[1:], values, resolved, user_id, guild, focused=(focused, typed)
        )
        data: JSON = {"id": cmd["id"], "name": cmd["name"], "type": 1, "options": data_options}
        if cmd.get("guild_id"):
            data["guild_id"] = cmd["guild_id"]
        return await self._send_interaction(4, user_id, channel, guild, data)

    def _command_options(
        self,
        cmd: JSON,
        path: list[str],
        values: dict[str, Any],
        resolved: JSON,
        user_id: int,
        guild: FakeGuild | None,
        *,
        focused: tuple[str, str] | None = None,
    ) -> list[JSON]:
        defs: list[JSON] = cmd.get("options") or []
        label = f"/{cmd['name']}"
        chain: list[JSON] = []
        for token in path:
            sub = next((o for o in defs if o["name"] == token and o["type"] in (1, 2)), None)
            if sub is None:
                names = [o["name"] for o in defs if o["type"] in (1, 2)]
                raise ValueError(f"{label} has no subcommand or group {token!r} (it has {names})")
            chain.append(sub)
            defs = sub.get("options") or []
            label += f" {token}"
        if any(o["type"] in (1, 2) for o in defs):
            raise ValueError(f"{label} needs a subcommand: {[o['name'] for o in defs]}")
        remaining = dict(values)
        leaf: list[JSON] = []
        for opt in defs:
            name = opt["name"]
            if focused is not None and name == focused[0]:
                leaf.append({"name": name, "type": opt["type"], "value": focused[1], "focused": True})
                continue
            if name not in remaining:
                if opt.get("required") and focused is None:
                    raise ValueError(f"{label}: missing required option {name!r}")
                continue
            value = self._option_value(label, opt, remaining.pop(name), resolved, user_id, guild)
            leaf.append({"name": name, "type": opt["type"], "value": value})
        if remaining:
            raise ValueError(
                f"{label} has no option(s) {sorted(remaining)}; options: {[o['name'] for o in defs]}"
            )
        for sub in reversed(chain):
            leaf = [{"name": sub["name"], "type": sub["type"], "options": leaf}]
        return leaf

    def _option_value(
        self, label: str, opt: JSON, value: Any, resolved: JSON, user_id: int, guild: FakeGuild | None
    ) -> Any:
        kind, name = opt["type"], opt["name"]
        where = f"{label} {name}"
        choices = opt.get("choices")
        if kind in (3, 4, 10):
            if kind == 3:
                value = str(value)
            elif kind == 4:
                if isinstance(value, bool) or int(value) != value:
                    raise ValueError(f"{where}: expected an integer, got {value!r}")
                value = int(value)
            else:
                value = float(value)
            if choices:
                by_name = {c["name"]: c["value"] for c in choices}
                if value not in [c["value"] for c in choices]:
                    if value not in by_name:
                        raise ValueError(f"{where}: {value!r} is not one of {[c['value'] for c in choices]}")
                    value = by_name[value]
            if kind == 3:
                low, high = opt.get("min_length", 0), opt.get("max_length", 6000)
                if not low <= len(value) <= high:
                    raise ValueError(f"{where}: length must be in [{low}, {high}]")
            else:
                low, high = opt.get("min_value"), opt.get("max_value")
                if (low is not None and value < low) or (high is not None and value > high):
                    raise ValueError(f"{where}: {value} is outside [{low}, {high}]")
            return value
        if kind == 5:
            return bool(value)
        if kind == 11:
            att = self._coerce_attachment(value)
            resolved.setdefault("attachments", {})[att["id"]] = att
            return att["id"]
        target = _id_of(value)
        if kind in (6, 9) and self._resolve_user(target, resolved, guild):
            return str(target)
        if kind in (8, 9) and guild is not None and target in guild.roles:
            resolved.setdefault("roles", {})[str(target)] = guild.roles[target].to_payload()
            return str(target)
        if kind == 7:
            channel, ch_guild = self.channel(target)
            types = opt.get("channel_types")
            if types and channel.type not in types:
                raise ValueError(f"{where}: channel type {channel.type} is not in {types}")
            entry = self.channel_payload(target)
            if ch_guild is not None:
                entry["permissions"] = str(ch_guild.permissions_for(user_id, target))
            resolved.setdefault("channels", {})[str(target)] = entry
            return str(target)
        raise ValueError(f"{where}: cannot resolve {value!r} for option type {kind}")

    def _resolve_user(self, target: int, resolved: JSON, guild: FakeGuild | None) -> bool:
        try:
            user = self.user(target)
        except KeyError:
            return False
        resolved.setdefault("users", {})[str(target)] = user.to_payload()
        if guild is not None and target in guild.members:
            member = guild.members[target].to_payload(
                with_user=False, permissions=guild.permissions_for(target)
            )
            resolved.setdefault("members", {})[str(target)] = member
        return True

    def _message_of(self, message: FakeMessage | int) -> FakeMessage:
        msg = message if isinstance(message, FakeMessage) else self.messages.get(_id_of(message))
        if msg is None:
            raise ValueError(f"unknown message {message!r}")
        return msg

    async def click(
        self,
        user_id: int,
        message: FakeMessage | int,
        custom_id: str,
        /,
        *,
        values: Sequence[Any] | None = None,
        force: bool = False,
        locale: str = "en-US",
    ) -> FakeInteraction:
        """Click a button (or pick ``values`` in a select) on a message the bot posted."""
        msg = self._message_of(message)
        component = msg.component(custom_id)
        if component is None:
            raise ValueError(f"message {msg.id} has no component {custom_id!r}; it has {msg.custom_ids}")
        channel, guild = self._context(user_id, msg.channel_id)
        if not force:
            if component.get("disabled"):
                raise CommandUnavailable(f"component {custom_id!r} is disabled")
            if msg.deleted:
                raise CommandUnavailable(f"message {msg.id} was deleted")
            if msg.ephemeral and msg.interaction is not None and msg.interaction.user_id != user_id:
                raise CommandUnavailable(f"message {msg.id} is ephemeral for user {msg.interaction.user_id}")
        ctype = component["type"]
        data: JSON = {"custom_id": custom_id, "component_type": ctype, "id": component.get("id")}
        if ctype in (3, 5, 6, 7, 8):
            picked = [str(_id_of(v)) if ctype != 3 else str(v) for v in values or []]
            low, high = component.get("min_values", 1), component.get("max_values", 1)
            if not force and not low <= len(picked) <= high:
                raise ValueError(f"select {custom_id!r} takes {low}..{high} values, got {len(picked)}")
            data["values"] = picked
            if ctype != 3:
                resolved: JSON = {}
                for v in picked:
                    target = int(v)
                    if not self._resolve_user(target, resolved, guild) and guild is not None:
                        if target in guild.roles:
                            resolved.setdefault("roles", {})[v] = guild.roles[target].to_payload()
                        elif target in guild.channels:
                            resolved.setdefault("channels", {})[v] = guild.channel_payload(
                                guild.channels[target]
                            )
                data["resolved"] = resolved
        elif values is not None:
            raise ValueError(f"component {custom_id!r} (type {ctype}) takes no values")
        elif ctype != 2 or component.get("style") in (5, 6):
            raise ValueError(f"component {custom_id!r} cannot be clicked")
        return await self._send_interaction(3, user_id, channel, guild, data, message=msg, locale=locale)

    async def submit_modal(
        self,
        user_id: int,
        channel_id: int,
        custom_id: str,
        values: Mapping[str, Any],
        /,
        *,
        message: FakeMessage | int | None = None,
        force: bool = False,
        locale: str = "en-US",
    ) -> FakeInteraction:
        """Submit the modal the bot opened with ``custom_id``: ``values`` maps field custom_id -> text
        (a list for selects / file uploads). The submit mirrors the modal's layout (action rows or labels)."""
        channel, guild = self._context(user_id, channel_id)
        opened = self._modals.get(custom_id)
        resolved: JSON = {}
        remaining = dict(values)
        components: list[JSON] = []
        if opened is None:
            if not force:
                raise ValueError(
                    f"the bot never opened a modal {custom_id!r} (opened: {sorted(self._modals)})"
                )
            for field_id, value in values.items():
                components.append(
                    {"type": 1, "components": [{"type": 4, "custom_id": field_id, "value": str(value)}]}
                )
            remaining.clear()
            origin = None
        else:
            modal, origin = opened
            if not force and origin.user_id != user_id:
                raise CommandUnavailable(f"modal {custom_id!r} was opened for user {origin.user_id}")
            known = {c.get("custom_id") for c in _walk_components(modal.get("components") or [])}
            if set(remaining) - known:
                raise ValueError(f"modal {custom_id!r} has no field(s) {sorted(set(remaining) - known)}")
            for top in modal.get("components") or []:
                if top.get("type") == 1:
                    row = [
                        self._modal_field(c, remaining, resolved, guild, force)
                        for c in top.get("components") or []
                    ]
                    components.append({"type": 1, "id": top.get("id"), "components": row})
                elif top.get("type") == 18:
                    inner = self._modal_field(top["component"], remaining, resolved, guild, force)
                    components.append({"type": 18, "id": top.get("id"), "component": inner})
                elif top.get("type") == 10:
                    components.append({"type": 10, "id": top.get("id")})
        if remaining:
            raise ValueError(f"modal {custom_id!r} has no field(s) {sorted(remaining)}")
        data: JSON = {"custom_id": custom_id, "components": components}
        if resolved:
            data["resolved"] = resolved
        msg = self._message_of(message) if message is not None else None
        if msg is None and origin is not None and origin.type == 3:
            msg = origin.message
        return await self._send_interaction(5, user_id, channel, guild, data, message=msg, locale=locale)

    def _modal_field(
        self, component: JSON, remaining: dict[str, Any], resolved: JSON, guild: FakeGuild | None, force: bool
    ) -> JSON:
        ctype, custom_id = component.get("type"), component.get("custom_id")
        out: JSON = {"type": ctype, "id": component.get("id"), "custom_id": custom_id}
        given = remaining.pop(custom_id, _MISSING)
        required = component.get("required", True)
        if given is _MISSING and required and not component.get("value") and not force and ctype not in (23,):
            raise ValueError(f"modal field {custom_id!r} is required")
        if ctype == 4:
            text = str(component.get("value") or "") if given is _MISSING else str(given)
            low, high = component.get("min_length", 0), component.get("max_length", 4000)
            if not force and text and not low <= len(text) <= high:
                raise ValueError(f"modal field {custom_id!r}: length must be in [{low}, {high}]")
            out["value"] = text
        elif ctype == 23:
            out["value"] = bool(given) if given is not _MISSING else False
        elif ctype == 21:
            out["value"] = None if given is _MISSING else str(given)
        else:
            items = [] if given is _MISSING else list(given)
            if ctype == 19:
                atts = [self._coerce_attachment(a) for a in items]
                resolved.setdefault("attachments", {}).update({a["id"]: a for a in atts})
                out["values"] = [a["id"] for a in atts]
            else:
                out["values"] = [str(_id_of(v)) if ctype in (5, 6, 7, 8) else str(v) for v in items]
                for v in out["values"] if ctype in (5, 7) else []:
                    self._resolve_user(int(v), resolved, guild)
        return out

    async def message_command(
        self,
        user_id: int,
        channel_id: int,
        name: str,
        target: FakeMessage | int,
        /,
        *,
        force: bool = False,
        locale: str = "en-US",
        attachment_size_limit: int | None = None,
    ) -> FakeInteraction:
        """Run a message context-menu command on ``target`` (resolved.messages carries the full message)."""
        channel, guild = self._context(user_id, channel_id)
        msg = self._message_of(target)
        cmd = self._find_command(name, 3, guild)
        if not force:
            self._check_access(cmd, user_id, channel, guild)
        data: JSON = {
            "id": cmd["id"],
            "name": cmd["name"],
            "type": 3,
            "target_id": str(msg.id),
            "resolved": {"messages": {str(msg.id): copy.deepcopy(msg.payload)}},
        }
        if cmd.get("guild_id"):
            data["guild_id"] = cmd["guild_id"]
        return await self._send_interaction(
            2, user_id, channel, guild, data, locale=locale, size_limit=attachment_size_limit
        )

    async def user_command(
        self, user_id: int, channel_id: int, name: str, target_user_id: int, /, *, force: bool = False
    ) -> FakeInteraction:
        """Run a user context-menu command on ``target_user_id``."""
        channel, guild = self._context(user_id, channel_id)
        cmd = self._find_command(name, 2, guild)
        if not force:
            self._check_access(cmd, user_id, channel, guild)
        resolved: JSON = {}
        self._resolve_user(target_user_id, resolved, guild)
        data: JSON = {
            "id": cmd["id"],
            "name": cmd["name"],
            "type": 2,
            "target_id": str(target_user_id),
            "resolved": resolved,
        }
        if cmd.get("guild_id"):
            data["guild_id"] = cmd["guild_id"]
        return await self._send_interaction(2, user_id, channel, guild, data)

    def post_user_message(
        self,
        channel_id: int,
        author_id: int,
        content: str = "",
        /,
        *,
        attachments: Sequence[Any] = (),
        embeds: Sequence[JSON] = (),
        reply_to: FakeMessage | int | None = None,
        dispatch: bool = True,
    ) -> FakeMessage:
        """Store a message from a user (attachments: ``add_attachment()`` dicts or (filename, bytes[, type]))
        and queue MESSAGE_CREATE (content stripped if the bot lacks the message_content intent)."""
        channel, guild = self._context(author_id, channel_id)
        author = self.user(author_id)
        atts = [self._coerce_attachment(a, channel_id=channel_id) for a in attachments]
        for att in atts:
            att.pop("ephemeral", None)
        msg_id = new_snowflake()
        mentions, mention_roles = self._mentions(content, guild)
        payload: JSON = {
            "id": str(msg_id),
            "channel_id": str(channel_id),
            "type": 0,
            "content": content,
            "author": author.to_payload(),
            "attachments": atts,
            "embeds": [{"type": "rich", **e} for e in embeds],
            "components": [],
            "mentions": mentions,
            "mention_roles": mention_roles,
            "mention_everyone": "@everyone" in content,
            "pinned": False,
            "tts": False,
            "timestamp": _iso(msg_id),
            "edited_timestamp": None,
            "flags": 0,
        }
        if reply_to is not None:
            target = self._message_of(reply_to)
            payload["type"] = 19
            payload["message_reference"] = {
                "type": 0,
                "channel_id": str(channel_id),
                "message_id": str(target.id),
            }
            payload["referenced_message"] = copy.deepcopy(target.payload)
        msg = FakeMessage(self, payload)
        self.messages[msg_id] = msg
        channel.last_message_id = msg_id
        if dispatch:
            self._message_event("MESSAGE_CREATE", msg)
        return msg

    def open_thread(self, user_id: int, parent_id: int, name: str) -> int:
        """A member opens a public thread in a text channel: queue THREAD_CREATE; the thread's id."""
        channel, guild = self._context(user_id, parent_id)
        if guild is None or channel.type not in (0, 5):
            raise ValueError(f"threads are opened in a server's text channels, not in {channel.name!r}")
        thread_id = guild.add_thread(parent_id, name, owner_id=user_id)
        self._enqueue(
            "THREAD_CREATE", {**guild.channel_payload(guild.channels[thread_id]), "newly_created": True}
        )
        return thread_id

    def set_nsfw(self, channel_id: int, nsfw: bool) -> None:
        """A moderator turns a channel's age restriction on or off: queue CHANNEL_UPDATE."""
        channel, guild = self.channel(channel_id)
        if guild is None or channel.is_thread:
            raise ValueError("only a server's channels are age-restricted; a thread follows its parent")
        channel.nsfw = nsfw
        self._enqueue("CHANNEL_UPDATE", guild.channel_payload(channel))

    def delete_message(self, message: FakeMessage | int) -> None:
        """Delete a message as a moderator would by hand, and queue MESSAGE_DELETE."""
        self._delete_message(self._message_of(message))

    def add_reaction(
        self, message: FakeMessage | int, user_id: int, emoji: str = "👍", *, offline: bool = False
    ) -> None:
        """Record ``user_id``'s reaction and queue MESSAGE_REACTION_ADD (custom emoji: ``"name:id"``).

        ``offline``: the reaction was added while the bot was not connected, so no event ever reaches
        it (a new session does not replay what happened meanwhile); only the message shows it.
        """
        msg = self._message_of(message)
        self.user(user_id)
        key = self._emoji_key(emoji)
        users = msg.reactions.setdefault(key, [])
        if user_id not in users:
            users.append(user_id)
            self._sync_reactions(msg)
            if not offline:
                self._reaction_event(msg, user_id, key, added=True)

    def remove_reaction(
        self, message: FakeMessage | int, user_id: int, emoji: str = "👍", *, offline: bool = False
    ) -> None:
        """Take ``user_id``'s reaction back and queue MESSAGE_REACTION_REMOVE (``offline``: see add_reaction)."""
        msg = self._message_of(message)
        key = self._emoji_key(emoji)
        if user_id in msg.reactions.get(key, []):
            msg.reactions[key].remove(user_id)
            self._sync_reactions(msg)
            if not offline:
                self._reaction_event(msg, user_id, key, added=False)

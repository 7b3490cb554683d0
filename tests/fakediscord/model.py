"""The guild model the fake serves: users, roles, channels, members and guilds as Discord's objects,
with Discord's permission algorithm; snowflake ids, timestamps and the permission bits."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import discord

JSON = dict[str, Any]

MiB = 1024 * 1024
DEFAULT_UPLOAD_LIMIT = 10 * MiB
DISCORD_EPOCH_MS = 1420070400000

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

APP_FLAGS = (1 << 15) | (1 << 19) | (1 << 23)  # GATEWAY_*_LIMITED privileged intents + COMMAND_BADGE
_THREAD_TYPES = (10, 11, 12)


def dumps(obj: Any) -> str:
    """Compact JSON, as Discord writes it."""
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


def iso_timestamp(snowflake: int | None = None) -> str:
    """ISO 8601 UTC timestamp like Discord's (``2025-01-02T03:04:05.678000+00:00``)."""
    ms = (snowflake >> 22) + DISCORD_EPOCH_MS if snowflake else int(time.time() * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}000+00:00"


def permission_bits(value: int | discord.Permissions | None, default: int) -> int:
    """Permissions given as bits or as discord.Permissions, as bits (``default`` for None)."""
    if value is None:
        return default
    return value.value if isinstance(value, discord.Permissions) else int(value)


def id_of(value: Any) -> int:
    """The id of what a test passes: an id, a digit string, a member, a payload or anything with ``.id``."""
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
    joined_at: str = field(default_factory=iso_timestamp)

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
        self.joined_at = iso_timestamp()
        self.roles: dict[int, FakeRole] = {
            self.id: FakeRole(
                self.id, "@everyone", permission_bits(everyone_permissions, DEFAULT_EVERYONE_PERMISSIONS)
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
            permission_bits(permissions, 0),
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
            channel.overwrites[target] = (permission_bits(allow, 0), permission_bits(deny, 0))
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
        self.channels[channel_id].overwrites[target_id] = (
            permission_bits(allow, 0),
            permission_bits(deny, 0),
        )

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
                    "archive_timestamp": iso_timestamp(channel.id),
                    "locked": False,
                    "create_timestamp": iso_timestamp(channel.id),
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

"""Acting as users: slash commands and autocomplete, buttons and selects, modals, context menus, messages,
threads and reactions, and a moderator's changes, each sent to the bot as Discord would send it. The
Discord client's own checks (permissions, nsfw, disabled buttons) raise CommandUnavailable."""

from __future__ import annotations

import copy
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import discord

from fakediscord.errors import CommandUnavailable
from fakediscord.messages import Messages
from fakediscord.model import (
    DEFAULT_BOT_PERMISSIONS,
    JSON,
    P_ADMINISTRATOR,
    P_VIEW_CHANNEL,
    FakeChannel,
    FakeGuild,
    id_of,
    iso_timestamp,
    new_snowflake,
)
from fakediscord.records import FakeInteraction, FakeMessage, walk_components

_MISSING: Any = object()


class UserActions(Messages):
    """What the test's users do, sent by FakeDiscord to the bot as Discord would send it."""

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
            picked = [str(id_of(v)) if ctype != 3 else str(v) for v in values or []]
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
            known = {c.get("custom_id") for c in walk_components(modal.get("components") or [])}
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
            "timestamp": iso_timestamp(msg_id),
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

    # -- helpers
    def _context(self, user_id: int, channel_id: int) -> tuple[FakeChannel, FakeGuild | None]:
        channel, guild = self.channel(channel_id)
        if guild is not None and user_id not in guild.members:
            raise ValueError(f"user {user_id} is not a member of guild {guild.name!r}")
        if guild is None and channel.recipient_id != user_id:
            raise ValueError(f"channel {channel_id} is not the bot's DM channel with user {user_id}")
        return channel, guild

    def _message_of(self, message: FakeMessage | int) -> FakeMessage:
        msg = message if isinstance(message, FakeMessage) else self.messages.get(id_of(message))
        if msg is None:
            raise ValueError(f"unknown message {message!r}")
        return msg

    def _find_command(self, name: str, cmd_type: int, guild: FakeGuild | None) -> JSON:
        return self.command(name, guild_id=guild.id if guild else None, type=cmd_type)

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
        target = id_of(value)
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
                out["values"] = [str(id_of(v)) if ctype in (5, 6, 7, 8) else str(v) for v in items]
                for v in out["values"] if ctype in (5, 7) else []:
                    self._resolve_user(int(v), resolved, guild)
        return out

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

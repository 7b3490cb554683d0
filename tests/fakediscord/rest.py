"""The REST API under /api/v10: the route table, the plumbing of a call (its body, auth, rate limits,
Discord's headers and error bodies, and the Request that records it) and one handler per route."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from aiohttp import BodyPartReader, web

from fakediscord.checks import command_problems, modal_problems
from fakediscord.errors import ApiError, form_error, not_found
from fakediscord.messages import Messages
from fakediscord.model import (
    APP_FLAGS,
    JSON,
    P_ADD_REACTIONS,
    P_ATTACH_FILES,
    P_CREATE_PRIVATE_THREADS,
    P_CREATE_PUBLIC_THREADS,
    P_MANAGE_MESSAGES,
    P_READ_HISTORY,
    P_SEND_IN_THREADS,
    P_SEND_MESSAGES,
    P_VIEW_CHANNEL,
    FakeChannel,
    FakeGuild,
    dumps,
    new_snowflake,
)
from fakediscord.records import (
    FLAG_COMPONENTS_V2,
    FLAG_EPHEMERAL,
    FLAG_SUPPRESS_EMBEDS,
    FLAG_SUPPRESS_NOTIFICATIONS,
    FakeInteraction,
    FakeMessage,
    RateLimitRule,
    Request,
    UploadedFile,
)

_NO_CONTENT = object()

_log = logging.getLogger(__name__)


@dataclass
class _Route:
    method: str
    template: str
    parts: list[str]
    handler: Callable[[Request, dict[str, str]], Awaitable[Any]]
    auth: bool


class RestApi(Messages):
    """FakeDiscord's REST API: each route's handler answers as Discord does, errors included."""

    def rate_limit(
        self, route: str, count: int = 1, *, retry_after: float = 0.05, is_global: bool = False
    ) -> None:
        """Answer the next ``count`` requests matching ``route`` (see ``Request.matches``; ``"*"`` = any)
        with 429 + X-RateLimit-* headers and ``retry_after`` seconds."""
        self._rate_limits.append(RateLimitRule(route, count, retry_after, is_global))

    # -- plumbing
    @functools.cached_property
    def _routes(self) -> list[_Route]:
        """What the fake answers: each route with its handler (bound to this fake)."""
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

    def _take_rate_limit(self, req: Request) -> RateLimitRule | None:
        for rule in self._rate_limits:
            if rule.remaining > 0 and (rule.spec == "*" or req.matches(rule.spec)):
                rule.remaining -= 1
                return rule
        return None

    @staticmethod
    def _headers(route: str | None, *, limited: RateLimitRule | None = None) -> dict[str, str]:
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
        limited: RateLimitRule | None = None
        result: Any
        try:
            if found is None:
                self.unhandled.append(req)
                raise ApiError(404, 0, "404: Not Found")
            route, params = found
            req.route, req.params = f"{route.method} {route.template}", params
            req.interaction = self._by_token.get(params.get("interaction_token", ""))
            limited = self._take_rate_limit(req)
            if limited is not None:
                raise ApiError(429, 0, "You are being rate limited.")
            if route.auth and request.headers.get("Authorization") != f"Bot {self.token}":
                raise ApiError(401, 0, "401: Unauthorized")
            result = await route.handler(req, params)
            status = 204 if result is _NO_CONTENT else 200
        except ApiError as exc:
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
        return web.Response(body=dumps(result).encode(), status=status, headers=headers)

    # -- basics
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
            raise not_found("User", 10013) from None

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
            "flags": APP_FLAGS,
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
            raise ApiError(400, 50033, "Invalid Recipient(s)") from None
        return self.channel_payload(self.dm_channel_id(user_id))

    # -- guilds
    def _guild_of(self, p: dict[str, str]) -> FakeGuild:
        try:
            return self.guilds[int(p["guild_id"])]
        except (KeyError, ValueError):
            raise not_found("Guild", 10004) from None

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
            raise not_found("Member", 10007)
        return member.to_payload()

    # -- commands
    async def _r_get_commands(self, req: Request, p: dict[str, str]) -> Any:
        self._check_app(p)
        return self.commands.get(int(p["guild_id"]) if "guild_id" in p else None, [])

    async def _r_put_commands(self, req: Request, p: dict[str, str]) -> Any:
        self._check_app(p)
        guild_id = self._guild_of(p).id if "guild_id" in p else None
        payload = req.json if isinstance(req.json, list) else []
        problems = command_problems(payload)
        if problems:
            raise form_error(problems)
        self.commands[guild_id] = [self._store_command(c, guild_id) for c in payload]
        self.sync_count += 1
        return self.commands[guild_id]

    async def _r_post_command(self, req: Request, p: dict[str, str]) -> Any:
        self._check_app(p)
        guild_id = self._guild_of(p).id if "guild_id" in p else None
        problems = command_problems([req.json])
        if problems:
            raise form_error(problems)
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
            raise not_found("Application", 10002)

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

    # -- channels and messages
    def _channel_or_404(self, p: dict[str, str]) -> tuple[FakeChannel, FakeGuild | None]:
        try:
            return self.channel(int(p["channel_id"]))
        except (KeyError, ValueError):
            raise not_found("Channel", 10003) from None

    def _require(self, channel: FakeChannel, guild: FakeGuild | None, perms: int) -> None:
        if guild is None:
            return
        have = guild.permissions_for(self.bot_id, channel.id)
        if not have & P_VIEW_CHANNEL:
            raise ApiError(403, 50001, "Missing Access")
        if have & perms != perms:
            raise ApiError(403, 50013, "Missing Permissions")

    def _message_or_404(self, p: dict[str, str]) -> FakeMessage:
        msg = self.messages.get(int(p["message_id"])) if p["message_id"].isdigit() else None
        if msg is None or msg.deleted or msg.ephemeral or msg.channel_id != int(p["channel_id"]):
            raise not_found("Message", 10008)
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
            raise ApiError(400, 50008, "Cannot send messages in a non-text channel")
        body = req.json if isinstance(req.json, dict) else {}
        need = P_SEND_IN_THREADS if channel.is_thread else P_SEND_MESSAGES
        self._require(channel, guild, need | (P_ATTACH_FILES if req.files else 0))
        if guild is None and not self.user(channel.recipient_id or 0).dms_open:
            raise ApiError(403, 50007, "Cannot send messages to this user")
        limit = guild.upload_limit if guild else self.upload_limit
        msg = self._create_message(channel, guild, body, req.files, author=self.bot_user, limit=limit)
        req.message = msg
        return msg.payload

    async def _r_edit_message(self, req: Request, p: dict[str, str]) -> Any:
        _, guild = self._channel_or_404(p)
        msg = self._message_or_404(p)
        if msg.author_id != self.bot_id:
            raise ApiError(403, 50005, "Cannot edit a message authored by another user")
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
            raise ApiError(400, 50024, "Cannot execute action on this channel type")
        body = req.json if isinstance(req.json, dict) else {}
        name = str(body.get("name") or "")
        if not 1 <= len(name) <= 100:
            raise form_error([(("name",), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")])
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

    # -- interactions
    def _interaction_for(self, p: dict[str, str], req: Request) -> FakeInteraction:
        ix = self._by_token.get(p["interaction_token"])
        if ix is None or ("interaction_id" in p and p["interaction_id"] != str(ix.id)):
            raise not_found("interaction", 10062) if "interaction_id" in p else not_found("Webhook", 10015)
        if "application_id" in p and p["application_id"] != str(self.application_id):
            raise not_found("Webhook", 10015)
        req.interaction = ix
        return ix

    def _invalid_response_type(self, ix: FakeInteraction, callback_type: int) -> ApiError:
        return form_error(
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
            raise ApiError(400, 40060, "Interaction has already been acknowledged.")
        if self.interaction_timeout is not None and time.monotonic() - ix.created > self.interaction_timeout:
            raise not_found("interaction", 10062)
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
            problems = modal_problems(data)
            if problems:
                raise form_error(problems)
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

    async def _r_followup(self, req: Request, p: dict[str, str]) -> Any:
        ix = self._interaction_for(p, req)
        if ix.callback is None or ix.callback_type == 9:
            raise not_found("Webhook", 10015)
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
            raise not_found("Message", 10008)
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

"""Messages as Discord keeps them: created, edited and deleted from REST or interaction bodies (files
uploaded to the CDN, embeds and components resolved, mentions parsed), their reactions, and the
gateway event each change sends."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import mimetypes
import re
from collections.abc import Sequence

from fakediscord.cdn import Cdn, sanitize_filename
from fakediscord.checks import check_uploads, message_problems
from fakediscord.errors import ApiError, Problem, form_error
from fakediscord.gateway import (
    INTENT_DIRECT_MESSAGE_REACTIONS,
    INTENT_DIRECT_MESSAGES,
    INTENT_GUILD_MESSAGE_REACTIONS,
    INTENT_GUILD_MESSAGES,
    INTENT_MESSAGE_CONTENT,
    Gateway,
)
from fakediscord.model import JSON, FakeChannel, FakeGuild, FakeUser, iso_timestamp, new_snowflake
from fakediscord.records import (
    FLAG_COMPONENTS_V2,
    FLAG_EPHEMERAL,
    FLAG_LOADING,
    FLAG_SUPPRESS_EMBEDS,
    FLAG_SUPPRESS_NOTIFICATIONS,
    FakeInteraction,
    FakeMessage,
    UploadedFile,
    walk_components,
)


class Messages(Gateway, Cdn):
    """The message store of FakeDiscord, which its REST routes and user actions share."""

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
        check_uploads(files, limit)
        problems = message_problems(body, flags)
        if problems:
            raise form_error(problems)
        ephemeral = bool(flags & FLAG_EPHEMERAL)
        attachments = self._build_attachments(channel.id, body, files, None, ephemeral) or []
        has_body = (
            body.get("content") or body.get("embeds") or body.get("components") or body.get("sticker_ids")
        )
        if not (loading or has_body or attachments or body.get("poll")):
            raise ApiError(400, 50006, "Cannot send an empty message")
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
            "timestamp": iso_timestamp(msg_id),
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
        check_uploads(files, limit)
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
        problems = message_problems(merged, flags)
        if problems:
            raise form_error(problems)
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
            raise ApiError(400, 50006, "Cannot send an empty message")
        new["flags"] = flags
        if not was_loading:
            new["edited_timestamp"] = iso_timestamp()
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
                mimetypes.guess_type(sanitize_filename(name))[0],
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
        problems: list[Problem] = []
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
            raise form_error(problems)
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
                    att = by_name.get(sanitize_filename(media["url"][len("attachment://") :]))
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
        for component in walk_components(components):
            if "id" not in component:
                component["id"] = next(counter)
            media = [component.get("media"), component.get("file")]
            media += [item.get("media") for item in component.get("items") or [] if isinstance(item, dict)]
            for unfurled in media:
                url = unfurled.get("url", "") if isinstance(unfurled, dict) else ""
                att = (
                    by_name.get(sanitize_filename(url[len("attachment://") :]))
                    if url.startswith("attachment://")
                    else None
                )
                if att is not None:
                    unfurled.update(url=att["url"], proxy_url=att["proxy_url"], attachment_id=att["id"])
                    unfurled.update({k: att[k] for k in ("width", "height", "content_type") if k in att})
        return components

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

"""The fake's side of the gateway: the websocket endpoint (HELLO, IDENTIFY -> READY + GUILD_CREATE,
heartbeats, RESUME, member requests), the intents that decide which events the bot gets, and the
outbox that writes events to the bot's connection in order, keeping them while it reconnects."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets

from aiohttp import WSMsgType, web

from fakediscord.connection import GatewayConnection, Session
from fakediscord.errors import WaitTimeout
from fakediscord.model import APP_FLAGS, JSON
from fakediscord.state import FakeState

# Gateway intents (bits) that decide which events the fake sends.
INTENT_GUILD_MEMBERS = 1 << 1
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_GUILD_MESSAGE_REACTIONS = 1 << 10
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_DIRECT_MESSAGE_REACTIONS = 1 << 13
INTENT_MESSAGE_CONTENT = 1 << 15

_log = logging.getLogger(__name__)


class Gateway(FakeState):
    """FakeDiscord's gateway: the bot's websocket, and the events queued for it."""

    @property
    def intents(self) -> int | None:
        return self.session.intents if self.session else None

    def _has_intent(self, bit: int) -> bool:
        intents = self.intents
        return intents is None or bool(intents & bit)

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

    async def flush(self, *, timeout: float = 5.0) -> None:
        """Wait until every queued gateway event has been written to the bot's socket."""
        pending = [fut for _, _, fut in self._outbox]
        if pending:
            _, not_done = await asyncio.wait(pending, timeout=timeout)
            if not_done:
                raise WaitTimeout(self._report("queued gateway events to be delivered"))

    # -- the outbox
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

    # -- the websocket endpoint
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
        session = Session(secrets.token_hex(16), data.get("intents"), data)
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
            "application": {"id": str(self.application_id), "flags": APP_FLAGS},
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

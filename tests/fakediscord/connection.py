"""One gateway websocket connection from the bot (its frames, compression, and what was sent and
received) and the session an IDENTIFY opens."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from fakediscord.model import JSON, dumps


@dataclass
class Session:
    """What an IDENTIFY opened: RESUME continues it, with the sequence numbers where they were."""

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
        self.session: Session | None = None
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

    async def send(self, payload: JSON, *, seq_for: Session | None = None) -> None:
        async with self._lock:
            if seq_for is not None:
                seq_for.seq += 1
                payload["s"] = seq_for.seq
            raw = dumps(payload)
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

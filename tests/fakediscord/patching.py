"""Pointing discord.py at the fake: its REST base, default gateway URL and CDN base."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import discord.asset
import discord.gateway
import discord.http
import yarl


class DiscordPatch:
    """Points discord.py's REST base, default gateway URL and CDN base at ``base_url`` until restored."""

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
    patch = DiscordPatch(base_url)
    patch.apply()
    try:
        yield
    finally:
        patch.restore()

"""What the fake records and stores: the bot's REST calls (Request, with their UploadedFile parts),
messages (FakeMessage), the interactions a test sent (FakeInteraction), files on the CDN and the
rate limits a test asked for."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from fakediscord.model import JSON

_T = TypeVar("_T")

# Message flags.
FLAG_SUPPRESS_EMBEDS = 1 << 2
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7
FLAG_SUPPRESS_NOTIFICATIONS = 1 << 12
FLAG_COMPONENTS_V2 = 1 << 15


class RecordKeeper(Protocol):
    """What a message or an interaction asks of the fake that keeps it: FakeDiscord, which imports this
    module (so this one names only what it needs)."""

    def file_bytes(self, attachment: JSON | int) -> bytes: ...

    def responses_to(self, interaction: FakeInteraction) -> list[Request]: ...

    async def wait_until(
        self, condition: Callable[[], _T], *, timeout: float = 5.0, what: str | None = None
    ) -> _T: ...


@dataclass
class UploadedFile:
    """A file part of a multipart REST call (``field`` is its form field, e.g. ``files[0]``)."""

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
    return [c["custom_id"] for c in walk_components(modal.get("components") or []) if c.get("type") == 4]


def walk_components(components: Iterable[JSON]) -> Iterator[JSON]:
    for component in components:
        yield component
        yield from walk_components(component.get("components") or [])
        for key in ("component", "accessory"):
            if isinstance(component.get(key), dict):
                yield from walk_components([component[key]])


class FakeMessage:
    """A message stored by the fake. ``payload`` is the Discord message object as the bot last saw it."""

    def __init__(
        self,
        fake: RecordKeeper,
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
        return [c["custom_id"] for c in walk_components(self.components) if c.get("custom_id")]

    def component(self, custom_id: str) -> JSON | None:
        return next((c for c in walk_components(self.components) if c.get("custom_id") == custom_id), None)

    @property
    def text(self) -> str:
        """Content plus embed titles/descriptions/fields and text displays, for loose assertions."""
        parts = [self.content]
        for embed in self.embeds:
            parts += [embed.get("title") or "", embed.get("description") or ""]
            parts += [f"{f.get('name')} {f.get('value')}" for f in embed.get("fields") or []]
        parts += [c.get("content") or "" for c in walk_components(self.components) if c.get("type") == 10]
        return "\n".join(p for p in parts if p)

    def __repr__(self) -> str:
        extra = " ephemeral" if self.ephemeral else ""
        extra += " loading" if self.loading else ""
        extra += " deleted" if self.deleted else ""
        return f"<FakeMessage {self.id} in {self.channel_id}{extra} content={self.content[:60]!r} files={len(self.attachments)}>"


class FakeInteraction:
    """An interaction the test sent; collects the bot's callback, original response and followups."""

    def __init__(
        self, fake: RecordKeeper, payload: JSON, *, message: FakeMessage | None, size_limit: int
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


@dataclass
class StoredFile:
    """Bytes on the fake CDN, by attachment id."""

    filename: str
    data: bytes
    content_type: str | None


@dataclass
class RateLimitRule:
    """``FakeDiscord.rate_limit``: answer the next ``remaining`` calls matching ``spec`` with 429."""

    spec: str
    remaining: int
    retry_after: float
    is_global: bool

"""The fake CDN: attachments that a test registers or the bot uploads, served at their URLs, and
downloads held back while a test looks at who is fetching what."""

from __future__ import annotations

import asyncio
import hashlib
import io
import mimetypes
import re
import time
from typing import Any
from urllib.parse import quote, unquote

from aiohttp import web

from fakediscord.model import JSON, id_of, new_snowflake
from fakediscord.records import Request, StoredFile
from fakediscord.state import FakeState


def sanitize_filename(name: str) -> str:
    """An attachment's file name as Discord stores it: whitespace becomes underscores."""
    return re.sub(r"\s", "_", name.strip()) or "unknown"


def _image_size(data: bytes) -> tuple[int, int] | None:
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:
        return None


class Cdn(FakeState):
    """FakeDiscord's CDN: stored files by attachment id, and their downloads."""

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
        filename = sanitize_filename(filename)
        content_type = content_type or mimetypes.guess_type(filename)[0]
        self._files[att_id] = StoredFile(filename, bytes(data), content_type)
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

    def file_bytes(self, attachment: JSON | int) -> bytes:
        att_id = id_of(attachment)
        return self._files[att_id].data

    def hold_downloads(self) -> None:
        """Attachment downloads from now on are recorded in ``cdn_requests`` (and wake waiters) but
        answered only at ``release_downloads()``: a test sees whose photos are being fetched."""
        self._downloads_open = asyncio.Event()

    def release_downloads(self) -> None:
        if self._downloads_open is not None:
            self._downloads_open.set()
            self._downloads_open = None

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

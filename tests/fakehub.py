"""A fake Hugging Face Hub on 127.0.0.1: the routes huggingface_hub's HfApi calls to create a repo and
commit files to it, and to delete a repo, with the Hub's answers and refusals.

    def test_publish(fake_hub: FakeHub) -> None:       # a running hub; HfApi() goes to it (HF_ENDPOINT)
        fake_hub.tokens["hf_alice"] = "alice"
        publish_model(..., "abraza", "hf_alice")
        assert fake_hub.repos["alice/abraza"].files["README.md"].startswith(b"---")

The server runs on a thread of its own, so a blocking caller (the CLI) and the bot's event loop alike
reach it.

Routes (as huggingface_hub 1.x/2.x calls them, hf_api.py, _commit_api.py, lfs.py):
GET /api/whoami-v2; POST /api/repos/create; DELETE /api/repos/delete; POST /api/validate-yaml;
POST /api/models/{repo}/preupload/{revision} (safetensors and PNG files go through LFS, as the Hub's
default .gitattributes says, the rest inline); POST /{repo}.git/info/lfs/objects/batch and a PUT of each
object to the href it answers (the "basic" transfer); POST /api/models/{repo}/commit/{revision}
(NDJSON: header, file, lfsFile). Xet uploads are not faked: the fixture turns them off, as
HF_HUB_DISABLE_XET=1 does. A token is a bearer token; every request is recorded in `requests`.
`fail_commit` makes the commit route answer that HTTP status with an error body instead (200: an
answer huggingface_hub cannot read).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

LFS_SUFFIXES = (".safetensors", ".png", ".bin", ".pt")


@dataclass
class FakeRepo:
    owner: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class HubRequest:
    method: str
    path: str
    # The bearer token sent, if any (tests check it is the member's, and that it goes nowhere else).
    token: str | None
    # A route the fake has; huggingface_hub also asks for things no upload needs (/api/agent-harnesses).
    known: bool


class FakeHub:
    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = tokens  # token -> user name
        self.repos: dict[str, FakeRepo] = {}
        self.deleted: list[str] = []
        self.requests: list[HubRequest] = []
        self.validated_cards: list[str] = []
        self.fail_commit: int | None = None
        self._lfs: dict[str, bytes] = {}
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- running ---------------------------------------------------------------------------

    def __enter__(self) -> FakeHub:
        app = web.Application(middlewares=[self._record], client_max_size=1 << 30)
        app.router.add_get("/api/whoami-v2", self._whoami)
        app.router.add_post("/api/repos/create", self._create)
        app.router.add_delete("/api/repos/delete", self._delete)
        app.router.add_post("/api/validate-yaml", self._validate_yaml)
        app.router.add_post("/api/models/{owner}/{name}/preupload/{revision}", self._preupload)
        app.router.add_post("/api/models/{owner}/{name}/commit/{revision}", self._commit)
        app.router.add_post("/{owner}/{name}.git/info/lfs/objects/batch", self._lfs_batch)
        app.router.add_put("/lfs-objects/{oid}", self._lfs_put)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake hub", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None and self._thread is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        known = request.match_info.http_exception is None
        self.requests.append(HubRequest(request.method, request.path, _bearer(request), known))
        try:
            return await handler(request)
        except _Refused as refused:
            return web.json_response(refused.body, status=refused.status)

    # -- routes ----------------------------------------------------------------------------

    def _user(self, request: web.Request) -> str:
        user = self.tokens.get(_bearer(request) or "")
        if user is None:
            raise _error(401, "Invalid credentials in Authorization header")
        return user

    def _writable(self, request: web.Request) -> FakeRepo:
        user = self._user(request)
        repo_id = f"{request.match_info['owner']}/{request.match_info['name']}"
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and repo.owner != user):
            raise _error(404, "Repository not found")
        if repo.owner != user:
            raise _error(403, "You don't have the rights to write to this repo")
        return repo

    async def _whoami(self, request: web.Request) -> web.Response:
        user = self._user(request)
        return web.json_response({"type": "user", "name": user, "auth": {"type": "access_token"}})

    async def _create(self, request: web.Request) -> web.Response:
        user = self._user(request)
        body = await request.json()
        owner = body.get("organization") or user
        repo_id = f"{owner}/{body['name']}"
        if owner != user:
            raise _error(403, f"You don't have the rights to create a model under the namespace {owner!r}")
        if repo_id in self.repos:
            raise _error(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        self.repos[repo_id] = FakeRepo(owner=user, private=body.get("visibility") != "public")
        return web.json_response({"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    async def _delete(self, request: web.Request) -> web.Response:
        user = self._user(request)
        body = await request.json()
        repo_id = f"{body.get('organization') or user}/{body['name']}"
        repo = self.repos.get(repo_id)
        if repo is None:
            raise _error(404, "Repository not found")
        if repo.owner != user:
            raise _error(403, "You don't have the rights to delete this repo")
        del self.repos[repo_id]
        self.deleted.append(repo_id)
        return web.json_response({})

    async def _validate_yaml(self, request: web.Request) -> web.Response:
        self._user(request)
        self.validated_cards.append((await request.json())["content"])
        return web.json_response({"errors": [], "warnings": []})

    async def _preupload(self, request: web.Request) -> web.Response:
        self._writable(request)
        files = (await request.json())["files"]
        return web.json_response(
            {
                "files": [
                    {
                        "path": file["path"],
                        "uploadMode": "lfs" if file["path"].endswith(LFS_SUFFIXES) else "regular",
                        "shouldIgnore": False,
                        "oid": None,
                    }
                    for file in files
                ]
            }
        )

    async def _lfs_batch(self, request: web.Request) -> web.Response:
        self._writable(request)
        body = await request.json()
        objects = [
            {
                "oid": obj["oid"],
                "size": obj["size"],
                "authenticated": True,
                # The Hub answers a storage URL that takes the bytes without the Hub's token.
                "actions": {"upload": {"href": f"{self.url}/lfs-objects/{obj['oid']}"}},
            }
            for obj in body["objects"]
            if obj["oid"] not in self._lfs
        ]
        return web.json_response(
            {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json"
        )

    async def _lfs_put(self, request: web.Request) -> web.Response:
        data = await request.read()
        if hashlib.sha256(data).hexdigest() != request.match_info["oid"]:
            raise _error(400, "the object's sha256 is not its oid")
        self._lfs[request.match_info["oid"]] = data
        return web.Response()

    async def _commit(self, request: web.Request) -> web.Response:
        repo = self._writable(request)
        if self.fail_commit is not None:
            raise _error(self.fail_commit, "Internal Error")
        files: dict[str, bytes] = {}
        summary = ""
        for line in (await request.read()).splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                summary = value["summary"]
            elif item["key"] == "file":
                assert value["encoding"] == "base64"
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self._lfs:
                    raise _error(400, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = self._lfs[value["oid"]]
            else:
                raise _error(400, f"unexpected commit operation {item['key']!r}")
        repo.files.update(files)
        repo.commits.append(summary)
        oid = hashlib.sha1(summary.encode() + str(len(repo.commits)).encode()).hexdigest()
        repo_id = f"{request.match_info['owner']}/{request.match_info['name']}"
        return web.json_response(
            {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
        )


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header.removeprefix("Bearer ") if header.startswith("Bearer ") else None


class _Refused(Exception):
    """The Hub's error answer: a status and a JSON body with its message (huggingface_hub shows it)."""

    def __init__(self, status: int, body: dict[str, str]) -> None:
        super().__init__(status, body)
        self.status, self.body = status, body


def _error(status: int, message: str, **extra: str) -> _Refused:
    return _Refused(status, {"error": message, **extra})


def assert_token_kept_nowhere(token: str, data_dir: Path, *texts: str) -> None:
    """Not in a log or output text, not in any file under the data directory (the database and its
    WAL included, read as raw bytes)."""
    for text in texts:
        assert token not in text
    for path in data_dir.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A running FakeHub that HfApi() reaches as it would HF_ENDPOINT, online and without Xet."""
    from huggingface_hub import constants

    with FakeHub(tokens={}) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        # conftest keeps the tests offline for the base model; publishing is the one thing online.
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        yield hub

"""SQLite storage for users, models, jobs, generations and the prompt book (through sqlite-utils).

The row is the source of truth: a job is written here before anyone is told it is queued, and the
queue rebuilds itself from these rows after a restart. One process writes (the bot, or the CLI when
the bot is not running); WAL and a busy timeout let the other read meanwhile.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import sqlite_utils

from engine.contract.protocol import (
    RESULT_TYPES,
    AdapterRef,
    GenerateJob,
    GenerationDone,
    ProtocolError,
    TrainingDone,
    TrainJob,
    decode,
)

log = logging.getLogger(__name__)

DATABASE_FILE = "dreambot.sqlite3"
# Discord ids are never 0: the CLI acts as user 0 in "guild" 0.
LOCAL_USER_ID = 0
LOCAL_USER_NAME = "local"
LOCAL_GUILD_ID = 0

JobKind = Literal["train", "generate"]
JobState = Literal["queued", "running", "done", "failed", "cancelled"]
ModelState = Literal["queued", "training", "ready", "failed"]
ACTIVE_JOB_STATES = ("queued", "running")


@dataclass
class ModelRow:
    id: int
    guild_id: int
    owner_id: int
    token: str
    class_word: str
    state: ModelState
    shared: bool
    adapter_path: str | None
    samples: list[str]
    metadata: dict[str, Any]
    error: str | None
    created_at: float

    def adapter_ref(self, weight: float = 1.0) -> AdapterRef:
        """How the engine finds and prompts this model, applied at `weight` (only a ready model has
        an adapter)."""
        if self.adapter_path is None:
            raise ValueError(f"model {self.token!r} is {self.state}: it has no adapter yet")
        return AdapterRef(token=self.token, class_word=self.class_word, path=self.adapter_path, weight=weight)


@dataclass
class JobRow:
    id: str
    kind: JobKind
    user_id: int
    guild_id: int
    channel_id: int
    state: JobState
    # The protocol job (engine.contract.protocol.encode output) the engine will receive: see `request`.
    payload: str
    model_id: int | None
    attempts: int
    error: str | None
    # The message kept up to date with progress, and the interaction that started the job.
    progress_message_id: int | None
    # What the bot needs beside the request to finish the job (a variation's parent generation).
    context: dict[str, Any]
    # The fields of the job's TrainingDone or GenerationDone once it is done: see `outcome`.
    result: dict[str, Any]
    created_at: float
    started_at: float | None
    finished_at: float | None

    @classmethod
    def queued(cls, job_id: str, kind: JobKind, user_id: int, payload: str, created_at: float) -> JobRow:
        """A row as add_job writes it, held in memory only: for the dispatch policy on its own
        (the policy's tests, bench.cluster_sim)."""
        return cls(
            id=job_id,
            kind=kind,
            user_id=user_id,
            guild_id=1,
            channel_id=1,
            state="queued",
            payload=payload,
            model_id=None,
            attempts=0,
            error=None,
            progress_message_id=None,
            context={},
            result={},
            created_at=created_at,
            started_at=None,
            finished_at=None,
        )

    @property
    def request(self) -> TrainJob | GenerateJob:
        """The job as the engine runs it (ProtocolError for a payload that is not one). The bot
        checked it when it wrote the row: it is read back as it is, not checked again."""
        job = decode(self.payload, checked=False)
        if not isinstance(job, TrainJob | GenerateJob) or job.type != self.kind or job.job_id != self.id:
            raise ProtocolError(f"expected a {self.kind!r} job with job_id {self.id!r}")
        return job

    @property
    def outcome(self) -> TrainingDone | GenerationDone | None:
        """The job's result, once it is done."""
        if self.state != "done":
            return None
        return RESULT_TYPES[self.kind](job_id=self.id, **self.result)


@dataclass
class GenerationRow:
    id: int
    job_id: str
    guild_id: int
    user_id: int
    channel_id: int
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    tokens: list[str]
    files: list[str]
    kind: Literal["txt2img", "variation", "upscale"]
    parent_id: int | None
    message_id: int | None
    gallery_message_id: int | None
    stars: int
    created_at: float
    parameters: list[str] = field(default_factory=list)
    # The prompt as the member typed it when it was a template (`[SUBJECT]`): "Use prompt" offers it.
    template: str | None = None
    # Made in an age-restricted channel (or a thread of one): shown only in age-restricted channels
    # (bot.views.may_show). Read as True while not recorded yet (see record_age_restriction).
    age_restricted: bool = False


@dataclass
class PromptRow:
    """An entry of a server's prompt book: a prompt a member saved, with the card that shows it."""

    id: int
    guild_id: int
    user_id: int
    title: str
    # In template form: the author's own model is written [SUBJECT], for whoever uses it.
    prompt: str
    negative_prompt: str
    note: str
    # The picture it was saved from (None when typed, or once that picture is deleted).
    generation_id: int | None
    card_channel_id: int | None
    card_message_id: int | None
    stars: int
    uses: int
    created_at: float
    # Saved in an age-restricted channel or from a picture made in one: shown only in age-restricted
    # channels, like such a picture. Read as True while not recorded yet.
    age_restricted: bool = False


PromptSort = Literal["top", "new", "used"]
_PROMPT_ORDER: dict[str, str] = {
    "top": "p.stars DESC, p.created_at DESC",
    "new": "p.created_at DESC",
    "used": "p.uses DESC, p.created_at DESC",
}


@dataclass
class PostRow:
    """A message the bot posted about a member's job or model (progress, samples, a notice)."""

    message_id: int
    channel_id: int
    # None for a direct message.
    guild_id: int | None
    user_id: int
    model_id: int | None
    job_id: str | None


@dataclass(frozen=True)
class MemberSettings:
    """A member's own defaults for /imagine, in every server; None: the server's default."""

    aspect: str | None = None
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    count: int | None = None
    # Whether her pictures are copied to the gallery channel.
    gallery: bool = True


MEMBER_SETTINGS = tuple(MemberSettings.__dataclass_fields__)

_JSON_FIELDS = {"samples", "metadata", "context", "result", "tokens", "files", "parameters"}
_BOOL_FIELDS = {"shared", "gallery"}


def _row(cls: type, raw: dict[str, Any]) -> Any:
    values = {}
    for name in cls.__dataclass_fields__:
        value = raw.get(name)
        if name in _JSON_FIELDS:
            value = (
                json.loads(value)
                if value
                else ([] if name in ("samples", "tokens", "files", "parameters") else {})
            )
        elif name in _BOOL_FIELDS:
            value = bool(value)
        elif name == "age_restricted":
            # NULL: not recorded yet (a row older than the column), which counts as age-restricted,
            # as _SHOWN_OUTSIDE_AGE_RESTRICTED has it in SQL.
            value = value is None or bool(value)
        values[name] = value
    return cls(**values)


# Each entry moves the schema one version forward; never edit one that has shipped, add another.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE models (
        id INTEGER PRIMARY KEY,
        guild_id INTEGER NOT NULL,
        owner_id INTEGER NOT NULL REFERENCES users(id),
        token TEXT NOT NULL,
        class_word TEXT NOT NULL,
        state TEXT NOT NULL,
        shared INTEGER NOT NULL DEFAULT 0,
        adapter_path TEXT,
        samples TEXT,
        metadata TEXT,
        error TEXT,
        created_at REAL NOT NULL,
        UNIQUE (guild_id, token)
    );
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        user_id INTEGER NOT NULL REFERENCES users(id),
        guild_id INTEGER NOT NULL,
        channel_id INTEGER NOT NULL,
        state TEXT NOT NULL,
        payload TEXT NOT NULL,
        model_id INTEGER REFERENCES models(id) ON DELETE SET NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        progress_message_id INTEGER,
        context TEXT,
        result TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL
    );
    CREATE INDEX jobs_by_state ON jobs (state, created_at);
    CREATE TABLE generations (
        id INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL,
        guild_id INTEGER NOT NULL,
        user_id INTEGER NOT NULL REFERENCES users(id),
        channel_id INTEGER NOT NULL,
        prompt TEXT NOT NULL,
        negative_prompt TEXT NOT NULL DEFAULT '',
        seed INTEGER NOT NULL,
        steps INTEGER NOT NULL,
        guidance REAL NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        tokens TEXT,
        files TEXT,
        parameters TEXT,
        kind TEXT NOT NULL,
        parent_id INTEGER REFERENCES generations(id) ON DELETE SET NULL,
        message_id INTEGER,
        gallery_message_id INTEGER,
        stars INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    );
    CREATE INDEX generations_by_guild ON generations (guild_id, created_at);
    CREATE VIRTUAL TABLE generations_fts USING fts5 (prompt, content='generations', content_rowid='id');
    CREATE TRIGGER generations_ai AFTER INSERT ON generations BEGIN
        INSERT INTO generations_fts (rowid, prompt) VALUES (new.id, new.prompt);
    END;
    CREATE TRIGGER generations_ad AFTER DELETE ON generations BEGIN
        INSERT INTO generations_fts (generations_fts, rowid, prompt) VALUES ('delete', old.id, old.prompt);
    END;
    CREATE TABLE settings (
        guild_id INTEGER NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (guild_id, key)
    );
    """,
    """
    CREATE TABLE posts (
        message_id INTEGER PRIMARY KEY,
        channel_id INTEGER NOT NULL,
        guild_id INTEGER,
        user_id INTEGER NOT NULL REFERENCES users(id),
        model_id INTEGER REFERENCES models(id) ON DELETE SET NULL,
        job_id TEXT
    );
    CREATE INDEX posts_by_user ON posts (user_id);
    CREATE INDEX posts_by_model ON posts (model_id);
    """,
    # A member's settings follow her across servers; her default model is one of a server's models, so
    # it is kept per server beside them, and goes with the model.
    """
    ALTER TABLE generations ADD COLUMN template TEXT;
    CREATE TABLE member_settings (
        user_id INTEGER PRIMARY KEY REFERENCES users(id),
        aspect TEXT,
        steps INTEGER,
        guidance REAL,
        negative_prompt TEXT,
        count INTEGER,
        gallery INTEGER NOT NULL DEFAULT 1
    );
    CREATE TABLE default_models (
        user_id INTEGER NOT NULL REFERENCES users(id),
        guild_id INTEGER NOT NULL,
        model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
        PRIMARY KEY (user_id, guild_id)
    );
    """,
    # The prompt book: saved prompts, their cards in the prompts channel and a search index.
    """
    CREATE TABLE prompts (
        id INTEGER PRIMARY KEY,
        guild_id INTEGER NOT NULL,
        user_id INTEGER NOT NULL REFERENCES users(id),
        title TEXT NOT NULL COLLATE NOCASE,
        prompt TEXT NOT NULL,
        negative_prompt TEXT NOT NULL DEFAULT '',
        note TEXT NOT NULL DEFAULT '',
        generation_id INTEGER REFERENCES generations(id) ON DELETE SET NULL,
        card_channel_id INTEGER,
        card_message_id INTEGER,
        stars INTEGER NOT NULL DEFAULT 0,
        uses INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        UNIQUE (guild_id, title)
    );
    CREATE INDEX prompts_by_card ON prompts (card_message_id);
    CREATE VIRTUAL TABLE prompts_fts USING fts5 (title, prompt, note, content='prompts', content_rowid='id');
    CREATE TRIGGER prompts_ai AFTER INSERT ON prompts BEGIN
        INSERT INTO prompts_fts (rowid, title, prompt, note) VALUES (new.id, new.title, new.prompt, new.note);
    END;
    CREATE TRIGGER prompts_ad AFTER DELETE ON prompts BEGIN
        INSERT INTO prompts_fts (prompts_fts, rowid, title, prompt, note)
        VALUES ('delete', old.id, old.title, old.prompt, old.note);
    END;
    CREATE TRIGGER prompts_au AFTER UPDATE OF title, prompt, note ON prompts BEGIN
        INSERT INTO prompts_fts (prompts_fts, rowid, title, prompt, note)
        VALUES ('delete', old.id, old.title, old.prompt, old.note);
        INSERT INTO prompts_fts (rowid, title, prompt, note) VALUES (new.id, new.title, new.prompt, new.note);
    END;
    """,
    # Whether a picture was made in an age-restricted channel (a thread of one included), and whether
    # an entry was saved in one or from such a picture. For the rows already there only Discord knows:
    # they stay NULL, which counts as age-restricted, until the bot looks their channels up at start-up
    # (record_age_restriction). An entry without a picture (typed, or its picture deleted) has nothing
    # to look up: it stays as ordinary as it was shown until now.
    """
    ALTER TABLE generations ADD COLUMN age_restricted INTEGER;
    ALTER TABLE prompts ADD COLUMN age_restricted INTEGER;
    UPDATE prompts SET age_restricted = 0 WHERE generation_id IS NULL;
    """,
]

# The rows an ordinary channel may show, in SQL: those recorded as made outside age-restricted
# channels (NULL, not recorded yet, is not 0). The same rule for one row is bot.views.may_show.
_SHOWN_OUTSIDE_AGE_RESTRICTED = "{rows}.age_restricted = 0"

# A generation or job made with one of the member's models shows her face, whoever asked for it.
# `{rows}` is the table, `{tokens}` the JSON array of the tokens its prompt used.
_WITH_HER_MODELS = """EXISTS (
    SELECT 1 FROM models m, json_each({tokens}) t
    WHERE m.owner_id = :user_id AND m.guild_id = {rows}.guild_id AND {token} = m.token
)"""
_HER_GENERATIONS = "generations.user_id = :user_id OR " + _WITH_HER_MODELS.format(
    rows="generations", tokens="generations.tokens", token="t.value"
)
# A job names the models it uses in its request: the adapters of a GenerateJob.
_HER_JOBS = "jobs.user_id = :user_id OR " + _WITH_HER_MODELS.format(
    rows="jobs", tokens="jobs.payload, '$.adapters'", token="json_extract(t.value, '$.token')"
)
_HER_POSTS = f"posts.user_id = :user_id OR posts.job_id IN (SELECT id FROM jobs WHERE {_HER_JOBS})"


class DatabaseUnusable(Exception):
    """The database file cannot be opened as it is; the message names it and says what to do."""

    @classmethod
    def because(cls, path: Path, error: sqlite3.DatabaseError) -> DatabaseUnusable:
        if isinstance(error, sqlite3.OperationalError):  # locked, unreadable, a folder: not its contents
            return cls(f"the database {path} cannot be opened: {error}")
        problem = "is not a database" if "not a database" in str(error) else "is damaged"
        return cls(
            f"the database {path} {problem}: restore it from a backup, or move it aside to start with an "
            "empty one (nothing was changed in it)"
        )


class Database:
    """The bot's tables. Methods are synchronous: SQLite on local disk answers in microseconds."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # The queue's dispatcher and the cogs share this connection on the event loop's thread.
        connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db = sqlite_utils.Database(connection)
        try:
            self.db.execute("PRAGMA busy_timeout = 10000")
            self.db.execute("PRAGMA foreign_keys = ON")
            # Deleted rows are overwritten with zeros, not just unlinked (see forget_user).
            self.db.execute("PRAGMA secure_delete = ON")
            # Reads the file's header and schema first: nothing is written to a file that is no
            # database, and each migration is one transaction.
            self.db.enable_wal()
            self._migrate()
        except sqlite3.DatabaseError as error:
            connection.close()
            raise DatabaseUnusable.because(path, error) from None

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> Database:
        return cls(data_dir / DATABASE_FILE)

    def close(self) -> None:
        self.db.close()

    @property
    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        for version, script in enumerate(MIGRATIONS, start=1):
            if self.schema_version < version:
                with self.db.conn:
                    self.db.conn.executescript(f"BEGIN; {script}; PRAGMA user_version = {version}; COMMIT;")

    # -- users -------------------------------------------------------------------------------

    def ensure_user(self, user_id: int, name: str) -> None:
        self.db["users"].upsert(
            {"id": user_id, "name": name, "created_at": time.time()}, pk="id", alter=False
        )

    # -- models ------------------------------------------------------------------------------

    def add_model(self, *, guild_id: int, owner_id: int, token: str, class_word: str) -> ModelRow:
        model_id = (
            self.db["models"]
            .insert(
                {
                    "guild_id": guild_id,
                    "owner_id": owner_id,
                    "token": token,
                    "class_word": class_word,
                    "state": "queued",
                    "shared": 0,
                    "created_at": time.time(),
                }
            )
            .last_pk
        )
        return self.model(model_id)

    def model(self, model_id: int) -> ModelRow:
        return _row(ModelRow, self.db["models"].get(model_id))

    def find_model(self, model_id: int | None) -> ModelRow | None:
        """The model, or None when it was deleted (or a job has none)."""
        rows = list(self.db["models"].rows_where("id = ?", [model_id]))
        return _row(ModelRow, rows[0]) if rows else None

    def model_by_token(self, guild_id: int, token: str) -> ModelRow | None:
        rows = list(self.db["models"].rows_where("guild_id = ? AND token = ?", [guild_id, token]))
        return _row(ModelRow, rows[0]) if rows else None

    def models_of(self, owner_id: int, guild_id: int | None = None) -> list[ModelRow]:
        where, args = "owner_id = ?", [owner_id]
        if guild_id is not None:
            where, args = where + " AND guild_id = ?", [*args, guild_id]
        return [
            _row(ModelRow, raw) for raw in self.db["models"].rows_where(where, args, order_by="created_at")
        ]

    def ready_models(self, guild_id: int) -> list[ModelRow]:
        rows = self.db["models"].rows_where("guild_id = ? AND state = 'ready'", [guild_id], order_by="token")
        return [_row(ModelRow, raw) for raw in rows]

    def update_model(self, model_id: int, **changes: Any) -> ModelRow:
        self.db["models"].update(model_id, _encode(changes))
        return self.model(model_id)

    def delete_model(self, model_id: int) -> None:
        self.db["models"].delete(model_id)

    # -- jobs --------------------------------------------------------------------------------

    def add_job(
        self,
        *,
        kind: JobKind,
        user_id: int,
        guild_id: int,
        channel_id: int,
        payload: str,
        model_id: int | None = None,
        context: dict[str, Any] | None = None,
        job_id: str | None = None,
    ) -> JobRow:
        job_id = job_id or new_job_id()
        self.db["jobs"].insert(
            {
                "id": job_id,
                "kind": kind,
                "user_id": user_id,
                "guild_id": guild_id,
                "channel_id": channel_id,
                "state": "queued",
                "payload": payload,
                "model_id": model_id,
                "attempts": 0,
                "context": json.dumps(context or {}),
                "created_at": time.time(),
            }
        )
        return self.job(job_id)

    def job(self, job_id: str) -> JobRow:
        return _row(JobRow, self.db["jobs"].get(job_id))

    def find_job(self, job_id: str) -> JobRow | None:
        rows = list(self.db["jobs"].rows_where("id = ?", [job_id]))
        return _row(JobRow, rows[0]) if rows else None

    def update_job(self, job_id: str, **changes: Any) -> JobRow:
        self.db["jobs"].update(job_id, _encode(changes))
        return self.job(job_id)

    def active_jobs(self, user_id: int | None = None) -> list[JobRow]:
        """Queued and running jobs, oldest first (optionally one member's)."""
        where = "state IN ('queued', 'running')"
        args: list[Any] = []
        if user_id is not None:
            where, args = where + " AND user_id = ?", [user_id]
        return [
            _row(JobRow, raw) for raw in self.db["jobs"].rows_where(where, args, order_by="created_at, rowid")
        ]

    def count_active_jobs(self, user_id: int) -> int:
        """A member's queued and running jobs in every server: one GPU queue serves them all, so a
        member in five servers does not get five times the share."""
        return self.db["jobs"].count_where("state IN ('queued', 'running') AND user_id = ?", [user_id])

    def jobs_of(self, user_id: int) -> list[JobRow]:
        """Every job of a member, finished ones included, oldest first."""
        rows = self.db["jobs"].rows_where("user_id = ?", [user_id], order_by="created_at, rowid")
        return [_row(JobRow, raw) for raw in rows]

    def trainings_of(self, model_id: int) -> list[JobRow]:
        """The training jobs of a model (only trainings name one), finished ones included."""
        rows = self.db["jobs"].rows_where("model_id = ?", [model_id], order_by="created_at, rowid")
        return [_row(JobRow, raw) for raw in rows]

    # -- generations -------------------------------------------------------------------------

    def add_generation(self, **values: Any) -> GenerationRow:
        values.setdefault("created_at", time.time())
        generation_id = self.db["generations"].insert(_encode(values)).last_pk
        return self.generation(generation_id)

    def generation(self, generation_id: int) -> GenerationRow:
        return _row(GenerationRow, self.db["generations"].get(generation_id))

    def find_generation(self, generation_id: int) -> GenerationRow | None:
        rows = list(self.db["generations"].rows_where("id = ?", [generation_id]))
        return _row(GenerationRow, rows[0]) if rows else None

    def generation_by_gallery_message(self, message_id: int) -> GenerationRow | None:
        rows = list(self.db["generations"].rows_where("gallery_message_id = ?", [message_id]))
        return _row(GenerationRow, rows[0]) if rows else None

    def gallery_posts_since(self, since: float, limit: int) -> list[GenerationRow]:
        """The newest generations mirrored to a gallery since `since` (a time.time()), newest first."""
        rows = self.db["generations"].rows_where(
            "gallery_message_id IS NOT NULL AND created_at >= ?",
            [since],
            order_by="created_at DESC",
            limit=limit,
        )
        return [_row(GenerationRow, raw) for raw in rows]

    def update_generation(self, generation_id: int, **changes: Any) -> GenerationRow:
        self.db["generations"].update(generation_id, _encode(changes))
        return self.generation(generation_id)

    def generations_of(self, user_id: int) -> list[GenerationRow]:
        rows = self.db["generations"].rows_where("user_id = ?", [user_id], order_by="created_at")
        return [_row(GenerationRow, raw) for raw in rows]

    def delete_generation(self, generation_id: int) -> None:
        self.db["generations"].delete(generation_id)

    def channels_without_age_restriction(self) -> list[tuple[int, int]]:
        """The (guild id, channel id) of the channels of pictures made before the bot recorded whether
        their channel was age-restricted."""
        cursor = self.db.execute(
            "SELECT DISTINCT guild_id, channel_id FROM generations WHERE age_restricted IS NULL "
            "ORDER BY guild_id, channel_id"
        )
        return [(guild_id, channel_id) for guild_id, channel_id in cursor.fetchall()]

    def record_age_restriction(self, channel_id: int, age_restricted: bool) -> None:
        """Record it for the pictures made in a channel before the bot recorded it, and for the prompt
        book entries saved from them."""
        with self.db.conn:
            self.db.execute(
                "UPDATE generations SET age_restricted = ? WHERE channel_id = ? AND age_restricted IS NULL",
                [age_restricted, channel_id],
            )
            self.db.execute(
                "UPDATE prompts SET age_restricted = ? WHERE age_restricted IS NULL "
                "AND generation_id IN (SELECT id FROM generations WHERE channel_id = ?)",
                [age_restricted, channel_id],
            )

    def search_generations(
        self,
        guild_id: int,
        *,
        user_id: int | None = None,
        token: str | None = None,
        search: str | None = None,
        sort: Literal["newest", "top"] = "newest",
        with_age_restricted: bool = False,
        offset: int = 0,
        limit: int = 1,
    ) -> tuple[list[GenerationRow], int]:
        """A page of a server's generations and the total that match, for /gallery; those made in
        age-restricted channels only `with_age_restricted`."""
        where = ["g.guild_id = ?"]
        args: list[Any] = [guild_id]
        if not with_age_restricted:
            where.append(_SHOWN_OUTSIDE_AGE_RESTRICTED.format(rows="g"))
        if user_id is not None:
            where.append("g.user_id = ?")
            args.append(user_id)
        if token is not None:
            where.append("EXISTS (SELECT 1 FROM json_each(g.tokens) WHERE json_each.value = ?)")
            args.append(token)
        if search:
            where.append("g.id IN (SELECT rowid FROM generations_fts WHERE generations_fts MATCH ?)")
            args.append(fts_query(search))
        order = "g.stars DESC, g.created_at DESC" if sort == "top" else "g.created_at DESC"
        condition = " AND ".join(where)
        total = self.db.execute(f"SELECT count(*) FROM generations g WHERE {condition}", args).fetchone()[0]
        cursor = self.db.execute(
            f"SELECT g.* FROM generations g WHERE {condition} ORDER BY {order}, g.id DESC LIMIT ? OFFSET ?",
            [*args, limit, offset],
        )
        columns = [c[0] for c in cursor.description]
        return [_row(GenerationRow, dict(zip(columns, raw, strict=True))) for raw in cursor.fetchall()], total

    # -- posts (messages about a member's jobs and models, to take down) ---------------------

    def add_post(
        self,
        *,
        message_id: int,
        channel_id: int,
        guild_id: int | None,
        user_id: int,
        model_id: int | None = None,
        job_id: str | None = None,
    ) -> None:
        self.db["posts"].insert(
            {
                "message_id": message_id,
                "channel_id": channel_id,
                "guild_id": guild_id,
                "user_id": user_id,
                "model_id": model_id,
                "job_id": job_id,
            }
        )

    def posts_to_forget(self, user_id: int) -> list[PostRow]:
        """The posts about a member's jobs and models, and about the jobs anyone ran with her models."""
        rows = self.db["posts"].rows_where(_HER_POSTS, {"user_id": user_id}, order_by="message_id")
        return [_row(PostRow, raw) for raw in rows]

    def posts_of_model(self, model_id: int) -> list[PostRow]:
        rows = self.db["posts"].rows_where("model_id = ?", [model_id], order_by="message_id")
        return [_row(PostRow, raw) for raw in rows]

    def delete_posts(self, message_ids: Collection[int]) -> None:
        with self.db.conn:
            self.db.conn.executemany("DELETE FROM posts WHERE message_id = ?", [[i] for i in message_ids])

    # -- the prompt book --------------------------------------------------------------------

    def add_prompt(
        self,
        *,
        guild_id: int,
        user_id: int,
        title: str,
        prompt: str,
        negative_prompt: str = "",
        note: str = "",
        generation_id: int | None = None,
        age_restricted: bool,
    ) -> PromptRow:
        """A new entry; sqlite3.IntegrityError when the server's book already has that title (any case)."""
        prompt_id = (
            self.db["prompts"]
            .insert(
                {
                    "guild_id": guild_id,
                    "user_id": user_id,
                    "title": title,
                    "prompt": prompt,
                    "negative_prompt": negative_prompt,
                    "note": note,
                    "generation_id": generation_id,
                    "age_restricted": age_restricted,
                    "stars": 0,
                    "uses": 0,
                    "created_at": time.time(),
                }
            )
            .last_pk
        )
        return self.prompt(prompt_id)

    def prompt(self, prompt_id: int) -> PromptRow:
        return _row(PromptRow, self.db["prompts"].get(prompt_id))

    def find_prompt(self, prompt_id: int) -> PromptRow | None:
        rows = list(self.db["prompts"].rows_where("id = ?", [prompt_id]))
        return _row(PromptRow, rows[0]) if rows else None

    def prompt_by_title(self, guild_id: int, title: str) -> PromptRow | None:
        """The entry of that title in the server's book, whatever its case."""
        rows = list(self.db["prompts"].rows_where("guild_id = ? AND title = ?", [guild_id, title.strip()]))
        return _row(PromptRow, rows[0]) if rows else None

    def prompt_by_card(self, message_id: int) -> PromptRow | None:
        rows = list(self.db["prompts"].rows_where("card_message_id = ?", [message_id]))
        return _row(PromptRow, rows[0]) if rows else None

    def update_prompt(self, prompt_id: int, **changes: Any) -> PromptRow:
        self.db["prompts"].update(prompt_id, changes)
        return self.prompt(prompt_id)

    def count_prompt_use(self, prompt_id: int) -> None:
        self.db.execute("UPDATE prompts SET uses = uses + 1 WHERE id = ?", [prompt_id])

    def delete_prompt(self, prompt_id: int) -> None:
        self.db["prompts"].delete(prompt_id)

    def prompt_titles(
        self, guild_id: int, *, user_id: int | None = None, with_age_restricted: bool = False
    ) -> list[str]:
        """The titles of a server's book (optionally one author's), for autocomplete; those of entries
        from age-restricted channels only `with_age_restricted`."""
        where, args = "guild_id = ?", [guild_id]
        if not with_age_restricted:
            where += " AND " + _SHOWN_OUTSIDE_AGE_RESTRICTED.format(rows="prompts")
        if user_id is not None:
            where, args = where + " AND user_id = ?", [*args, user_id]
        return [raw["title"] for raw in self.db["prompts"].rows_where(where, args, order_by="title")]

    def search_prompts(
        self,
        guild_id: int,
        *,
        search: str | None = None,
        sort: PromptSort = "new",
        with_age_restricted: bool = False,
        offset: int = 0,
        limit: int = 1,
    ) -> tuple[list[PromptRow], int]:
        """A page of a server's prompt book and the total that match, for /prompt browse: by stars
        (top), newest first (new) or most used (used); entries from age-restricted channels only
        `with_age_restricted`."""
        if sort not in _PROMPT_ORDER:
            raise ValueError(f"sort must be one of {', '.join(_PROMPT_ORDER)}, got {sort!r}")
        where = ["p.guild_id = ?"]
        args: list[Any] = [guild_id]
        if not with_age_restricted:
            where.append(_SHOWN_OUTSIDE_AGE_RESTRICTED.format(rows="p"))
        if search:
            where.append("p.id IN (SELECT rowid FROM prompts_fts WHERE prompts_fts MATCH ?)")
            args.append(fts_query(search))
        condition = " AND ".join(where)
        total = self.db.execute(f"SELECT count(*) FROM prompts p WHERE {condition}", args).fetchone()[0]
        cursor = self.db.execute(
            f"SELECT p.* FROM prompts p WHERE {condition} ORDER BY {_PROMPT_ORDER[sort]}, p.id DESC "
            "LIMIT ? OFFSET ?",
            [*args, limit, offset],
        )
        columns = [c[0] for c in cursor.description]
        return [_row(PromptRow, dict(zip(columns, raw, strict=True))) for raw in cursor.fetchall()], total

    def _her_prompts(self, user_id: int) -> tuple[str, dict[str, Any]]:
        """The entries a member's /forget removes: hers, those saved from a picture of her face, and
        those that name one of her models (a recipe for her face), as a condition on `prompts`."""
        where = [
            "prompts.user_id = :user_id",
            f"prompts.generation_id IN (SELECT id FROM generations WHERE {_HER_GENERATIONS})",
        ]
        args: dict[str, Any] = {"user_id": user_id}
        for number, model in enumerate(self.models_of(user_id)):
            where.append(
                f"(prompts.guild_id = :guild{number} AND prompts.id IN "
                f"(SELECT rowid FROM prompts_fts WHERE prompts_fts MATCH :token{number}))"
            )
            args |= {f"guild{number}": model.guild_id, f"token{number}": fts_query(model.token)}
        return " OR ".join(where), args

    def prompts_to_forget(self, user_id: int) -> list[PromptRow]:
        where, args = self._her_prompts(user_id)
        rows = self.db["prompts"].rows_where(where, args, order_by="id")
        return [_row(PromptRow, raw) for raw in rows]

    # -- settings (admin-set limits per server) ---------------------------------------------

    def setting(self, guild_id: int, key: str, default: int) -> int:
        rows = list(self.db["settings"].rows_where("guild_id = ? AND key = ?", [guild_id, key]))
        return int(rows[0]["value"]) if rows else default

    def set_setting(self, guild_id: int, key: str, value: int) -> None:
        self.db["settings"].upsert(
            {"guild_id": guild_id, "key": key, "value": str(value)}, pk=("guild_id", "key")
        )

    # -- a member's own settings -------------------------------------------------------------

    def member_settings(self, user_id: int) -> MemberSettings:
        rows = list(self.db["member_settings"].rows_where("user_id = ?", [user_id]))
        return _row(MemberSettings, rows[0]) if rows else MemberSettings()

    def set_member_settings(self, user_id: int, settings: MemberSettings) -> None:
        """Store them (the member's users row must exist: ensure_user)."""
        values = {name: getattr(settings, name) for name in MEMBER_SETTINGS}
        self.db["member_settings"].upsert({"user_id": user_id, **values}, pk="user_id")

    def default_model(self, user_id: int, guild_id: int) -> ModelRow | None:
        """The model she chose as her default in this server, if she chose one and it still exists."""
        rows = list(self.db["default_models"].rows_where("user_id = ? AND guild_id = ?", [user_id, guild_id]))
        return self.find_model(rows[0]["model_id"]) if rows else None

    def set_default_model(self, user_id: int, guild_id: int, model_id: int | None) -> None:
        """Choose her default model in this server; None: back to her newest ready one."""
        self.db.execute("DELETE FROM default_models WHERE user_id = ? AND guild_id = ?", [user_id, guild_id])
        if model_id is not None:
            self.db["default_models"].insert({"user_id": user_id, "guild_id": guild_id, "model_id": model_id})

    # -- forgetting a member ----------------------------------------------------------------

    def generations_to_forget(self, user_id: int) -> list[GenerationRow]:
        """A member's pictures, and every picture anyone made with one of her models."""
        rows = self.db["generations"].rows_where(_HER_GENERATIONS, {"user_id": user_id}, order_by="id")
        return [_row(GenerationRow, raw) for raw in rows]

    def jobs_to_forget(self, user_id: int) -> list[JobRow]:
        """A member's jobs, and every job anyone asked for with one of her models, oldest first."""
        rows = self.db["jobs"].rows_where(_HER_JOBS, {"user_id": user_id}, order_by="created_at, rowid")
        return [_row(JobRow, raw) for raw in rows]

    def forget_user(self, user_id: int) -> list[str]:
        """Delete every row of a member (and the pictures made with her models); return the files those
        rows pointed to. Then scrub(), which leaves no trace of the rows in the file or its WAL."""
        files: list[str] = []
        for model in self.models_of(user_id):
            files.extend(model.samples)
            if model.adapter_path:
                files.append(model.adapter_path)
        for generation in self.generations_to_forget(user_id):
            files.extend(generation.files)
        who = {"user_id": user_id}
        prompts, prompt_args = self._her_prompts(user_id)
        with self.db.conn:
            # Before the generations and models: which entries show her face is read from them.
            self.db.execute(f"DELETE FROM prompts WHERE {prompts}", prompt_args)
            # Before the models: which pictures used her models is read from them.
            self.db.execute(f"DELETE FROM generations WHERE {_HER_GENERATIONS}", who)
            self.db.execute(f"DELETE FROM posts WHERE {_HER_POSTS}", who)
            self.db.execute(f"DELETE FROM jobs WHERE {_HER_JOBS}", who)
            self.db.execute("DELETE FROM default_models WHERE user_id = :user_id", who)
            self.db.execute("DELETE FROM member_settings WHERE user_id = :user_id", who)
            self.db.execute("DELETE FROM models WHERE owner_id = :user_id", who)
            self.db.execute("DELETE FROM users WHERE id = :user_id", who)
        return files

    def scrub(self) -> None:
        """Leave no byte of deleted rows in the file: secure_delete zeroes their cells, but the FTS index
        keeps a deleted prompt's terms until its segments are merged, a table's inner pages keep deleted
        rowids as dividers until VACUUM rebuilds them, and the WAL keeps old copies of every page until
        a checkpoint empties it.

        On a connection of its own, so that a thread can run it (its time grows with the database)
        while this one keeps serving the bot: WAL readers are not blocked, writers wait for it."""
        connection = sqlite3.connect(self.path, isolation_level=None)
        try:
            connection.execute("PRAGMA busy_timeout = 10000")
            connection.execute("INSERT INTO generations_fts (generations_fts) VALUES ('optimize')")
            connection.execute("INSERT INTO prompts_fts (prompts_fts) VALUES ('optimize')")
            connection.execute("VACUUM")
            busy, _, _ = connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            connection.close()
        if busy:
            # Another process (the CLI) is reading: its snapshot needs the WAL's frames.
            log.warning(
                "could not empty the WAL of %s: another process is reading it, so deleted rows may stay "
                "in the WAL until the next checkpoint overwrites them",
                self.path,
            )


def new_job_id() -> str:
    return secrets.token_hex(6)


def fts_query(search: str) -> str:
    """Quote each word so that user text is never read as FTS5 syntax; all words must match."""
    words = [word.replace('"', '""') for word in search.split()]
    return " ".join(f'"{word}"' for word in words) or '""'


def _encode(values: dict[str, Any]) -> dict[str, Any]:
    return {k: json.dumps(v) if k in _JSON_FIELDS else v for k, v in values.items()}

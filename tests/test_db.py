from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from bot.db import MIGRATIONS, Database, JobRow, MemberSettings, PromptRow, fts_query, new_job_id
from engine.contract.protocol import AdapterRef, GenerateJob, TrainingDone, TrainJob, encode


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database.in_data_dir(tmp_path)
    database.ensure_user(1, "alice")
    database.ensure_user(2, "bob")
    return database


def _generation(db: Database, user_id: int, prompt: str, tokens: list[str], **extra: object) -> int:
    return db.add_generation(
        job_id="j",
        guild_id=10,
        user_id=user_id,
        channel_id=5,
        prompt=prompt,
        seed=1,
        steps=2,
        guidance=7.5,
        width=64,
        height=64,
        tokens=tokens,
        files=[f"/data/generations/{prompt}.png"],
        kind="txt2img",
        **{"age_restricted": False, **extra},
    ).id


def test_migrations_run_once_and_wal_is_on(tmp_path: Path) -> None:
    first = Database.in_data_dir(tmp_path)
    assert first.schema_version == len(MIGRATIONS)
    first.ensure_user(1, "alice")
    first.add_model(guild_id=1, owner_id=1, token="abraza", class_word="person")
    first.close()
    again = Database.in_data_dir(tmp_path)
    assert again.schema_version == len(MIGRATIONS)
    assert again.model_by_token(1, "abraza") is not None
    assert again.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_database_of_the_first_schema_gains_the_posts_table(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(f"{MIGRATIONS[0]}; PRAGMA user_version = 1;")
    old.execute("INSERT INTO users (id, name, created_at) VALUES (1, 'alice', 0)")
    old.commit()
    old.close()
    db = Database(path)
    assert db.schema_version == len(MIGRATIONS)
    db.add_post(message_id=100, channel_id=5, guild_id=10, user_id=1)
    assert [post.message_id for post in db.posts_to_forget(1)] == [100]


def test_a_database_of_the_second_schema_gains_templates_and_member_settings(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(f"{MIGRATIONS[0]}; {MIGRATIONS[1]}; PRAGMA user_version = 2;")
    old.execute("INSERT INTO users (id, name, created_at) VALUES (1, 'alice', 0)")
    old.execute(
        "INSERT INTO generations (job_id, guild_id, user_id, channel_id, prompt, seed, steps, guidance, width, "
        "height, kind, created_at) VALUES ('j', 10, 1, 5, 'abraza as thor', 1, 2, 7.5, 64, 64, 'txt2img', 0)"
    )
    old.commit()
    old.close()
    db = Database(path)
    assert db.schema_version == len(MIGRATIONS)
    assert db.generation(1).template is None and db.member_settings(1) == MemberSettings()
    db.set_member_settings(1, MemberSettings(steps=30, gallery=False))
    assert db.member_settings(1) == MemberSettings(steps=30, gallery=False)


def test_a_database_of_the_fourth_schema_counts_its_pictures_age_restricted_until_recorded(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(f"{'; '.join(MIGRATIONS[:4])}; PRAGMA user_version = 4;")
    old.execute("INSERT INTO users (id, name, created_at) VALUES (1, 'alice', 0)")
    for channel_id, prompt in [(5, "a castle"), (6, "a nude statue"), (6, "a nude dancer")]:
        old.execute(
            "INSERT INTO generations (job_id, guild_id, user_id, channel_id, prompt, seed, steps, guidance, "
            "width, height, kind, created_at) VALUES ('j', 10, 1, ?, ?, 1, 2, 7.5, 64, 64, 'txt2img', 0)",
            [channel_id, prompt],
        )
    for title, generation_id in [("Dragon", None), ("Castle", 1), ("Statue", 2)]:
        old.execute(
            "INSERT INTO prompts (guild_id, user_id, title, prompt, generation_id, created_at) "
            "VALUES (10, 1, ?, 'a prompt', ?, 0)",
            [title, generation_id],
        )
    old.commit()
    old.close()
    db = Database(path)
    assert db.schema_version == len(MIGRATIONS)

    def shown(*, anywhere: bool) -> tuple[list[str], list[str], list[str]]:
        """The pictures, entries and titles shown in an age-restricted channel (`anywhere`), or not."""
        pictures = [row.prompt for row in db.search_generations(10, with_age_restricted=anywhere, limit=9)[0]]
        entries = [row.title for row in db.search_prompts(10, with_age_restricted=anywhere, limit=9)[0]]
        return pictures, entries, db.prompt_titles(10, with_age_restricted=anywhere)

    # Where its pictures were made is not known yet: they count as age-restricted, and the entries
    # saved from them too; a typed entry is an ordinary one.
    assert [db.generation(i).age_restricted for i in (1, 2, 3)] == [True, True, True]
    assert shown(anywhere=False) == ([], ["Dragon"], ["Dragon"])
    assert shown(anywhere=True) == (
        ["a nude dancer", "a nude statue", "a castle"],
        ["Statue", "Castle", "Dragon"],
        ["Castle", "Dragon", "Statue"],
    )
    assert db.channels_without_age_restriction() == [(10, 5), (10, 6)]

    db.record_age_restriction(5, False)
    db.record_age_restriction(6, True)
    assert db.channels_without_age_restriction() == []
    assert [db.generation(i).age_restricted for i in (1, 2, 3)] == [False, True, True]
    assert shown(anywhere=False) == (["a castle"], ["Castle", "Dragon"], ["Castle", "Dragon"])
    # New rows say it from the start.
    _generation(db, 1, "a marble statue", [], age_restricted=False)
    assert shown(anywhere=False)[0] == ["a marble statue", "a castle"]
    assert db.channels_without_age_restriction() == []


def test_tokens_are_unique_per_server(db: Database) -> None:
    db.add_model(guild_id=10, owner_id=1, token="abraza", class_word="person")
    db.add_model(guild_id=11, owner_id=2, token="abraza", class_word="dog")
    with pytest.raises(sqlite3.IntegrityError):
        db.add_model(guild_id=10, owner_id=2, token="abraza", class_word="person")


def test_jobs_keep_their_state_and_order(db: Database) -> None:
    first = db.add_job(kind="train", user_id=1, guild_id=10, channel_id=5, payload="{}", context={"a": 1})
    second = db.add_job(kind="generate", user_id=2, guild_id=10, channel_id=5, payload="{}")
    assert [job.id for job in db.active_jobs()] == [first.id, second.id]
    db.update_job(first.id, state="done", result={"files": ["x.png"]})
    assert db.job(first.id).result == {"files": ["x.png"]}
    assert db.job(first.id).context == {"a": 1}
    assert [job.id for job in db.active_jobs()] == [second.id]
    assert db.count_active_jobs(2) == 1 and db.count_active_jobs(1) == 0
    # The cap is per member across servers: a job in server 11 counts too.
    db.add_job(kind="generate", user_id=2, guild_id=11, channel_id=6, payload="{}")
    assert db.count_active_jobs(2) == 2
    assert [job.id for job in db.jobs_of(1)] == [first.id]
    assert db.find_job("nope") is None


def test_gallery_search_filters_and_sorts(db: Database) -> None:
    thor = _generation(db, 1, "abraza as thor, epic", ["abraza"])
    viking = _generation(db, 2, "sabafry as a viking", ["sabafry"])
    both = _generation(db, 1, "abraza and sabafry as superheroes", ["abraza", "sabafry"])
    db.update_generation(viking, stars=5)

    rows, total = db.search_generations(10, limit=10)
    assert total == 3 and [r.id for r in rows] == [both, viking, thor]
    assert [r.id for r in db.search_generations(10, user_id=1, limit=10)[0]] == [both, thor]
    assert [r.id for r in db.search_generations(10, token="sabafry", limit=10)[0]] == [both, viking]
    assert [r.id for r in db.search_generations(10, search="thor", limit=10)[0]] == [thor]
    assert db.search_generations(10, sort="top", limit=1)[0][0].id == viking
    page, total = db.search_generations(10, offset=1, limit=1)
    assert total == 3 and [r.id for r in page] == [viking]
    # Member text is never FTS5 syntax.
    assert db.search_generations(10, search='thor" OR "viking', limit=10)[1] == 0
    assert db.search_generations(11, limit=10)[1] == 0


def test_fts_query_quotes_every_word() -> None:
    assert fts_query('thor "NEAR" -x') == '"thor" """NEAR""" "-x"'


def test_deleted_generations_leave_the_search_index(db: Database) -> None:
    thor = _generation(db, 1, "abraza as thor", ["abraza"])
    db.delete_generation(thor)
    assert db.search_generations(10, search="thor")[1] == 0


def test_forget_user_removes_every_row_and_returns_files(db: Database) -> None:
    model = db.add_model(guild_id=10, owner_id=1, token="abraza", class_word="person")
    db.update_model(
        model.id, adapter_path="/data/adapters/10/abraza/adapter.safetensors", samples=["/s/0.png"]
    )
    train = db.add_job(kind="train", user_id=1, guild_id=10, channel_id=5, payload="{}", model_id=model.id)
    db.add_post(message_id=100, channel_id=5, guild_id=10, user_id=1, model_id=model.id, job_id=train.id)
    _generation(db, 1, "abraza as thor", ["abraza"])
    bobs = _generation(db, 2, "a cat", [])
    # Bob's picture with her model shows her face; another server's abraza is someone else.
    with_her_face = _generation(db, 2, "abraza and a dog", ["abraza"])
    bobs_job = _job_using(db, 2, "abraza")
    db.add_post(message_id=101, channel_id=5, guild_id=10, user_id=2, job_id=bobs_job.id)
    elsewhere = db.add_generation(
        job_id="k", guild_id=11, user_id=2, channel_id=6, prompt="abraza at sea", seed=1, steps=2,
        guidance=7.5, width=64, height=64, tokens=["abraza"], files=[], kind="txt2img",
    ).id  # fmt: skip

    files = db.forget_user(1)
    db.scrub()

    assert sorted(files) == sorted(
        [
            "/data/adapters/10/abraza/adapter.safetensors",
            "/s/0.png",
            "/data/generations/abraza as thor.png",
            "/data/generations/abraza and a dog.png",
        ]
    )
    for table, column in [
        ("models", "owner_id"),
        ("jobs", "user_id"),
        ("generations", "user_id"),
        ("posts", "user_id"),
        ("users", "id"),
    ]:
        assert db.db[table].count_where(f"{column} = ?", [1]) == 0
    assert db.search_generations(10, search="thor")[1] == 0
    assert db.find_generation(bobs) is not None and db.find_generation(elsewhere) is not None
    assert db.find_generation(with_her_face) is None and db.find_job(bobs_job.id) is None
    assert db.db["posts"].count == 0
    assert [g.id for g in db.generations_of(2)] == [bobs, elsewhere]
    assert db.find_model(model.id) is None


def test_posts_are_found_by_member_and_by_model(db: Database) -> None:
    model = db.add_model(guild_id=10, owner_id=1, token="abraza", class_word="person")
    train = db.add_job(kind="train", user_id=1, guild_id=10, channel_id=5, payload="{}", model_id=model.id)
    with_her_model = _job_using(db, 2, "abraza")
    bobs = db.add_job(kind="generate", user_id=2, guild_id=10, channel_id=5, payload="{}")
    db.add_post(message_id=100, channel_id=5, guild_id=10, user_id=1, model_id=model.id, job_id=train.id)
    db.add_post(message_id=101, channel_id=77, guild_id=None, user_id=1, model_id=model.id, job_id=train.id)
    db.add_post(message_id=102, channel_id=5, guild_id=10, user_id=2, job_id=with_her_model.id)
    db.add_post(message_id=103, channel_id=5, guild_id=10, user_id=2, job_id=bobs.id)

    assert [post.message_id for post in db.posts_of_model(model.id)] == [100, 101]
    assert [post.message_id for post in db.posts_to_forget(1)] == [100, 101, 102]
    assert db.posts_to_forget(1)[1].guild_id is None  # a DM
    db.delete_posts([100])
    # A deleted model's posts stay the member's, for /forget.
    db.delete_model(model.id)
    assert db.posts_of_model(model.id) == []
    assert [(post.message_id, post.model_id) for post in db.posts_to_forget(1)] == [(101, None)]
    assert [post.message_id for post in db.posts_to_forget(2)] == [102, 103]


def test_settings_default_and_override(db: Database) -> None:
    assert db.setting(10, "max_models_per_user", 3) == 3
    db.set_setting(10, "max_models_per_user", 5)
    db.set_setting(10, "max_models_per_user", 6)
    assert db.setting(10, "max_models_per_user", 3) == 6
    assert db.setting(11, "max_models_per_user", 3) == 3


def test_only_a_model_with_an_adapter_gives_the_engine_a_reference(db: Database) -> None:
    model = db.add_model(guild_id=10, owner_id=1, token="abraza", class_word="person")
    with pytest.raises(ValueError, match="'abraza' is queued: it has no adapter yet"):
        model.adapter_ref()
    ready = db.update_model(
        model.id, state="ready", adapter_path="/data/adapters/10/abraza/adapter.safetensors"
    )
    reference = ready.adapter_ref()
    assert (reference.token, reference.class_word) == ("abraza", "person")
    assert reference.path == "/data/adapters/10/abraza/adapter.safetensors"


def _job_using(db: Database, user_id: int, token: str) -> JobRow:
    """A generation job of `user_id` in server 10 whose request uses the model `token`."""
    job_id = new_job_id()
    request = GenerateJob(
        job_id=job_id,
        prompt=f"{token} at sea",
        output_dir=f"/data/generations/{job_id}",
        adapters=[AdapterRef(token, "person", f"/data/adapters/10/{token}/adapter.safetensors")],
    )
    return db.add_job(
        kind="generate", user_id=user_id, guild_id=10, channel_id=5, payload=encode(request), job_id=job_id
    )


def test_a_job_row_of_the_previous_version_reads_as_the_typed_contract(db: Database) -> None:
    """Rows written before the typed results (payload, context and result as the bot stored them
    then) load as the same TrainJob and TrainingDone a new row holds."""
    train = TrainJob(job_id="old", token="abraza", class_word="person", photos=["/p/0.png"], output_dir="/a")
    db.add_job(
        kind="train",
        user_id=1,
        guild_id=10,
        channel_id=5,
        payload=encode(train),
        job_id="old",
        # What the training cog kept beside the payload, and the queue's {"files": ..., **data}.
        context={"token": "abraza", "class_word": "person", "photos": 1, "photos_dir": "/data/photos/old"},
    )
    old_result = {
        "files": ["/a/samples/0.png"],
        "adapter_path": "/a/adapter.safetensors",
        "metadata_path": "/a/training.json",
        "metadata": {"steps": 4},
        "steps": 4,
        "seconds": 1.5,
    }
    row = db.update_job("old", state="done", result=old_result)
    assert row.request == train
    assert row.outcome == TrainingDone(job_id="old", **old_result)
    assert db.update_job("old", state="failed").outcome is None


# -- the prompt book ---------------------------------------------------------------------------


def _saved(db: Database, user_id: int, title: str, prompt: str, **extra: Any) -> PromptRow:
    return db.add_prompt(
        guild_id=10, user_id=user_id, title=title, prompt=prompt, **{"age_restricted": False, **extra}
    )


def test_saved_prompts_have_unique_titles_per_server_in_any_case(db: Database) -> None:
    knight = _saved(db, 1, "Knight", "[SUBJECT] as a knight", note="steps 30 work best")
    assert db.prompt_by_title(10, " knight ") == knight and knight.note == "steps 30 work best"
    with pytest.raises(sqlite3.IntegrityError):
        _saved(db, 2, "KNIGHT", "a knight")
    # Another server's book is its own.
    elsewhere = db.add_prompt(guild_id=11, user_id=2, title="knight", prompt="a knight", age_restricted=False)
    assert elsewhere.guild_id == 11
    assert db.prompt_by_title(10, "dragon") is None


def test_prompt_book_search_and_sorts(db: Database) -> None:
    knight = _saved(db, 1, "Knight", "[SUBJECT] as a knight in armour")
    dragon = _saved(db, 2, "Dragon rider", "riding a red dragon", note="add (wings:1.2)")
    castle = _saved(db, 1, "Castle", "a castle at dusk")
    db.update_prompt(dragon.id, stars=3)
    db.update_prompt(knight.id, stars=1)
    for _ in range(2):
        db.count_prompt_use(castle.id)
    db.count_prompt_use(knight.id)

    def ids(**options: Any) -> list[int]:
        return [row.id for row in db.search_prompts(10, limit=10, **options)[0]]

    assert ids() == [castle.id, dragon.id, knight.id]
    assert ids(sort="top") == [dragon.id, knight.id, castle.id]
    assert ids(sort="used") == [castle.id, knight.id, dragon.id]
    # Title, prompt and note are searched; every word must match; member text is never FTS5 syntax.
    assert ids(search="rider") == ids(search="wings") == ids(search="RED dragon") == [dragon.id]
    assert ids(search="armour knight") == [knight.id]
    assert ids(search='knight" OR "castle') == []
    page, total = db.search_prompts(10, sort="top", offset=1, limit=1)
    assert total == 3 and [row.id for row in page] == [knight.id]
    with pytest.raises(ValueError, match="got 'stars'"):
        db.search_prompts(10, sort="stars")  # type: ignore[arg-type]
    # An edited or deleted entry leaves the index.
    db.update_prompt(castle.id, prompt="a lighthouse")
    assert ids(search="castle") == [castle.id] and ids(search="dusk") == []
    db.delete_prompt(castle.id)
    assert ids(search="lighthouse") == []


def test_forget_removes_her_entries_and_those_showing_or_naming_her_model(db: Database) -> None:
    db.add_model(guild_id=10, owner_id=1, token="abraza", class_word="person")
    hers = _saved(db, 1, "Knight", "[SUBJECT] as a knight")
    her_face = _generation(db, 2, "abraza on a beach", ["abraza"])
    from_her_face = _saved(db, 2, "Beach", "abraza on a beach", generation_id=her_face)
    naming_her = _saved(db, 2, "Duel", "<lora:abraza:0.6> fights a dragon")
    bobs = _saved(db, 2, "Dragon", "a red dragon", generation_id=_generation(db, 2, "a red dragon", []))
    # The same word in another server names someone else's model.
    elsewhere = db.add_prompt(
        guild_id=11, user_id=2, title="Duel", prompt="abraza fights", age_restricted=False
    )
    db.update_prompt(hers.id, card_channel_id=5, card_message_id=900)

    forgotten = db.prompts_to_forget(1)
    assert [row.id for row in forgotten] == [hers.id, from_her_face.id, naming_her.id]
    assert forgotten[0].card_message_id == 900
    db.forget_user(1)
    db.scrub()
    assert db.find_prompt(bobs.id) == bobs and db.find_prompt(elsewhere.id) == elsewhere
    assert [row.id for row in db.search_prompts(10, limit=10)[0]] == [bobs.id]
    assert db.search_prompts(10, search="knight")[1] == 0

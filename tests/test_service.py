"""bot/service.py on its own: the rules a request meets, whichever front end (a cog, the CLI) sends it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.config import BotConfig
from bot.db import Database, JobRow, MemberSettings, new_job_id
from bot.service import (
    MAX_QUEUED_KEY,
    ImageRequest,
    UserFacingError,
    awaits_retry,
    check_queue_cap,
    delete_model,
    end_training,
    image_request,
    queue_training,
    retry_training,
)
from bot.storage import photos_dir
from engine.contract.config import config_from_dict
from engine.contract.disk import DISK_FULL_MESSAGE
from engine.contract.protocol import Error, ErrorCode


def test_the_job_cap_counts_a_members_jobs_in_every_server(tmp_path: Path) -> None:
    config = config_from_dict({"storage": {"data_dir": str(tmp_path)}}, kind=BotConfig)
    db = Database(tmp_path / "db.sqlite3")
    db.ensure_user(1, "alice")
    db.set_setting(10, MAX_QUEUED_KEY, 2)
    db.add_job(kind="generate", user_id=1, guild_id=10, channel_id=5, payload="{}")
    check_queue_cap(db, config, 10, 1)  # one of two
    # Another server's job takes the second place: one GPU queue serves every server.
    db.add_job(kind="generate", user_id=1, guild_id=11, channel_id=6, payload="{}")
    with pytest.raises(UserFacingError, match="You already have 2 jobs waiting or running, the limit is 2"):
        check_queue_cap(db, config, 10, 1)
    # Server 11 keeps the configured default of 3.
    check_queue_cap(db, config, 11, 1)


def failed_training(db: Database, config: BotConfig, token: str, code: ErrorCode) -> JobRow:
    """A training of `token` by member 1 that the engine failed with `code`, as the bot ends it."""
    job_id = new_job_id()
    folder = photos_dir(config, job_id)
    folder.mkdir(parents=True)
    photos = [folder / f"{index:02d}.png" for index in range(3)]
    for photo in photos:
        photo.write_bytes(b"png")
    row = queue_training(
        db, config, guild_id=10, user_id=1, user_name="alice", channel_id=5,
        token=token, class_word="person", job_id=job_id, photos=photos,
    )  # fmt: skip
    error = Error(row.id, DISK_FULL_MESSAGE if code == "disk_full" else "why", code)
    row = db.update_job(row.id, state="failed", error=error.message)  # as JobQueue writes it
    end_training(db, config, row, error)
    return db.job(row.id)


def test_a_training_stopped_by_a_full_disk_keeps_its_photos_until_its_model_goes(tmp_path: Path) -> None:
    config = config_from_dict({"storage": {"data_dir": str(tmp_path)}}, kind=BotConfig)
    db = Database(tmp_path / "db.sqlite3")
    other = failed_training(db, config, "zorvik", "internal")
    assert not photos_dir(config, other.id).exists() and not awaits_retry(db, other)

    stopped = failed_training(db, config, "abraza", "disk_full")
    assert awaits_retry(db, stopped)
    model = db.find_model(stopped.model_id)
    assert model is not None and model.state == "failed" and model.error == DISK_FULL_MESSAGE
    # Tried again: the same job, queued afresh.
    again = retry_training(db, config, stopped)
    assert (again.id, again.state, again.attempts, again.error) == (stopped.id, "queued", 0, None)
    assert db.model(model.id).state == "queued"
    with pytest.raises(UserFacingError, match=r"\*\*abraza\*\* is already back in the queue"):
        retry_training(db, config, again)

    # Stopped again, then the model deleted: the photos go with it.
    db.update_job(again.id, state="failed", error=DISK_FULL_MESSAGE)
    end_training(db, config, db.job(again.id), Error(again.id, DISK_FULL_MESSAGE, "disk_full"))
    assert len(list(photos_dir(config, again.id).iterdir())) == 3
    delete_model(db, config, db.model(model.id))
    assert not photos_dir(config, again.id).exists()
    with pytest.raises(UserFacingError, match="its photos or its model are gone"):
        retry_training(db, config, db.job(again.id))

    # A new training of the name takes the place of a stopped one, photos and all.
    stopped = failed_training(db, config, "qwyxel", "disk_full")
    failed_training(db, config, "qwyxel", "internal")
    assert not photos_dir(config, stopped.id).exists()


def test_a_pictures_settings_come_from_the_member_then_her_settings_then_the_config(tmp_path: Path) -> None:
    config = config_from_dict(
        {"training": {"resolution": 512}, "generation": {"steps": 25, "guidance": 7.5},
         "safety": {"default_negative_prompt": "lowres"}},
        kind=BotConfig,
    )  # fmt: skip
    assert image_request(config, "a castle") == ImageRequest(
        prompt="a castle", negative_prompt="lowres", seed=None, count=1, width=512, height=512, steps=25,
        guidance=7.5,
    )  # fmt: skip
    mine = MemberSettings(aspect="portrait", steps=30, guidance=5.0, negative_prompt="blurry", count=2)
    hers = image_request(config, "a castle", settings=mine)
    assert (hers.count, hers.steps, hers.guidance, hers.negative_prompt) == (2, 30, 5.0, "lowres, blurry")
    assert hers.height > hers.width
    # What she gives wins, a guidance of 0 too; the server's negative prompt always leads.
    given = image_request(config, "a castle", settings=mine, negative="text", aspect="landscape", seed=7,
                          count=4, steps=12, guidance=0.0)  # fmt: skip
    assert (given.count, given.steps, given.guidance, given.seed) == (4, 12, 0.0, 7)
    assert given.negative_prompt == "lowres, text" and given.width > given.height

"""bot/service.py on its own: the rules a request meets, whichever front end (a cog, the CLI) sends it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.db import Database
from bot.service import MAX_QUEUED_KEY, UserFacingError, check_queue_cap
from engine.config import config_from_dict


def test_the_job_cap_counts_a_members_jobs_in_every_server(tmp_path: Path) -> None:
    config = config_from_dict({"storage": {"data_dir": str(tmp_path)}})
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

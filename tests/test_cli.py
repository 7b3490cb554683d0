"""The `dreambot` command end to end: check, train, imagine and models on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from botharness import selfie_jpeg
from PIL import Image

from bot.cli import main
from bot.db import LOCAL_GUILD_ID, Database
from engine.generate import read_parameters


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with a config.toml for the tiny model, as the README tells a CPU user to write."""
    (tmp_path / "config.toml").write_text(
        '[model]\nbase = "tiny"\ndevice = "cpu"\n'
        "[training]\nresolution = 64\nmax_steps = 6\nclass_images = 2\nsample_count = 1\n"
        "[generation]\nsteps = 3\n[intake]\nmin_photos = 3\n"
    )
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        (photos / f"selfie{index}.jpg").write_bytes(selfie_jpeg(index))
    (photos / "notes.jpg").write_text("not a photo")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_check_prints_the_report_and_exits_by_verdict(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = sorted(str(p) for p in (workdir / "photos").glob("selfie*.jpg"))
    assert main(["check", "--class", "person", *good]) == 0
    assert "selfie0.jpg" in capsys.readouterr().out

    assert main(["check", "--json", "--class", "person", good[0], "photos/notes.jpg"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert [(p["file"], p["accepted"]) for p in report["photos"]] == [
        ("selfie0.jpg", True),
        ("notes.jpg", False),
    ]
    assert "not an image" in report["photos"][1]["reason"]


def test_train_then_imagine_with_the_token(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = sorted(str(p) for p in (workdir / "photos").glob("selfie*.jpg"))
    assert main(["train", "--name", "abraza", "--class", "person", *photos]) == 0
    out = capsys.readouterr().out
    assert "trained 'abraza'" in out and 'dreambot imagine "abraza as a viking"' in out

    db = Database.in_data_dir(workdir / "data")
    model = db.model_by_token(LOCAL_GUILD_ID, "abraza")
    assert model is not None and model.state == "ready"
    assert Path(model.adapter_path).is_file()
    assert not (workdir / "data" / "photos").exists() or not any((workdir / "data" / "photos").iterdir())

    assert main(["imagine", "abraza as thor", "--seed", "7", "--count", "2", "--out", "out"]) == 0
    written = sorted((workdir / "out").glob("*.png"))
    assert len(written) == 2
    assert Image.open(written[0]).size == (64, 64)
    parameters = read_parameters(written[0])
    assert parameters["prompt"] == "abraza person as thor"
    assert parameters["Seed"] == "7"
    assert "abraza" in parameters["Lora hashes"]
    assert db.search_generations(LOCAL_GUILD_ID, search="thor")[1] == 1

    capsys.readouterr()
    assert main(["models"]) == 0
    assert "abraza" in capsys.readouterr().out


def test_train_refuses_a_bad_photo_set_before_any_engine_starts(workdir: Path) -> None:
    assert main(["train", "--name", "abraza", "photos/notes.jpg", "photos/selfie0.jpg"]) == 1
    db = Database.in_data_dir(workdir / "data")
    assert db.model_by_token(LOCAL_GUILD_ID, "abraza") is None
    assert db.active_jobs() == []


def test_a_bad_config_key_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[training]\nresolution = 'big'\n")
    assert main(["models", "--config", str(config)]) == 2
    assert (
        capsys.readouterr().err.strip() == "dreambot: [training] resolution: expected an integer, got 'big'"
    )


def test_run_without_a_token_says_where_it_comes_from(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    assert main(["run"]) == 2
    assert "DISCORD_TOKEN" in capsys.readouterr().err

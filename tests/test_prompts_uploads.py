from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from bot.db import Database, ModelRow
from bot.prompts import models_in_prompt, size_for_aspect
from bot.service import UserFacingError, usable_models
from bot.uploads import MAX_FILES_PER_MESSAGE, image_file, image_files
from engine.contract.prompt_syntax import parse_prompt


def _model(token: str) -> ModelRow:
    return ModelRow(
        id=1, guild_id=1, owner_id=1, token=token, class_word="person", state="ready", shared=False,
        adapter_path="/a", samples=[], metadata={}, error=None, created_at=0.0,
    )  # fmt: skip


def test_models_are_found_as_whole_words() -> None:
    models = [_model("abraza"), _model("sabafry"), _model("bra")]
    found = models_in_prompt(parse_prompt("Abraza and sabafry, as superheroes"), models)
    assert [m.token for m in found] == ["abraza", "sabafry"]


def test_a_lora_tag_names_its_model() -> None:
    models = [_model("abraza"), _model("sabafry"), _model("lora")]
    found = models_in_prompt(parse_prompt("a portrait <lora:sabafry:0.5>, (oil:1.2)"), models)
    assert [m.token for m in found] == ["sabafry"]


def test_usable_models_are_at_their_tags_weight_and_an_unknown_tag_is_refused(tmp_path: Path) -> None:
    db = Database.in_data_dir(tmp_path)
    for user_id, token, shared in ((1, "abraza", False), (2, "zorblat", True), (2, "sabafry", False)):
        db.ensure_user(user_id, f"user{user_id}")
        model = db.add_model(guild_id=10, owner_id=user_id, token=token, class_word="person")
        db.update_model(model.id, state="ready", shared=int(shared), adapter_path=f"/a/{token}")
    adapters = usable_models(db, 10, 1, "abraza and zorblat <lora:zorblat:0.3>")
    # A bare token is weight 1; a model shared with the member may be used at any weight.
    assert [(a.token, a.weight) for a in adapters] == [("abraza", 1.0), ("zorblat", 0.3)]
    with pytest.raises(UserFacingError, match=r"`<lora:nobody>` names no trained model in this server"):
        usable_models(db, 10, 1, "abraza <lora:nobody:0.5>")
    with pytest.raises(UserFacingError, match=r"“sabafry” is <@2>'s model and its owner hasn't shared it"):
        usable_models(db, 10, 1, "<lora:sabafry:0.5>")
    with pytest.raises(
        UserFacingError, match=r"I can't read your prompt: the weight 50 in “\(thor:50\)” is outside 0 to 2"
    ):
        usable_models(db, 10, 1, "abraza as (thor:50)")


@pytest.mark.parametrize(
    ("aspect", "side", "size"),
    [
        ("square", 512, (512, 512)),
        ("portrait", 512, (512, 768)),
        ("landscape", 512, (768, 512)),
        ("portrait", 64, (64, 96)),
    ],
)
def test_aspect_sizes_are_multiples_of_8(aspect: str, side: int, size: tuple[int, int]) -> None:
    assert size_for_aspect(aspect, side) == size


def test_unknown_aspect_is_refused() -> None:
    with pytest.raises(ValueError, match="got 'tall'"):
        size_for_aspect("tall", 512)


def _noisy_png(path: Path, side: int) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "abraza as thor\nSteps: 25, Seed: 7")
    Image.fromarray(pixels).save(path, pnginfo=info)
    return path


def test_a_file_that_fits_goes_as_it_is(tmp_path: Path) -> None:
    path = _noisy_png(tmp_path / "0.png", 64)
    upload = image_file(path, "gen-0.png", size_limit=10_000_000)
    assert upload.filename == "gen-0.png"
    assert upload.fp.read() == path.read_bytes()


def test_a_file_over_the_limit_is_reencoded_under_it_keeping_the_parameters(tmp_path: Path) -> None:
    path = _noisy_png(tmp_path / "0.png", 512)
    limit = path.stat().st_size // 8
    upload = image_file(path, "gen-0.png", size_limit=limit)
    data = upload.fp.read()
    assert len(data) <= limit
    assert upload.filename == "gen-0.jpg"
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        assert b"Seed: 7" in image.info["comment"]


def test_uploads_are_grouped_ten_to_a_message(tmp_path: Path) -> None:
    paths = [_noisy_png(tmp_path / f"{i}.png", 16) for i in range(12)]
    messages = image_files(paths, "samples")
    assert [len(files) for files in messages] == [MAX_FILES_PER_MESSAGE, 2]
    assert messages[1][1].filename == "samples-11.png"

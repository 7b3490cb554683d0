"""Publishing to the Hugging Face Hub (bot.publish) against the fake Hub: what the repo ends up holding,
the refusals, and that the member's token is kept nowhere."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import numpy as np
import pytest
from fakehub import FakeHub, assert_token_kept_nowhere
from huggingface_hub import ModelCard
from PIL import Image
from safetensors import safe_open

from bot.config import BotConfig
from bot.db import Database, ModelRow
from bot.publish import publish_model
from bot.service import UserFacingError
from engine.contract.config import StorageSection
from engine.contract.kohya import (
    DIFFUSERS_ADAPTER_FILE,
    diffusers_adapter_bytes,
    kohya_metadata,
    write_kohya_adapter,
)

TOKEN = "hf_aliceWriteToken0123456789"
TRAINING = {
    "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "pipeline": "StableDiffusionPipeline",
    "token": "abraza",
    "class_word": "person",
    "instance_prompt": "photo of abraza person",
    "sample_prompt": "portrait photo of abraza person, detailed, soft light",
    "steps": 40,
    "rank": 4,
    "alpha": 8,
    "learning_rate": 1e-4,
    "photo_count": 3,
    "resolution": 64,
    "prior_preservation": True,
    "class_images": 2,
    "seed": 0,
}


def kohya_model(data_dir: Path) -> tuple[BotConfig, Database, ModelRow]:
    """A ready model with a small kohya adapter, its training.json and two samples, as a training leaves them."""
    config = BotConfig(storage=StorageSection(data_dir=str(data_dir)))
    folder = data_dir / "adapters" / "5" / "abraza"
    (folder / "samples").mkdir(parents=True)
    rng = np.random.default_rng(0)
    layers = {
        "unet": {
            f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.{target}": (
                rng.standard_normal((4, 32), dtype=np.float32),
                rng.standard_normal((32, 4), dtype=np.float32),
            )
            for target in ("to_q", "to_k", "to_v", "to_out.0")
        }
    }
    adapter = write_kohya_adapter(
        folder / "adapter.safetensors",
        layers,
        {"unet": 8.0},
        sdxl=False,
        metadata=kohya_metadata(TRAINING, sdxl=False),
    )
    (folder / "training.json").write_text(json.dumps(TRAINING), encoding="utf-8")
    samples = []
    for index in range(2):
        samples.append(folder / "samples" / f"{index}.png")
        Image.new("RGB", (64, 64), (index * 100, 50, 50)).save(samples[-1])
    db = Database.in_data_dir(config.data_dir)
    db.ensure_user(1, "alice")
    model = db.add_model(guild_id=5, owner_id=1, token="abraza", class_word="person")
    model = db.update_model(
        model.id,
        state="ready",
        adapter_path=str(adapter),
        samples=[str(sample) for sample in samples],
        metadata={**TRAINING, "photos": 3},
    )
    return config, db, model


def safetensors_content(data: bytes, folder: Path) -> tuple[dict[str, list[float]], dict[str, str]]:
    """A safetensors file's tensors and metadata (its header's key order varies from one write to the next)."""
    path = folder / "content.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="numpy") as file:
        return {key: file.get_tensor(key).tolist() for key in file.keys()}, file.metadata()  # noqa: SIM118


def test_publish_makes_one_private_repo_with_the_model_the_card_and_the_samples(
    fake_hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake_hub.tokens[TOKEN] = "alice"
    config, _db, model = kohya_model(tmp_path / "data")

    published = publish_model(config, model, "alice/abraza-lora", TOKEN)

    assert published.repo_id == "alice/abraza-lora" and published.private
    assert published.url == f"{fake_hub.url}/alice/abraza-lora"
    repo = fake_hub.repos["alice/abraza-lora"]
    assert repo.private and len(repo.commits) == 1  # one commit, private unless asked
    adapter = Path(model.adapter_path or "")
    assert sorted(repo.files) == sorted(
        ["README.md", "abraza.safetensors", DIFFUSERS_ADAPTER_FILE, "samples/0.png", "samples/1.png"]
    )
    assert repo.files["abraza.safetensors"] == adapter.read_bytes()
    assert safetensors_content(repo.files[DIFFUSERS_ADAPTER_FILE], tmp_path) == safetensors_content(
        diffusers_adapter_bytes(adapter), tmp_path
    )
    assert repo.files["samples/1.png"] == Path(model.samples[1]).read_bytes()

    card = ModelCard(repo.files["README.md"].decode())
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert card.data.license == "creativeml-openrail-m"
    assert {"lora", "dreambooth", "diffusers", "text-to-image"} <= set(card.data.tags)
    assert card.data.instance_prompt == "photo of abraza person"
    assert card.data.widget == [
        {"text": TRAINING["sample_prompt"], "output": {"url": f"samples/{index}.png"}} for index in range(2)
    ]
    assert "Write `abraza person` in the prompt" in card.text
    assert "<lora:abraza:0.8>" in card.text and "models/loras" in card.text
    assert "- LoRA alpha: 8" in card.text and "- steps: 40" in card.text
    assert fake_hub.validated_cards == [repo.files["README.md"].decode()]
    # The token went to the Hub (every API call carries it) and nowhere else; the storage PUTs go without.
    api_calls = [request for request in fake_hub.requests if request.known and request.method != "PUT"]
    assert {request.token for request in api_calls} == {TOKEN}
    assert {request.token for request in fake_hub.requests if request not in api_calls} == {None}
    assert_token_kept_nowhere(TOKEN, tmp_path / "data", caplog.text, repr(published))


def test_a_repo_named_without_owner_goes_to_the_tokens_account_and_public_when_asked(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    fake_hub.tokens[TOKEN] = "alice"
    config, _db, model = kohya_model(tmp_path / "data")
    published = publish_model(config, model, "abraza", TOKEN, private=False)
    assert published.repo_id == "alice/abraza" and not published.private
    assert not fake_hub.repos["alice/abraza"].private


def test_a_bad_token_is_refused_before_anything_is_created(
    fake_hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    config, _db, model = kohya_model(tmp_path / "data")
    with pytest.raises(UserFacingError) as refused:
        publish_model(config, model, "alice/abraza", "hf_revokedToken0000")
    assert str(refused.value).startswith("Hugging Face refused the token (401): it is wrong or revoked.")
    assert "huggingface.co/settings/tokens" in str(refused.value)
    assert fake_hub.repos == {} and [r.path for r in fake_hub.requests if r.known] == ["/api/whoami-v2"]
    assert_token_kept_nowhere("hf_revokedToken0000", tmp_path / "data", caplog.text, str(refused.value))


def test_a_repo_that_exists_is_refused_and_left_as_it_was(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.tokens |= {TOKEN: "alice", "hf_bob": "bob"}
    config, _db, model = kohya_model(tmp_path / "data")
    publish_model(config, model, "bob/abraza", "hf_bob")  # bob's repo, and one of alice's own
    publish_model(config, model, "alice/abraza", TOKEN)
    before = {repo_id: dict(repo.files) for repo_id, repo in fake_hub.repos.items()}

    with pytest.raises(UserFacingError) as someone_elses:
        publish_model(config, model, "bob/abraza", TOKEN)
    assert str(someone_elses.value).startswith("Hugging Face refused to write to `bob/abraza` (403)")
    with pytest.raises(UserFacingError) as own:
        publish_model(config, model, "alice/abraza", TOKEN)
    assert "`alice/abraza` already exists on Hugging Face" in str(own.value)
    assert "pick another name" in str(own.value)
    assert {repo_id: repo.files for repo_id, repo in fake_hub.repos.items()} == before
    assert fake_hub.deleted == []


def test_a_failed_upload_deletes_the_repo_it_made(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.tokens[TOKEN] = "alice"
    fake_hub.fail_commit = 500
    config, _db, model = kohya_model(tmp_path / "data")
    with pytest.raises(UserFacingError) as failed:
        publish_model(config, model, "alice/abraza", TOKEN)
    assert str(failed.value) == (
        "Hugging Face answered 500 while publishing `alice/abraza`. Try again later. "
        "I deleted the repo again, so nothing half-published is left."
    )
    assert fake_hub.repos == {} and fake_hub.deleted == ["alice/abraza"]


def test_no_network_is_said_so(tmp_path: Path, fake_hub: FakeHub) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    config, _db, model = kohya_model(tmp_path / "data")
    with pytest.raises(UserFacingError) as failed:
        publish_model(config, model, "alice/abraza", TOKEN, endpoint=f"http://127.0.0.1:{port}")
    assert str(failed.value) == (
        "I couldn't reach Hugging Face (the network or the Hub is down). Nothing was published; try again later."
    )
    assert fake_hub.requests == []


@pytest.mark.parametrize("repo", ["a/b/c", "alice/-bad", "", "x" * 97])
def test_a_bad_repo_name_is_refused_with_the_rule(repo: str, tmp_path: Path) -> None:
    config, _db, model = kohya_model(tmp_path / "data")
    with pytest.raises(
        UserFacingError, match="is not a Hugging Face repo name: use `your-username/model-name`"
    ):
        publish_model(config, model, repo, TOKEN)


def test_an_offline_bot_says_publishing_needs_the_network(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake_hub.tokens[TOKEN] = "alice"
    config, _db, model = kohya_model(tmp_path / "data")
    with pytest.raises(
        UserFacingError, match=r"Publishing needs the network, and this bot runs offline \(HF_HUB_OFFLINE"
    ):
        publish_model(config, model, "alice/abraza", TOKEN)
    assert fake_hub.requests == []

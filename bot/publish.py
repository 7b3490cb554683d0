"""Publishing a model to the Hugging Face Hub, for /model publish and `dreambot publish`.

One new repo of the member's, one commit: the kohya file (A1111, Forge, ComfyUI), the same weights in
diffusers' format, the sample pictures and a model card. The token is the member's own; it lives in
the HfApi of one call and is never stored, logged or shown. A repo made by a call whose upload then
fails is deleted again, so a failure leaves nothing half-published. A repo that already exists is
refused: nothing of the member's is overwritten, and a new repo has the visibility they chose.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, HTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id
from safetensors import safe_open

from bot.config import BotConfig
from bot.db import ModelRow
from bot.service import UserFacingError, export_adapter
from engine.contract.kohya import DIFFUSERS_ADAPTER_FILE, diffusers_adapter_bytes

log = logging.getLogger(__name__)

TOKEN_SETTINGS_URL = "https://huggingface.co/settings/tokens"
# The licence a fine-tune of each base family inherits (both require derivatives to keep their terms).
LICENCES = {"sd_v1": "creativeml-openrail-m", "sdxl_base_v1-0": "openrail++"}
TAGS = ["lora", "dreambooth", "diffusers", "text-to-image", "stable-diffusion", "template:sd-lora"]
# The training settings the card lists, in this order, from the model's metadata.
CARD_SETTINGS = {
    "steps": "steps",
    "learning_rate": "learning rate",
    "rank": "LoRA rank",
    "alpha": "LoRA alpha",
    "resolution": "resolution",
    "photo_count": "photos",
    "prior_preservation": "prior preservation",
    "class_images": "class images",
    "train_text_encoder": "text encoder trained",
    "seed": "seed",
}


@dataclass(frozen=True)
class Published:
    repo_id: str
    url: str
    private: bool
    # The repo's files, in commit order.
    files: list[str]
    samples: int


def check_repo_id(repo: str) -> str:
    """`USER/NAME` or `NAME` as the Hub allows repo names; the message says what was wrong."""
    repo = repo.strip()
    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise UserFacingError(
            f"`{repo[:100]}` is not a Hugging Face repo name: use `your-username/model-name` (letters, "
            "digits, `-`, `_` and `.`, at most 96 characters), or just `model-name` for your account."
        ) from None
    return repo


def publish_model(
    config: BotConfig,
    model: ModelRow,
    repo: str,
    token: str,
    *,
    private: bool = True,
    endpoint: str | None = None,
) -> Published:
    """Create `repo` (under the token's account when it names no owner) and upload the model in one
    commit. `endpoint` None: HF_ENDPOINT, else huggingface.co. Blocking: the bot runs it in a thread."""
    repo = check_repo_id(repo)
    export = export_adapter(config, model)
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(repo, created=False):
        account = api.whoami()["name"]
    repo_id = repo if "/" in repo else f"{account}/{repo}"
    operations = _operations(config, model, export.path, export.filename, repo_id)
    with _hub_errors(repo_id, created=False):
        url = api.create_repo(repo_id, private=private)
    try:
        with _hub_errors(repo_id, created=True):
            api.create_commit(
                repo_id,
                operations,
                commit_message=f"{model.token}: a DreamBooth LoRA trained with dreambot",
            )
    except BaseException:
        # Nothing half-published stays behind: the repo is this call's own.
        with contextlib.suppress(HTTPError, OfflineModeIsEnabled):
            api.delete_repo(repo_id)
        raise
    return Published(
        repo_id=repo_id,
        url=str(url),
        private=private,
        files=[op.path_in_repo for op in operations],
        samples=sum(op.path_in_repo.startswith("samples/") for op in operations),
    )


def _operations(
    config: BotConfig, model: ModelRow, adapter: Path, filename: str, repo_id: str
) -> list[CommitOperationAdd]:
    samples = [Path(sample) for sample in model.samples if Path(sample).is_file()]
    sample_names = [f"samples/{index}.png" for index in range(len(samples))]
    card = model_card(config, model, adapter, filename, repo_id, sample_names)
    return [
        CommitOperationAdd("README.md", card.encode("utf-8")),
        CommitOperationAdd(filename, str(adapter)),
        CommitOperationAdd(DIFFUSERS_ADAPTER_FILE, diffusers_adapter_bytes(adapter)),
        *(CommitOperationAdd(name, str(path)) for name, path in zip(sample_names, samples, strict=True)),
    ]


def model_card(
    config: BotConfig, model: ModelRow, adapter: Path, filename: str, repo_id: str, samples: list[str]
) -> str:
    """README.md: YAML front matter the Hub reads (base model, licence, tags, widget), then the text."""
    with safe_open(str(adapter), framework="numpy") as file:
        header = file.metadata() or {}
    training = {**_training_file(adapter), **model.metadata}
    base = str(training.get("base_model") or config.model.base)
    trigger = header.get("modelspec.trigger_phrase") or f"{model.token} {model.class_word}"
    instance_prompt = str(training.get("instance_prompt") or f"photo of {trigger}")
    sample_prompt = str(training.get("sample_prompt") or _sample_prompt(config, model))
    data: dict[str, Any] = {
        "license": LICENCES.get(header.get("ss_base_model_version", ""), "other"),
        "tags": TAGS,
        "instance_prompt": instance_prompt,
        "widget": [{"text": sample_prompt, "output": {"url": name}} for name in samples],
    }
    # The Hub links a base it hosts (owner/name); a local checkpoint or the built-in test model is named
    # in the text only.
    if "/" in base and not Path(base).expanduser().exists():
        data["base_model"] = base
    settings = [
        f"- {label}: {training[key]}" for key, label in CARD_SETTINGS.items() if training.get(key) is not None
    ]
    name = filename.removesuffix(".safetensors")
    body = f"""
# {model.token}

A DreamBooth LoRA of one {model.class_word}, trained with dreambot on `{base}`.

## Trigger words

Write `{trigger}` in the prompt, as in `{instance_prompt}`.

## Use it

- AUTOMATIC1111 / Forge: put `{filename}` in `models/Lora` and add `<lora:{name}:0.8>` to the prompt.
- ComfyUI: put `{filename}` in `models/loras` and pick it in a LoraLoader node.
- diffusers:

```py
pipe.load_lora_weights("{repo_id}", weight_name="{DIFFUSERS_ADAPTER_FILE}")
image = pipe("{sample_prompt}").images[0]
```

`{filename}` is the kohya format (with kohya's `ss_*` and `modelspec.*` metadata); `{DIFFUSERS_ADAPTER_FILE}`
holds the same weights in diffusers' format.

## Training settings

{chr(10).join(settings)}
"""
    return ModelCardData(**data).to_yaml().join(("---\n", "\n---\n")) + body


def _training_file(adapter: Path) -> dict[str, Any]:
    path = adapter.with_name("training.json")
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _sample_prompt(config: BotConfig, model: ModelRow) -> str:
    return config.training.sample_prompt.replace("{token}", model.token).replace("{class}", model.class_word)


@contextlib.contextmanager
def _hub_errors(repo_id: str, *, created: bool) -> Iterator[None]:
    """The Hub's refusals as messages for the member; never the token, never the Hub's raw text."""
    try:
        yield
    except OfflineModeIsEnabled:
        raise UserFacingError(
            "Publishing needs the network, and this bot runs offline (HF_HUB_OFFLINE is set). Ask its operator."
        ) from None
    except HfHubHTTPError as error:
        status = error.response.status_code
        log.warning("the Hub answered %s to publishing %s", status, repo_id)
        raise UserFacingError(_refusal(repo_id, status, created=created)) from None
    except HTTPError as error:  # no answer at all: DNS, a refused connection, a timeout
        log.warning("the Hub could not be reached to publish %s: %s", repo_id, type(error).__name__)
        raise UserFacingError(
            "I couldn't reach Hugging Face (the network or the Hub is down). Nothing was published; "
            "try again later."
        ) from None


def _refusal(repo_id: str, status: int, *, created: bool) -> str:
    undone = " I deleted the repo again, so nothing half-published is left." if created else ""
    if status == 401:
        return (
            f"Hugging Face refused the token (401): it is wrong or revoked. Make a new one with **write** "
            f"access at {TOKEN_SETTINGS_URL} and try again.{undone}"
        )
    if status == 409:
        return (
            f"`{repo_id}` already exists on Hugging Face. I only publish into a new repo (nothing of yours "
            "is overwritten): pick another name."
        )
    if status == 403:
        return (
            f"Hugging Face refused to write to `{repo_id}` (403): the token needs **write** access, and the "
            f"owner part must be your account or an organization you can write to.{undone}"
        )
    return f"Hugging Face answered {status} while publishing `{repo_id}`. Try again later.{undone}"

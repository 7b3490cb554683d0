"""One path from a member's request to a job row, and from a finished job to rows and files.

The cogs and the CLI both call these functions, so each rule (a name, a limit, the safety checker's
verdict) is written once. Nothing here talks to Discord: the functions read and write the database
and the data directory, and refuse with a UserFacingError whose message is written for the member.
The CLI acts as a local member (LOCAL_USER_ID in LOCAL_GUILD_ID) through the same functions.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from bot.config import BotConfig
from bot.consent import may_use
from bot.db import Database, GenerationRow, JobRow, MemberSettings, ModelRow, new_job_id
from bot.prompts import ASPECTS, MAX_COMMAND_STEPS, models_in_prompt, size_for_aspect
from bot.safety import merge_negative, prompt_refusal
from bot.storage import adapter_dir, generation_dir, photos_dir, remove_path, remove_paths
from bot.templates import TemplateError, fill, placeholders, unfilled_message
from bot.words import normalize_token, subject_problem, token_problem
from engine.contract.disk import DISK_FULL_MESSAGE
from engine.contract.kohya import upgrade_adapter
from engine.contract.prompt_syntax import PromptSyntaxError, parse_prompt
from engine.contract.protocol import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_SEED,
    AdapterRef,
    Error,
    GenerateJob,
    GenerationDone,
    ProtocolError,
    TrainingDone,
    TrainJob,
    encode,
)

GenerationKind = Literal["txt2img", "variation", "upscale"]

# Per-server overrides of the [limits] config that /admin limits stores (db.setting keys).
MAX_MODELS_KEY = "max_models_per_user"
MAX_QUEUED_KEY = "max_queued_jobs_per_user"


class UserFacingError(Exception):
    """A refusal or failure whose message is written for the member and shown as it is."""


# -- limits ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberLimits:
    max_models: int
    max_queued_jobs: int


def member_limits(db: Database, config: BotConfig, guild_id: int) -> MemberLimits:
    """What one member may have in a server: the admins' override, else the config."""
    limits = config.limits
    return MemberLimits(
        max_models=db.setting(guild_id, MAX_MODELS_KEY, limits.max_models_per_user),
        max_queued_jobs=db.setting(guild_id, MAX_QUEUED_KEY, limits.max_queued_jobs_per_user),
    )


def check_queue_cap(db: Database, config: BotConfig, guild_id: int, user_id: int) -> None:
    """Refuse another job to a member who already has the most this server allows waiting or running,
    counting their jobs in every server."""
    limit = member_limits(db, config, guild_id).max_queued_jobs
    active = db.count_active_jobs(user_id)
    if active >= limit:
        raise UserFacingError(
            f"You already have {active} job{'s' * (active != 1)} waiting or running, the limit is "
            f"{limit}. Wait for one to finish (see `/queue`) and try again."
        )


# -- training ----------------------------------------------------------------------------------


def check_training_request(
    db: Database, config: BotConfig, guild_id: int, user_id: int, token: str, class_word: str
) -> None:
    """Refuse a training the member may not start: its name, its subject, their limits.

    `token` and `class_word` are already normalized (bot.words).
    """
    problem = token_problem(token) or subject_problem(class_word)
    if problem:
        raise UserFacingError(problem)
    existing = db.model_by_token(guild_id, token)
    # A member may reuse the name of their own failed model; anything else holding it wins.
    if existing is not None and not (existing.owner_id == user_id and existing.state == "failed"):
        if existing.owner_id == user_id:
            raise UserFacingError(
                f"You already have a model called **{token}**. Pick another name, or delete that model first."
            )
        raise UserFacingError(
            f"**{token}** is already taken in this server. Please pick another made-up word."
        )
    max_models = member_limits(db, config, guild_id).max_models
    models = [model for model in db.models_of(user_id, guild_id) if model.state != "failed"]
    if len(models) >= max_models:
        raise UserFacingError(
            f"You already have {len(models)} model{'s' * (len(models) != 1)} in this server, the limit "
            f"is {max_models}. Delete one with `/model delete` to train another."
        )
    check_queue_cap(db, config, guild_id, user_id)


def queue_training(
    db: Database,
    config: BotConfig,
    *,
    guild_id: int,
    user_id: int,
    user_name: str,
    channel_id: int,
    token: str,
    class_word: str,
    job_id: str,
    photos: Sequence[Path],
    steps: int | None = None,
) -> JobRow:
    """Write the model and job rows; from here on the training survives a restart of the bot.

    `steps` None: [training]'s rule (steps per photo, capped)."""
    db.ensure_user(user_id, user_name)
    failed = db.model_by_token(guild_id, token)
    if failed is not None:  # the member's own failed model (check_training_request allowed nothing else)
        delete_model(db, config, failed)
    output_dir = adapter_dir(config, guild_id, token)
    # An older model of this name must not be resumed from its checkpoints.
    remove_path(config, output_dir)
    job = TrainJob(
        job_id=job_id,
        token=token,
        class_word=class_word,
        photos=[str(path) for path in photos],
        output_dir=str(output_dir),
        steps=steps,
    )
    try:
        model = db.add_model(guild_id=guild_id, owner_id=user_id, token=token, class_word=class_word)
    except sqlite3.IntegrityError:
        raise UserFacingError(
            f"**{token}** was taken a moment ago in this server. Please pick another made-up word."
        ) from None
    db.update_model(model.id, metadata={"photos": len(photos)})
    return db.add_job(
        kind="train",
        user_id=user_id,
        guild_id=guild_id,
        channel_id=channel_id,
        payload=encode(job),
        job_id=job_id,
        model_id=model.id,
    )


def finish_training(db: Database, config: BotConfig, job: JobRow, result: TrainingDone) -> ModelRow | None:
    """The trained model, ready; None when it was deleted while it trained (its files go too)."""
    model = db.find_model(job.model_id)
    if model is None:
        remove_training_files(db, config, job, with_adapter=True)
        return None
    model = db.update_model(
        model.id,
        state="ready",
        adapter_path=result.adapter_path,
        samples=result.files,
        metadata={**model.metadata, **result.metadata, "steps": result.steps},
        error=None,
    )
    remove_training_files(db, config, job, with_adapter=False)
    return model


def end_training(db: Database, config: BotConfig, job: JobRow, error: Error) -> ModelRow | None:
    """A training that failed or was cancelled. A failed one's model is kept as failed (its name can be
    trained again); a cancelled one's is deleted. Returns the failed model, None when there is none.

    One that stopped on a full disk keeps its photos and checkpoints: retry_training runs it again
    from where it stopped once there is room."""
    model = db.find_model(job.model_id)
    if error.code == "cancelled" or model is None:
        if model is not None:
            delete_model(db, config, model)
        remove_training_files(db, config, job, with_adapter=True)
        return None
    model = db.update_model(model.id, state="failed", error=error.message)
    if error.code != "disk_full":
        remove_training_files(db, config, job, with_adapter=False)
    return model


def awaits_retry(db: Database, job: JobRow) -> bool:
    """A training that a full disk stopped (the row keeps the engine's message, not its code) and
    that still has what retry_training needs: its model, failed, and its photos (end_training kept them)."""
    if job.kind != "train" or job.state != "failed" or job.error != DISK_FULL_MESSAGE:
        return False
    model = db.find_model(job.model_id)
    try:
        request = job.request
    except ProtocolError:
        return False
    return (
        model is not None
        and model.state == "failed"
        and all(Path(photo).is_file() for photo in request.photos)
    )


def retry_training(db: Database, config: BotConfig, job: JobRow) -> JobRow:
    """Queue a training that stopped on a full disk again: the same job, on the photos it kept, which
    the engine resumes from its newest checkpoint. UserFacingError says why it cannot be."""
    request = job.request
    assert isinstance(request, TrainJob)
    if job.state in ("queued", "running"):
        raise UserFacingError(f"**{request.token}** is already back in the queue.")
    if job.state == "done":
        raise UserFacingError(f"**{request.token}** is already trained.")
    if not awaits_retry(db, job):
        raise UserFacingError(
            f"Training **{request.token}** can't be tried again: its photos or its model are gone. "
            f"Run `/train` again with the same name."
        )
    # The member's limits as a new training meets them; the failed model holds the name.
    check_training_request(db, config, job.guild_id, job.user_id, request.token, request.class_word)
    db.update_model(job.model_id, state="queued", error=None)
    return db.update_job(job.id, state="queued", error=None, attempts=0, started_at=None, finished_at=None)


def model_files(config: BotConfig, model: ModelRow) -> list[str | Path]:
    """A model's files: its adapter folder (weights, checkpoints, samples) and its files wherever they are."""
    paths: list[str | Path] = [adapter_dir(config, model.guild_id, model.token), *model.samples]
    if model.adapter_path:
        paths.append(model.adapter_path)
    return paths


def delete_model(db: Database, config: BotConfig, model: ModelRow) -> int:
    """The one way a model goes: its row and its files; returns how many files were removed. Safe to
    call again. (The engines' own copies of its adapter go first: JobQueue.forget_adapters.)"""
    # Photos a failed training kept for its retry (awaits_retry) go too, unless [storage] keeps them all.
    kept_photos = (
        []
        if config.storage.keep_photos
        else [photos_dir(config, job.id) for job in db.trainings_of(model.id)]
    )
    if db.find_model(model.id) is not None:
        db.delete_model(model.id)
    return remove_paths(config, [*model_files(config, model), *kept_photos])


def remove_training_files(db: Database, config: BotConfig, job: JobRow, *, with_adapter: bool) -> None:
    """A finished training's photos (unless [storage] keep_photos), and with_adapter its output folder."""
    request = job.request
    assert isinstance(request, TrainJob)
    # Unless a new model of the same name already trains there.
    if with_adapter and db.model_by_token(job.guild_id, request.token) is None:
        remove_path(config, request.output_dir)
    if with_adapter or not config.storage.keep_photos:
        remove_path(config, photos_dir(config, job.id))


# -- generation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRequest:
    """One generation to queue, whichever path asked for it: /imagine, a button, the prompt modal, the CLI."""

    prompt: str
    negative_prompt: str
    seed: int | None
    count: int
    width: int
    height: int
    steps: int
    guidance: float
    parent_id: int | None = None
    init_image: str | None = None
    strength: float | None = None
    upscale: bool = False
    # The prompt as the member typed it, when `prompt` is its filled-in template (fill_template).
    template: str | None = None

    @property
    def kind(self) -> GenerationKind:
        return generation_kind(self.init_image, self.upscale)


def image_request(
    config: BotConfig,
    prompt: str,
    *,
    settings: MemberSettings | None = None,
    negative: str | None = None,
    aspect: str | None = None,
    seed: int | None = None,
    count: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
) -> ImageRequest:
    """The one place a new picture's settings are made, whichever path asks (/imagine, Use prompt on
    Picture info, the prompt book, the CLI): what the member gave, else her /settings when the path
    applies them, else the server's config; the server's negative prompt always comes first."""
    mine = settings or MemberSettings()
    width, height = size_for_aspect(aspect or mine.aspect or "square", config.training.resolution)
    return ImageRequest(
        prompt=prompt,
        negative_prompt=merge_negative(
            config.safety.default_negative_prompt, negative or mine.negative_prompt
        ),
        seed=seed,
        count=count or mine.count or 1,
        width=width,
        height=height,
        steps=steps or mine.steps or config.generation.steps,
        # The first given: a guidance of 0 is a guidance like any other.
        guidance=next(
            value for value in (guidance, mine.guidance, config.generation.guidance) if value is not None
        ),
    )


def generation_kind(init_image: str | None, upscale: bool) -> GenerationKind:
    if upscale:
        return "upscale"
    return "txt2img" if init_image is None else "variation"


def usable_models(db: Database, guild_id: int, user_id: int, prompt: str) -> list[AdapterRef]:
    """The adapters of the models the prompt names, each at its `<lora:...>` tag's weight (1 for a
    bare token); another member's only when its owner has shared it (then at any weight)."""
    ready = db.ready_models(guild_id)
    try:
        parsed = parse_prompt(prompt)
    except PromptSyntaxError as error:
        raise UserFacingError(f"I can't read your prompt: {error}.") from None
    weights = parsed.lora_weights
    models = models_in_prompt(parsed, ready)
    unknown = sorted(set(weights) - {model.token for model in models})
    if unknown:
        raise UserFacingError(
            f"`<lora:{unknown[0]}>` names no trained model in this server: `/models` lists yours, and "
            "a model's name in the prompt is enough to use it."
        )
    for model in models:
        if not may_use(model, user_id):
            raise UserFacingError(
                f"“{model.token}” is <@{model.owner_id}>'s model and its owner hasn't shared it, "
                "so only they can use it (they can share it with `/model share`)."
            )
    return [model.adapter_ref(weights.get(model.token, 1.0)) for model in models]


def default_model(db: Database, guild_id: int, user_id: int) -> ModelRow | None:
    """The model `[SUBJECT]` stands for: the one she chose in /settings while it is ready, else her
    newest ready one in this server."""
    chosen = db.default_model(user_id, guild_id)
    if chosen is not None and chosen.state == "ready":
        return chosen
    ready = [model for model in db.models_of(user_id, guild_id) if model.state == "ready"]
    return ready[-1] if ready else None


def fill_template(db: Database, guild_id: int, user_id: int, request: ImageRequest) -> ImageRequest:
    """The request with `[SUBJECT]`/`[me]` filled in with the member's default model, the prompt as
    typed kept as its template; as it is when its prompt is no template or is already filled."""
    if request.template is not None:
        return request
    try:
        prompt = fill(request.prompt, default_model(db, guild_id, user_id))
    except TemplateError as error:
        raise UserFacingError(str(error)) from None
    if prompt == request.prompt:
        return request
    return dataclasses.replace(request, prompt=prompt, template=request.prompt)


def check_generation_request(
    db: Database, config: BotConfig, guild_id: int, user_id: int, request: ImageRequest, *, nsfw_allowed: bool
) -> list[AdapterRef]:
    """Refuse what may not be drawn (safety), a prompt that does not read, models the member may not
    use, and a full queue; else the adapters the prompt uses."""
    # Never drawn with a placeholder in it: the engine would read `[ARTIST]` as a weaker "ARTIST".
    if names := placeholders(request.prompt):
        raise UserFacingError(unfilled_message(names))
    refusal = prompt_refusal(
        request.prompt, request.negative_prompt, config.safety, nsfw_channel=nsfw_allowed
    )
    if refusal is not None:
        raise UserFacingError(refusal)
    try:
        parse_prompt(request.negative_prompt, loras=False)
    except PromptSyntaxError as error:
        raise UserFacingError(f"I can't read your negative prompt: {error}.") from None
    adapters = usable_models(db, guild_id, user_id, request.prompt)
    check_queue_cap(db, config, guild_id, user_id)
    return adapters


def queue_generation(
    db: Database,
    config: BotConfig,
    *,
    guild_id: int,
    user_id: int,
    user_name: str,
    channel_id: int,
    age_restricted: bool,
    request: ImageRequest,
    adapters: Sequence[AdapterRef],
) -> JobRow:
    """Write the job row of a checked request (check_generation_request); `age_restricted`: whether
    its channel is, which its picture's row will say."""
    job_id = new_job_id()
    try:
        job = GenerateJob(
            job_id=job_id,
            prompt=request.prompt,
            output_dir=str(generation_dir(config, job_id)),
            negative_prompt=request.negative_prompt,
            seed=random.randint(0, MAX_SEED) if request.seed is None else request.seed,
            steps=request.steps,
            guidance=request.guidance,
            width=request.width,
            height=request.height,
            count=request.count,
            adapters=list(adapters),
            init_image=request.init_image,
            strength=request.strength,
            upscale=request.upscale,
        )
    except ValueError as error:
        raise UserFacingError(f"I can't draw that: {error}.") from None
    db.ensure_user(user_id, user_name)
    return db.add_job(
        kind="generate",
        user_id=user_id,
        guild_id=guild_id,
        channel_id=channel_id,
        payload=encode(job),
        job_id=job_id,
        context={
            "parent_id": request.parent_id,
            "template": request.template,
            "age_restricted": age_restricted,
        },
    )


@dataclass(frozen=True)
class FinishedGeneration:
    # None when the safety checker flagged every image: nothing is kept.
    row: GenerationRow | None
    # Images the safety checker flagged: deleted, never shown.
    hidden: int


def finish_generation(
    db: Database, config: BotConfig, job: JobRow, result: GenerationDone
) -> FinishedGeneration:
    """Keep what may be shown: flagged images are deleted before anyone sees them, the rest becomes
    the generation row."""
    request = job.request
    assert isinstance(request, GenerateJob)
    kept = [index for index, flagged in enumerate(result.nsfw) if not flagged]
    for index in set(range(len(result.files))) - set(kept):
        Path(result.files[index]).unlink(missing_ok=True)
    hidden = len(result.files) - len(kept)
    if not kept:
        shutil.rmtree(generation_dir(config, job.id), ignore_errors=True)
        return FinishedGeneration(None, hidden)
    files = [result.files[index] for index in kept]
    # The size as made: an upscale's comes from its source image, which the request does not carry.
    with Image.open(files[0]) as first:
        width, height = first.size
    row = db.add_generation(
        job_id=job.id,
        guild_id=job.guild_id,
        user_id=job.user_id,
        channel_id=job.channel_id,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        seed=request.seed,
        steps=request.steps,
        guidance=request.guidance,
        width=width,
        height=height,
        tokens=[adapter.token for adapter in request.adapters],
        files=files,
        parameters=[result.parameters[index] for index in kept],
        kind=generation_kind(request.init_image, request.upscale),
        parent_id=job.context.get("parent_id"),
        template=job.context.get("template"),
        # None (not recorded) for a job queued by a bot older than the column.
        age_restricted=job.context.get("age_restricted"),
    )
    return FinishedGeneration(row, hidden)


def end_generation(config: BotConfig, job: JobRow) -> None:
    """A generation that failed or was cancelled leaves no files."""
    shutil.rmtree(generation_dir(config, job.id), ignore_errors=True)


# -- a member's settings ------------------------------------------------------------------------


def check_member_settings(settings: MemberSettings) -> None:
    """Refuse a value /imagine could not use, saying the value received."""
    if settings.aspect is not None and settings.aspect not in ASPECTS:
        raise UserFacingError(f"The aspect has to be one of {', '.join(ASPECTS)}, not “{settings.aspect}”.")
    if settings.steps is not None and not 1 <= settings.steps <= MAX_COMMAND_STEPS:
        raise UserFacingError(f"Steps go from 1 to {MAX_COMMAND_STEPS}, not {settings.steps}.")
    if settings.guidance is not None and not 0 <= settings.guidance <= MAX_GUIDANCE:
        raise UserFacingError(f"Guidance goes from 0 to {MAX_GUIDANCE:g}, not {settings.guidance:g}.")
    if settings.count is not None and not 1 <= settings.count <= MAX_IMAGES:
        raise UserFacingError(f"The count goes from 1 to {MAX_IMAGES}, not {settings.count}.")
    if settings.negative_prompt is not None:
        try:
            parse_prompt(settings.negative_prompt, loras=False)
        except PromptSyntaxError as error:
            raise UserFacingError(f"I can't read your negative prompt: {error}.") from None


def choose_default_model(db: Database, guild_id: int, user_id: int, token: str) -> ModelRow:
    """Her model called `token` in this server, now her default; refused for anyone else's or none."""
    model = db.model_by_token(guild_id, normalize_token(token))
    if model is None or model.owner_id != user_id:
        raise UserFacingError(
            f"You have no model called “{token}” in this server: `/models` lists yours, and "
            "[SUBJECT] stands for your own face, so only your own models can be your default."
        )
    if model.state != "ready":
        raise UserFacingError(f"**{model.token}** isn't trained yet ({model.state}): pick a ready model.")
    db.set_default_model(user_id, guild_id, model.id)
    return model


# -- export ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterExport:
    """A model's kohya LoRA file, as other tools take it."""

    path: Path
    # The name to give it: what A1111's <lora:NAME:W> and ComfyUI's LoraLoader show.
    filename: str
    # What to write in a prompt to draw the subject (the file's modelspec.trigger_phrase).
    trigger: str
    base_model: str


def export_adapter(config: BotConfig, model: ModelRow) -> AdapterExport:
    """The model's adapter file, in the kohya format: one still in the old diffusers format is
    converted first (in place, once). Blocking: the bot runs it in a thread."""
    if model.state != "ready" or not model.adapter_path:
        raise UserFacingError(
            f"**{model.token}** isn't trained yet ({model.state}), so there is nothing to export."
        )
    path = Path(model.adapter_path)
    if not path.is_file():
        raise UserFacingError(
            f"The file of **{model.token}** is missing on my side. Train it again to export it."
        )
    upgrade_adapter(path)
    return AdapterExport(
        path=path,
        filename=f"{model.token}.safetensors",
        trigger=f"{model.token} {model.class_word}",
        base_model=str(model.metadata.get("base_model") or config.model.base),
    )


def export_instructions(export: AdapterExport) -> str:
    """Where the file goes in the tools members use, and how a prompt calls it (markdown)."""
    name = export.filename.removesuffix(".safetensors")
    return (
        f"It works with `{export.base_model}`, the base it was trained on, and close relatives.\n"
        f"• AUTOMATIC1111 / Forge: put `{export.filename}` in `models/Lora` and add `<lora:{name}:0.8>` "
        "to the prompt.\n"
        f"• ComfyUI: put it in `models/loras` and pick it in a LoraLoader node.\n"
        f"• diffusers: `pipe.load_lora_weights('.', weight_name='{export.filename}')`.\n"
        f"Trigger words: write `{export.trigger}` in the prompt, as in `{export.trigger} as a viking`."
    )

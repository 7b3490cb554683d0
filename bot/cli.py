"""The `dreambot` command: run the Discord bot, or train, imagine and check photos without Discord.

The CLI is a small client of the same pieces the bot uses: photo intake, the SQLite data in the
data directory and the job queue that starts an engine worker. It acts as a local member (user 0 in
"server" 0), so its models and generations sit beside the Discord ones without mixing with them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from bot.config import BotConfig, load_bot_config
from bot.db import (
    LOCAL_GUILD_ID,
    LOCAL_USER_ID,
    LOCAL_USER_NAME,
    Database,
    DatabaseUnusable,
    JobRow,
    ModelRow,
    new_job_id,
)
from bot.intake import PHOTO_SUFFIXES, check_files
from bot.jobs import JobQueue
from bot.pools import worker_pool
from bot.prompts import ASPECTS
from bot.service import (
    UserFacingError,
    check_generation_request,
    check_training_request,
    delete_model,
    end_generation,
    end_training,
    export_adapter,
    export_instructions,
    fill_template,
    finish_generation,
    finish_training,
    image_request,
    queue_generation,
    queue_training,
)
from bot.storage import photos_dir
from bot.words import load_base_vocabulary, normalize_subject, normalize_token, subject_problem, token_problem
from engine.contract.config import ConfigError
from engine.contract.protocol import (
    LOG_FORMAT,
    MAX_IMAGES,
    Error,
    Event,
    GenerationDone,
    Progress,
    Result,
    TrainingDone,
)

if TYPE_CHECKING:
    from bot.bot import DreamBot

log = logging.getLogger(__name__)

# Loading the base model can take minutes on a first run (download), training far longer.
ENGINE_START_TIMEOUT = 60 * 60


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    if args.command != "run":
        # The CLI tells the outcome of its one job itself, a failure's reason included (an engine
        # that cannot start too); the queue's log lines are for a bot's operator.
        handler.addFilter(lambda record: not record.name.startswith("bot.jobs"))
    logging.basicConfig(level=logging.INFO if args.command == "run" else logging.WARNING, handlers=[handler])
    try:
        config = load_bot_config(args.config)
    except ConfigError as error:
        print(f"dreambot: {error}", file=sys.stderr)
        return 2
    try:
        return args.handler(config, args)
    except DatabaseUnusable as error:
        print(f"dreambot: {error}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreambot", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    config_help = "config file (default: ./config.toml if present)"
    parser.add_argument("--config", type=Path, help=config_help)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        # Before or after the command name; SUPPRESS keeps one given before from being reset here.
        sub.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=config_help)
        return sub

    run = command("run", "run the Discord bot (the token comes from DISCORD_TOKEN)")
    run.set_defaults(handler=run_bot)

    train = command("train", "train a personal model from photos")
    train.add_argument("--name", required=True, help="the rare token that will stand for the subject")
    train.add_argument("--class", dest="class_word", default="person", help="person, man, woman, dog, ...")
    train.add_argument("--steps", type=int, help="training steps (default: 100 per photo, capped)")
    train.add_argument("photos", nargs="+", type=Path, help="photo files, or folders of them")
    train.set_defaults(handler=train_command)

    imagine = command("imagine", "generate images; tokens of trained models in the prompt select them")
    imagine.add_argument("prompt")
    imagine.add_argument("--negative", help="terms added to the [safety] default negative prompt")
    imagine.add_argument("--seed", type=int, help="random when not given")
    imagine.add_argument("--steps", type=int, help="denoising steps (default: [generation] steps)")
    imagine.add_argument("--guidance", type=float, help="CFG scale (default: [generation] guidance)")
    imagine.add_argument(
        "--count", type=int, default=1, choices=range(1, MAX_IMAGES + 1), metavar=f"1-{MAX_IMAGES}"
    )
    imagine.add_argument("--aspect", default="square", choices=sorted(ASPECTS))
    imagine.add_argument("--out", type=Path, default=Path("."), help="folder for the PNGs (default: .)")
    imagine.set_defaults(handler=imagine_command)

    delete = command("delete", "delete a trained model: its row, its weights and its samples")
    delete.add_argument("name")
    delete.set_defaults(handler=delete_command)

    export = command("export", "write a model's LoRA file (kohya format: A1111, Forge, ComfyUI, diffusers)")
    export.add_argument("name")
    export.add_argument("--out", type=Path, help="the file to write (default: ./NAME.safetensors)")
    export.set_defaults(handler=export_command)

    publish = command("publish", "publish a model to the Hugging Face Hub (the token comes from HF_TOKEN)")
    publish.add_argument("name")
    publish.add_argument("--repo", required=True, help="USER/REPO, or REPO under the token's account")
    publish.add_argument("--public", action="store_true", help="anyone may see it (default: private)")
    publish.set_defaults(handler=publish_command)

    models = command("models", "list the trained models")
    models.set_defaults(handler=models_command)

    check = command("check", "check photos for training without training")
    check.add_argument("--class", dest="class_word", default="person")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("photos", nargs="+", type=Path, help="photo files, or folders of them")
    check.set_defaults(handler=check_command)

    health = command("health", "exit 0 while a running bot is connected to Discord (for HEALTHCHECK)")
    health.set_defaults(handler=health_command)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("dreambot")
    except importlib.metadata.PackageNotFoundError:  # run from a source folder, not installed
        return "(not installed)"


# -- run ------------------------------------------------------------------------------------------


def run_bot(config: BotConfig, args: argparse.Namespace) -> int:
    token = os.environ.get("DISCORD_TOKEN", "").strip()
    if not token:
        print(
            "dreambot: set DISCORD_TOKEN to the bot's token (Discord developer portal > Bot)", file=sys.stderr
        )
        return 2
    # discord.py loads only for this command.
    import aiohttp
    import discord

    from bot.bot import DreamBot

    try:
        asyncio.run(_serve(DreamBot(config), token))
    except discord.LoginFailure:
        print(
            "dreambot: Discord refused the token: check that DISCORD_TOKEN holds the bot's token "
            "(developer portal > your application > Bot > Reset Token), not the application id or secret",
            file=sys.stderr,
        )
        return 1
    except aiohttp.ClientConnectionError as error:
        print(f"dreambot: cannot reach Discord: check the network ({error})", file=sys.stderr)
        return 1
    return 0


async def _serve(bot: DreamBot, token: str) -> None:
    """Run the bot until Discord ends it, or SIGTERM (docker stop) or SIGINT (Ctrl-C) stops it: the
    engines checkpoint and exit, then the gateway gets a close frame (DreamBot.close)."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    async with bot:
        running = asyncio.create_task(bot.start(token), name="discord")
        stopping = asyncio.create_task(stop_requested.wait(), name="stop signal")
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if stop_requested.is_set():
            log.info("stop requested: stopping the engines and closing the Discord connection")
            await bot.close()
        await running


def health_command(config: BotConfig, args: argparse.Namespace) -> int:
    from bot.bot import HEARTBEAT_MAX_AGE, heartbeat_path

    path = heartbeat_path(config)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        print(f"unhealthy: no bot is connected to Discord ({path} is missing)", file=sys.stderr)
        return 1
    if age > HEARTBEAT_MAX_AGE:
        print(f"unhealthy: the bot's last heartbeat is {age:.0f} s old: it lost Discord", file=sys.stderr)
        return 1
    print(f"healthy: connected to Discord (heartbeat {age:.0f} s ago)")
    return 0


# -- check and train -----------------------------------------------------------------------------


def check_command(config: BotConfig, args: argparse.Namespace) -> int:
    photos = _photo_files(args.photos)
    if not photos:
        return _no_photos(args.photos)
    report = check_files(photos, args.class_word, None, config.intake, config.training.resolution)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.format(markdown=False))
    return 0 if report.ok else 1


def _photo_files(paths: Sequence[Path]) -> list[Path]:
    """The paths given, each folder among them replaced by the photo files in it, sorted."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = (p for p in path.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
            files.extend(sorted(found))
        else:
            files.append(path)
    return files


def _no_photos(folders: Sequence[Path]) -> int:
    names = ", ".join(str(folder) for folder in folders)
    print(f"dreambot: no photos in {names} (JPEG, PNG, WebP or HEIC files)", file=sys.stderr)
    return 2


def train_command(config: BotConfig, args: argparse.Namespace) -> int:
    token, class_word = normalize_token(args.name), normalize_subject(args.class_word)
    # The bot's rules, before any photo is read, file written or engine started: a name Discord
    # refuses is refused here; then what the database knows (taken names, limits).
    load_base_vocabulary(config.model.base)
    if problem := token_problem(token) or subject_problem(class_word):
        return _refuse(UserFacingError(problem))
    db = Database.in_data_dir(config.data_dir)
    try:
        check_training_request(db, config, LOCAL_GUILD_ID, LOCAL_USER_ID, token, class_word)
    except UserFacingError as error:
        return _refuse(error)
    photos = _photo_files(args.photos)
    if not photos:
        return _no_photos(args.photos)
    job_id = new_job_id()
    prepared_dir = photos_dir(config, job_id)
    report = check_files(photos, class_word, prepared_dir, config.intake, config.training.resolution)
    print(report.format(markdown=False))
    if not report.ok:
        shutil.rmtree(prepared_dir, ignore_errors=True)
        return 1
    row = queue_training(
        db,
        config,
        guild_id=LOCAL_GUILD_ID,
        user_id=LOCAL_USER_ID,
        user_name=LOCAL_USER_NAME,
        channel_id=0,
        token=token,
        class_word=class_word,
        job_id=job_id,
        photos=report.prepared,
        steps=args.steps,
    )
    finished = asyncio.run(_run_until_finished(config, db, row))
    result = finished.outcome
    if not isinstance(result, TrainingDone):
        end_training(db, config, finished, Error(finished.id, finished.error or "stopped", "internal"))
        print(f"dreambot: training failed: {finished.error}", file=sys.stderr)
        return 1
    model = finish_training(db, config, finished, result)
    assert model is not None
    print(f"trained {token!r} in {result.seconds:.0f} s: {result.adapter_path}")
    for sample in result.files:
        print(f"sample: {sample}")
    print(f'now try: dreambot imagine "{token} as a viking"')
    return 0


def delete_command(config: BotConfig, args: argparse.Namespace) -> int:
    db = Database.in_data_dir(config.data_dir)
    model = _local_model(db, args.name)
    if model is None:
        return 1
    files = delete_model(db, config, model)
    print(f"deleted {model.token!r} ({files} files)")
    return 0


def export_command(config: BotConfig, args: argparse.Namespace) -> int:
    model = _local_model(Database.in_data_dir(config.data_dir), args.name)
    if model is None:
        return 1
    try:
        export = export_adapter(config, model)
    except UserFacingError as error:
        return _refuse(error)
    target = args.out or Path(export.filename)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(export.path, target)
    print(target)
    # A1111 and ComfyUI name a LoRA by its file: the instructions follow a --out name.
    print(terminal_text(export_instructions(dataclasses.replace(export, filename=target.name))))
    return 0


def publish_command(config: BotConfig, args: argparse.Namespace) -> int:
    from bot.publish import TOKEN_SETTINGS_URL, publish_model  # huggingface_hub loads for this command only

    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        print(
            f"dreambot: set HF_TOKEN to a Hugging Face token with write access ({TOKEN_SETTINGS_URL})",
            file=sys.stderr,
        )
        return 2
    model = _local_model(Database.in_data_dir(config.data_dir), args.name)
    if model is None:
        return 1
    try:
        published = publish_model(config, model, args.repo, token, private=not args.public)
    except UserFacingError as error:
        return _refuse(error)
    print(f"published {model.token!r} to {published.url} ({'private' if published.private else 'public'})")
    for name in published.files:
        print(f"  {name}")
    return 0


def _local_model(db: Database, name: str) -> ModelRow | None:
    """The CLI's model called `name`, or None after saying there is none."""
    model = db.model_by_token(LOCAL_GUILD_ID, normalize_token(name))
    if model is None:
        print(f"dreambot: there is no model called {name!r} (see dreambot models)", file=sys.stderr)
    return model


# -- imagine ------------------------------------------------------------------------------------


def imagine_command(config: BotConfig, args: argparse.Namespace) -> int:
    db = Database.in_data_dir(config.data_dir)
    request = image_request(
        config,
        args.prompt,
        negative=args.negative,
        aspect=args.aspect,
        seed=args.seed,
        count=args.count,
        steps=args.steps,
        guidance=args.guidance,
    )
    try:
        # [me] is the local user's default model, as on Discord.
        request = fill_template(db, LOCAL_GUILD_ID, LOCAL_USER_ID, request)
        adapters = check_generation_request(
            db, config, LOCAL_GUILD_ID, LOCAL_USER_ID, request, nsfw_allowed=False
        )
        row = queue_generation(
            db,
            config,
            guild_id=LOCAL_GUILD_ID,
            user_id=LOCAL_USER_ID,
            user_name=LOCAL_USER_NAME,
            channel_id=0,
            # Like nsfw_allowed above: the command line is no age-restricted channel.
            age_restricted=False,
            request=request,
            adapters=adapters,
        )
    except UserFacingError as error:
        return _refuse(error)
    finished = asyncio.run(_run_until_finished(config, db, row))
    result = finished.outcome
    if not isinstance(result, GenerationDone):
        end_generation(config, finished)
        print(f"dreambot: generation failed: {finished.error}", file=sys.stderr)
        return 1
    # The safety checker's verdict holds here too: a flagged image is deleted, never written out.
    generation = finish_generation(db, config, finished, result)
    if generation.hidden:
        print(
            f"dreambot: the safety checker flagged {generation.hidden} image(s); they were deleted",
            file=sys.stderr,
        )
    if generation.row is None:
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for index, source in enumerate(generation.row.files):
        target = args.out / f"dreambot-{row.id}-{index}.png"
        shutil.copyfile(source, target)
        print(target)
    return 0


def _refuse(error: UserFacingError) -> int:
    print(f"dreambot: {terminal_text(str(error))}", file=sys.stderr)
    return 1


def terminal_text(message: str) -> str:
    """A message written for Discord, without its markdown (bold, code) for a terminal."""
    return message.replace("**", "").replace("`", "")


# -- models -------------------------------------------------------------------------------------


def models_command(config: BotConfig, args: argparse.Namespace) -> int:
    db = Database.in_data_dir(config.data_dir)
    rows = db.db.execute("SELECT id FROM models ORDER BY guild_id, token").fetchall()
    if not rows:
        print("no models yet: dreambot train --name TOKEN PHOTOS...")
        return 0
    print(f"{'token':<20} {'class':<10} {'state':<9} {'steps':>6} {'photos':>6}  where")
    for (model_id,) in rows:
        model = db.model(model_id)
        where = "local" if model.guild_id == LOCAL_GUILD_ID else f"server {model.guild_id}"
        steps = model.metadata.get("steps", "")
        photos = model.metadata.get("photos", "")
        print(
            f"{model.token:<20} {model.class_word:<10} {model.state:<9} {steps!s:>6} {photos!s:>6}  {where}"
        )
    return 0


# -- running one job through the queue -----------------------------------------------------------


async def _run_until_finished(config: BotConfig, db: Database, row: JobRow) -> JobRow:
    """Start a worker, run the job with a progress bar per phase, and return its final row."""
    finished: asyncio.Future[JobRow] = asyncio.get_running_loop().create_future()
    bars: dict[str, tqdm] = {}

    async def on_event(job: JobRow, event: Event) -> None:
        if job.id != row.id:
            return
        if isinstance(event, Progress):
            bar = bars.get(event.phase)
            if bar is None:
                for other in bars.values():
                    other.close()
                bar = bars[event.phase] = tqdm(
                    total=event.total, desc=event.phase, unit="step", file=sys.stderr
                )
            bar.update(event.step - bar.n)
            if event.loss is not None:
                bar.set_postfix(loss=f"{event.loss:.4f}")
        elif isinstance(event, Result | Error) and not finished.done():
            finished.set_result(job)

    queue = JobQueue(db, config, on_event=on_event, job_ids={row.id}, pool=worker_pool(config))
    print("starting the engine (loading the base model)...", file=sys.stderr)
    await queue.start()
    try:
        queue.submit(row)
        return await finished
    finally:
        for bar in bars.values():
            bar.close()
        await queue.stop()

"""Training: /train and the "Train on these photos" message command, and a training's life in the channel.

A request is checked (name, subject, limits), its photos go through intake, and the member sees the
intake report before anything is queued. A queued training gets one public progress message in the
channel, kept up to date from the engine's progress events, and its samples are posted there when it
is done. The job row is the source of truth: it is written before the member is told anything is
queued, and it holds the progress message's id so that the message survives a restart of the bot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import re
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands, tasks

from bot.bot import DreamBot, reports_errors
from bot.db import ACTIVE_JOB_STATES, JobRow, new_job_id
from bot.intake import PHOTO_SUFFIXES, IntakeReport, PhotoVerdict, check_files, too_big
from bot.service import (
    UserFacingError,
    awaits_retry,
    check_training_request,
    end_training,
    finish_training,
    queue_training,
    retry_training,
)
from bot.storage import incoming_dir, photos_dir, remove_path
from bot.uploads import DEFAULT_UPLOAD_LIMIT, image_files
from bot.views import can_manage, only_mentions
from bot.words import CLASS_WORDS, normalize_subject, normalize_token
from engine.contract.disk import disk_full_cause
from engine.contract.protocol import Accepted, Error, Progress, TrainingDone, TrainJob

log = logging.getLogger(__name__)

# Discord rate-limits message edits; a progress message changes at most this often per job.
PROGRESS_EDIT_INTERVAL = 5.0
# The trend arrow compares the newest loss with the one this many Progress events back (~0.5 s each).
LOSS_TREND_EVENTS = 10
LOSS_FLAT_BAND = 0.02
PREVIEW_NAME = "preview.png"
PROGRESS_BAR_WIDTH = 20
PHASE_LABELS = {
    "class images": "Preparing reference images",
    "training": "Training",
    "samples": "Drawing samples",
}
MAX_PHOTO_OPTIONS = 20
RETRY_TEMPLATE = r"dreambot:retrytrain:(?P<job_id>[0-9a-f]+)"
# Attachments are streamed to disk in pieces of this size: a download holds no more in memory.
DOWNLOAD_CHUNK = 64 * 1024
# A download that receives nothing for this long is given up: it holds one of the intake turns.
DOWNLOAD_STALL_TIMEOUT = 30.0
WAITING_TURN_MESSAGE = (
    "⏳ Your photos are waiting their turn: I check a few sets of photos at a time. The report follows here."
)
DOWNLOAD_FAILED_MESSAGE = "I couldn't download your photos from Discord. Please try again."
INTAKE_DISK_FULL_MESSAGE = (
    "I can't take your photos right now: the server's disk is full (its admins can see it in the "
    "log). Please try again later."
)


# -- checks that need no Discord -------------------------------------------------------------


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def progress_bar(fraction: float, width: int = PROGRESS_BAR_WIDTH) -> str:
    filled = round(min(max(fraction, 0.0), 1.0) * width)
    return "█" * filled + "░" * (width - filled)


def loss_trend(losses: Sequence[float]) -> str:
    """The newest loss and where the last few went: "loss 0.142 ↘" (down), "↗" (up) or "→"."""
    newest, oldest = losses[-1], losses[0]
    # Within 2 % of where it was counts as flat: the smoothed loss wobbles a little from step to step.
    if newest < oldest * (1 - LOSS_FLAT_BAND):
        arrow = "↘"
    elif newest > oldest * (1 + LOSS_FLAT_BAND):
        arrow = "↗"
    else:
        arrow = "→"
    return f"loss {newest:.3f} {arrow}"


def progress_status(
    phase: str, step: int, total: int, eta_seconds: float | None, losses: Sequence[float] = ()
) -> str:
    """Two lines for the progress message: phase, step/total, percent, loss trend and ETA, then a text bar."""
    fraction = step / total if total > 0 else 0.0
    line = f"{PHASE_LABELS.get(phase, phase.capitalize())}: step {step}/{total} ({fraction:.0%})"
    if losses:
        line += f" · {loss_trend(losses)}"
    if eta_seconds is not None and step < total:
        line += f" · about {format_duration(eta_seconds)} left"
    return f"{line}\n`{progress_bar(fraction)}`"


def progress_header(token: str, class_word: str, user_id: int, photo_count: int) -> str:
    return f"🎨 Training **{token}** ({class_word}) for <@{user_id}> on {photo_count} photos"


def image_attachments(message: discord.Message) -> list[discord.Attachment]:
    return [
        attachment
        for attachment in message.attachments
        if (attachment.content_type or "").startswith("image/")
        or Path(attachment.filename).suffix.lower() in PHOTO_SUFFIXES
    ]


class IntakeTurns:
    """Whose photos are downloaded and checked now: one set per member at a time, `slots` sets in all.

    A burst of /train waits here for its turn instead of filling the bot's memory and cores at once.
    """

    def __init__(self, slots: int) -> None:
        self._slots = asyncio.Semaphore(slots)
        self._members: dict[int, asyncio.Lock] = {}
        # Turns taken or awaited per member: a member's lock goes once none is left.
        self._holders: Counter[int] = Counter()

    def must_wait(self, member_id: int) -> bool:
        """Whether a turn asked for now would wait (for the member's earlier set, or for a slot)."""
        lock = self._members.get(member_id)
        return self._slots.locked() or (lock is not None and lock.locked())

    @contextlib.asynccontextmanager
    async def turn(self, member_id: int) -> AsyncIterator[None]:
        lock = self._members.setdefault(member_id, asyncio.Lock())
        self._holders[member_id] += 1
        try:
            async with lock, self._slots:
                yield
        finally:
            self._holders[member_id] -= 1
            if not self._holders[member_id]:
                del self._holders[member_id], self._members[member_id]


class RetryTrainingButton(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]], template=RETRY_TEMPLATE
):
    """Try again: a training that stopped on a full disk runs again from where it stopped. A dynamic
    item, so the button works after a restart of the bot (the cog registers it)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(
            discord.ui.Button(
                label="Try again",
                style=discord.ButtonStyle.primary,
                custom_id=f"dreambot:retrytrain:{job_id}",
            )
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction,
        item: discord.ui.Button[discord.ui.View],
        match: re.Match[str],
        /,
    ) -> RetryTrainingButton:
        return cls(match["job_id"])

    @reports_errors
    async def callback(self, interaction: discord.Interaction[DreamBot]) -> None:
        training = interaction.client.get_cog(Training.__cog_name__)
        assert isinstance(training, Training)
        await training.retry(interaction, self.job_id)


class TrainModal(discord.ui.Modal, title="Train on these photos"):
    name: discord.ui.TextInput[TrainModal] = discord.ui.TextInput(
        label="Name: a made-up word for you", placeholder="abraza", min_length=3, max_length=20
    )
    subject: discord.ui.TextInput[TrainModal] = discord.ui.TextInput(
        label="Subject: what the photos show", default="person", min_length=2, max_length=40
    )

    def __init__(self, cog: Training, attachments: list[discord.Attachment]) -> None:
        super().__init__()
        self.cog = cog
        self.attachments = attachments

    @reports_errors
    async def on_submit(self, interaction: discord.Interaction) -> None:
        await self.cog.start_training(interaction, self.name.value, self.subject.value, self.attachments)


class Training(commands.Cog):
    def __init__(self, bot: DreamBot) -> None:
        self.bot = bot
        self.train_menu = app_commands.ContextMenu(
            name="Train on these photos", callback=self.train_from_message
        )
        self.train_menu.guild_only = True
        self._last_edit: dict[str, float] = {}
        # job id -> its latest Progress losses, for the trend arrow.
        self._losses: dict[str, deque[float]] = {}
        # job id -> its [training] preview_at sample, until an edit attaches it to the progress message.
        self._previews: dict[str, bytes] = {}
        # The newest progress text of a job whose last edit was too recent; flushed by a background task.
        self._pending: dict[str, tuple[JobRow, str]] = {}
        self._edit_locks: dict[str, asyncio.Lock] = {}
        self.intake_turns = IntakeTurns(bot.config.intake.max_concurrent)
        # The checks run on threads of their own, one per turn: a thread keeps the memory its last
        # decode used (the allocator's arena), so more threads would mean more such memory.
        self._intake_threads = ThreadPoolExecutor(
            bot.config.intake.max_concurrent, thread_name_prefix="intake"
        )
        # The attachments' downloads: streamed to disk, never read whole into memory.
        self._downloads: aiohttp.ClientSession | None = None

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.train_menu)
        self.bot.add_dynamic_items(RetryTrainingButton)
        await asyncio.to_thread(self._sweep_photos)
        self._downloads = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                sock_connect=DOWNLOAD_STALL_TIMEOUT, sock_read=DOWNLOAD_STALL_TIMEOUT
            )
        )
        self.flush_progress.start()

    async def cog_unload(self) -> None:
        self.flush_progress.cancel()
        if self._downloads is not None:
            await self._downloads.close()
        self._intake_threads.shutdown(wait=False, cancel_futures=True)
        self.bot.remove_dynamic_items(RetryTrainingButton)
        self.bot.tree.remove_command(self.train_menu.name, type=self.train_menu.type)

    # -- the commands --------------------------------------------------------------------------

    @app_commands.command()
    @app_commands.guild_only()
    @app_commands.describe(
        name="A made-up word that will mean you in prompts (3-20 lowercase letters or digits), e.g. abraza",
        subject="What the photos show: person, man, woman, dog, cat... (1-3 words)",
        photo1="A photo of you: face clearly visible, alone in the picture",
        **{f"photo{i}": "Another photo (different place, light, clothes)" for i in range(2, 21)},
    )
    async def train(
        self,
        interaction: discord.Interaction[DreamBot],
        name: app_commands.Range[str, 3, 20],
        subject: app_commands.Range[str, 1, 40],
        photo1: discord.Attachment,
        photo2: discord.Attachment | None = None,
        photo3: discord.Attachment | None = None,
        photo4: discord.Attachment | None = None,
        photo5: discord.Attachment | None = None,
        photo6: discord.Attachment | None = None,
        photo7: discord.Attachment | None = None,
        photo8: discord.Attachment | None = None,
        photo9: discord.Attachment | None = None,
        photo10: discord.Attachment | None = None,
        photo11: discord.Attachment | None = None,
        photo12: discord.Attachment | None = None,
        photo13: discord.Attachment | None = None,
        photo14: discord.Attachment | None = None,
        photo15: discord.Attachment | None = None,
        photo16: discord.Attachment | None = None,
        photo17: discord.Attachment | None = None,
        photo18: discord.Attachment | None = None,
        photo19: discord.Attachment | None = None,
        photo20: discord.Attachment | None = None,
    ) -> None:
        """Teach me what you look like from 5-20 selfies, so /imagine can draw you."""
        photos = [
            photo1, photo2, photo3, photo4, photo5, photo6, photo7, photo8, photo9, photo10,
            photo11, photo12, photo13, photo14, photo15, photo16, photo17, photo18, photo19, photo20,
        ]  # fmt: skip
        await self.start_training(
            interaction, name, subject, [photo for photo in photos if photo is not None]
        )

    @train.autocomplete("subject")
    async def subject_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        typed = normalize_subject(current)
        words = [word for word in CLASS_WORDS if word.startswith(typed)]
        if typed and typed not in words:
            words.insert(0, typed)  # free text stays possible
        return [app_commands.Choice(name=word, value=word) for word in words[:25]]

    async def train_from_message(
        self, interaction: discord.Interaction[DreamBot], message: discord.Message
    ) -> None:
        if message.author.id != interaction.user.id:
            raise UserFacingError(
                "Only your own photos: use this on a message you posted yourself, so nobody trains a "
                "model of someone else."
            )
        attachments = image_attachments(message)
        if not attachments:
            raise UserFacingError(
                "That message has no photos attached. Post your selfies first, then try again."
            )
        await interaction.response.send_modal(TrainModal(self, attachments[:MAX_PHOTO_OPTIONS]))

    # -- one path for both ---------------------------------------------------------------------

    async def start_training(
        self,
        interaction: discord.Interaction,
        name: str,
        subject: str,
        attachments: Sequence[discord.Attachment],
    ) -> None:
        """Check the request and the photos, show the intake report, and queue the training if it passed."""
        if interaction.guild_id is None or interaction.channel_id is None:
            raise UserFacingError("Training works in a server channel, not in DMs.")
        guild_id, user = interaction.guild_id, interaction.user
        token, class_word = normalize_token(name), normalize_subject(subject)
        check_training_request(self.bot.db, self.bot.config, guild_id, user.id, token, class_word)
        self.bot.check_engine_available()
        await interaction.response.defer(ephemeral=True, thinking=True)
        if self.intake_turns.must_wait(user.id):
            await interaction.followup.send(WAITING_TURN_MESSAGE, ephemeral=True)

        job_id = new_job_id()
        folder = photos_dir(self.bot.config, job_id)
        queued = False
        try:
            async with self.intake_turns.turn(user.id):
                report = await self._intake(job_id, attachments, class_word, folder)
            await interaction.followup.send(report.format(), ephemeral=True)
            if not report.ok:
                return
            # Intake took a while: the name or the limits may have changed meanwhile.
            check_training_request(self.bot.db, self.bot.config, guild_id, user.id, token, class_word)
            row = queue_training(
                self.bot.db,
                self.bot.config,
                guild_id=guild_id,
                user_id=user.id,
                user_name=str(user),
                channel_id=interaction.channel_id,
                token=token,
                class_word=class_word,
                job_id=job_id,
                photos=report.prepared,
            )
            queued = True
        finally:
            if not queued:
                await asyncio.to_thread(remove_path, self.bot.config, folder)

        row = await self._post_progress_message(interaction, row)
        self.bot.jobs.submit(row)
        await interaction.followup.send(
            f"**{token}** is {self._queue_place(row)}. I'll keep the progress message in this channel up to date and "
            "post your samples here when it's done (usually a few minutes to half an hour).",
            ephemeral=True,
        )

    async def _intake(
        self, job_id: str, attachments: Sequence[discord.Attachment], class_word: str, folder: Path
    ) -> IntakeReport:
        """Download the photos to disk and check them from there; the accepted ones are written to
        `folder`. The downloads are deleted whatever happens."""
        config = self.bot.config
        max_bytes = config.intake.max_bytes
        incoming = incoming_dir(config, job_id)
        # Files declared too big are never downloaded, and none is read past the limit; they are
        # reported beside the checked ones.
        wanted = [index for index, attachment in enumerate(attachments) if attachment.size <= max_bytes]
        paths = {index: incoming / f"{index:02d}" for index in wanted}
        try:
            await asyncio.to_thread(incoming.mkdir, parents=True)
            complete = await self._download({index: attachments[index] for index in wanted}, paths, max_bytes)
            checked = [index for index in wanted if complete[index]]
            check = functools.partial(
                check_files,
                [paths[index] for index in checked],
                class_word,
                folder,
                config.intake,
                config.training.resolution,
                names=[attachments[index].filename for index in checked],
            )
            report = await asyncio.get_running_loop().run_in_executor(self._intake_threads, check)
        except OSError as error:
            if disk_full_cause(error) is None:
                raise
            log.error(
                "the disk of %s is full: a member's photos could not be saved (%s)", config.data_dir, error
            )
            raise UserFacingError(INTAKE_DISK_FULL_MESSAGE) from error
        finally:
            await asyncio.to_thread(remove_path, config, incoming)
        reasons = {
            index: too_big(attachment.size if attachment.size > max_bytes else None, max_bytes)
            for index, attachment in enumerate(attachments)
            if index not in checked
        }
        _add_too_big(report, attachments, reasons)
        return report

    async def _download(
        self, attachments: Mapping[int, discord.Attachment], paths: Mapping[int, Path], max_bytes: int
    ) -> dict[int, bool]:
        """Stream the attachments to their paths at once; for each, False when it was bigger than
        max_bytes (the rest was not read). Returns once every download has ended."""
        indexes = list(attachments)
        results = await asyncio.gather(
            *(self._save_attachment(attachments[index], paths[index], max_bytes) for index in indexes),
            return_exceptions=True,
        )
        errors = [result for result in results if isinstance(result, BaseException)]
        # A full disk first: it is the admin's to fix, and the member must hear it is not their photos.
        for error in errors:
            if disk_full_cause(error) is not None:
                raise error
        for error in errors:
            if isinstance(error, aiohttp.ClientError | TimeoutError):
                log.warning("downloading a photo failed: %r", error)
                raise UserFacingError(DOWNLOAD_FAILED_MESSAGE) from error
        if errors:
            raise errors[0]
        return {index: result is True for index, result in zip(indexes, results, strict=True)}

    async def _save_attachment(self, attachment: discord.Attachment, path: Path, max_bytes: int) -> bool:
        assert self._downloads is not None
        async with self._downloads.get(attachment.url) as response:
            response.raise_for_status()
            received = 0
            with path.open("wb") as file:
                async for chunk in response.content.iter_chunked(DOWNLOAD_CHUNK):
                    received += len(chunk)
                    if received > max_bytes:
                        return False
                    await asyncio.to_thread(file.write, chunk)
        return True

    async def retry(self, interaction: discord.Interaction[DreamBot], job_id: str) -> None:
        """The Try again button: queue a training that stopped on a full disk again."""
        job = self.bot.db.find_job(job_id)
        if job is None or job.kind != "train":
            raise UserFacingError("That training is gone: run `/train` again.")
        if not can_manage(interaction, job):
            raise UserFacingError(
                "That's not your training: only its owner or a server manager can try it again."
            )
        row = retry_training(self.bot.db, self.bot.config, job)
        # The button has done its work: it goes from the post.
        await interaction.response.edit_message(view=None)
        # Before the engine can take it, so that this never overwrites its first progress.
        await self._edit_progress(row, _progress_text(row, "Waiting in the queue…"), final=False)
        self.bot.jobs.submit(row)
        request = row.request
        assert isinstance(request, TrainJob)
        await interaction.followup.send(
            f"**{request.token}** is back in the queue ({self._queue_place(row)}): it picks up where it stopped.",
            ephemeral=True,
        )

    def _queue_place(self, row: JobRow) -> str:
        position = self.bot.jobs.position(row.id)
        return f"#{position} in the queue" if position else "starting now"

    async def _post_progress_message(self, interaction: discord.Interaction, row: JobRow) -> JobRow:
        # A plain channel message, not the interaction's: a training outlives its 15-minute token.
        channel = interaction.channel
        if not isinstance(channel, discord.abc.Messageable):
            return row
        try:
            message = await channel.send(_progress_text(row, "Waiting in the queue…"))
        except discord.HTTPException:
            log.warning("cannot post the progress message of job %s in channel %s", row.id, row.channel_id)
            return row
        self.bot.record_post(message, row)
        return self.bot.db.update_job(row.id, progress_message_id=message.id)

    # -- the training's life in the channel ------------------------------------------------------

    @commands.Cog.listener()
    async def on_training_accepted(self, job: JobRow, event: Accepted) -> None:
        model = self.bot.db.find_model(job.model_id)
        if model is not None:
            self.bot.db.update_model(model.id, state="training")
        await self._show_progress(job, _progress_text(job, "Starting…"))

    @commands.Cog.listener()
    async def on_training_progress(self, job: JobRow, event: Progress) -> None:
        losses = self._losses.setdefault(job.id, deque(maxlen=LOSS_TREND_EVENTS))
        if event.loss is not None:
            losses.append(event.loss)
        if event.preview is not None:
            # Read now: the training's folder is moved away when it finishes, maybe before the next edit.
            try:
                self._previews[job.id] = await asyncio.to_thread(Path(event.preview).read_bytes)
            except OSError:
                log.warning("the preview of job %s is gone", job.id, exc_info=True)
        status = progress_status(
            event.phase,
            event.step,
            event.total,
            event.eta_seconds,
            losses if event.phase == "training" else (),
        )
        await self._show_progress(job, _progress_text(job, status))

    @commands.Cog.listener()
    async def on_training_finished(self, job: JobRow, event: TrainingDone) -> None:
        # On the loop's thread, like every database write; the photos it removes are small.
        model = finish_training(self.bot.db, self.bot.config, job, event)
        if model is None:
            # Deleted while it trained: whatever the engine wrote since belongs to nobody.
            await self._edit_final(job, "🗑️ The model was deleted.")
            return
        await self._edit_final(job, f"✅ Done in {format_duration(event.seconds)}, {event.steps} steps.")
        samples = model.samples
        await self._tell_member(
            job,
            f"<@{job.user_id}> your model **{model.token}** is ready! "
            f"Here {'is a sample' if len(samples) == 1 else f'are {len(samples)} samples'}.\n"
            f"Try it: `/imagine {model.token} as a viking`\n"
            f"Only you can use it for now; `/model share {model.token} on` lets others in this server use it too.",
            [Path(sample) for sample in samples],
        )

    @commands.Cog.listener()
    async def on_training_failed(self, job: JobRow, event: Error) -> None:
        model = end_training(self.bot.db, self.bot.config, job, event)
        if model is None:
            await self._edit_final(job, "⏹️ Cancelled.")
            return
        if event.code == "disk_full":
            log.warning(
                "training %s (%s) stopped on a full disk: its photos and checkpoints are kept for Try again",
                job.id,
                model.token,
            )
            await self._edit_final(job, f"⏸️ Stopped: {event.message}.")
            retry = discord.ui.View(timeout=None)
            retry.add_item(RetryTrainingButton(job.id))
            await self._tell_member(
                job,
                f"<@{job.user_id}> training **{model.token}** stopped: {event.message}. Your photos and "
                "the steps done so far are kept: once there is room again, press **Try again** (you or a "
                "server manager) and it picks up where it stopped.",
                view=retry,
            )
            return
        await self._edit_final(job, f"❌ Failed: {event.message}")
        await self._tell_member(
            job,
            f"<@{job.user_id}> training **{model.token}** failed: {event.message}\n"
            f"You can run `/train` again with the same name.",
        )

    async def _show_progress(self, job: JobRow, text: str) -> None:
        if time.monotonic() - self._last_edit.get(job.id, 0.0) >= PROGRESS_EDIT_INTERVAL:
            await self._edit_progress(job, text, final=False)
        else:
            self._pending[job.id] = (job, text)

    async def _edit_final(self, job: JobRow, status: str) -> None:
        # The final state is always shown, however recent the last edit was.
        await self._edit_progress(job, _progress_text(job, status), final=True)

    async def _edit_progress(self, job: JobRow, text: str, *, final: bool) -> None:
        lock = self._edit_locks.setdefault(job.id, asyncio.Lock())
        async with lock:
            if not final and _finished(self.bot.db.find_job(job.id)):
                return  # a late progress edit must not overwrite the final state
            if final:
                self._pending.pop(job.id, None)
                self._last_edit.pop(job.id, None)
                self._losses.pop(job.id, None)
                self._edit_locks.pop(job.id, None)
            else:
                self._last_edit[job.id] = time.monotonic()
            # The preview rides on the next edit (the final one too, if it came late): no extra edit.
            preview = self._previews.pop(job.id, None)
            if job.progress_message_id is None:
                return
            channel = self.bot.get_partial_messageable(job.channel_id, guild_id=job.guild_id)
            extra: dict[str, Any] = {}
            if preview is not None:
                extra["attachments"] = [discord.File(io.BytesIO(preview), PREVIEW_NAME)]
            try:
                await channel.get_partial_message(job.progress_message_id).edit(content=text, **extra)
            except discord.HTTPException as error:
                log.warning("cannot edit the progress message of job %s: %s", job.id, error)

    @tasks.loop(seconds=1.0)
    async def flush_progress(self) -> None:
        now = time.monotonic()
        for job_id, (job, text) in list(self._pending.items()):
            if now - self._last_edit.get(job_id, 0.0) >= PROGRESS_EDIT_INTERVAL:
                del self._pending[job_id]
                await self._edit_progress(job, text, final=False)

    async def _tell_member(
        self, job: JobRow, content: str, files: Sequence[Path] = (), view: discord.ui.View | None = None
    ) -> None:
        """Post in the job's channel, pinging only the member; by DM when the channel refuses. The
        first message carries `view`.

        Every message sent is recorded as a post about the job, for /forget and /model delete."""
        guild = self.bot.get_guild(job.guild_id)
        limit = guild.filesize_limit if guild is not None else DEFAULT_UPLOAD_LIMIT
        existing = [path for path in files if path.is_file()]
        mention = only_mentions(job.user_id)
        channel = self.bot.get_partial_messageable(job.channel_id, guild_id=job.guild_id)
        record = functools.partial(self.bot.record_post, job=job)
        try:
            await _send_with_files(
                channel, content, existing, f"sample-{job.id}", limit, mention, record, view
            )
            return
        except discord.HTTPException as error:
            log.warning("cannot post job %s's outcome in channel %s: %s", job.id, job.channel_id, error)
        try:
            user = self.bot.get_user(job.user_id) or await self.bot.fetch_user(job.user_id)
            await _send_with_files(
                user, content, existing, f"sample-{job.id}", DEFAULT_UPLOAD_LIMIT, mention, record, view
            )
        except discord.HTTPException as error:
            log.warning("cannot tell user %s about job %s: %s", job.user_id, job.id, error)

    def _sweep_photos(self) -> None:
        """Remove what a crash left behind: downloads that intake never finished with, and prepared
        photos with no job row, or a finished job's (unless kept, or awaiting a retry)."""
        root = self.bot.config.data_dir.resolve()
        for folder in _subfolders(root / "incoming"):
            remove_path(self.bot.config, folder)
        for folder in _subfolders(root / "photos"):
            job = self.bot.db.find_job(folder.name)
            kept = job is not None and (
                job.state in ACTIVE_JOB_STATES
                or self.bot.config.storage.keep_photos
                or awaits_retry(self.bot.db, job)
            )
            if not kept:
                remove_path(self.bot.config, folder)


def _subfolders(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.is_dir() else []


def _progress_text(job: JobRow, status: str) -> str:
    request = job.request
    assert isinstance(request, TrainJob)
    header = progress_header(request.token, request.class_word, job.user_id, len(request.photos))
    return f"{header}\n{status}"


def _finished(job: JobRow | None) -> bool:
    return job is None or job.state not in ACTIVE_JOB_STATES


def _add_too_big(
    report: IntakeReport, attachments: Sequence[discord.Attachment], reasons: Mapping[int, str]
) -> None:
    """Put the photos too big to check (index -> reason) into the report, in the order the member sent them."""
    for index in sorted(reasons):
        report.photos.insert(index, PhotoVerdict(attachments[index].filename, False, reasons[index]))


async def _send_with_files(
    destination: discord.abc.Messageable,
    content: str,
    paths: Sequence[Path],
    stem: str,
    size_limit: int,
    allowed_mentions: discord.AllowedMentions,
    on_sent: Callable[[discord.Message], None],
    view: discord.ui.View | None = None,
) -> None:
    """Send `content` (and `view`) with the pictures, in as many messages as the size limit needs;
    `on_sent` hears of each message as it is sent (a later one may fail)."""
    batches = await asyncio.to_thread(image_files, paths, stem, size_limit) if paths else [[]]
    for index, batch in enumerate(batches):
        extra: dict[str, Any] = {"files": batch} if batch else {}
        if index == 0 and view is not None:
            extra["view"] = view
        message = await destination.send(
            content if index == 0 else None, allowed_mentions=allowed_mentions, **extra
        )
        on_sent(message)


async def setup(bot: DreamBot) -> None:
    await bot.add_cog(Training(bot))

"""A member's models and jobs: /models, /model delete|share|export, /queue with cancel buttons, /forget, /help.

The Cancel buttons are dynamic items: their custom_id carries the job id, so a button keeps working
after the bot restarts, with no view kept in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.bot import DreamBot, UserFacingError, reply_privately, report_error
from bot.cogs.training import normalize_token
from bot.db import ACTIVE_JOB_STATES, JobRow, ModelRow, PostRow
from bot.storage import adapter_dir, generation_dir, photos_dir, remove_paths
from bot.uploads import DEFAULT_UPLOAD_LIMIT
from engine.protocol import GenerateJob, ProtocolError, decode

log = logging.getLogger(__name__)

CANCEL_TEMPLATE = r"dreambot:cancel:(?P<job_id>[0-9a-f]+)"
# A running job stops at its next step; deleting its files before then would race the engine.
CANCEL_WAIT_SECONDS = 30.0
CONFIRM_TIMEOUT = 60.0
MAX_BUTTONS = 25
STATE_ICONS = {"queued": "⏳", "training": "🏋️", "ready": "✅", "failed": "❌"}

HELP_TEXT = """\
**How it works**
1. `/train` with 5-20 selfies and a made-up name, e.g. `abraza`. I check every photo first and tell \
you which ones I can't use and why; nothing is queued until the set is good.
2. The training runs on the GPU (minutes to half an hour). A progress message in the channel keeps \
you posted, and I post a few samples when it's done.
3. `/imagine abraza as a viking` draws you anywhere.

**Commands**
`/train` · or right-click your own message with photos → Apps → **Train on these photos**
`/models` your models · `/model share` let others use one (off by default) · \
`/model export` the LoRA file by DM · `/model delete`
`/queue` your waiting and running jobs, with Cancel buttons
`/forget` delete everything I keep about you: your photos, models and pictures, the pictures \
others made with your models, every message I posted about them, and every record of you

**Tips for good photos**
• Just you, face clearly visible, no sunglasses; a mix of close-ups and head-and-shoulders.
• Different places, light and clothes: what the photos share, the model learns as part of you.
• Sharp, well-lit, at least 720 px on the short side; no filters, no group shots.
• The name should be a made-up word: a real word already means something to the model.\
"""


# -- jobs ----------------------------------------------------------------------------------------


def describe_job(job: JobRow) -> str:
    if job.kind == "train":
        return f"training **{job.context.get('token', '?')}**"
    try:
        request = decode(job.payload)
    except ProtocolError:
        return "image"
    prompt = request.prompt if isinstance(request, GenerateJob) else ""
    prompt = discord.utils.escape_markdown(prompt if len(prompt) <= 60 else prompt[:59] + "…")
    return f"image “{prompt}”"


def job_line(bot: DreamBot, job: JobRow, number: int, *, with_member: bool = False) -> str:
    if job.state == "running":
        where = "running now"
    else:
        position = bot.jobs.position(job.id)
        where = f"#{position} in the queue" if position else "waiting"
    member = f"<@{job.user_id}> · " if with_member else ""
    return (
        f"{number}. {member}{describe_job(job)} — {where} · <#{job.channel_id}> · "
        f"since <t:{int(job.created_at)}:R> · `{job.id}`"
    )


def jobs_message(
    bot: DreamBot, jobs: list[JobRow], *, with_member: bool = False
) -> tuple[str, discord.ui.View]:
    """A numbered list of jobs and a view with one Cancel button per job (at most 25)."""
    shown = jobs[:MAX_BUTTONS]
    lines = [job_line(bot, job, number, with_member=with_member) for number, job in enumerate(shown, start=1)]
    if len(jobs) > len(shown):
        lines.append(f"… and {len(jobs) - len(shown)} more")
    view = discord.ui.View(timeout=None)
    for number, job in enumerate(shown, start=1):
        view.add_item(CancelJobButton(job.id, label=f"Cancel {number}"))
    return "\n".join(lines), view


async def cancel_job(bot: DreamBot, job: JobRow, by: discord.abc.User) -> bool:
    """Cancel a job; its member hears about it in the job's channel when someone else cancelled it."""
    if not await bot.jobs.cancel(job.id):
        return False
    if by.id != job.user_id:
        channel = bot.get_partial_messageable(job.channel_id, guild_id=job.guild_id)
        try:
            notice = await channel.send(
                f"<@{job.user_id}> a server manager cancelled your {describe_job(job)}.",
                allowed_mentions=discord.AllowedMentions(users=[discord.Object(id=job.user_id)]),
            )
            bot.record_post(notice, job)
        except discord.HTTPException as error:
            log.warning("cannot tell user %s that job %s was cancelled: %s", job.user_id, job.id, error)
    return True


async def wait_until_finished(
    bot: DreamBot, job_ids: Iterable[str], timeout: float = CANCEL_WAIT_SECONDS
) -> None:
    """Wait (up to `timeout`) until none of the jobs is queued or running any more."""
    pending = set(job_ids)
    async with asyncio.timeout(timeout):
        while pending:
            pending = {
                job_id
                for job_id in pending
                if (job := bot.db.find_job(job_id)) is not None and job.state in ACTIVE_JOB_STATES
            }
            if pending:
                await asyncio.sleep(0.2)


def can_manage(interaction: discord.Interaction, job: JobRow) -> bool:
    """The member who owns the job, or a server manager of the job's server."""
    if job.user_id == interaction.user.id:
        return True
    return job.guild_id == interaction.guild_id and interaction.permissions.manage_guild


class CancelJobButton(discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]], template=CANCEL_TEMPLATE):
    def __init__(self, job_id: str, *, label: str = "Cancel") -> None:
        super().__init__(
            discord.ui.Button(
                label=label, style=discord.ButtonStyle.danger, custom_id=f"dreambot:cancel:{job_id}"
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
    ) -> CancelJobButton:
        return cls(match["job_id"])

    async def callback(self, interaction: discord.Interaction[DreamBot]) -> None:
        try:
            bot = interaction.client
            job = bot.db.find_job(self.job_id)
            if job is None or job.state not in ACTIVE_JOB_STATES:
                raise UserFacingError("That job has already finished.")
            if not can_manage(interaction, job):
                raise UserFacingError(
                    "That's not your job: only its owner or a server manager can cancel it."
                )
            if not await cancel_job(bot, job, interaction.user):
                raise UserFacingError("That job has already finished.")
            await reply_privately(interaction, f"Cancelled: {describe_job(job)}.")
        except Exception as error:
            await report_error(interaction, error)


# -- confirmation ----------------------------------------------------------------------------------


class ConfirmView(discord.ui.View):
    """Two buttons for the member who ran the command; `confirmed` is None when nobody answered."""

    def __init__(self, owner_id: int, confirm_label: str) -> None:
        super().__init__(timeout=CONFIRM_TIMEOUT)
        self.owner_id = owner_id
        self.confirmed: bool | None = None
        self.confirm.label = confirm_label

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id != self.owner_id:
            await reply_privately(interaction, "This question isn't for you.")
            return False
        return True

    @discord.ui.button(label="Delete", style=discord.ButtonStyle.danger)
    async def confirm(self, interaction: discord.Interaction, button: discord.ui.Button[ConfirmView]) -> None:
        await self._answer(interaction, True)

    @discord.ui.button(label="Keep it", style=discord.ButtonStyle.secondary)
    async def keep(self, interaction: discord.Interaction, button: discord.ui.Button[ConfirmView]) -> None:
        await self._answer(interaction, False)

    async def _answer(self, interaction: discord.Interaction, confirmed: bool) -> None:
        self.confirmed = confirmed
        # The command goes on from view.wait() and edits the message itself.
        await interaction.response.defer()
        self.stop()


async def confirm(interaction: discord.Interaction, question: str, confirm_label: str) -> bool:
    """Ask the member, ephemerally; True when they pressed the confirm button within the timeout."""
    view = ConfirmView(interaction.user.id, confirm_label)
    await interaction.response.send_message(question, view=view, ephemeral=True)
    await view.wait()
    if view.confirmed:
        await interaction.edit_original_response(content="Working on it…", view=None)
        return True
    answer = "Timed out: nothing was deleted." if view.confirmed is None else "Kept: nothing was deleted."
    await interaction.edit_original_response(content=answer, view=None)
    return False


# -- the cog ---------------------------------------------------------------------------------------


class Models(commands.Cog):
    model = app_commands.Group(
        name="model", description="Manage one of your trained models.", guild_only=True
    )

    def __init__(self, bot: DreamBot) -> None:
        self.bot = bot

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(CancelJobButton)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(CancelJobButton)

    def _own_model(self, interaction: discord.Interaction, name: str) -> ModelRow:
        assert interaction.guild_id is not None
        token = normalize_token(name)
        model = self.bot.db.model_by_token(interaction.guild_id, token)
        # Someone else's model is reported the same as a missing one: names are not probed this way.
        if model is None or model.owner_id != interaction.user.id:
            shown = discord.utils.escape_markdown(token[:40])
            raise UserFacingError(f"You have no model called **{shown}** in this server. See `/models`.")
        return model

    async def model_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        if interaction.guild_id is None:
            return []
        typed = normalize_token(current)
        models = self.bot.db.models_of(interaction.user.id, interaction.guild_id)
        return [
            app_commands.Choice(name=f"{model.token} ({model.state})", value=model.token)
            for model in models
            if model.token.startswith(typed)
        ][:25]

    @app_commands.command(name="models")
    @app_commands.guild_only()
    async def list_models(self, interaction: discord.Interaction[DreamBot]) -> None:
        """Your trained models in this server."""
        assert interaction.guild_id is not None
        models = self.bot.db.models_of(interaction.user.id, interaction.guild_id)
        if not models:
            await interaction.response.send_message(
                "You have no models here yet. Start with `/train` (see `/help` for tips).", ephemeral=True
            )
            return
        max_models = self.bot.member_limits(interaction.guild_id).max_models
        lines = [f"**Your models** ({len(models)}, the limit is {max_models}):"]
        lines.extend(_model_line(model) for model in models)
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    @model.command(name="delete")
    @app_commands.describe(name="The model's name")
    @app_commands.autocomplete(name=model_autocomplete)
    async def delete_model(self, interaction: discord.Interaction[DreamBot], name: str) -> None:
        """Delete one of your models: the trained file, its samples and any training still running."""
        model = self._own_model(interaction, name)
        running = [job for job in self.bot.db.active_jobs(interaction.user.id) if job.model_id == model.id]
        # Read first: the cancellation deletes the model row, which unlinks its posts.
        posts = self.bot.db.posts_of_model(model.id)
        question = f"Delete **{model.token}** for good?" + (
            " Its training will be cancelled." if running else " Pictures already made stay."
        )
        if not await confirm(interaction, question, "Delete"):
            return
        for job in running:
            await self.bot.jobs.cancel(job.id)
        with contextlib.suppress(TimeoutError):  # what did not stop in time is deleted anyway
            await wait_until_finished(self.bot, [job.id for job in running])
        # The cancellation may have removed the row already (see the training cog); the rest is ours.
        if self.bot.db.find_model(model.id) is not None:
            self.bot.db.delete_model(model.id)
        paths = [adapter_dir(self.bot.config, model.guild_id, model.token), *model.samples]
        if model.adapter_path:
            paths.append(model.adapter_path)
        paths.extend(photos_dir(self.bot.config, job.id) for job in running)
        await asyncio.to_thread(remove_paths, self.bot.config, paths)
        refused = await self._take_down(posts)
        await interaction.edit_original_response(
            content=f"Deleted **{model.token}**, its samples and its training messages.{_refusal(refused)}"
        )

    @model.command(name="share")
    @app_commands.describe(
        name="The model's name", state="on: anyone here may use it in /imagine; off: only you"
    )
    @app_commands.autocomplete(name=model_autocomplete)
    async def share_model(
        self, interaction: discord.Interaction[DreamBot], name: str, state: Literal["on", "off"]
    ) -> None:
        """Let others in this server use your model in /imagine, or stop them (off by default)."""
        model = self._own_model(interaction, name)
        self.bot.db.update_model(model.id, shared=state == "on")
        if state == "on":
            message = f"**{model.token}** is shared: anyone in this server can use it in `/imagine` now."
        else:
            message = (
                f"**{model.token}** is private: only you can use it. "
                "Nobody else renders your face unless you say so."
            )
        await interaction.response.send_message(message, ephemeral=True)

    @model.command(name="export")
    @app_commands.describe(name="The model's name")
    @app_commands.autocomplete(name=model_autocomplete)
    async def export_model(self, interaction: discord.Interaction[DreamBot], name: str) -> None:
        """Get your model's LoRA file by DM, to use in other Stable Diffusion tools."""
        model = self._own_model(interaction, name)
        if model.state != "ready" or not model.adapter_path:
            raise UserFacingError(
                f"**{model.token}** isn't trained yet ({model.state}), so there is nothing to export."
            )
        path = Path(model.adapter_path)
        if not path.is_file():
            raise UserFacingError(
                f"The file of **{model.token}** is missing on my side. Train it again to export it."
            )
        size = path.stat().st_size
        if size > DEFAULT_UPLOAD_LIMIT:
            raise UserFacingError(
                f"The file of **{model.token}** is {size / 2**20:.1f} MB, more than Discord lets me send in a DM."
            )
        await interaction.response.defer(ephemeral=True, thinking=True)
        base = model.metadata.get("base_model") or self.bot.config.model.base
        filename = f"{model.token}.safetensors"
        try:
            await interaction.user.send(
                f"Here is **{model.token}**, your LoRA for Stable Diffusion (trained on `{base}`; it works with "
                "that base model and close relatives).\n"
                f"• ComfyUI: put `{filename}` in `models/loras` and add a LoRA loader.\n"
                f"• AUTOMATIC1111 / Forge: put it in `models/Lora` and add `<lora:{model.token}:0.8>` to the prompt.\n"
                f"• diffusers: `pipe.load_lora_weights('{filename}')`.\n"
                f"In every tool, name yourself in the prompt as `{model.token} {model.class_word}`.",
                file=discord.File(path, filename=filename),
            )
        except discord.Forbidden:
            raise UserFacingError(
                "I couldn't DM you: your direct messages are closed. Allow DMs from server members "
                "(Privacy Settings of this server), then try again."
            ) from None
        await interaction.followup.send(f"Sent **{model.token}** to you by DM.", ephemeral=True)

    @app_commands.command(name="queue")
    @app_commands.guild_only()
    async def queue(self, interaction: discord.Interaction[DreamBot]) -> None:
        """Your waiting and running jobs, with a button to cancel each."""
        jobs = self.bot.db.active_jobs(interaction.user.id)
        if not jobs:
            await interaction.response.send_message("You have nothing waiting or running.", ephemeral=True)
            return
        text, view = jobs_message(self.bot, jobs)
        await interaction.response.send_message(f"**Your jobs**\n{text}", view=view, ephemeral=True)

    @app_commands.command(name="forget")
    async def forget(self, interaction: discord.Interaction[DreamBot]) -> None:
        """Delete everything I keep about you: photos, models, pictures, my messages and your records."""
        question = (
            "Delete **everything** I keep about you, in every server: your training photos, models and "
            "pictures, the pictures others made with your models, my messages about them, and every "
            "record of you? Running jobs are cancelled. This cannot be undone."
        )
        if not await confirm(interaction, question, "Delete everything"):
            return
        db, user_id = self.bot.db, interaction.user.id
        # Read first: a cancelled training's model row is deleted as the cancellation lands.
        models = db.models_of(user_id)
        active = [job for job in db.jobs_to_forget(user_id) if job.state in ACTIVE_JOB_STATES]
        for job in active:
            await self.bot.jobs.cancel(job.id)
        with contextlib.suppress(TimeoutError):  # what did not stop in time is deleted anyway
            await wait_until_finished(self.bot, [job.id for job in active])

        jobs = db.jobs_to_forget(user_id)
        generations = db.generations_to_forget(user_id)
        refused = await self._take_down(db.posts_to_forget(user_id))
        for generation in generations:
            refused += await self.bot.delete_generation_posts(generation)
        config = self.bot.config
        paths: list[str | Path] = [adapter_dir(config, model.guild_id, model.token) for model in models]
        for job in jobs:
            paths.append(
                photos_dir(config, job.id) if job.kind == "train" else generation_dir(config, job.id)
            )
        paths.extend(db.forget_user(user_id))
        files = await asyncio.to_thread(remove_paths, config, paths)
        await interaction.edit_original_response(
            content=(
                f"Done. I deleted {_count(len(models), 'model')}, {_count(len(jobs), 'job')}, "
                f"{_count(len(generations), 'picture')} (their posts and gallery copies too) and "
                f"{_count(files, 'file')} (photos, model weights, samples and pictures), and took down my "
                "messages about your trainings and images. Nothing of yours is left in my records"
                + (f".{_refusal(refused)}" if refused else " or in the channels.")
            )
        )

    async def _take_down(self, posts: list[PostRow]) -> list[discord.PartialMessage]:
        """Delete recorded posts and forget them, refused ones too (the member hears of those)."""
        refused = await self.bot.take_down(
            self.bot.get_partial_messageable(post.channel_id, guild_id=post.guild_id).get_partial_message(
                post.message_id
            )
            for post in posts
        )
        self.bot.db.delete_posts([post.message_id for post in posts])
        return refused

    @app_commands.command(name="help")
    async def help(self, interaction: discord.Interaction[DreamBot]) -> None:
        """How this bot works, its commands, and tips for good training photos."""
        embed = discord.Embed(
            title="DreamBot: teach me your face, then imagine yourself anywhere", description=HELP_TEXT
        )
        await interaction.response.send_message(embed=embed, ephemeral=True)


def _model_line(model: ModelRow) -> str:
    facts = [model.state, f"shared: {'on' if model.shared else 'off'}"]
    if model.metadata.get("steps"):
        facts.append(f"{model.metadata['steps']} steps")
    if model.metadata.get("photos"):
        facts.append(_count(model.metadata["photos"], "photo"))
    facts.append(f"created <t:{int(model.created_at)}:R>")
    line = f"{STATE_ICONS.get(model.state, '•')} **{model.token}** ({model.class_word}): {' · '.join(facts)}"
    if model.state == "failed" and model.error:
        line += f"\n  ↳ {model.error}"
    return line


def _refusal(refused: list[discord.PartialMessage]) -> str:
    """A line naming the messages Discord refused to delete, or '' when there are none."""
    if not refused:
        return ""
    one = len(refused) == 1
    links = " ".join(message.jump_url for message in refused)
    return (
        f"\n⚠️ Discord didn't let me delete {_count(len(refused), 'message')} of mine, as I can no longer "
        f"see {'its' if one else 'their'} channel: {links}\nAsk a server manager to delete "
        f"{'it' if one else 'them'}."
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' * (number != 1)}"


async def setup(bot: DreamBot) -> None:
    await bot.add_cog(Models(bot))

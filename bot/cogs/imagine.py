"""/imagine and the buttons under every generated image.

A request goes: checks (channel, safety, whose models, the member's queue cap) -> defer -> the job row
-> "queued" -> the engine. When the result comes back the generation row is written and posted with
buttons (Reroll, Use prompt, Info, Delete, V1..V4, U1..U4, and the prompt book's Save prompt). The
buttons are `DynamicItem`s whose custom_id
carries the generation id, so they keep working after a restart: every click reads the row again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import math
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import discord
from discord import app_commands
from discord.ext import commands
from PIL import Image

from bot.bot import DreamBot, reports_errors
from bot.consent import generation_refusal
from bot.db import GenerationRow, JobRow, ModelRow
from bot.pnginfo import Parameters, parse_a1111
from bot.prompts import MAX_COMMAND_STEPS
from bot.service import (
    ImageRequest,
    UserFacingError,
    check_generation_request,
    end_generation,
    fill_template,
    finish_generation,
    image_request,
    queue_generation,
)
from bot.storage import generation_dir
from bot.templates import template_form
from bot.views import (
    GRID_FILE,
    SavePromptButton,
    confirm,
    ensure_may_show,
    generation_embed,
    image_upload,
    is_age_restricted,
    only_mentions,
    picture_info_embed,
)
from engine.contract.protocol import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_SEED,
    Accepted,
    Error,
    GenerationDone,
    Progress,
)

log = logging.getLogger(__name__)

# Interaction tokens live 15 minutes; past 14 the result goes to the channel instead.
INTERACTION_LIFETIME = 14 * 60
# The least time between two preview edits of one message, whatever rate the engine sends them at.
PREVIEW_EDIT_INTERVAL = 2.0
PREVIEW_NAME = "preview.jpg"


# -- pure helpers ------------------------------------------------------------------------------


def make_grid(paths: Sequence[Path], target: Path) -> Path:
    """The images two a row, in order, in cells the size of the first one (black where none); a PNG."""
    images = [Image.open(path) for path in paths]
    try:
        cell_width, cell_height = images[0].size
        columns = min(2, len(images))
        rows = math.ceil(len(images) / columns)
        sheet = Image.new("RGB", (cell_width * columns, cell_height * rows))
        for index, image in enumerate(images):
            cell = image.convert("RGB").resize((cell_width, cell_height))
            sheet.paste(cell, ((index % columns) * cell_width, (index // columns) * cell_height))
    finally:
        for image in images:
            image.close()
    sheet.save(target, format="PNG")
    return target


def base_size(row: GenerationRow) -> tuple[int, int]:
    """The txt2img size behind a generation (an upscale is twice its source)."""
    if row.kind == "upscale":
        return row.width // 2, row.height // 2
    return row.width, row.height


def generation_parameters(row: GenerationRow) -> Parameters:
    """What the PNGs of a generation say about it; one Seed field lists the seed of each picture."""
    if not row.parameters:
        raise UserFacingError("That picture was made before I kept its parameters, so I have none to show.")
    parameters = parse_a1111(row.parameters[0])
    if len(row.parameters) == 1:
        return parameters
    seeds = [parse_a1111(text).settings.get("Seed", "?") for text in row.parameters]
    return dataclasses.replace(parameters, settings={**parameters.settings, "Seed": ", ".join(seeds)})


# -- the cog -------------------------------------------------------------------------------------


@dataclass
class _Waiting:
    """An interaction that may still deliver its job's outcome itself (kept in memory only)."""

    interaction: discord.Interaction
    deadline: float
    # Held while its message is edited, so that "queued", "drawing" and the result land in order
    # (listeners run as concurrent tasks); once finished, no late status edit overwrites the result.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    finished: bool = False
    # When its message last got a preview: one edit with an upload every PREVIEW_EDIT_INTERVAL at most.
    previewed_at: float = float("-inf")

    def usable(self) -> bool:
        return time.monotonic() < self.deadline


# -- the cog -----------------------------------------------------------------------------------


class Imagine(commands.Cog):
    def __init__(self, bot: DreamBot) -> None:
        self.bot = bot
        # job id -> the interaction that asked; lost on restart, when results go to the channel.
        self._waiting: dict[str, _Waiting] = {}

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(*BUTTONS)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(*BUTTONS)

    @app_commands.command()
    @app_commands.guild_only()
    @app_commands.describe(
        prompt="What to draw; a member's token (“abraza as thor”) or [me] (your own model) draws them",
        negative="What to keep out of the picture (your /settings one when empty)",
        seed="The same seed and prompt give the same picture (random when empty)",
        count="How many pictures (1-4; your /settings count when empty)",
        aspect="The picture's shape (your /settings aspect when empty)",
        steps="Denoising steps: more is slower and finer",
        guidance="How closely to follow the prompt",
    )
    async def imagine(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, 1000],
        negative: app_commands.Range[str, 1, 1000] | None = None,
        seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
        count: app_commands.Range[int, 1, MAX_IMAGES] | None = None,
        aspect: Literal["square", "portrait", "landscape"] | None = None,
        steps: app_commands.Range[int, 1, MAX_COMMAND_STEPS] | None = None,
        guidance: app_commands.Range[float, 0.0, MAX_GUIDANCE] | None = None,
    ) -> None:
        """Imagine a picture; a member's token, or [me] for your own model, puts them in it."""
        request = image_request(
            self.bot.config,
            prompt,
            # What she leaves out comes from her /settings, then from the server's config.
            settings=self.bot.db.member_settings(interaction.user.id),
            negative=negative,
            aspect=aspect,
            seed=seed,
            count=count,
            steps=steps,
            guidance=guidance,
        )
        await self.queue(interaction, request, redirect=False)

    # -- queueing ------------------------------------------------------------------------------

    async def queue(self, interaction: discord.Interaction, request: ImageRequest, *, redirect: bool) -> None:
        """Check, defer, write the job row, tell the member, then hand the job to the queue.

        Without `redirect` a request from outside the prompts channel is refused with a pointer;
        with it (buttons, the prompt modal) the result is posted in the prompts channel instead.
        """
        guild, user = interaction.guild, interaction.user
        if guild is None:
            raise UserFacingError("Images are made in servers, not in direct messages.")
        channel = self.channel_for(interaction, redirect=redirect)
        self.bot.check_engine_available()
        db, config = self.bot.db, self.bot.config
        # [SUBJECT] is whoever asks: on someone else's picture, the clicker's own model.
        request = fill_template(db, guild.id, user.id, request)
        # Checked and written with no await between, so two quick requests cannot both pass the cap.
        adapters = check_generation_request(
            db, config, guild.id, user.id, request, nsfw_allowed=channel.is_nsfw()
        )
        job = queue_generation(
            db,
            config,
            guild_id=guild.id,
            user_id=user.id,
            user_name=user.name,
            channel_id=channel.id,
            age_restricted=is_age_restricted(channel),
            request=request,
            adapters=adapters,
        )
        here = channel.id == interaction.channel_id
        if not interaction.response.is_done():
            await interaction.response.defer(thinking=True, ephemeral=not here)
        position = self.bot.jobs.position(job.id) or 1
        status = f"⏳ Queued {_describe(request)}" + (
            f" ({position - 1} ahead of you)." if position > 1 else "."
        )
        try:
            if here:
                waiting = self._waiting[job.id] = _Waiting(
                    interaction, time.monotonic() + INTERACTION_LIFETIME
                )
                async with waiting.lock:
                    message = await interaction.edit_original_response(content=status)
                    self.bot.db.update_job(job.id, progress_message_id=message.id)
                    # It ends as the picture or as the reason there is none: either is about her job.
                    self.bot.record_post(message, job)
            else:
                await interaction.followup.send(
                    f"{status} The result will be posted in {channel.mention}.", ephemeral=True
                )
        except discord.HTTPException:
            log.warning("could not tell %s that job %s is queued", user.id, job.id, exc_info=True)
        finally:
            # The row is the truth: the job runs even if telling the member failed.
            self.bot.jobs.submit(job)

    def channel_for(
        self, interaction: discord.Interaction, *, redirect: bool
    ) -> discord.TextChannel | discord.Thread:
        """The channel a picture asked for in this interaction is posted in (see queue)."""
        channel = interaction.channel
        prompts = self.bot.prompts_channel(interaction.guild)
        in_prompts = prompts is None or (
            channel is not None and prompts.id in (channel.id, getattr(channel, "parent_id", None))
        )
        if in_prompts and isinstance(channel, discord.TextChannel | discord.Thread):
            return channel
        if prompts is not None and redirect:
            return prompts
        where = prompts.mention if prompts is not None else "a server text channel"
        raise UserFacingError(f"Images are made in {where}: please use /imagine there.")

    # -- job events ----------------------------------------------------------------------------

    @commands.Cog.listener()
    async def on_generation_accepted(self, job: JobRow, event: Accepted) -> None:
        waiting = self._waiting.get(job.id)
        if waiting is None:
            return
        async with waiting.lock:
            if waiting.finished or not waiting.usable():
                return
            try:
                await waiting.interaction.edit_original_response(content="🎨 Drawing…")
            except discord.HTTPException:
                log.debug("could not show job %s as started", job.id, exc_info=True)

    @commands.Cog.listener()
    async def on_generation_progress(self, job: JobRow, event: Progress) -> None:
        """Show the engine's preview of the picture so far on the waiting message."""
        waiting = self._waiting.get(job.id)
        if waiting is None or event.preview is None:
            return
        async with waiting.lock:
            # Discord allows a few edits a second per message; an upload every 2 s is plenty to watch.
            if (
                waiting.finished
                or not waiting.usable()
                or time.monotonic() - waiting.previewed_at < PREVIEW_EDIT_INTERVAL
            ):
                return
            try:
                preview = await asyncio.to_thread(Path(event.preview).read_bytes)
            except OSError:
                log.debug("the preview of job %s is gone", job.id, exc_info=True)
                return
            waiting.previewed_at = time.monotonic()
            try:
                await waiting.interaction.edit_original_response(
                    content=f"🎨 step {event.step}/{event.total}",
                    attachments=[discord.File(io.BytesIO(preview), PREVIEW_NAME)],
                )
            except discord.HTTPException:
                log.debug("could not show job %s's preview", job.id, exc_info=True)

    @contextlib.asynccontextmanager
    async def _finishing(self, job_id: str) -> AsyncIterator[_Waiting | None]:
        """The job's waiting interaction (if any), held for the final edit and then forgotten."""
        waiting = self._waiting.pop(job_id, None)
        if waiting is None:
            yield None
            return
        async with waiting.lock:
            waiting.finished = True
            yield waiting

    @commands.Cog.listener()
    async def on_generation_finished(self, job: JobRow, event: GenerationDone) -> None:
        async with self._finishing(job.id) as waiting:
            await self._deliver_result(job, event, waiting)

    async def _deliver_result(self, job: JobRow, event: GenerationDone, waiting: _Waiting | None) -> None:
        # On the loop's thread, like every database write; it deletes a few files at most.
        finished = finish_generation(self.bot.db, self.bot.config, job, event)
        row, hidden = finished.row, finished.hidden
        if row is None:
            await self._tell(
                job,
                waiting,
                f"<@{job.user_id}> the safety checker flagged {_pictures(hidden)} as NSFW, so I didn't post "
                "anything. Please try a different prompt.",
            )
            return
        if len(row.files) > 1:
            # Encoding a 2x2 grid of full-size images takes a moment: off the event loop.
            grid = generation_dir(self.bot.config, job.id) / GRID_FILE
            await asyncio.to_thread(make_grid, [Path(path) for path in row.files], grid)
        # Its model's owner may have withdrawn it while the queue told this cog and the grid was made.
        if (refusal := generation_refusal(self.bot.db, job)) is not None:
            self.bot.db.delete_generation(row.id)
            end_generation(self.bot.config, job)
            await self._tell(job, waiting, f"<@{job.user_id}> I couldn't make your image: {refusal}")
            return
        note = f" (the safety checker hid {_pictures(hidden)} flagged as NSFW)" if hidden else ""
        message = await self._post(job, waiting, row, note)
        if message is not None:
            row = self.bot.db.update_generation(row.id, message_id=message.id)
            # The gallery cog mirrors it (bot/cogs/gallery.py).
            self.bot.dispatch("generation_posted", row, message)

    @commands.Cog.listener()
    async def on_generation_failed(self, job: JobRow, event: Error) -> None:
        end_generation(self.bot.config, job)
        if event.code == "cancelled":
            text = f"<@{job.user_id}> your image was cancelled."
        else:
            text = f"<@{job.user_id}> I couldn't make your image: {event.message}"
        async with self._finishing(job.id) as waiting:
            await self._tell(job, waiting, text)

    async def _post(
        self, job: JobRow, waiting: _Waiting | None, row: GenerationRow, note: str
    ) -> discord.Message | None:
        guild = self.bot.get_guild(job.guild_id)
        if guild is None:
            log.warning("generation %s is for a server I'm not in", row.id)
            return None
        upload, name = image_upload(row, guild.filesize_limit)
        content = f"<@{row.user_id}>{note}"
        embed = generation_embed(row, name)
        view = generation_view(row)
        if waiting is not None and waiting.usable():
            try:
                return await waiting.interaction.edit_original_response(
                    content=content,
                    embed=embed,
                    attachments=[upload] if upload else [],
                    view=view,
                    allowed_mentions=only_mentions(row.user_id),
                )
            except discord.HTTPException:
                log.info("could not finish job %s on its interaction; posting instead", job.id)
                upload, name = image_upload(row, guild.filesize_limit)
        channel = guild.get_channel_or_thread(job.channel_id)
        if not isinstance(channel, discord.TextChannel | discord.Thread):
            log.warning("the channel of generation %s is gone", row.id)
            return None
        message = await channel.send(
            content,
            embed=embed,
            file=upload or discord.utils.MISSING,
            view=view,
            allowed_mentions=only_mentions(row.user_id),
        )
        await self._remove_status(job, channel)
        return message

    async def _tell(self, job: JobRow, waiting: _Waiting | None, text: str) -> None:
        """Tell the member how their job ended, on its interaction while it lasts, else in the channel."""
        if waiting is not None and waiting.usable():
            try:
                await waiting.interaction.edit_original_response(
                    content=text, allowed_mentions=only_mentions(job.user_id)
                )
                return
            except discord.HTTPException:
                log.info("could not tell job %s's outcome on its interaction", job.id)
        guild = self.bot.get_guild(job.guild_id)
        channel = guild.get_channel_or_thread(job.channel_id) if guild else None
        if isinstance(channel, discord.TextChannel | discord.Thread):
            message = await channel.send(text, allowed_mentions=only_mentions(job.user_id))
            self.bot.record_post(message, job)
            await self._remove_status(job, channel)

    async def _remove_status(self, job: JobRow, channel: discord.TextChannel | discord.Thread) -> None:
        # The "queued" message of a job whose interaction expired: the new post replaces it.
        if job.progress_message_id is None:
            return
        try:
            await channel.get_partial_message(job.progress_message_id).delete()
        except discord.HTTPException:
            log.debug("could not remove the status message of job %s", job.id, exc_info=True)

    # -- buttons -------------------------------------------------------------------------------

    def _generation(self, generation_id: int) -> GenerationRow:
        row = self.bot.db.find_generation(generation_id)
        if row is None:
            raise UserFacingError("That image has been deleted.")
        return row

    def _shown_generation(
        self, interaction: discord.Interaction, generation_id: int, *, queued: bool
    ) -> GenerationRow:
        """The generation, refused where it may not be shown: in the channel its new picture would be
        posted in when `queued`, else in the member's channel (an answer only she sees is still in it)."""
        row = self._generation(generation_id)
        channel = self.channel_for(interaction, redirect=True) if queued else interaction.channel
        ensure_may_show(row.age_restricted, channel)
        return row

    def _same_settings(self, row: GenerationRow, **changes: Any) -> ImageRequest:
        width, height = base_size(row)
        values: dict[str, Any] = {
            "prompt": row.prompt,
            "negative_prompt": row.negative_prompt,
            "seed": None,
            "count": max(1, min(MAX_IMAGES, len(row.files))) if row.kind == "txt2img" else 1,
            "width": width,
            "height": height,
            "steps": row.steps,
            "guidance": row.guidance,
            "template": row.template,
        }
        return ImageRequest(**{**values, **changes})

    def _source_image(self, row: GenerationRow, index: int) -> str:
        if not 0 <= index < len(row.files) or not Path(row.files[index]).is_file():
            raise UserFacingError("That picture's file is gone, so I can't work from it.")
        return row.files[index]

    async def reroll(self, interaction: discord.Interaction, generation_id: int) -> None:
        row = self._shown_generation(interaction, generation_id, queued=True)
        await self.queue(interaction, self._same_settings(row), redirect=True)

    async def vary(self, interaction: discord.Interaction, generation_id: int, index: int) -> None:
        request = self._from_image(
            self._shown_generation(interaction, generation_id, queued=True), index, "variation"
        )
        await self.queue(interaction, request, redirect=True)

    async def upscale(self, interaction: discord.Interaction, generation_id: int, index: int) -> None:
        request = self._from_image(
            self._shown_generation(interaction, generation_id, queued=True), index, "upscale"
        )
        await self.queue(interaction, request, redirect=True)

    def _from_image(
        self, row: GenerationRow, index: int, kind: Literal["variation", "upscale"]
    ) -> ImageRequest:
        """img2img from one picture of a generation: a variation at its size, an upscale at twice it."""
        config = self.bot.config.generation
        strength = config.variation_strength if kind == "variation" else config.upscale_strength
        scale = 2 if kind == "upscale" else 1
        return self._same_settings(
            row,
            count=1,
            width=row.width * scale,
            height=row.height * scale,
            # img2img denoises for steps x strength steps, which must come to at least one.
            steps=max(row.steps, math.ceil(1 / strength) if strength > 0 else 1),
            upscale=kind == "upscale",
            parent_id=row.id,
            init_image=self._source_image(row, index),
            strength=strength,
        )

    async def open_prompt_modal(self, interaction: discord.Interaction, generation_id: int) -> None:
        """The prompt as a template, ready to edit and run: as its author typed it when it was one,
        else with the author's tokens written as [SUBJECT], which the clicker's own model fills."""
        row = self._shown_generation(interaction, generation_id, queued=False)
        authors: list[ModelRow] = []
        if interaction.user.id != row.user_id:
            authors = [m for m in self.bot.db.models_of(row.user_id, row.guild_id) if m.token in row.tokens]
        prompt = template_form(row.template or row.prompt, authors)
        await interaction.response.send_modal(
            UsePromptModal(self, prompt, lambda submitted, text: self.run_prompt(submitted, row.id, text))
        )

    async def open_picture_prompt_modal(
        self, interaction: discord.Interaction, prompt: str, negative_prompt: str, aspect: str
    ) -> None:
        """The prompt of a picture made elsewhere (Picture info), ready to edit and run with its
        negative prompt and shape and this server's steps and guidance (its sampler is not ours)."""
        request = image_request(self.bot.config, prompt, negative=negative_prompt, aspect=aspect)
        await interaction.response.send_modal(
            UsePromptModal(
                self,
                prompt,
                lambda submitted, text: self.queue(
                    submitted, dataclasses.replace(request, prompt=text), redirect=True
                ),
            )
        )

    async def show_info(self, interaction: discord.Interaction, generation_id: int) -> None:
        """A generation's parameters, privately, with its Use prompt button."""
        row = self._shown_generation(interaction, generation_id, queued=False)
        if not interaction.response.is_done():
            await interaction.response.defer(ephemeral=True, thinking=True)
        view = discord.ui.View(timeout=None)
        view.add_item(GenerationButton("prompt", row.id))
        embed = picture_info_embed(generation_parameters(row), f"Picture info · generation #{row.id}")
        await interaction.followup.send(embed=embed, view=view, ephemeral=True)

    def posted_generation(self, message: discord.Message) -> int | None:
        """The generation a message of mine shows: a post with its buttons, or its gallery copy."""
        if self.bot.user is None or message.author.id != self.bot.user.id:
            return None
        for row in message.components:
            for component in getattr(row, "children", []):
                if match := GENERATION_TEMPLATE.fullmatch(getattr(component, "custom_id", None) or ""):
                    return int(match["id"])
        gallery = self.bot.db.generation_by_gallery_message(message.id)
        return gallery.id if gallery is not None else None

    async def run_prompt(self, interaction: discord.Interaction, generation_id: int, prompt: str) -> None:
        row = self._shown_generation(interaction, generation_id, queued=True)
        request = self._same_settings(row, prompt=prompt, template=None, count=1)
        await self.queue(interaction, request, redirect=True)

    async def delete(self, interaction: discord.Interaction, generation_id: int) -> None:
        row = self._generation(generation_id)
        if interaction.user.id != row.user_id and not interaction.permissions.manage_guild:
            raise UserFacingError("Only the member who made this image, or a server manager, can delete it.")
        question = "Delete this picture for good: its post, its gallery copy and the image files?"
        if not await confirm(interaction, question, "Delete"):
            return
        # Read again: someone may have deleted it while the question was open.
        row = self._generation(generation_id)
        if refused := await self.bot.delete_generation_posts(row):
            await interaction.edit_original_response(
                content=f"Discord didn't let me delete {' and '.join(message.jump_url for message in refused)}: "
                "I can no longer see that channel. Ask a server manager to delete it, or to let me back in."
            )
            return
        self.bot.db.delete_generation(row.id)
        folder = generation_dir(self.bot.config, row.job_id)
        await asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True)
        await interaction.edit_original_response(
            content="Deleted: the post, its gallery copy and the image files."
        )


# -- the buttons, which outlive the process ------------------------------------------------------


def _imagine(interaction: discord.Interaction) -> Imagine:
    cog = interaction.client.get_cog("Imagine")  # type: ignore[attr-defined]
    assert isinstance(cog, Imagine)
    return cog


GENERATION_TEMPLATE = re.compile(r"dreambot:(?P<action>reroll|prompt|info|delete):(?P<id>\d+)")


class GenerationButton(
    discord.ui.DynamicItem[discord.ui.Button],
    template=GENERATION_TEMPLATE,
):
    """Reroll, Use prompt, Info or Delete: an action on a whole generation (row 0)."""

    LOOKS: ClassVar[dict[str, tuple[str, str, discord.ButtonStyle]]] = {
        "reroll": ("Reroll", "🎲", discord.ButtonStyle.primary),
        "prompt": ("Use prompt", "✏️", discord.ButtonStyle.secondary),
        "info": ("Info", "ℹ️", discord.ButtonStyle.secondary),
        "delete": ("Delete", "🗑️", discord.ButtonStyle.danger),
    }

    def __init__(self, action: str, generation_id: int) -> None:
        label, emoji, style = self.LOOKS[action]
        super().__init__(
            discord.ui.Button(
                label=label, emoji=emoji, style=style, custom_id=f"dreambot:{action}:{generation_id}", row=0
            )
        )
        self.action = action
        self.generation_id = generation_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: Any, /
    ) -> GenerationButton:
        return cls(match["action"], int(match["id"]))

    @reports_errors
    async def callback(self, interaction: discord.Interaction) -> None:
        cog = _imagine(interaction)
        start = {
            "reroll": cog.reroll,
            "prompt": cog.open_prompt_modal,
            "info": cog.show_info,
            "delete": cog.delete,
        }[self.action]
        await start(interaction, self.generation_id)


class ImageButton(
    discord.ui.DynamicItem[discord.ui.Button],
    template=r"dreambot:(?P<action>vary|upscale):(?P<id>\d+):(?P<index>\d)",
):
    """Variations (row 1) or Upscale (row 2) of one image of a generation."""

    LABELS: ClassVar[dict[str, tuple[str, str]]] = {"vary": ("Variations", "V"), "upscale": ("Upscale", "U")}

    def __init__(self, action: str, generation_id: int, index: int, several: bool = False) -> None:
        label, prefix = self.LABELS[action]
        super().__init__(
            discord.ui.Button(
                label=f"{prefix}{index + 1}" if several else label,
                style=discord.ButtonStyle.secondary,
                custom_id=f"dreambot:{action}:{generation_id}:{index}",
                row=1 if action == "vary" else 2,
            )
        )
        self.action = action
        self.generation_id = generation_id
        self.index = index

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: Any, /
    ) -> ImageButton:
        return cls(match["action"], int(match["id"]), int(match["index"]))

    @reports_errors
    async def callback(self, interaction: discord.Interaction) -> None:
        cog = _imagine(interaction)
        start = cog.vary if self.action == "vary" else cog.upscale
        await start(interaction, self.generation_id, self.index)


BUTTONS = (GenerationButton, ImageButton)


def generation_view(row: GenerationRow) -> discord.ui.View:
    """The buttons under a generation; no timeout, as every click is resolved from its custom_id."""
    view = discord.ui.View(timeout=None)
    for action in ("reroll", "prompt", "info", "delete"):
        view.add_item(GenerationButton(action, row.id))
    if row.kind != "upscale":
        several = len(row.files) > 1
        for action in ("vary", "upscale"):
            for index in range(len(row.files)):
                view.add_item(ImageButton(action, row.id, index, several))
    view.add_item(SavePromptButton(row.id))
    return view


class UsePromptModal(discord.ui.Modal, title="Imagine with this prompt"):
    """A prompt to edit; `run` queues the edited one (with a generation's or a picture's settings)."""

    def __init__(
        self,
        cog: Imagine,
        prompt: str,
        run: Callable[[discord.Interaction, str], Coroutine[Any, Any, None]],
    ) -> None:
        super().__init__()
        self.cog = cog
        self.run = run
        self.prompt = discord.ui.TextInput(
            label="Prompt", style=discord.TextStyle.paragraph, default=prompt[:1000], max_length=1000
        )
        self.add_item(self.prompt)

    @reports_errors
    async def on_submit(self, interaction: discord.Interaction) -> None:
        await self.run(interaction, self.prompt.value)


# -- small words -------------------------------------------------------------------------------


def _pictures(count: int) -> str:
    return "1 picture" if count == 1 else f"{count} pictures"


def _describe(request: ImageRequest) -> str:
    what = {"txt2img": _pictures(request.count), "variation": "a variation", "upscale": "an upscale"}
    return f"{what[request.kind]} of “{discord.utils.escape_markdown(request.prompt)[:200]}”"


async def setup(bot: DreamBot) -> None:
    await bot.add_cog(Imagine(bot))

"""What more than one cog shows: job lists with Cancel buttons, confirmations, a generation's embed,
the rule of where what came from an age-restricted channel may be shown, and the words they share.
No cog owns this module and it imports no cog.

The Cancel buttons are dynamic items: their custom_id carries the job id, so a button keeps working
after the bot restarts, with no view kept in memory (the queue cog registers them).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import ClassVar

import discord

from bot.bot import DreamBot, reply_privately, reports_errors
from bot.db import ACTIVE_JOB_STATES, GenerationRow, JobRow
from bot.pnginfo import Parameters
from bot.service import UserFacingError
from bot.uploads import image_file
from engine.contract.protocol import ProtocolError, TrainJob

log = logging.getLogger(__name__)

CANCEL_TEMPLATE = r"dreambot:cancel:(?P<job_id>[0-9a-f]+)"
SAVE_PROMPT_TEMPLATE = r"dreambot:saveprompt:(?P<id>\d+)"
CONFIRM_TIMEOUT = 60.0
MAX_BUTTONS = 25
GRID_FILE = "grid.png"
# A ⭐ reaction is a vote, on a gallery post and on a prompt book card alike.
STAR = "⭐"


def is_star_vote(payload: discord.RawReactionActionEvent, bot_user: discord.abc.User | None) -> bool:
    """A ⭐ given or taken back by a member (the bot's own ⭐, added so people can click it, is no vote)."""
    return str(payload.emoji) == STAR and bot_user is not None and payload.user_id != bot_user.id


def only_mentions(user_id: int) -> discord.AllowedMentions:
    """Ping exactly this member and no one else (not roles, not @everyone written in a prompt)."""
    return discord.AllowedMentions(
        everyone=False, roles=False, replied_user=False, users=[discord.Object(id=user_id)]
    )


# -- age-restricted channels ---------------------------------------------------------------------

PICTURE_FROM_AGE_RESTRICTED = "That picture was made in an age-restricted channel"
PROMPT_FROM_AGE_RESTRICTED = "That prompt comes from an age-restricted channel"


def is_age_restricted(channel: object) -> bool:
    """Threads inherit their parent's age restriction; DMs and unknown channels have none."""
    is_nsfw = getattr(channel, "is_nsfw", None)
    return bool(is_nsfw and is_nsfw())


def may_show(age_restricted: bool, channel: object) -> bool:
    """The one rule for a picture or prompt book entry (its row's `age_restricted`): what came from an
    age-restricted channel is shown only in age-restricted channels. A search asks the database for
    rows with `with_age_restricted=may_show(True, channel)`."""
    return not age_restricted or is_age_restricted(channel)


def ensure_may_show(age_restricted: bool, channel: object, origin: str = PICTURE_FROM_AGE_RESTRICTED) -> None:
    """Refuse, saying why, to show in `channel` (where the member is, or where a new picture would be
    posted) what may not be shown there."""
    if may_show(age_restricted, channel):
        return
    mention = getattr(channel, "mention", None)
    which = f", and {mention} isn't one" if mention else ""
    raise UserFacingError(f"{origin}, so it's only shown in age-restricted channels{which}.")


# -- jobs ----------------------------------------------------------------------------------------


def describe_job(job: JobRow) -> str:
    try:
        request = job.request
    except ProtocolError:
        return "job"
    if isinstance(request, TrainJob):
        return f"training **{request.token}**"
    prompt = request.prompt if len(request.prompt) <= 60 else request.prompt[:59] + "…"
    return f"image “{discord.utils.escape_markdown(prompt)}”"


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
                allowed_mentions=only_mentions(job.user_id),
            )
            bot.record_post(notice, job)
        except discord.HTTPException as error:
            log.warning("cannot tell user %s that job %s was cancelled: %s", job.user_id, job.id, error)
    return True


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

    @reports_errors
    async def callback(self, interaction: discord.Interaction[DreamBot]) -> None:
        bot = interaction.client
        job = bot.db.find_job(self.job_id)
        if job is None or job.state not in ACTIVE_JOB_STATES:
            raise UserFacingError("That job has already finished.")
        if not can_manage(interaction, job):
            raise UserFacingError("That's not your job: only its owner or a server manager can cancel it.")
        if not await cancel_job(bot, job, interaction.user):
            raise UserFacingError("That job has already finished.")
        await reply_privately(interaction, f"Cancelled: {describe_job(job)}.")


# -- paging ------------------------------------------------------------------------------------


class Pager(discord.ui.View):
    """One result at a time, turned with Previous and Next; only the member who opened it turns it.

    A subclass gives `render` (the current page, read afresh; None when nothing matches any more)
    and its texts, and may add buttons of its own after Previous and Next."""

    # The answer to another member who presses a button, and the page shown once nothing matches.
    not_yours: ClassVar[str]
    nothing_left: ClassVar[str]

    def __init__(self, opener_id: int, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self.opener_id = opener_id
        self.index = 0
        self.message: discord.InteractionMessage | None = None

    def render(self) -> tuple[discord.Embed, discord.File | None] | None:
        raise NotImplementedError

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        if interaction.user.id == self.opener_id:
            return True
        await interaction.response.send_message(self.not_yours, ephemeral=True)
        return False

    async def _show(self, interaction: discord.Interaction) -> None:
        page = self.render()
        if page is None:
            self.stop()
            await interaction.response.edit_message(
                content=self.nothing_left, embed=None, attachments=[], view=None
            )
            return
        embed, upload = page
        await interaction.response.edit_message(
            embed=embed, attachments=[upload] if upload else [], view=self
        )

    @discord.ui.button(label="Previous", emoji="◀️", style=discord.ButtonStyle.secondary)
    @reports_errors
    async def previous(self, interaction: discord.Interaction, button: discord.ui.Button[Pager]) -> None:
        self.index = max(0, self.index - 1)
        await self._show(interaction)

    @discord.ui.button(label="Next", emoji="▶️", style=discord.ButtonStyle.secondary)
    @reports_errors
    async def next(self, interaction: discord.Interaction, button: discord.ui.Button[Pager]) -> None:
        self.index += 1
        await self._show(interaction)

    async def on_timeout(self) -> None:
        if self.message is not None:
            try:
                await self.message.edit(view=None)
            except discord.HTTPException:
                log.debug("could not close an expired pager", exc_info=True)


# -- confirmation --------------------------------------------------------------------------------


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
    @reports_errors
    async def confirm(self, interaction: discord.Interaction, button: discord.ui.Button[ConfirmView]) -> None:
        await self._answer(interaction, True)

    @discord.ui.button(label="Keep it", style=discord.ButtonStyle.secondary)
    @reports_errors
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


# -- generations ---------------------------------------------------------------------------------


def post_image(row: GenerationRow) -> Path | None:
    """The picture a generation is shown as: its only image, or the grid of several beside them."""
    if not row.files:
        return None
    path = Path(row.files[0]) if len(row.files) == 1 else Path(row.files[0]).parent / GRID_FILE
    return path if path.is_file() else None


def generation_embed(row: GenerationRow, image_name: str | None) -> discord.Embed:
    """The prompt, seed, model and author of a generation; the image as an attachment name."""
    titles = {"txt2img": "Imagined", "variation": "Variation", "upscale": "Upscaled"}
    embed = discord.Embed(
        title=titles.get(row.kind, "Imagined"),
        description=discord.utils.escape_markdown(row.prompt)[:4000],
        colour=discord.Colour.blurple(),
    )
    embed.add_field(name="Seed", value=str(row.seed))
    embed.add_field(name="Model", value=", ".join(row.tokens) or "base model")
    embed.add_field(name="Size", value=f"{row.width}×{row.height}")
    embed.add_field(name="Author", value=f"<@{row.user_id}>")
    embed.set_footer(text=f"generation #{row.id} · {row.steps} steps · guidance {row.guidance:g}")
    if image_name is not None:
        embed.set_image(url=f"attachment://{image_name}")
    return embed


def image_upload(row: GenerationRow, size_limit: int) -> tuple[discord.File | None, str | None]:
    """The generation's picture as an upload named by its id (never by anything a member typed)."""
    path = post_image(row)
    if path is None:
        return None, None
    upload = image_file(path, f"dreambot-{row.id}.png", size_limit)
    return upload, upload.filename


# -- picture info --------------------------------------------------------------------------------

# Discord's limit on the characters of all the embeds of one message.
EMBEDS_LIMIT = 6000
# Shown as fields of their own, in this order; other settings share one field.
MAIN_SETTINGS = ("Seed", "Steps", "CFG scale", "Sampler", "Size", "Model")
NEGATIVE_FIELD = "Negative prompt"
OTHER_FIELD = "Other settings"
_ZERO_WIDTH_SPACE = "\u200b"


def _code_block(text: str, limit: int) -> str:
    """The text in a code block of at most `limit` characters, so Markdown in it shows as typed;
    a zero-width space after each backtick keeps the text from closing the block."""
    body = text.replace("`", "`" + _ZERO_WIDTH_SPACE)
    room = max(1, limit - len("```\n\n```"))
    if len(body) > room:
        body = body[: room - 1] + "…"
    return f"```\n{body}\n```"


def _code_block_text(block: str) -> str:
    """What `_code_block` was given (cut short when it had to be)."""
    if not block.startswith("```\n") or not block.endswith("\n```"):
        return ""
    return block.removeprefix("```\n").removesuffix("\n```").replace("`" + _ZERO_WIDTH_SPACE, "`")


def picture_info_embed(parameters: Parameters, title: str, budget: int = EMBEDS_LIMIT) -> discord.Embed:
    """A picture's parameters in at most `budget` characters: the prompt (as the description), the
    negative prompt, the main settings, the LoRAs and the rest of the settings in one field.

    Short fields are cut to a fixed length and the negative prompt and the other settings to a
    sixth of the budget each, so that what is left, most of it, goes to the prompt.
    """
    embed = discord.Embed(title=title[:80], colour=discord.Colour.blurple())
    embed.set_footer(text=f"made with {parameters.made_with}")
    share = budget // 6
    if parameters.negative_prompt:
        negative = _code_block(parameters.negative_prompt, min(1024, share))
        embed.add_field(name=NEGATIVE_FIELD, value=negative, inline=False)
    settings = parameters.settings
    for key in MAIN_SETTINGS:
        if settings.get(key):
            embed.add_field(name=key, value=settings[key][:50])
    if parameters.loras:
        loras = ", ".join(f"{lora.name} ({lora.weight})" for lora in parameters.loras)
        embed.add_field(name="LoRAs", value=loras[:120], inline=False)
    other = "\n".join(
        f"{key}: {value}" for key, value in settings.items() if key not in MAIN_SETTINGS and value
    )
    other_room = len(OTHER_FIELD) + min(len(other), share) if other else 0
    embed.description = (
        _code_block(parameters.prompt, min(4096, budget - len(embed) - other_room))
        if parameters.prompt
        else "*(no prompt)*"
    )
    if other:
        room = min(1024, budget - len(embed) - len(OTHER_FIELD))
        embed.add_field(name=OTHER_FIELD, value=other[:room], inline=False)
    return embed


def picture_prompts(embed: discord.Embed) -> tuple[str, str]:
    """The prompt and negative prompt a `picture_info_embed` shows, read back from it."""
    negative = next((field.value for field in embed.fields if field.name == NEGATIVE_FIELD), None)
    return _code_block_text(embed.description or ""), _code_block_text(negative or "")


class SavePromptButton(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]], template=SAVE_PROMPT_TEMPLATE
):
    """ "Save prompt" under a generation (row 3): the imagine cog shows it, the prompt book cog
    registers it and does the saving; the generation id is in its custom_id."""

    def __init__(self, generation_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Save prompt",
                emoji="📖",
                style=discord.ButtonStyle.secondary,
                custom_id=f"dreambot:saveprompt:{generation_id}",
                row=3,
            )
        )
        self.generation_id = generation_id

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction,
        item: discord.ui.Button[discord.ui.View],
        match: re.Match[str],
        /,
    ) -> SavePromptButton:
        return cls(int(match["id"]))

    @reports_errors
    async def callback(self, interaction: discord.Interaction[DreamBot]) -> None:
        book = interaction.client.get_cog("PromptBook")
        if book is None:
            raise UserFacingError("The prompt book is switched off right now.")
        await book.open_save_modal(interaction, self.generation_id)  # type: ignore[attr-defined]


# -- words ---------------------------------------------------------------------------------------


def refusal_line(refused: list[discord.PartialMessage]) -> str:
    """A line naming the messages Discord refused to delete, or '' when there are none."""
    if not refused:
        return ""
    one = len(refused) == 1
    links = " ".join(message.jump_url for message in refused)
    return (
        f"\n⚠️ Discord didn't let me delete {count(len(refused), 'message')} of mine, as I can no longer "
        f"see {'its' if one else 'their'} channel: {links}\nAsk a server manager to delete "
        f"{'it' if one else 'them'}."
    )


def count(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' * (number != 1)}"

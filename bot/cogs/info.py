"""Picture info: the "Picture info" message command, which shows how the pictures of a message were made.

A post of ours is shown from its generation row, as its Info button does (the imagine cog's). Any
other message's pictures are downloaded (up to 20 MB each) and read by bot.pnginfo: our PNGs and
AUTOMATIC1111's (the `parameters` text, also in its JPEGs and WebPs), ComfyUI's (its graph,
summarised). Each picture shown gets a "Use prompt" button that opens the imagine cog's prompt modal.
The button reads the prompt back from the info message it sits on: that message is ours, so
Discord always shows it to us, also after a restart, while another member's attachments reach a bot
without the message-content intent only in the interaction that targets them.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, cast

import discord
from discord import app_commands
from discord.ext import commands

from bot.bot import DreamBot, reports_errors
from bot.pnginfo import MAX_PICTURE_BYTES, Parameters, Picture, PictureError, read_picture, without_lora_tags
from bot.prompts import ASPECTS, nearest_aspect
from bot.service import UserFacingError
from bot.views import EMBEDS_LIMIT, picture_info_embed, picture_prompts

if TYPE_CHECKING:
    from bot.cogs.imagine import Imagine

log = logging.getLogger(__name__)

# Pictures shown from one message; their embeds share Discord's 6,000 characters.
MAX_SHOWN = 4
# Pictures read at once, whoever asks: each is held whole in memory (up to MAX_PICTURE_BYTES), so a
# burst of Picture info waits its turn instead of filling the bot's memory.
PICTURES_READ_AT_ONCE = 2
# What is downloaded to look at; the file's first bytes decide what it is.
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PICTURE_PROMPT_TEMPLATE = re.compile(rf"dreambot:pictureprompt:(?P<index>\d):(?P<aspect>{'|'.join(ASPECTS)})")


def _imagine(bot: DreamBot) -> Imagine:
    # Not isinstance: load_extension executes the imagine module afresh, so its class differs.
    cog = cast("Imagine | None", bot.get_cog("Imagine"))
    if cog is None:
        raise UserFacingError("Making pictures is switched off on this bot right now.")
    return cog


def _may_be_picture(attachment: discord.Attachment) -> bool:
    return (attachment.content_type or "").startswith("image/") or Path(
        attachment.filename
    ).suffix.lower() in PICTURE_SUFFIXES


class PicturePromptButton(discord.ui.DynamicItem[discord.ui.Button], template=PICTURE_PROMPT_TEMPLATE):
    """Use prompt under the info of a picture made elsewhere: the index of its embed, and its shape."""

    def __init__(self, index: int, aspect: str, several: bool = False) -> None:
        super().__init__(
            discord.ui.Button(
                label=f"Use prompt {index + 1}" if several else "Use prompt",
                emoji="✏️",
                style=discord.ButtonStyle.secondary,
                custom_id=f"dreambot:pictureprompt:{index}:{aspect}",
            )
        )
        self.index = index
        self.aspect = aspect

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> PicturePromptButton:
        return cls(int(match["index"]), match["aspect"])

    @reports_errors
    async def callback(self, interaction: discord.Interaction[DreamBot]) -> None:
        message = interaction.message
        if message is None or len(message.embeds) <= self.index:
            raise UserFacingError("I can't read that picture's info any more: ask for Picture info again.")
        prompt, negative = picture_prompts(message.embeds[self.index])
        await _imagine(interaction.client).open_picture_prompt_modal(
            interaction, without_lora_tags(prompt), negative, self.aspect
        )


class Info(commands.Cog):
    def __init__(self, bot: DreamBot) -> None:
        self.bot = bot
        self.info_menu = app_commands.ContextMenu(name="Picture info", callback=self.picture_info)
        self.info_menu.guild_only = True
        self._reading = asyncio.Semaphore(PICTURES_READ_AT_ONCE)

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.info_menu)
        self.bot.add_dynamic_items(PicturePromptButton)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(PicturePromptButton)
        self.bot.tree.remove_command(self.info_menu.name, type=self.info_menu.type)

    async def picture_info(
        self, interaction: discord.Interaction[DreamBot], message: discord.Message
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        imagine = _imagine(self.bot)
        generation_id = imagine.posted_generation(message)
        if generation_id is not None:
            await imagine.show_info(interaction, generation_id)
            return
        attachments = [attachment for attachment in message.attachments if _may_be_picture(attachment)]
        if not attachments:
            raise UserFacingError(
                "That message has no picture attached. Picture info reads the prompt and settings saved "
                "in a PNG (made by me, AUTOMATIC1111 or ComfyUI) or in an AUTOMATIC1111 JPEG or WebP."
            )
        found: list[tuple[str, Parameters, str]] = []  # file name, parameters, aspect
        notes: list[str] = []
        # One at a time: at most one member's 20 MB is in memory.
        for attachment in attachments:
            name = discord.utils.escape_markdown(attachment.filename)
            try:
                picture = await self._read(attachment)
            except PictureError as error:
                notes.append(f"**{name}** {error}.")
                continue
            if picture.parameters is None:
                notes.append(
                    f"**{name}** carries no prompt or settings: none were saved in it, or an app "
                    "that re-saved it left them out."
                )
            else:
                found.append((name, picture.parameters, nearest_aspect(picture.width, picture.height)))
        shown = found[:MAX_SHOWN]
        if len(found) > len(shown):
            notes.append(f"Shown: the first {len(shown)} of {len(found)} pictures with settings.")
        content = "\n".join(notes)[:2000]
        if not shown:
            await interaction.followup.send(content, ephemeral=True)
            return
        several = len(shown) > 1
        view = discord.ui.View(timeout=None)
        embeds = []
        for index, (name, parameters, aspect) in enumerate(shown):
            title = f"Picture info · {name}"
            embeds.append(picture_info_embed(parameters, title, EMBEDS_LIMIT // len(shown)))
            view.add_item(PicturePromptButton(index, aspect, several))
        await interaction.followup.send(
            content or discord.utils.MISSING, embeds=embeds, view=view, ephemeral=True
        )

    async def _read(self, attachment: discord.Attachment) -> Picture:
        """The attachment's picture; PictureError (its message follows the file's name) when it is none."""
        if attachment.size > MAX_PICTURE_BYTES:
            raise PictureError(
                f"is over {MAX_PICTURE_BYTES // 1024 // 1024} MB, more than I read, so I didn't look at it"
            )
        async with self._reading:
            try:
                data = await attachment.read()
            except discord.HTTPException as error:
                log.warning("could not download attachment %s: %s", attachment.id, error)
                raise PictureError("couldn't be downloaded from Discord: please try again") from error
            return await asyncio.to_thread(read_picture, data)


async def setup(bot: DreamBot) -> None:
    await bot.add_cog(Info(bot))

"""The shared prompt book: /prompt save|browse|use|delete, the cards in the prompts channel, ⭐ stars.

A prompt is saved typed (/prompt save) or from a picture (its "Save prompt" button). The author's own
model in it is stored as [SUBJECT], so whoever uses the entry gets their own face in its place. Each
entry is posted once as a card with its example picture and a "Try with my face" button; ⭐ reactions
on the card and uses rank the book. Rendering goes through the imagine cog's queue, like /imagine.
An entry saved in an age-restricted channel, or from a picture made in one, is shown (its card too)
and rendered only in age-restricted channels, like such a picture (bot.views.may_show).
"""

from __future__ import annotations

import logging
import re
import sqlite3
from typing import TYPE_CHECKING, cast

import discord
from discord import app_commands
from discord.ext import commands

from bot.bot import DreamBot, reports_errors
from bot.db import PromptRow, PromptSort
from bot.safety import prompt_refusal
from bot.service import UserFacingError, image_request
from bot.templates import SUBJECT, template_form, with_stand_in
from bot.uploads import DEFAULT_UPLOAD_LIMIT
from bot.views import (
    PROMPT_FROM_AGE_RESTRICTED,
    STAR,
    Pager,
    SavePromptButton,
    confirm,
    ensure_may_show,
    image_upload,
    is_age_restricted,
    is_star_vote,
    may_show,
    refusal_line,
)
from engine.contract.prompt_syntax import PromptSyntaxError, parse_prompt

if TYPE_CHECKING:
    from bot.cogs.imagine import Imagine

log = logging.getLogger(__name__)

MAX_TITLE = 80
MAX_NOTE = 500
# A /prompt browse pager stops answering after this long; /prompt browse again opens a new one.
PAGER_TIMEOUT = 15 * 60
TRY_TEMPLATE = r"dreambot:tryprompt:(?P<id>\d+)"


def card_embed(entry: PromptRow, image_name: str | None) -> discord.Embed:
    """An entry's title, prompt, note and author; its example picture as an attachment name."""
    embed = discord.Embed(
        title=discord.utils.escape_markdown(entry.title),
        description=discord.utils.escape_markdown(entry.prompt)[:4000],
        colour=discord.Colour.gold(),
    )
    if entry.negative_prompt:
        embed.add_field(name="Negative", value=discord.utils.escape_markdown(entry.negative_prompt)[:1000])
    if entry.note:
        embed.add_field(
            name="What works", value=discord.utils.escape_markdown(entry.note)[:1000], inline=False
        )
    embed.add_field(name="Author", value=f"<@{entry.user_id}>")
    if image_name is not None:
        embed.set_image(url=f"attachment://{image_name}")
    return embed


class PromptBook(commands.Cog):
    prompt = app_commands.Group(
        name="prompt", description="The server's shared prompt book.", guild_only=True
    )

    def __init__(self, bot: DreamBot) -> None:
        self.bot = bot

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(SavePromptButton, TryPromptButton)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(SavePromptButton, TryPromptButton)

    # -- saving --------------------------------------------------------------------------------

    @prompt.command(name="save")
    @app_commands.describe(
        title="A short name for it, unique in this server",
        prompt="The prompt; your model's name in it becomes [SUBJECT], whoever uses it",
        note="What works (or doesn't) with it",
    )
    async def save(
        self,
        interaction: discord.Interaction,
        title: app_commands.Range[str, 1, MAX_TITLE],
        prompt: app_commands.Range[str, 1, 1000],
        note: app_commands.Range[str, 1, MAX_NOTE] | None = None,
    ) -> None:
        """Save a prompt to the server's prompt book, posted as a card for everyone to try."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        entry = await self.save_entry(
            interaction,
            title,
            prompt,
            "",
            note or "",
            generation_id=None,
            age_restricted=is_age_restricted(interaction.channel),
        )
        await interaction.followup.send(self._saved_line(entry), ephemeral=True)

    async def open_save_modal(self, interaction: discord.Interaction, generation_id: int) -> None:
        """From a picture's "Save prompt" button: its author names it and says what works."""
        row = self.bot.db.find_generation(generation_id)
        if row is None:
            raise UserFacingError("That image has been deleted.")
        if row.user_id != interaction.user.id:
            raise UserFacingError(
                "Only the member who made this picture can save it to the prompt book. Press "
                "“Use prompt” to make your own, or save a prompt of yours with `/prompt save`."
            )
        # Before she fills the form in: a picture whose card could go up nowhere is refused.
        self._card_channel(interaction, row.age_restricted)
        await interaction.response.send_modal(SavePromptModal(self, generation_id))

    async def save_from_picture(
        self, interaction: discord.Interaction, generation_id: int, title: str, note: str
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        row = self.bot.db.find_generation(generation_id)
        if row is None:  # deleted while the form was open
            raise UserFacingError("That image has been deleted.")
        entry = await self.save_entry(
            interaction,
            title,
            row.prompt,
            row.negative_prompt,
            note,
            generation_id=row.id,
            age_restricted=row.age_restricted or is_age_restricted(interaction.channel),
        )
        await interaction.followup.send(self._saved_line(entry), ephemeral=True)

    async def save_entry(
        self,
        interaction: discord.Interaction,
        title: str,
        prompt: str,
        negative_prompt: str,
        note: str,
        *,
        generation_id: int | None,
        age_restricted: bool,
    ) -> PromptRow:
        """Check, store in template form and post the card (once); the entry as stored.
        `age_restricted`: saved in an age-restricted channel or from a picture made in one."""
        guild, db = interaction.guild, self.bot.db
        assert guild is not None  # guild_only
        title, note = " ".join(title.split()), note.strip()
        if not title:
            raise UserFacingError("The title is empty: give the prompt a short name.")
        card_channel = self._card_channel(interaction, age_restricted)
        # The card is public: what could not be drawn there is not posted there either.
        refusal = prompt_refusal(
            f"{title} {prompt} {note}",
            negative_prompt,
            self.bot.config.safety,
            nsfw_channel=card_channel.is_nsfw(),
        )
        if refusal is not None:
            raise UserFacingError(refusal)
        try:
            parse_prompt(with_stand_in(prompt))
        except PromptSyntaxError as error:
            raise UserFacingError(f"I can't read your prompt: {error}.") from None
        own = db.models_of(interaction.user.id, guild.id)
        db.ensure_user(interaction.user.id, interaction.user.name)
        try:
            entry = db.add_prompt(
                guild_id=guild.id,
                user_id=interaction.user.id,
                title=title,
                prompt=template_form(prompt, own),
                negative_prompt=negative_prompt,
                note=note,
                generation_id=generation_id,
                age_restricted=age_restricted,
            )
        except sqlite3.IntegrityError:
            shown = discord.utils.escape_markdown(title)
            raise UserFacingError(
                f"The prompt book already has a prompt called **{shown}**: pick another title."
            ) from None
        return await self._post_card(entry, card_channel)

    def _card_channel(
        self, interaction: discord.Interaction, age_restricted: bool
    ) -> discord.TextChannel | discord.Thread:
        """Where an entry's card goes up: the prompts channel, unless it may not show the entry; then
        where the entry is saved, if that may."""
        prompts = self.bot.prompts_channel(interaction.guild)
        channel = (
            prompts if prompts is not None and may_show(age_restricted, prompts) else interaction.channel
        )
        if not isinstance(channel, discord.TextChannel | discord.Thread):
            raise UserFacingError("I have no prompts channel to post the card in.")
        ensure_may_show(age_restricted, channel)
        return channel

    async def _post_card(self, entry: PromptRow, channel: discord.TextChannel | discord.Thread) -> PromptRow:
        generation = self.bot.db.find_generation(entry.generation_id) if entry.generation_id else None
        upload, name = image_upload(generation, channel.guild.filesize_limit) if generation else (None, None)
        view = discord.ui.View(timeout=None)
        view.add_item(TryPromptButton(entry.id))
        try:
            card = await channel.send(
                f"📖 New in the prompt book, by <@{entry.user_id}>",
                embed=card_embed(entry, name),
                file=upload or discord.utils.MISSING,
                view=view,
            )
        except discord.HTTPException as error:
            # The entry stands without its card: /prompt browse and /prompt use find it.
            log.warning("could not post the card of prompt %s in #%s: %s", entry.id, channel, error)
            return entry
        entry = self.bot.db.update_prompt(entry.id, card_channel_id=channel.id, card_message_id=card.id)
        try:
            await card.add_reaction(STAR)
        except discord.HTTPException:
            log.debug("could not add a star to the card of prompt %s", entry.id, exc_info=True)
        return entry

    def _saved_line(self, entry: PromptRow) -> str:
        shown = discord.utils.escape_markdown(entry.title)
        where = (
            f" Its card: https://discord.com/channels/{entry.guild_id}/{entry.card_channel_id}/{entry.card_message_id}"
            if entry.card_message_id
            else ""
        )
        template = (
            f" Your model is written {SUBJECT}: whoever uses it gets their own face."
            if SUBJECT in entry.prompt
            else ""
        )
        return f"Saved **{shown}** to the prompt book.{template}{where}"

    # -- browsing ------------------------------------------------------------------------------

    @prompt.command(name="browse")
    @app_commands.describe(
        search="Words that must be in the title, prompt or note",
        sort="Most starred (top), newest (new) or most used (used) first",
    )
    async def browse(
        self,
        interaction: discord.Interaction,
        search: app_commands.Range[str, 1, 200] | None = None,
        sort: PromptSort = "new",
    ) -> None:
        """Browse the server's prompt book."""
        assert interaction.guild_id is not None  # guild_only
        pager = PromptPager(
            self,
            opener_id=interaction.user.id,
            guild_id=interaction.guild_id,
            search=search,
            sort=sort,
            with_age_restricted=may_show(True, interaction.channel),
        )
        page = pager.render()
        if page is None:
            raise UserFacingError(
                "No saved prompt matches that."
                if search
                else "The prompt book is empty: save one with `/prompt save`."
            )
        embed, upload = page
        await interaction.response.send_message(embed=embed, file=upload or discord.utils.MISSING, view=pager)
        pager.message = await interaction.original_response()

    # -- using ---------------------------------------------------------------------------------

    @prompt.command(name="use")
    @app_commands.describe(title="The saved prompt's title")
    async def use(
        self, interaction: discord.Interaction, title: app_commands.Range[str, 1, MAX_TITLE]
    ) -> None:
        """Render a saved prompt, with your own face where it says [SUBJECT]."""
        assert interaction.guild_id is not None  # guild_only
        entry = self.bot.db.prompt_by_title(interaction.guild_id, title)
        if entry is None:
            shown = discord.utils.escape_markdown(title.strip()[:MAX_TITLE])
            raise UserFacingError(f"The prompt book has no prompt called **{shown}**. See `/prompt browse`.")
        await self.render(interaction, entry.id)

    async def render(self, interaction: discord.Interaction, prompt_id: int) -> None:
        """Queue the entry as /imagine does (the imagine cog's queue); the result goes to the prompts channel."""
        entry = self.bot.db.find_prompt(prompt_id)
        if entry is None:
            raise UserFacingError("That prompt has been deleted from the prompt book.")
        # Not isinstance: load_extension executes the imagine module afresh, so its class differs.
        imagine = cast("Imagine | None", self.bot.get_cog("Imagine"))
        if imagine is None:
            raise UserFacingError("Drawing is switched off right now. Please try again later.")
        # Its picture shows the prompt where it is posted.
        ensure_may_show(
            entry.age_restricted, imagine.channel_for(interaction, redirect=True), PROMPT_FROM_AGE_RESTRICTED
        )
        # The imagine cog's queue fills [SUBJECT] with the member's own model (or says to /train).
        request = image_request(self.bot.config, entry.prompt, negative=entry.negative_prompt)
        await imagine.queue(interaction, request, redirect=True)
        self.bot.db.count_prompt_use(entry.id)

    # -- deleting ------------------------------------------------------------------------------

    @prompt.command(name="delete")
    @app_commands.describe(title="The title of your saved prompt")
    async def delete(
        self, interaction: discord.Interaction, title: app_commands.Range[str, 1, MAX_TITLE]
    ) -> None:
        """Delete one of your saved prompts and take its card down."""
        assert interaction.guild_id is not None  # guild_only
        entry = self.bot.db.prompt_by_title(interaction.guild_id, title)
        shown = discord.utils.escape_markdown(entry.title if entry else title.strip()[:MAX_TITLE])
        if entry is None:
            raise UserFacingError(f"The prompt book has no prompt called **{shown}**. See `/prompt browse`.")
        if entry.user_id != interaction.user.id:
            raise UserFacingError(f"**{shown}** is <@{entry.user_id}>'s: only its author can delete it.")
        if not await confirm(
            interaction, f"Delete **{shown}** from the prompt book and take its card down?", "Delete"
        ):
            return
        refused = await self.bot.take_down(self.bot.prompt_cards([entry]))
        self.bot.db.delete_prompt(entry.id)
        await interaction.edit_original_response(
            content=f"Deleted **{shown}** from the prompt book and took its card down.{refusal_line(refused)}"
        )

    @use.autocomplete("title")
    async def _any_title(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        if interaction.guild_id is None:
            return []
        titles = self.bot.db.prompt_titles(
            interaction.guild_id, with_age_restricted=may_show(True, interaction.channel)
        )
        return _choices(titles, current)

    @delete.autocomplete("title")
    async def _own_title(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        if interaction.guild_id is None:
            return []
        titles = self.bot.db.prompt_titles(
            interaction.guild_id,
            user_id=interaction.user.id,
            with_age_restricted=may_show(True, interaction.channel),
        )
        return _choices(titles, current)

    # -- stars ---------------------------------------------------------------------------------

    @commands.Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        self._count_star(payload, +1)

    @commands.Cog.listener()
    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        self._count_star(payload, -1)

    def _count_star(self, payload: discord.RawReactionActionEvent, change: int) -> None:
        if not is_star_vote(payload, self.bot.user):
            return
        entry = self.bot.db.prompt_by_card(payload.message_id)
        if entry is None or entry.guild_id != payload.guild_id:
            return
        # No await between reading and writing: concurrent reactions cannot lose a count.
        self.bot.db.update_prompt(entry.id, stars=max(0, entry.stars + change))


def _choices(titles: list[str], current: str) -> list[app_commands.Choice[str]]:
    return [
        app_commands.Choice(name=title, value=title) for title in titles if current.lower() in title.lower()
    ][:25]


def _book(interaction: discord.Interaction) -> PromptBook:
    cog = interaction.client.get_cog("PromptBook")  # type: ignore[attr-defined]
    assert isinstance(cog, PromptBook)
    return cog


class TryPromptButton(discord.ui.DynamicItem[discord.ui.Button], template=TRY_TEMPLATE):
    """ "Try with my face" on a card or a /prompt browse page: the entry id is in its custom_id."""

    def __init__(self, prompt_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Try with my face",
                emoji="🪄",
                style=discord.ButtonStyle.primary,
                custom_id=f"dreambot:tryprompt:{prompt_id}",
            )
        )
        self.prompt_id = prompt_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> TryPromptButton:
        return cls(int(match["id"]))

    @reports_errors
    async def callback(self, interaction: discord.Interaction) -> None:
        book = _book(interaction)
        await book.render(interaction, self.prompt_id)


class SavePromptModal(discord.ui.Modal, title="Save to the prompt book"):
    def __init__(self, book: PromptBook, generation_id: int) -> None:
        super().__init__()
        self.book = book
        self.generation_id = generation_id
        self.entry_title = discord.ui.TextInput(label="Title", max_length=MAX_TITLE)
        self.note = discord.ui.TextInput(
            label="What works (optional)",
            style=discord.TextStyle.paragraph,
            required=False,
            max_length=MAX_NOTE,
        )
        self.add_item(self.entry_title)
        self.add_item(self.note)

    @reports_errors
    async def on_submit(self, interaction: discord.Interaction) -> None:
        await self.book.save_from_picture(
            interaction, self.generation_id, self.entry_title.value, self.note.value
        )


class PromptPager(Pager):
    """One entry of the prompt book at a time; only the member who opened it turns its pages."""

    not_yours = "This is someone else's page: use /prompt browse to open your own."
    nothing_left = "No saved prompt matches any more."

    def __init__(
        self,
        book: PromptBook,
        *,
        opener_id: int,
        guild_id: int,
        search: str | None,
        sort: PromptSort,
        with_age_restricted: bool,
    ) -> None:
        super().__init__(opener_id, PAGER_TIMEOUT)
        self.book = book
        self.guild_id = guild_id
        self.search = search
        self.sort: PromptSort = sort
        # Whether its channel may show entries from age-restricted channels.
        self.with_age_restricted = with_age_restricted
        self.entry: PromptRow | None = None

    def render(self) -> tuple[discord.Embed, discord.File | None] | None:
        """The current page, read afresh (stars and uses change, entries get deleted); None when none match."""
        db = self.book.bot.db
        rows, total = self._page()
        if not rows and total:
            self.index = total - 1
            rows, total = self._page()
        if not rows:
            return None
        self.entry = entry = rows[0]
        generation = db.find_generation(entry.generation_id) if entry.generation_id else None
        guild = self.book.bot.get_guild(self.guild_id)
        size_limit = guild.filesize_limit if guild else DEFAULT_UPLOAD_LIMIT
        upload, name = image_upload(generation, size_limit) if generation else (None, None)
        embed = card_embed(entry, name)
        embed.add_field(name="Stars", value=f"{STAR} {entry.stars}")
        embed.add_field(name="Uses", value=str(entry.uses))
        embed.set_footer(text=f"{self.index + 1} / {total} · prompt #{entry.id}")
        self.previous.disabled = self.index == 0
        self.next.disabled = self.index >= total - 1
        return embed, upload

    def _page(self) -> tuple[list[PromptRow], int]:
        return self.book.bot.db.search_prompts(
            self.guild_id,
            search=self.search,
            sort=self.sort,
            with_age_restricted=self.with_age_restricted,
            offset=self.index,
        )

    @discord.ui.button(label="Try with my face", emoji="🪄", style=discord.ButtonStyle.primary)
    @reports_errors
    async def try_it(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        if self.entry is not None:
            await self.book.render(interaction, self.entry.id)


async def setup(bot: DreamBot) -> None:
    await bot.add_cog(PromptBook(bot))

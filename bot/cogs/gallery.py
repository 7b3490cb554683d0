"""The shared gallery: every generation mirrored to the gallery channel, ⭐ stars, and /gallery.

The mirror post links back to the original and mentions its author without pinging anyone. A ⭐
reaction on a mirror post counts as a star (the bot's own ⭐, added so people can click it, does
not); /gallery pages through the server's generations, newest or most starred first. Stars given
while the bot was offline reach it as no event: at start-up it counts them on recent posts.

A picture made in an age-restricted channel (or a thread of one) is shown only in age-restricted
channels (bot.views.may_show), here and everywhere else. Its row says so; for the pictures made before
rows did, the channels are looked up once at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Literal, cast

import discord
from discord import app_commands
from discord.ext import commands

from bot.bot import DreamBot, reports_errors
from bot.consent import generation_refusal
from bot.db import GenerationRow
from bot.service import UserFacingError
from bot.uploads import DEFAULT_UPLOAD_LIMIT
from bot.views import STAR, Pager, generation_embed, image_upload, is_age_restricted, is_star_vote, may_show

if TYPE_CHECKING:
    from bot.cogs.imagine import Imagine

log = logging.getLogger(__name__)

# At start-up the stars of this many of the newest gallery posts, of at most this age, are counted
# again from their reactions (one request each).
RECOUNT_POSTS = 200
RECOUNT_SECONDS = 14 * 24 * 3600
# A /gallery pager stops answering after this long; /gallery again opens a new one.
PAGER_TIMEOUT = 15 * 60


def message_url(guild_id: int, channel_id: int, message_id: int) -> str:
    return f"https://discord.com/channels/{guild_id}/{channel_id}/{message_id}"


class Gallery(commands.Cog):
    def __init__(self, bot: DreamBot) -> None:
        self.bot = bot
        self._startup: list[asyncio.Task[None]] = []

    async def cog_load(self) -> None:
        self._startup = [
            asyncio.create_task(self.recount_stars(), name="recount stars"),
            asyncio.create_task(self.record_age_restrictions(), name="record age restrictions"),
        ]

    async def cog_unload(self) -> None:
        for task in self._startup:
            task.cancel()

    # -- the mirror ----------------------------------------------------------------------------

    @commands.Cog.listener()
    async def on_generation_posted(self, row: GenerationRow, message: discord.Message) -> None:
        """Sent by the imagine cog once a generation is posted: copy it to the gallery channel."""
        guild = self.bot.get_guild(row.guild_id)
        channel = self.bot.gallery_channel(guild)
        if guild is None or channel is None or channel.id == message.channel.id:
            return
        if not self.bot.db.member_settings(row.user_id).gallery:
            return  # she keeps her pictures out of the gallery (/settings)
        if not may_show(row.age_restricted, channel):
            return  # what an age-restricted channel allows stays in such channels
        job = self.bot.db.find_job(row.job_id)
        if job is None or generation_refusal(self.bot.db, job) is not None:
            return  # a model of it was withdrawn since its post: no copy spreads it further
        upload, name = image_upload(row, guild.filesize_limit)
        embed = generation_embed(row, name)
        embed.add_field(name="Original", value=f"[Jump to the post]({message.jump_url})")
        try:
            post = await channel.send(
                f"By <@{row.user_id}>",
                embed=embed,
                file=upload or discord.utils.MISSING,
                allowed_mentions=discord.AllowedMentions.none(),
            )
            if self.bot.db.find_generation(row.id) is None:
                # Deleted while this copy was being posted: the copy goes too.
                await post.delete()
                return
            self.bot.db.update_generation(row.id, gallery_message_id=post.id)
            await post.add_reaction(STAR)
        except discord.HTTPException as error:
            # A gallery channel the bot may not post or react in: the original post stands anyway.
            log.warning("could not mirror generation %s to #%s: %s", row.id, channel.name, error)

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
        row = self.bot.db.generation_by_gallery_message(payload.message_id)
        if row is None or row.guild_id != payload.guild_id:
            return
        # No await between reading and writing: concurrent reactions cannot lose a count.
        self.bot.db.update_generation(row.id, stars=max(0, row.stars + change))

    async def recount_stars(self) -> None:
        """Count the stars of recent gallery posts from their reactions: those added or removed while
        the bot was offline never arrive as events."""
        await self.bot.wait_until_ready()
        since = time.time() - RECOUNT_SECONDS
        changed = 0
        for row in self.bot.db.gallery_posts_since(since, RECOUNT_POSTS):
            channel = self.bot.gallery_channel(self.bot.get_guild(row.guild_id))
            if channel is None or row.gallery_message_id is None:
                continue
            try:
                post = await channel.fetch_message(row.gallery_message_id)
            except discord.NotFound:
                continue  # deleted by hand: the stars it had stay counted
            except discord.HTTPException as error:
                log.warning("could not recount the stars of generation %s: %s", row.id, error)
                continue
            stars = next(
                (reaction.count - reaction.me for reaction in post.reactions if str(reaction.emoji) == STAR),
                0,
            )
            # Read again: a star may have arrived as an event while the post was fetched.
            current = self.bot.db.find_generation(row.id)
            if current is not None and current.stars == row.stars and stars != row.stars:
                self.bot.db.update_generation(row.id, stars=stars)
                changed += 1
        if changed:
            log.info("recounted the stars of %d gallery posts changed while the bot was offline", changed)

    # -- age restrictions of older pictures ----------------------------------------------------

    async def record_age_restrictions(self) -> None:
        """Record whether the channels of pictures made before the bot recorded it are age-restricted:
        until then they count as age-restricted, hidden from ordinary channels."""
        await self.bot.wait_until_ready()
        for guild_id, channel_id in self.bot.db.channels_without_age_restriction():
            guild = self.bot.get_guild(guild_id)
            if guild is None:
                continue  # a server the bot is not in (now): looked at again at the next start
            # An archived thread is not in the cache: it is fetched.
            channel = guild.get_channel_or_thread(channel_id)
            if channel is None:
                try:
                    channel = await self.bot.fetch_channel(channel_id)
                except discord.NotFound:
                    # Deleted: nothing tells what it was, so its pictures count as age-restricted.
                    self.bot.db.record_age_restriction(channel_id, True)
                    continue
                except discord.HTTPException as error:
                    log.warning("could not look up channel %s of older pictures: %s", channel_id, error)
                    continue
            self.bot.db.record_age_restriction(channel_id, is_age_restricted(channel))

    # -- /gallery ------------------------------------------------------------------------------

    @app_commands.command()
    @app_commands.guild_only()
    @app_commands.describe(
        user="Only this member's images",
        model="Only images made with this token's model",
        search="Words that must be in the prompt",
        sort="Newest first, or most starred first",
    )
    async def gallery(
        self,
        interaction: discord.Interaction,
        user: discord.User | None = None,
        model: app_commands.Range[str, 1, 100] | None = None,
        search: app_commands.Range[str, 1, 200] | None = None,
        sort: Literal["newest", "top"] = "newest",
    ) -> None:
        """Browse the images made on this server."""
        assert interaction.guild is not None  # guild_only
        pager = GalleryPager(
            self.bot,
            opener_id=interaction.user.id,
            guild_id=interaction.guild.id,
            with_age_restricted=may_show(True, interaction.channel),
            user_id=user.id if user else None,
            token=model.strip().lower() if model else None,
            search=search,
            sort=sort,
        )
        page = pager.render()
        if page is None:
            raise UserFacingError("No images match that yet.")
        embed, upload = page
        await interaction.response.send_message(embed=embed, file=upload or discord.utils.MISSING, view=pager)
        pager.message = await interaction.original_response()

    @gallery.autocomplete("model")
    async def _model_choices(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        if interaction.guild is None:
            return []
        tokens = [model.token for model in self.bot.db.ready_models(interaction.guild.id)]
        return [app_commands.Choice(name=token, value=token) for token in tokens if current.lower() in token][
            :25
        ]


class GalleryPager(Pager):
    """One /gallery result at a time; only the member who opened it can turn its pages."""

    not_yours = "This is someone else's gallery: use /gallery to browse your own."
    nothing_left = "No images match any more."

    def __init__(
        self,
        bot: DreamBot,
        *,
        opener_id: int,
        guild_id: int,
        user_id: int | None,
        token: str | None,
        search: str | None,
        sort: Literal["newest", "top"],
        with_age_restricted: bool,
    ) -> None:
        super().__init__(opener_id, PAGER_TIMEOUT)
        # Whether its channel may show pictures made in age-restricted channels.
        self.with_age_restricted = with_age_restricted
        self.bot = bot
        self.guild_id = guild_id
        self.user_id = user_id
        self.token = token
        self.search = search
        self.sort: Literal["newest", "top"] = sort
        self.row: GenerationRow | None = None

    def render(self) -> tuple[discord.Embed, discord.File | None] | None:
        """The current page, read afresh (stars change, images get deleted); None when none match."""
        rows, total = self._page()
        if not rows and total:
            # Images were deleted since the last page: show the new last one.
            self.index = total - 1
            rows, total = self._page()
        if not rows:
            return None
        self.row = row = rows[0]
        guild = self.bot.get_guild(self.guild_id)
        size_limit = guild.filesize_limit if guild else DEFAULT_UPLOAD_LIMIT
        upload, name = image_upload(row, size_limit)
        embed = generation_embed(row, name)
        embed.add_field(name="Stars", value=f"{STAR} {row.stars}")
        if row.message_id is not None:
            link = message_url(row.guild_id, row.channel_id, row.message_id)
            embed.add_field(name="Original", value=f"[Jump to the post]({link})")
        embed.set_footer(text=f"{self.index + 1} / {total} · generation #{row.id}")
        self.previous.disabled = self.index == 0
        self.next.disabled = self.index >= total - 1
        return embed, upload

    def _page(self) -> tuple[list[GenerationRow], int]:
        return self.bot.db.search_generations(
            self.guild_id,
            user_id=self.user_id,
            token=self.token,
            search=self.search,
            sort=self.sort,
            with_age_restricted=self.with_age_restricted,
            offset=self.index,
            limit=1,
        )

    @discord.ui.button(label="Use prompt", emoji="✏️", style=discord.ButtonStyle.primary)
    @reports_errors
    async def use_prompt(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        # Not isinstance: load_extension executes the imagine module afresh, so its class differs.
        cog = cast("Imagine | None", self.bot.get_cog("Imagine"))
        if cog is not None and self.row is not None:
            await cog.open_prompt_modal(interaction, self.row.id)


async def setup(bot: DreamBot) -> None:
    await bot.add_cog(Gallery(bot))

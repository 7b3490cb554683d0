"""The Discord client: loads one cog per feature, owns the database and the job queue.

Cogs turn requests into jobs through `bot.service` and talk to the engine only through `bot.jobs`.
Job events come back as discord.py custom events named by the job's kind, so a cog listens to its
own kind only:

    @commands.Cog.listener()
    async def on_training_progress(self, job: JobRow, event: Progress) -> None: ...

    # on_{training,generation}_accepted(job, Accepted), ..._progress(job, Progress),
    # on_training_finished(job, TrainingDone), on_generation_finished(job, GenerationDone),
    # on_{training,generation}_failed(job, Error)
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec

import discord
from discord import app_commands
from discord.ext import commands

from bot.config import BotConfig
from bot.db import Database, GenerationRow, JobRow, PostRow, PromptRow
from bot.jobs import JobQueue
from bot.pools import worker_pool
from bot.service import UserFacingError
from bot.words import load_base_vocabulary
from bot.workers import WorkerPool

if TYPE_CHECKING:
    from engine.contract.protocol import Event

log = logging.getLogger(__name__)

P = ParamSpec("P")

# The name a job event is dispatched under: {kind}_{event}, as in on_generation_finished.
JOB_EVENT_KINDS = {"train": "training", "generate": "generation"}
JOB_EVENT_NAMES = {
    "accepted": "accepted",
    "progress": "progress",
    "trained": "finished",
    "generated": "finished",
    "error": "failed",
}

COGS = (
    "bot.cogs.training",
    "bot.cogs.models",
    "bot.cogs.queue",
    "bot.cogs.privacy",
    "bot.cogs.help",
    "bot.cogs.imagine",
    "bot.cogs.gallery",
    "bot.cogs.info",
    "bot.cogs.promptbook",
    "bot.cogs.admin",
    "bot.cogs.settings",
)


# While the gateway is connected the bot touches data_dir/heartbeat this often; `dreambot health`
# (the Docker HEALTHCHECK) calls it unhealthy once the file is older than HEARTBEAT_MAX_AGE.
HEARTBEAT_INTERVAL = 20.0
HEARTBEAT_MAX_AGE = 3 * HEARTBEAT_INTERVAL


class DreamBot(commands.Bot):
    def __init__(self, config: BotConfig, pool: WorkerPool | None = None) -> None:
        intents = discord.Intents.default()
        # The bot never joins voice: no "PyNaCl is not installed" warnings at every start.
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            help_command=None,
            # Nothing the bot posts pings anyone unless a message opts in for the member it answers.
            allowed_mentions=discord.AllowedMentions.none(),
        )
        self.config = config
        self.db = Database.in_data_dir(config.data_dir)
        # The config's pool unless the caller hands one in (a test, a hostile engine).
        self.jobs = JobQueue(self.db, config, on_event=self._on_job_event, pool=pool or worker_pool(config))
        self._heartbeat: asyncio.Task[None] | None = None
        # Model names are checked against the base model's tokenizer: read it once, here.
        load_base_vocabulary(config.model.base)

    async def setup_hook(self) -> None:
        for extension in COGS:
            await self.load_extension(extension)
        self.tree.on_error = self.on_app_command_error
        await self.jobs.start()
        self._heartbeat = asyncio.create_task(self._beat(), name="heartbeat")
        await self.sync_commands()

    async def sync_commands(self) -> None:
        """Guild syncs show up at once; a global sync can take up to an hour to reach every client."""
        guild_ids = self.config.discord.guild_ids
        if not guild_ids:
            await self.tree.sync()
            return
        for guild_id in guild_ids:
            guild = discord.Object(id=guild_id)
            self.tree.copy_global_to(guild=guild)
            await self.tree.sync(guild=guild)

    async def close(self) -> None:
        """Stop taking jobs, let the engines checkpoint and exit, then close the gateway (a close frame)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        heartbeat_path(self.config).unlink(missing_ok=True)
        await self.jobs.stop()
        await super().close()
        self.db.close()

    async def on_message(self, message: discord.Message, /) -> None:
        """Chat is never a command, not even chat that mentions the bot: every command is an app
        command, so a message is neither parsed nor answered (commands.Bot's would log each mention
        as an unknown command)."""

    def check_engine_available(self) -> None:
        """Refuse a new job at once while no engine has been there for a while (the queue fails the
        waiting ones then): the member hears it now rather than after her job waited for nothing."""
        if (message := self.jobs.unavailable_message()) is not None:
            raise UserFacingError(message)

    async def _beat(self) -> None:
        path = heartbeat_path(self.config)
        while True:
            await self.wait_until_ready()
            if self.ws is not None and self.ws.open:
                path.touch()
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def _on_job_event(self, job: JobRow, event: Event) -> None:
        # e.g. a training's Progress -> on_training_progress(job, event): each cog hears its own kind.
        self.dispatch(f"{JOB_EVENT_KINDS[job.kind]}_{JOB_EVENT_NAMES[event.type]}", job, event)

    # -- channels ----------------------------------------------------------------------------

    def prompts_channel(self, guild: discord.Guild | None) -> discord.TextChannel | None:
        return _configured_channel(guild, self.config.discord.prompts_channel)

    def gallery_channel(self, guild: discord.Guild | None) -> discord.TextChannel | None:
        return _configured_channel(guild, self.config.discord.gallery_channel)

    async def delete_generation_posts(self, row: GenerationRow) -> list[discord.PartialMessage]:
        """Take a picture down: its post where it was asked for, and its copy in the gallery.

        Returns the posts Discord refused to delete (see take_down)."""
        guild = self.get_guild(row.guild_id)
        posts = [
            (guild.get_channel_or_thread(row.channel_id) if guild else None, row.message_id),
            (self.gallery_channel(guild), row.gallery_message_id),
        ]
        return await self.take_down(
            channel.get_partial_message(message_id)
            for channel, message_id in posts
            if isinstance(channel, discord.TextChannel | discord.Thread) and message_id is not None
        )

    def prompt_cards(self, entries: Iterable[PromptRow]) -> list[discord.PartialMessage]:
        """The cards of prompt book entries, to take down (see take_down)."""
        return [
            self.get_partial_messageable(entry.card_channel_id, guild_id=entry.guild_id).get_partial_message(
                entry.card_message_id
            )
            for entry in entries
            if entry.card_channel_id is not None and entry.card_message_id is not None
        ]

    def record_post(self, message: discord.Message, job: JobRow) -> None:
        """Remember a message about a member's job or model, so that /forget and /model delete find it."""
        in_dm = isinstance(message.channel, discord.DMChannel)
        self.db.add_post(
            message_id=message.id,
            channel_id=message.channel.id,
            guild_id=None if in_dm else job.guild_id,
            user_id=job.user_id,
            model_id=job.model_id,
            job_id=job.id,
        )

    async def take_down_posts(self, posts: Iterable[PostRow]) -> list[discord.PartialMessage]:
        """Delete recorded posts and forget them, refused ones too (the member hears of those)."""
        posts = list(posts)
        refused = await self.take_down(
            self.get_partial_messageable(post.channel_id, guild_id=post.guild_id).get_partial_message(
                post.message_id
            )
            for post in posts
        )
        self.db.delete_posts([post.message_id for post in posts])
        return refused

    async def take_down(self, messages: Iterable[discord.PartialMessage]) -> list[discord.PartialMessage]:
        """Delete messages of the bot; returns those Discord refused (403: the bot lost access to the
        channel), for the member to hear of. One already deleted by hand is down all the same."""
        refused = []
        for message in messages:
            try:
                await message.delete()
            except discord.NotFound:
                pass
            except discord.Forbidden:
                refused.append(message)
        return refused

    # -- the one error handler ---------------------------------------------------------------

    async def on_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        await report_error(interaction, error)


def reports_errors(
    action: Callable[Concatenate[Any, discord.Interaction, P], Awaitable[None]],
) -> Callable[Concatenate[Any, discord.Interaction, P], Coroutine[Any, Any, None]]:
    """The one way a component handles its errors: a button's callback, a modal's on_submit or a
    view's button decorated with it reports what it raises as a command's error is (report_error)."""

    @functools.wraps(action)
    async def reporting(
        component: Any, interaction: discord.Interaction, /, *args: P.args, **kwargs: P.kwargs
    ) -> None:
        try:
            await action(component, interaction, *args, **kwargs)
        except Exception as error:
            await report_error(interaction, error)

    return reporting


async def report_error(interaction: discord.Interaction, error: Exception) -> None:
    """The one error handler: commands reach it through the tree, components through reports_errors."""
    original = getattr(error, "original", error)
    if isinstance(original, UserFacingError):
        message = str(original)
    elif isinstance(error, app_commands.MissingPermissions):
        message = "Only server managers (Manage Server permission) can do that."
    elif isinstance(error, app_commands.CheckFailure):
        message = str(error) or "You can't use that command here."
    elif isinstance(error, app_commands.CommandOnCooldown):
        message = f"Slow down: try again in {error.retry_after:.0f} s."
    else:
        # A component's or modal's custom_id only: a modal's values may hold a secret (a Hub token).
        data = interaction.data or {}
        command = interaction.command.qualified_name if interaction.command else data.get("custom_id")
        log.error("interaction %s failed", command, exc_info=original)
        message = "Something went wrong on my side. It has been logged; please try again."
    await reply_privately(interaction, message)


async def reply_privately(interaction: discord.Interaction, message: str) -> None:
    """An ephemeral answer, whether or not the interaction was already answered or deferred."""
    try:
        if interaction.response.is_done():
            await interaction.followup.send(message, ephemeral=True)
        else:
            await interaction.response.send_message(message, ephemeral=True)
    except discord.HTTPException:
        log.warning("could not tell user %s: %s", interaction.user.id, message)


def heartbeat_path(config: BotConfig) -> Path:
    return config.data_dir / "heartbeat"


def _configured_channel(guild: discord.Guild | None, wanted: str) -> discord.TextChannel | None:
    """A channel named in the config by id or by name (with or without the leading #)."""
    if guild is None or not wanted:
        return None
    if wanted.isdigit():
        channel = guild.get_channel(int(wanted))
    else:
        channel = discord.utils.get(guild.text_channels, name=wanted.removeprefix("#"))
    return channel if isinstance(channel, discord.TextChannel) else None

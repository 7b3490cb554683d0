"""Server managers' commands: every job in the server, cancelling any of them, and per-member limits.

Discord hides /admin from members without Manage Server (default_permissions), and each command checks
the permission again at run time, since a server can override what Discord shows to whom.
"""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from bot.bot import DreamBot
from bot.db import ACTIVE_JOB_STATES
from bot.service import MAX_MODELS_KEY, MAX_QUEUED_KEY, UserFacingError, member_limits
from bot.views import cancel_job, describe_job, jobs_message


@app_commands.guild_only()
@app_commands.default_permissions(manage_guild=True)
class Admin(
    commands.GroupCog, group_name="admin", group_description="Server managers: the queue and the limits."
):
    def __init__(self, bot: DreamBot) -> None:
        self.bot = bot

    @app_commands.command(name="queue")
    @app_commands.checks.has_permissions(manage_guild=True)
    async def queue(self, interaction: discord.Interaction[DreamBot]) -> None:
        """Every waiting and running job in this server, with a button to cancel each."""
        jobs = [job for job in self.bot.db.active_jobs() if job.guild_id == interaction.guild_id]
        if not jobs:
            await interaction.response.send_message(
                "Nothing is waiting or running in this server.", ephemeral=True
            )
            return
        text, view = jobs_message(self.bot, jobs, with_member=True)
        await interaction.response.send_message(f"**Jobs in this server**\n{text}", view=view, ephemeral=True)

    @app_commands.command(name="cancel")
    @app_commands.checks.has_permissions(manage_guild=True)
    @app_commands.describe(job_id="The job's id, as /admin queue shows it")
    async def cancel(self, interaction: discord.Interaction[DreamBot], job_id: str) -> None:
        """Cancel any member's job in this server."""
        job = self.bot.db.find_job(job_id.strip().lower())
        if job is None or job.guild_id != interaction.guild_id:
            raise UserFacingError(
                f"There is no job `{discord.utils.escape_markdown(job_id[:20])}` in this server."
            )
        if job.state not in ACTIVE_JOB_STATES or not await cancel_job(self.bot, job, interaction.user):
            raise UserFacingError(f"Job `{job.id}` has already finished ({job.state}).")
        await interaction.response.send_message(
            f"Cancelled <@{job.user_id}>'s {describe_job(job)} (`{job.id}`).", ephemeral=True
        )

    @app_commands.command(name="limits")
    @app_commands.checks.has_permissions(manage_guild=True)
    @app_commands.describe(
        max_queued_jobs="Jobs one member may have waiting or running at once",
        max_models="Models one member may keep in this server (0 turns training off)",
    )
    async def limits(
        self,
        interaction: discord.Interaction[DreamBot],
        max_queued_jobs: app_commands.Range[int, 1, 50] | None = None,
        max_models: app_commands.Range[int, 0, 100] | None = None,
    ) -> None:
        """Show or set the per-member limits in this server."""
        assert interaction.guild_id is not None
        if max_queued_jobs is not None:
            self.bot.db.set_setting(interaction.guild_id, MAX_QUEUED_KEY, max_queued_jobs)
        if max_models is not None:
            self.bot.db.set_setting(interaction.guild_id, MAX_MODELS_KEY, max_models)
        limits = member_limits(self.bot.db, self.bot.config, interaction.guild_id)
        changed = max_queued_jobs is not None or max_models is not None
        await interaction.response.send_message(
            f"{'Limits updated' if changed else 'Limits'} for each member of this server:\n"
            f"• jobs waiting or running at once: **{limits.max_queued_jobs}**\n"
            f"• models kept: **{limits.max_models}**\n"
            "A member's jobs in every server count toward their jobs at once here.",
            ephemeral=True,
        )


async def setup(bot: DreamBot) -> None:
    await bot.add_cog(Admin(bot))

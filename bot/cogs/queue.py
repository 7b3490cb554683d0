"""/queue: a member's waiting and running jobs, with a Cancel button for each."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from bot.bot import DreamBot
from bot.views import CancelJobButton, jobs_message


class Queue(commands.Cog):
    def __init__(self, bot: DreamBot) -> None:
        self.bot = bot

    async def cog_load(self) -> None:
        # The buttons of /queue and /admin queue alike, after any restart.
        self.bot.add_dynamic_items(CancelJobButton)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(CancelJobButton)

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


async def setup(bot: DreamBot) -> None:
    await bot.add_cog(Queue(bot))

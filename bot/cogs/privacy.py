"""/forget: a member's right to leave no trace, in the database, the data directory and the channels."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import discord
from discord import app_commands
from discord.ext import commands

from bot.bot import DreamBot
from bot.db import ACTIVE_JOB_STATES
from bot.storage import adapter_dir, generation_dir, photos_dir, remove_paths
from bot.views import confirm, count, refusal_line

# A running job stops at its next step; deleting its files before then would race the engine.
CANCEL_WAIT_SECONDS = 30.0


class Privacy(commands.Cog):
    def __init__(self, bot: DreamBot) -> None:
        self.bot = bot

    @app_commands.command(name="forget")
    async def forget(self, interaction: discord.Interaction[DreamBot]) -> None:
        """Delete everything I keep about you: photos, models, pictures, my messages and your records."""
        question = (
            "Delete **everything** I keep about you, in every server: your training photos, models and "
            "pictures, the pictures others made with your models, your saved prompts and those that use "
            "your models, my messages about them, and every record of you? Running jobs are cancelled. "
            "This cannot be undone."
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
            await self.bot.jobs.wait_finished([job.id for job in active], CANCEL_WAIT_SECONDS)

        jobs = db.jobs_to_forget(user_id)
        generations = db.generations_to_forget(user_id)
        prompts = db.prompts_to_forget(user_id)
        refused = await self.bot.take_down_posts(db.posts_to_forget(user_id))
        refused += await self.bot.take_down(self.bot.prompt_cards(prompts))
        for generation in generations:
            refused += await self.bot.delete_generation_posts(generation)
        config = self.bot.config
        paths: list[str | Path] = [adapter_dir(config, model.guild_id, model.token) for model in models]
        for job in jobs:
            paths.append(
                photos_dir(config, job.id) if job.kind == "train" else generation_dir(config, job.id)
            )
        await self.bot.jobs.forget_adapters(paths)
        paths.extend(db.forget_user(user_id))
        await asyncio.to_thread(db.scrub)
        files = await asyncio.to_thread(remove_paths, config, paths)
        await interaction.edit_original_response(
            content=(
                f"Done. I deleted {count(len(models), 'model')}, {count(len(jobs), 'job')}, "
                f"{count(len(generations), 'picture')} (their posts and gallery copies too), "
                f"{count(len(prompts), 'saved prompt')} (their cards too) and "
                f"{count(files, 'file')} (photos, model weights, samples and pictures), and took down my "
                "messages about your trainings and images. Nothing of yours is left in my records"
                + (f".{refusal_line(refused)}" if refused else " or in the channels.")
            )
        )


async def setup(bot: DreamBot) -> None:
    await bot.add_cog(Privacy(bot))

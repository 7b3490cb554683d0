"""/settings show|set|reset: a member's own defaults for /imagine, and whether her pictures go to the
gallery.

They follow her across servers (one row per member), except her default model, which is one of a
server's models and so is chosen per server (bot.db `default_models`, gone with the model).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.bot import DreamBot
from bot.db import MemberSettings
from bot.prompts import MAX_COMMAND_STEPS
from bot.service import check_member_settings, choose_default_model, default_model
from bot.words import normalize_token
from engine.contract.protocol import MAX_GUIDANCE, MAX_IMAGES


class Settings(commands.Cog):
    settings = app_commands.Group(
        name="settings", description="Your defaults for /imagine, and the gallery.", guild_only=True
    )

    def __init__(self, bot: DreamBot) -> None:
        self.bot = bot

    @settings.command(name="show")
    async def show(self, interaction: discord.Interaction[DreamBot]) -> None:
        """Your defaults for /imagine, and whether your pictures go to the gallery."""
        await interaction.response.defer(ephemeral=True)
        await interaction.edit_original_response(content=self._describe(interaction))

    async def own_ready_models(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        if interaction.guild_id is None:
            return []
        typed = normalize_token(current)
        models = self.bot.db.models_of(interaction.user.id, interaction.guild_id)
        return [
            app_commands.Choice(name=model.token, value=model.token)
            for model in models
            if model.state == "ready" and model.token.startswith(typed)
        ][:25]

    @settings.command(name="set")
    @app_commands.describe(
        model="Your model that [SUBJECT] and [me] stand for in this server (else your newest)",
        aspect="The picture's shape",
        steps="Denoising steps: more is slower and finer",
        guidance="How closely to follow the prompt",
        negative="What to keep out of your pictures",
        count="How many pictures at a time",
        gallery="Whether your pictures are copied to the gallery channel",
    )
    @app_commands.autocomplete(model=own_ready_models)
    async def set_(
        self,
        interaction: discord.Interaction[DreamBot],
        model: str | None = None,
        aspect: Literal["square", "portrait", "landscape"] | None = None,
        steps: app_commands.Range[int, 1, MAX_COMMAND_STEPS] | None = None,
        guidance: app_commands.Range[float, 0.0, MAX_GUIDANCE] | None = None,
        negative: app_commands.Range[str, 1, 1000] | None = None,
        count: app_commands.Range[int, 1, MAX_IMAGES] | None = None,
        gallery: bool | None = None,
    ) -> None:
        """Set your defaults for /imagine (what you leave out stays as it is)."""
        await interaction.response.defer(ephemeral=True)
        db, user = self.bot.db, interaction.user
        given = {"aspect": aspect, "steps": steps, "guidance": guidance, "count": count, "gallery": gallery}
        changes = {name: value for name, value in given.items() if value is not None}
        if negative is not None:
            changes["negative_prompt"] = negative
        settings = dataclasses.replace(db.member_settings(user.id), **changes)
        # Everything is checked before anything is stored: a refusal changes nothing.
        check_member_settings(settings)
        db.ensure_user(user.id, user.name)
        if model is not None:
            assert interaction.guild_id is not None
            choose_default_model(db, interaction.guild_id, user.id, model)
        db.set_member_settings(user.id, settings)
        await interaction.edit_original_response(content="Saved.\n" + self._describe(interaction))

    @settings.command(name="reset")
    async def reset(self, interaction: discord.Interaction[DreamBot]) -> None:
        """Back to the server's defaults, your newest model and the gallery."""
        await interaction.response.defer(ephemeral=True)
        db, user = self.bot.db, interaction.user
        assert interaction.guild_id is not None
        db.ensure_user(user.id, user.name)
        db.set_member_settings(user.id, MemberSettings())
        db.set_default_model(user.id, interaction.guild_id, None)
        await interaction.edit_original_response(content="Reset.\n" + self._describe(interaction))

    def _describe(self, interaction: discord.Interaction) -> str:
        assert interaction.guild_id is not None
        db, config = self.bot.db, self.bot.config
        mine = db.member_settings(interaction.user.id)
        chosen = db.default_model(interaction.user.id, interaction.guild_id)
        subject = default_model(db, interaction.guild_id, interaction.user.id)
        if subject is None:
            model = "none yet: train one with `/train`"
        else:
            model = f"**{subject.token}**" + (" (chosen)" if chosen == subject else " (your newest)")

        def value(mine: object, default: object) -> str:
            return f"{mine}" if mine is not None else f"{default} (server default)"

        negative = discord.utils.escape_markdown(mine.negative_prompt) if mine.negative_prompt else None
        return "\n".join(
            [
                "**Your settings** (/imagine uses them for what you leave out)",
                f"Model for [SUBJECT] and [me] in this server: {model}",
                f"Aspect: {value(mine.aspect, 'square')}",
                f"Steps: {value(mine.steps, config.generation.steps)}",
                f"Guidance: {value(_number(mine.guidance), _number(config.generation.guidance))}",
                f"Pictures at a time: {value(mine.count, 1)}",
                f"Negative prompt: {value(negative, 'none of your own')}",
                "Gallery: "
                + ("your pictures are copied there" if mine.gallery else "your pictures stay out"),
            ]
        )


def _number(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


async def setup(bot: DreamBot) -> None:
    await bot.add_cog(Settings(bot))

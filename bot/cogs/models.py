"""A member's models: /models, /model delete|share|export|publish."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.bot import DreamBot, reports_errors
from bot.db import ModelRow
from bot.publish import check_repo_id, publish_model
from bot.service import (
    UserFacingError,
    delete_model,
    export_adapter,
    export_instructions,
    member_limits,
    model_files,
)
from bot.uploads import DEFAULT_UPLOAD_LIMIT
from bot.views import confirm, count, refusal_line
from bot.words import normalize_token

# A running job stops at its next step; deleting its files before then would race the engine.
CANCEL_WAIT_SECONDS = 30.0
STATE_ICONS = {"queued": "⏳", "training": "🏋️", "ready": "✅", "failed": "❌"}


class Models(commands.Cog):
    model = app_commands.Group(
        name="model", description="Manage one of your trained models.", guild_only=True
    )

    def __init__(self, bot: DreamBot) -> None:
        self.bot = bot

    def _own_model(self, interaction: discord.Interaction, name: str) -> ModelRow:
        assert interaction.guild_id is not None
        token = normalize_token(name)
        model = self.bot.db.model_by_token(interaction.guild_id, token)
        # Someone else's model is reported the same as a missing one: names are not probed this way.
        if model is None or model.owner_id != interaction.user.id:
            shown = discord.utils.escape_markdown(token[:40])
            raise UserFacingError(f"You have no model called **{shown}** in this server. See `/models`.")
        return model

    async def model_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        if interaction.guild_id is None:
            return []
        typed = normalize_token(current)
        models = self.bot.db.models_of(interaction.user.id, interaction.guild_id)
        return [
            app_commands.Choice(name=f"{model.token} ({model.state})", value=model.token)
            for model in models
            if model.token.startswith(typed)
        ][:25]

    @app_commands.command(name="models")
    @app_commands.guild_only()
    async def list_models(self, interaction: discord.Interaction[DreamBot]) -> None:
        """Your trained models in this server."""
        assert interaction.guild_id is not None
        models = self.bot.db.models_of(interaction.user.id, interaction.guild_id)
        if not models:
            await interaction.response.send_message(
                "You have no models here yet. Start with `/train` (see `/help` for tips).", ephemeral=True
            )
            return
        max_models = member_limits(self.bot.db, self.bot.config, interaction.guild_id).max_models
        lines = [f"**Your models** ({len(models)}, the limit is {max_models}):"]
        lines.extend(_model_line(model) for model in models)
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    @model.command(name="delete")
    @app_commands.describe(name="The model's name")
    @app_commands.autocomplete(name=model_autocomplete)
    async def delete_model(self, interaction: discord.Interaction[DreamBot], name: str) -> None:
        """Delete one of your models: the trained file, its samples and any training still running."""
        model = self._own_model(interaction, name)
        running = [job for job in self.bot.db.active_jobs(interaction.user.id) if job.model_id == model.id]
        # Read first: the cancellation deletes the model row, which unlinks its posts.
        posts = self.bot.db.posts_of_model(model.id)
        question = f"Delete **{model.token}** for good?" + (
            " Its training will be cancelled." if running else " Pictures already made stay."
        )
        if not await confirm(interaction, question, "Delete"):
            return
        for job in running:
            await self.bot.jobs.cancel(job.id)
        with contextlib.suppress(TimeoutError):  # what did not stop in time is deleted anyway
            await self.bot.jobs.wait_finished([job.id for job in running], CANCEL_WAIT_SECONDS)
        # A cancelled training deletes its model too (bot.service.end_training); both go one way.
        await self.bot.jobs.forget_adapters(model_files(self.bot.config, model))
        delete_model(self.bot.db, self.bot.config, model)
        refused = await self.bot.take_down_posts(posts)
        await interaction.edit_original_response(
            content=f"Deleted **{model.token}**, its samples and its training messages.{refusal_line(refused)}"
        )

    @model.command(name="share")
    @app_commands.describe(
        name="The model's name", state="on: anyone here may use it in /imagine; off: only you"
    )
    @app_commands.autocomplete(name=model_autocomplete)
    async def share_model(
        self, interaction: discord.Interaction[DreamBot], name: str, state: Literal["on", "off"]
    ) -> None:
        """Let others in this server use your model in /imagine, or stop them (off by default)."""
        model = self._own_model(interaction, name)
        self.bot.db.update_model(model.id, shared=state == "on")
        if state == "on":
            message = f"**{model.token}** is shared: anyone in this server can use it in `/imagine` now."
        else:
            message = (
                f"**{model.token}** is private: only you can use it. "
                "Nobody else renders your face unless you say so."
            )
        await interaction.response.send_message(message, ephemeral=True)

    @model.command(name="export")
    @app_commands.describe(name="The model's name")
    @app_commands.autocomplete(name=model_autocomplete)
    async def export_model(self, interaction: discord.Interaction[DreamBot], name: str) -> None:
        """Get your model's LoRA file by DM, for AUTOMATIC1111, Forge, ComfyUI or diffusers."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        model = self._own_model(interaction, name)
        # An adapter still in the old format is rewritten first: file work, off the event loop.
        export = await asyncio.to_thread(export_adapter, self.bot.config, model)
        size = export.path.stat().st_size
        if size > DEFAULT_UPLOAD_LIMIT:
            raise UserFacingError(
                f"The file of **{model.token}** is {size / 2**20:.1f} MB, more than Discord lets me send in a DM."
            )
        try:
            await interaction.user.send(
                f"Here is **{model.token}**, your LoRA for Stable Diffusion (kohya format).\n"
                + export_instructions(export),
                file=discord.File(export.path, filename=export.filename),
            )
        except discord.Forbidden:
            raise UserFacingError(
                "I couldn't DM you: your direct messages are closed. Allow DMs from server members "
                "(Privacy Settings of this server), then try again."
            ) from None
        await interaction.followup.send(f"Sent **{model.token}** to you by DM.", ephemeral=True)

    @model.command(name="publish")
    @app_commands.describe(
        name="The model's name",
        repo="Your Hugging Face repo to create: your-username/model-name, or model-name",
        visibility="private (the default: only you see it) or public (anyone can download your face)",
    )
    @app_commands.autocomplete(name=model_autocomplete)
    async def publish_model(
        self,
        interaction: discord.Interaction[DreamBot],
        name: str,
        repo: str,
        visibility: Literal["private", "public"] = "private",
    ) -> None:
        """Upload your model to your own Hugging Face account, with its samples and a model card."""
        # No defer: the answer is the token form, which must be the first response.
        model = self._own_model(interaction, name)
        if model.state != "ready" or not model.adapter_path:
            raise UserFacingError(
                f"**{model.token}** isn't trained yet ({model.state}), so there is nothing to publish."
            )
        modal = HubTokenModal(self, model.id, check_repo_id(repo), private=visibility == "private")
        await interaction.response.send_modal(modal)

    async def publish(
        self, interaction: discord.Interaction, model_id: int, repo: str, token: str, *, private: bool
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        model = self.bot.db.find_model(model_id)
        if model is None or model.owner_id != interaction.user.id:
            raise UserFacingError("That model is gone (deleted meanwhile), so nothing was published.")
        published = await asyncio.to_thread(
            publish_model, self.bot.config, model, repo, token, private=private
        )
        visibility = "private: only you see it" if published.private else "public: anyone can download it"
        await interaction.followup.send(
            f"Published **{model.token}** to <{published.url}> ({visibility}): the kohya file, the "
            f"diffusers weights, {count(published.samples, 'sample')} and a model card. "
            "I kept nothing of your token.",
            ephemeral=True,
        )


class HubTokenModal(discord.ui.Modal, title="Publish to Hugging Face"):
    # Read once in on_submit and handed to the upload; never stored, logged or shown again.
    token: discord.ui.TextInput[HubTokenModal] = discord.ui.TextInput(
        label="Your Hugging Face write token (used once)",
        placeholder="hf_... (huggingface.co/settings/tokens)",
        min_length=8,
        max_length=200,
    )

    def __init__(self, cog: Models, model_id: int, repo: str, *, private: bool) -> None:
        super().__init__()
        self.cog = cog
        self.model_id = model_id
        self.repo = repo
        self.private = private

    @reports_errors
    async def on_submit(self, interaction: discord.Interaction) -> None:
        await self.cog.publish(
            interaction, self.model_id, self.repo, self.token.value.strip(), private=self.private
        )


def _model_line(model: ModelRow) -> str:
    facts = [model.state, f"shared: {'on' if model.shared else 'off'}"]
    if model.metadata.get("steps"):
        facts.append(f"{model.metadata['steps']} steps")
    if model.metadata.get("photos"):
        facts.append(count(model.metadata["photos"], "photo"))
    facts.append(f"created <t:{int(model.created_at)}:R>")
    line = f"{STATE_ICONS.get(model.state, '•')} **{model.token}** ({model.class_word}): {' · '.join(facts)}"
    if model.state == "failed" and model.error:
        line += f"\n  ↳ {model.error}"
    return line


async def setup(bot: DreamBot) -> None:
    await bot.add_cog(Models(bot))

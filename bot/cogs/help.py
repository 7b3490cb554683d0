"""/help: how the bot works, its commands, and tips for good training photos."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from bot.bot import DreamBot

HELP_TEXT = """\
**How it works**
1. `/train` with 5-20 selfies and a made-up name, e.g. `abraza`. I check every photo first and tell \
you which ones I can't use and why; nothing is queued until the set is good.
2. The training runs on the GPU (minutes to half an hour). A progress message in the channel keeps \
you posted, and I post a few samples when it's done.
3. `/imagine abraza as a viking` draws you anywhere. AUTOMATIC1111's prompt syntax works: \
`(word:1.3)` and `(word)` stronger, `[word]` weaker, `BREAK`, and `<lora:abraza:0.7>` for less of you.
4. Share templates: `[me]` or `[SUBJECT]` stands for your own model, other words in capitals (`[ARTIST]`) are placeholders to fill in, as in `Portrait of [SUBJECT] as [CHARACTER], art by [ARTIST]`. **Use prompt** on anyone's picture puts your face in, not theirs.

**Commands**
`/train` · or right-click your own message with photos → Apps → **Train on these photos**
`/models` your models · `/model share` let others use one (off by default) · \
`/model export` the LoRA file by DM (A1111, Forge, ComfyUI) · `/model publish` to your own Hugging Face \
account (private by default) · `/model delete`
right-click a message with pictures → Apps → **Picture info** (or a picture's **Info** button): how it \
was made (prompt, seed, settings, LoRAs), from my PNGs, AUTOMATIC1111's or ComfyUI's, with **Use prompt**
`/prompt save` a prompt to the server's prompt book (or **Save prompt** under your picture) · \
`/prompt browse` search it, by stars, newest or most used · `/prompt use` render one with your face \
(or **Try with my face** on its card in the prompts channel); your model's name in a saved prompt becomes \
`[SUBJECT]`, so whoever uses it gets their own face · ⭐ a card to vote for it · `/prompt delete` one of yours
`/queue` your waiting and running jobs, with Cancel buttons
`/settings` your defaults for /imagine (model, aspect, steps, guidance, negative prompt, count) and whether your pictures go to the gallery
`/forget` delete everything I keep about you: your photos, models and pictures, the pictures \
others made with your models, your saved prompts and their cards, every message I posted about them, \
and every record of you

**Tips for good photos**
• Just you, face clearly visible, no sunglasses; a mix of close-ups and head-and-shoulders.
• Different places, light and clothes: what the photos share, the model learns as part of you.
• Sharp, well-lit, at least 720 px on the short side; no filters, no group shots.
• The name should be a made-up word: a real word already means something to the model.\
"""


class Help(commands.Cog):
    def __init__(self, bot: DreamBot) -> None:
        self.bot = bot

    @app_commands.command(name="help")
    async def help(self, interaction: discord.Interaction[DreamBot]) -> None:
        """How this bot works, its commands, and tips for good training photos."""
        embed = discord.Embed(
            title="DreamBot: teach me your face, then imagine yourself anywhere", description=HELP_TEXT
        )
        await interaction.response.send_message(embed=embed, ephemeral=True)


async def setup(bot: DreamBot) -> None:
    await bot.add_cog(Help(bot))

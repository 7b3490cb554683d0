"""The fake Discord in tests/fakediscord/, proven against a real discord.py client (no network).

Each test starts a FakeDiscord, runs a small commands.Bot with a cog against it, acts as users and
checks what the fake recorded. ``run()`` also fails a test that leaves tasks pending or leaks resources.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import discord
import discord.gateway
import discord.http
import pytest
from discord import app_commands
from discord.ext import commands
from fakediscord import CommandUnavailable, FakeDiscord, FakeGuild, run_async
from PIL import Image


def _png(width: int = 8, height: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 90)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()


# ------------------------------------------------------------------------------------- the test bot


class PanelView(discord.ui.View):
    """A persistent view (timeout None, fixed custom_ids), registered with bot.add_view()."""

    def __init__(self) -> None:
        super().__init__(timeout=None)

    @discord.ui.button(label="Name it", custom_id="panel:name", style=discord.ButtonStyle.primary)
    async def name_it(self, interaction: discord.Interaction, button: discord.ui.Button[PanelView]) -> None:
        await interaction.response.send_modal(NameModal(custom_id="name-modal"))

    @discord.ui.button(label="Done", custom_id="panel:done")
    async def done(self, interaction: discord.Interaction, button: discord.ui.Button[PanelView]) -> None:
        button.disabled = True
        await interaction.response.edit_message(content="done", view=self)


class NameModal(discord.ui.Modal, title="Name your model"):
    # One text input in an action row (legacy layout) and one inside a Label (type 18).
    model_name = discord.ui.TextInput(label="Name", custom_id="model_name", max_length=32)
    flavor = discord.ui.Label(
        text="Flavor", component=discord.ui.TextInput(custom_id="flavor", required=False)
    )

    async def on_submit(self, interaction: discord.Interaction) -> None:
        flavor = self.flavor.component.value  # type: ignore[attr-defined]
        await interaction.response.send_message(
            f"saved {self.model_name.value} ({flavor or 'plain'})", ephemeral=True
        )


class DreamCog(commands.Cog):
    model = app_commands.Group(name="model", description="Manage models")

    def __init__(self, bot: DreamTestBot) -> None:
        self.bot = bot
        self.count_menu = app_commands.ContextMenu(name="Count photos", callback=self.count_photos)
        self.wave_menu = app_commands.ContextMenu(name="Wave", callback=self.wave)

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.count_menu)
        self.bot.tree.add_command(self.wave_menu)

    @app_commands.command(name="imagine", description="Imagine something")
    async def imagine(
        self, interaction: discord.Interaction, prompt: str, count: app_commands.Range[int, 1, 4] = 1
    ) -> None:
        await interaction.response.defer(thinking=True)
        files = [discord.File(io.BytesIO(PNG), filename=f"image {i}.png") for i in range(count)]
        embed = discord.Embed(title=prompt).set_image(url="attachment://image_0.png")
        await interaction.followup.send(f"{count} × {prompt}", files=files, embed=embed)

    @imagine.autocomplete("prompt")
    async def imagine_prompt(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        names = ["abraza as thor", "abraza in space", "a cat"]
        return [app_commands.Choice(name=n, value=n) for n in names if n.startswith(current)]

    @app_commands.command(name="inspect", description="Look at a photo")
    async def inspect(self, interaction: discord.Interaction, photo: discord.Attachment) -> None:
        data = await photo.read()
        digest = hashlib.sha256(data).hexdigest()[:12]
        text = f"{photo.filename} {len(data)} {digest} {photo.width}x{photo.height}"
        echo = discord.File(io.BytesIO(data), filename="echo.png")
        await interaction.response.send_message(text, ephemeral=True, file=echo)

    @app_commands.command(name="panel", description="Post the naming panel")
    async def panel(self, interaction: discord.Interaction) -> None:
        assert isinstance(interaction.channel, discord.TextChannel)
        await interaction.channel.send("Pick a name", view=PanelView())
        await interaction.response.send_message("posted", ephemeral=True)

    @app_commands.command(name="purge", description="Admins only")
    @app_commands.default_permissions(manage_guild=True)
    async def purge(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message("purged")

    @app_commands.command(name="spicy", description="Age-restricted", nsfw=True)
    async def spicy(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message("🌶️")

    @model.command(name="delete", description="Delete a model")
    async def model_delete(self, interaction: discord.Interaction, name: str) -> None:
        await interaction.response.send_message(f"deleted {name}")

    @app_commands.command(name="post", description="Post a file in a channel")
    async def post(self, interaction: discord.Interaction, channel: discord.TextChannel) -> None:
        target = self.bot.get_channel(channel.id)
        assert isinstance(target, discord.TextChannel)
        message = await target.send("here you go", file=discord.File(io.BytesIO(PNG), filename="out.png"))
        await message.add_reaction("🎨")
        await interaction.response.send_message(f"posted {message.id}", ephemeral=True)

    @app_commands.command(name="big", description="Try to send a big file")
    async def big(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer()
        try:
            await interaction.followup.send(file=discord.File(io.BytesIO(b"x" * 5000), filename="big.bin"))
        except discord.HTTPException as exc:
            await interaction.followup.send(f"too big: {exc.status} {exc.code}")

    @app_commands.command(name="edits", description="Edit and delete responses")
    async def edits(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message("v1")
        await interaction.edit_original_response(
            content="v2", attachments=[discord.File(io.BytesIO(PNG), "v2.png")]
        )
        await interaction.followup.send("just for you", ephemeral=True)
        public = await interaction.followup.send("public", wait=True)
        await public.edit(content="public, edited")
        extra = await interaction.followup.send("short-lived", wait=True)
        await extra.delete()
        original = await interaction.original_response()
        await interaction.followup.send(
            f"original says {original.content} with {len(original.attachments)} file"
        )

    @app_commands.command(name="pick", description="Pick a style")
    async def pick(self, interaction: discord.Interaction) -> None:
        view = discord.ui.View(timeout=None)
        select: discord.ui.Select[discord.ui.View] = discord.ui.Select(
            custom_id="style",
            max_values=2,
            options=[discord.SelectOption(label=s) for s in ("oil", "ink", "neon")],
        )

        async def chosen(inner: discord.Interaction) -> None:
            await inner.response.send_message("chose " + "+".join(select.values))

        select.callback = chosen  # type: ignore[method-assign]
        view.add_item(select)
        await interaction.response.send_message("pick one", view=view)

    @app_commands.command(name="gallery", description="Components v2 with an image")
    async def gallery(self, interaction: discord.Interaction) -> None:
        view = discord.ui.LayoutView(timeout=None)
        gallery = discord.ui.MediaGallery(discord.MediaGalleryItem("attachment://grid.png"))
        view.add_item(discord.ui.Container(discord.ui.TextDisplay("your grid"), gallery))
        await interaction.response.send_message(view=view, file=discord.File(io.BytesIO(PNG), "grid.png"))

    @app_commands.command(name="thread", description="Open a thread")
    async def thread(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message("opening")
        starter = await interaction.original_response()
        thread = await starter.create_thread(name="chat")
        await thread.send("inside the thread")

    async def wave(self, interaction: discord.Interaction, member: discord.Member) -> None:
        await interaction.response.send_message(f"👋 {member.name}")

    async def count_photos(self, interaction: discord.Interaction, message: discord.Message) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        sizes = [len(await attachment.read()) for attachment in message.attachments]
        summary = discord.File(io.BytesIO(PNG), filename="summary.png")
        await interaction.user.send(f"{len(sizes)} photos, {sum(sizes)} bytes", file=summary)
        await interaction.followup.send(f"found {len(sizes)}", ephemeral=True)

    @commands.Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        self.bot.seen.append(("reaction", payload.user_id, str(payload.emoji)))

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        self.bot.seen.append(("message", message.author.id, message.content))


class DreamTestBot(commands.Bot):
    def __init__(self, *, intents: discord.Intents, sync_guild: int | None = None) -> None:
        super().__init__(command_prefix="!", intents=intents)
        self.seen: list[tuple[Any, ...]] = []
        self.sync_guild = sync_guild

    async def setup_hook(self) -> None:
        await self.add_cog(DreamCog(self))
        self.add_view(PanelView())
        if self.sync_guild is None:
            await self.tree.sync()
        else:
            guild = discord.Object(self.sync_guild)
            self.tree.copy_global_to(guild=guild)
            await self.tree.sync(guild=guild)


def full_intents() -> discord.Intents:
    intents = discord.Intents.default()
    intents.members = True
    intents.message_content = True
    return intents


# ---------------------------------------------------------------------------------------- harness


@dataclass
class World:
    fake: FakeDiscord
    bot: DreamTestBot
    guild: FakeGuild
    general: int
    after_dark: int
    alice: int
    mod: int
    quiet: int


@contextlib.asynccontextmanager
async def world(
    *, intents: discord.Intents | None = None, sync_guild: bool = False, **fake_options: Any
) -> AsyncIterator[World]:
    guild = FakeGuild("Dream Lab")
    after_dark = guild.add_channel("after-dark", nsfw=True, topic="18+")
    alice = guild.add_member("alice")
    mod = guild.add_member("mod", admin=True)
    quiet = guild.add_member("quiet", dms_open=False)
    async with FakeDiscord(guild, **fake_options) as fake:
        bot = DreamTestBot(intents=intents or full_intents(), sync_guild=guild.id if sync_guild else None)
        async with fake.run_bot(bot):
            yield World(fake, bot, guild, guild.channel_id("general"), after_dark, alice, mod, quiet)
        assert not fake.errors, fake.errors


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """asyncio.run the test; fail on pending tasks, loop errors or ResourceWarnings left behind."""
    run_async(test, timeout=20.0)


# ------------------------------------------------------------------------------------------ tests


def test_bot_connects_caches_the_guild_and_syncs_commands() -> None:
    saved = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)

    async def scenario() -> None:
        async with world() as w:
            fake, bot = w.fake, w.bot
            assert f"{fake.base_url}/api/v10" == discord.http.Route.BASE
            assert bot.user is not None and bot.user.id == fake.bot_id and bot.user.bot
            assert bot.application_id == fake.application_id
            guild = bot.get_guild(w.guild.id)
            assert guild is not None and guild.name == "Dream Lab" and guild.owner_id == w.guild.owner_id
            assert {c.name for c in guild.text_channels} == {"general", "after-dark"}
            after_dark = guild.get_channel(w.after_dark)
            assert isinstance(after_dark, discord.TextChannel) and after_dark.is_nsfw()
            assert after_dark.topic == "18+"
            assert not guild.get_channel(w.general).is_nsfw()  # type: ignore[union-attr]
            alice, mod = guild.get_member(w.alice), guild.get_member(w.mod)
            assert alice is not None and alice.name == "alice" and not alice.guild_permissions.manage_guild
            assert mod is not None and mod.guild_permissions.manage_guild
            assert guild.me.guild_permissions.attach_files and guild.me.top_role.is_bot_managed()
            assert guild.default_role.permissions.send_messages
            assert guild.chunked and guild.member_count == len(w.guild.members)

            # gateway: zlib-stream, heartbeats, sequence numbers, intents
            conn = fake.connections[0]
            assert conn.query["v"] == "10" and conn.query["encoding"] == "json"
            # zlib-stream here; zstd-stream when `zstandard` is installed (the fake speaks both)
            assert conn.compress == discord.utils._ActiveDecompressionContext.COMPRESSION_TYPE
            assert conn.compress in ("zlib-stream", "zstd-stream")
            assert conn.binary_frames > 0 and conn.text_frames == 0
            assert [p["op"] for p in conn.received[:2]] == [
                1,
                2,
            ]  # heartbeat right after HELLO, then IDENTIFY
            assert any(p["op"] == 11 for p in conn.sent)
            seqs = [p["s"] for p in conn.sent if p["op"] == 0]
            assert seqs == list(range(1, len(seqs) + 1))
            assert [p["t"] for p in conn.sent if p["op"] == 0][:2] == ["READY", "GUILD_CREATE"]
            assert fake.identifies[0]["intents"] == bot.intents.value

            # REST: login, app info, global sync
            routes = [r.route for r in fake.requests]
            assert routes[:2] == ["GET /users/@me", "GET /oauth2/applications/@me"]
            assert "PUT /applications/{application_id}/commands" in routes
            assert {c["name"] for c in fake.commands[None]} == {
                "imagine",
                "inspect",
                "panel",
                "purge",
                "spicy",
                "model",
                "post",
                "big",
                "edits",
                "gallery",
                "pick",
                "thread",
                "Count photos",
                "Wave",
            }
            imagine = fake.command("imagine")
            assert [(o["name"], o["type"], o.get("required", False)) for o in imagine["options"]] == [
                ("prompt", 3, True),
                ("count", 4, False),
            ]
            assert fake.command("purge")["default_member_permissions"] == "32"
            assert fake.command("Count photos", type=3)["id"]
            fetched = await bot.tree.fetch_commands()
            assert {c.name: c.id for c in fetched} == {c["name"]: int(c["id"]) for c in fake.commands[None]}
            assert fake.unhandled == []

    run(scenario)
    assert saved == (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)


def test_slash_command_defers_then_followup_fills_the_original_with_files() -> None:
    async def scenario() -> None:
        async with world() as w:
            fake = w.fake
            ix = await fake.slash(w.alice, w.general, "imagine", prompt="abraza as thor", count=2)
            assert ix.payload["data"]["options"] == [
                {"name": "prompt", "type": 3, "value": "abraza as thor"},
                {"name": "count", "type": 4, "value": 2},
            ]
            callback = await ix.wait_callback()
            assert callback.json == {"type": 5}
            msg = await ix.wait_original(lambda m: len(m.files) == 2)
            assert msg.content == "2 × abraza as thor" and not msg.ephemeral and not msg.loading
            assert msg.files == [("image_0.png", PNG), ("image_1.png", PNG)]  # spaces become underscores
            assert msg.attachments[0]["width"] == 8 and msg.attachments[0]["content_type"] == "image/png"
            assert msg.embeds[0]["title"] == "abraza as thor"
            assert msg.embeds[0]["image"]["url"] == msg.attachments[0]["url"]  # attachment:// resolved
            assert msg.payload["interaction_metadata"]["name"] == "imagine" and msg.payload["type"] == 20
            assert ix.followups == []  # the first followup after a defer *is* the original
            followup = ix.requests[1]
            assert followup.route == "POST /webhooks/{application_id}/{interaction_token}"
            assert followup.multipart and followup.query["wait"] == "1"
            assert [f.filename for f in followup.files] == ["image 0.png", "image 1.png"]
            assert fake.responses_to(ix) == ix.requests and len(ix.requests) == 2

            history = [m async for m in w.bot.get_channel(w.general).history(limit=5)]  # type: ignore[union-attr]
            assert [m.id for m in history] == [msg.id]

            with pytest.raises(ValueError, match="outside"):
                await fake.slash(w.alice, w.general, "imagine", prompt="x", count=9)
            with pytest.raises(ValueError, match="no option"):
                await fake.slash(w.alice, w.general, "imagine", prompt="x", colour="red")
            with pytest.raises(ValueError, match="missing required"):
                await fake.slash(w.alice, w.general, "imagine")

    run(scenario)


def test_attachment_option_is_read_from_the_fake_cdn() -> None:
    async def scenario() -> None:
        async with world() as w:
            fake = w.fake
            photo = fake.add_attachment("me at the beach.png", PNG)
            assert (photo["filename"], photo["width"], photo["height"]) == ("me_at_the_beach.png", 8, 6)
            ix = await fake.slash(w.alice, w.general, "inspect", photo=photo)
            assert ix.payload["data"]["resolved"]["attachments"][photo["id"]] == photo
            reply = await ix.wait_original()
            digest = hashlib.sha256(PNG).hexdigest()[:12]
            assert reply.content == f"me_at_the_beach.png {len(PNG)} {digest} 8x6" and reply.ephemeral
            assert reply.files == [("echo.png", PNG)] and reply.attachments[0]["ephemeral"] is True
            assert ix.callback is not None and ix.callback.multipart and ix.callback.json["type"] == 4
            assert [r.status for r in fake.cdn_requests] == [200]

            ix = await fake.slash(w.alice, w.general, "inspect", photo=("notes.txt", b"abc"))
            assert (await ix.wait_original()).content.startswith("notes.txt 3 ")

    run(scenario)


def test_persistent_button_opens_a_modal_and_the_submit_round_trips() -> None:
    async def scenario() -> None:
        async with world() as w:
            fake = w.fake
            ix = await fake.slash(w.mod, w.general, "panel")
            assert (await ix.wait_original()).content == "posted"
            panel = await fake.wait_message(w.general, lambda m: m.custom_ids)
            assert panel.author_id == fake.bot_id and panel.custom_ids == ["panel:name", "panel:done"]

            click = await fake.click(w.alice, panel, "panel:name")
            assert click.payload["message"]["id"] == str(panel.id)
            modal = await click.wait_modal()
            assert modal["custom_id"] == "name-modal" and modal["title"] == "Name your model"
            assert [c["type"] for c in modal["components"]] == [1, 18]
            with pytest.raises(ValueError, match="no field"):
                await fake.submit_modal(w.alice, w.general, "name-modal", {"nope": "x"})
            with pytest.raises(CommandUnavailable):
                await fake.submit_modal(w.mod, w.general, "name-modal", {"model_name": "x"})

            submit = await fake.submit_modal(
                w.alice, w.general, "name-modal", {"model_name": "abraza", "flavor": "oil"}
            )
            assert [c["type"] for c in submit.payload["data"]["components"]] == [1, 18]
            assert submit.payload["message"]["id"] == str(panel.id)
            reply = await submit.wait_original()
            assert reply.content == "saved abraza (oil)" and reply.ephemeral

            done = await fake.click(w.alice, panel, "panel:done")
            assert (await done.wait_callback()).json["type"] == 7
            assert panel.content == "done" and panel.component("panel:done")["disabled"] is True  # type: ignore[index]
            assert done.original is panel and panel.edited
            with pytest.raises(CommandUnavailable, match="disabled"):
                await fake.click(w.alice, panel, "panel:done")

    run(scenario)


def test_message_context_menu_reads_a_user_message_and_dms_the_user() -> None:
    async def scenario() -> None:
        async with world() as w:
            fake, bot = w.fake, w.bot
            photos = fake.post_user_message(
                w.general, w.alice, "my photos", attachments=[("a.png", PNG), ("b.png", PNG, "image/png")]
            )
            await fake.wait_until(lambda: ("message", w.alice, "my photos") in bot.seen)
            ix = await fake.message_command(w.alice, w.general, "Count photos", photos)
            assert ix.payload["data"]["target_id"] == str(photos.id)
            assert (
                ix.payload["data"]["resolved"]["messages"][str(photos.id)]["attachments"]
                == photos.attachments
            )
            reply = await ix.wait_original()
            assert reply.content == "found 2" and reply.ephemeral
            dm = await fake.wait_dm(w.alice)
            assert dm.content == f"2 photos, {2 * len(PNG)} bytes" and dm.files == [("summary.png", PNG)]
            create_dm = await fake.wait_for("POST /users/@me/channels")
            assert create_dm.json == {"recipient_id": w.alice}
            assert len(fake.cdn_requests) == 2

    run(scenario)


def test_client_side_permission_and_nsfw_rules() -> None:
    async def scenario() -> None:
        async with world() as w:
            fake = w.fake
            with pytest.raises(CommandUnavailable, match="manage_guild"):
                await fake.slash(w.alice, w.general, "purge")
            for who in (w.mod, w.guild.owner_id):
                ix = await fake.slash(who, w.general, "purge")
                assert (await ix.wait_original()).content == "purged"
            assert int(ix.payload["member"]["permissions"]) == discord.Permissions.all().value
            # Discord enforces default_member_permissions in the client; the bot itself does not check.
            forced = await fake.slash(w.alice, w.general, "purge", force=True)
            assert (await forced.wait_original()).content == "purged"

            with pytest.raises(CommandUnavailable, match="age-restricted"):
                await fake.slash(w.alice, w.general, "spicy")
            ix = await fake.slash(w.alice, w.after_dark, "spicy")
            assert (await ix.wait_original()).content == "🌶️"

    run(scenario)


def test_threads_follow_their_parents_age_restriction_and_archived_ones_are_fetched() -> None:
    async def scenario() -> None:
        async with world() as w:
            fake, bot = w.fake, w.bot
            thread_id = fake.open_thread(w.alice, w.after_dark, "late night")
            guild = bot.get_guild(w.guild.id)
            assert guild is not None
            await fake.wait_until(lambda: guild.get_thread(thread_id) is not None)
            thread = guild.get_thread(thread_id)
            assert isinstance(thread, discord.Thread) and thread.owner_id == w.alice
            assert thread.parent_id == w.after_dark and thread.is_nsfw()

            fake.set_nsfw(w.after_dark, False)
            after_dark = guild.get_channel(w.after_dark)
            assert isinstance(after_dark, discord.TextChannel)
            await fake.wait_until(lambda: not after_dark.is_nsfw())
            assert not thread.is_nsfw()

            # An archived thread is left out of GUILD_CREATE: a bot fetches it by id.
            archived = w.guild.add_thread(w.general, "old news", archived=True)
            assert [t["id"] for t in w.guild.payload()["threads"]] == [str(thread_id)]
            fetched = await bot.fetch_channel(archived)
            assert isinstance(fetched, discord.Thread) and fetched.archived and fetched.parent_id == w.general

    run(scenario)


def test_subcommand_group_and_channel_option() -> None:
    async def scenario() -> None:
        async with world() as w:
            fake = w.fake
            ix = await fake.slash(w.mod, w.general, "model delete", name="abraza")
            assert ix.payload["data"]["options"] == [
                {"name": "delete", "type": 1, "options": [{"name": "name", "type": 3, "value": "abraza"}]}
            ]
            assert (await ix.wait_original()).content == "deleted abraza"
            with pytest.raises(ValueError, match="needs a subcommand"):
                await fake.slash(w.mod, w.general, "model")

            ix = await fake.slash(w.mod, w.general, "post", channel=w.after_dark)
            resolved = ix.payload["data"]["resolved"]["channels"][str(w.after_dark)]
            assert resolved["name"] == "after-dark" and resolved["nsfw"] is True
            await ix.wait_original()
            posted = await fake.wait_message(w.after_dark, lambda m: m.files)
            assert posted.content == "here you go" and posted.files == [("out.png", PNG)]

    run(scenario)


def test_channel_file_message_reactions_and_reaction_users() -> None:
    async def scenario() -> None:
        async with world() as w:
            fake, bot = w.fake, w.bot
            ix = await fake.slash(w.mod, w.general, "post", channel=w.general)
            await ix.wait_original()
            posted = await fake.wait_message(w.general, lambda m: m.files)
            assert posted.files == [("out.png", PNG)] and posted.author_id == fake.bot_id
            await fake.wait_until(lambda: posted.reactions.get("🎨"))
            assert posted.reactions == {"🎨": [fake.bot_id]}
            assert await fake.wait_for(lambda r: r.method == "PUT" and "/reactions/" in r.path)

            fake.add_reaction(posted, w.alice, "🎨")
            await fake.wait_until(lambda: ("reaction", w.alice, "🎨") in bot.seen)
            channel = bot.get_channel(w.general)
            assert isinstance(channel, discord.TextChannel)
            message = await channel.fetch_message(posted.id)
            assert await message.attachments[0].read() == PNG
            reaction = message.reactions[0]
            assert (str(reaction.emoji), reaction.count, reaction.me) == ("🎨", 2, True)
            assert sorted([u.id async for u in reaction.users()]) == sorted([fake.bot_id, w.alice])
            reactors = await fake.wait_for(lambda r: r.route and r.route.endswith("/reactions/{emoji}"))
            assert reactors.status == 200

    run(scenario)


def test_rate_limited_requests_are_retried_by_discord_py() -> None:
    async def scenario() -> None:
        async with world() as w:
            fake = w.fake
            fake.rate_limit("POST /channels/{channel_id}/messages", count=2, retry_after=0.1)
            channel = w.bot.get_channel(w.general)
            assert isinstance(channel, discord.TextChannel)
            started = time.monotonic()
            sent = await channel.send("hello")
            assert time.monotonic() - started >= 0.2
            attempts = [r for r in fake.requests if r.matches(f"POST /channels/{w.general}/messages")]
            assert [r.status for r in attempts] == [429, 429, 200]
            assert attempts[0].response["retry_after"] == 0.1
            assert [m.id for m in fake.messages_in(w.general)] == [sent.id]

            # interaction webhooks go through discord.py's webhook adapter, which retries too
            fake.rate_limit("POST /webhooks/{application_id}/{interaction_token}", retry_after=0.05)
            ix = await fake.slash(w.alice, w.general, "imagine", prompt="p")
            await ix.wait_original(lambda m: m.files)
            assert [r.status for r in ix.requests] == [200, 429, 200]

    run(scenario)


def test_upload_limit_per_interaction_answers_413() -> None:
    async def scenario() -> None:
        async with world() as w:
            ix = await w.fake.slash(w.alice, w.general, "big", attachment_size_limit=1000)
            assert ix.payload["attachment_size_limit"] == 1000
            msg = await ix.wait_original(lambda m: "too big" in m.content)
            assert msg.content == "too big: 413 40005"
            assert [(r.status, r.code) for r in ix.requests][1] == (413, 40005)

            ok = await w.fake.slash(w.alice, w.general, "big")  # default limit: 10 MiB
            assert (await ok.wait_original(lambda m: m.files)).files == [("big.bin", b"x" * 5000)]

    run(scenario)


def test_validation_errors_dms_and_unhandled_routes() -> None:
    async def scenario() -> None:
        async with world() as w:
            fake, bot = w.fake, w.bot
            channel = bot.get_channel(w.general)
            assert isinstance(channel, discord.TextChannel)
            with pytest.raises(discord.HTTPException) as too_long:
                await channel.send("x" * 2001)
            assert (too_long.value.status, too_long.value.code) == (400, 50035)
            with pytest.raises(discord.HTTPException) as big_embed:
                await channel.send(embed=discord.Embed(title="t" * 300))
            assert big_embed.value.code == 50035 and "embeds.0.title" in str(big_embed.value)

            quiet = bot.get_user(w.quiet)
            assert quiet is not None
            with pytest.raises(discord.Forbidden) as closed:
                await quiet.send("hi")
            assert closed.value.code == 50007
            alice = await bot.fetch_user(w.alice)
            await alice.send("hello alice")
            assert [m.content for m in fake.dms_to(w.alice)] == ["hello alice"]

            guild = bot.get_guild(w.guild.id)
            assert guild is not None
            with pytest.raises(discord.NotFound):
                await guild.fetch_emojis()
            assert [r.path for r in fake.unhandled] == [f"/guilds/{guild.id}/emojis"]
            member = await guild.fetch_member(w.mod)
            assert [r.name for r in member.roles] == ["@everyone", "Admin"]

    run(scenario)


def test_reconnect_resumes_the_session() -> None:
    async def scenario() -> None:
        async with world() as w:
            fake = w.fake
            session = fake.session
            await fake.reconnect()
            assert len(fake.connections) == 2 and fake.connections[0].closed
            assert fake.resumes[0]["session_id"] == session.id and fake.session is session  # type: ignore[union-attr]
            assert fake.connections[1].sent[-1]["t"] == "RESUMED" and len(fake.identifies) == 1
            ix = await fake.slash(w.mod, w.general, "model delete", name="after-resume")
            assert (await ix.wait_original()).content == "deleted after-resume"

    run(scenario)


def test_guild_sync_and_missing_privileged_intents() -> None:
    async def scenario() -> None:
        async with world(intents=discord.Intents.default(), sync_guild=True) as w:
            fake, bot = w.fake, w.bot
            assert None not in fake.commands and "imagine" in {c["name"] for c in fake.commands[w.guild.id]}
            ix = await fake.slash(w.mod, w.general, "model delete", name="g")
            assert ix.payload["data"]["guild_id"] == str(w.guild.id)
            assert (await ix.wait_original()).content == "deleted g"

            guild = bot.get_guild(w.guild.id)
            assert guild is not None and guild.get_member(w.alice) is None  # no members intent: only the bot
            fake.post_user_message(w.general, w.alice, "secret")
            await fake.wait_until(lambda: ("message", w.alice, "") in bot.seen)  # no message_content intent

    run(scenario)


def test_response_edits_followups_and_deletes() -> None:
    async def scenario() -> None:
        async with world() as w:
            fake = w.fake
            ix = await fake.slash(w.alice, w.general, "edits")
            last = await ix.wait_message(lambda m: m.content.startswith("original says"))
            assert last.content == "original says v2 with 1 file"
            assert ix.original is not None and ix.original.content == "v2"
            assert ix.original.files == [("v2.png", PNG)] and ix.original.history[0]["content"] == "v1"
            private, public, gone, _ = ix.followups
            assert private.ephemeral and not public.ephemeral and gone.deleted
            assert public.content == "public, edited"
            assert [r.route.split(" ")[0] + " " + r.route.rsplit("/", 1)[-1] for r in ix.requests] == [
                "POST callback",
                "PATCH {message_id}",
                "POST {interaction_token}",
                "POST {interaction_token}",
                "PATCH {message_id}",
                "POST {interaction_token}",
                "DELETE {message_id}",
                "GET {message_id}",
                "POST {interaction_token}",
            ]
            assert ix.requests[1].params["message_id"] == "@original"
            visible = [m.content for m in fake.messages_in(w.general, ephemeral=False)]
            assert visible == ["v2", "public, edited", "original says v2 with 1 file"]

    run(scenario)


def test_select_autocomplete_user_menu_thread_chunking_and_dm_interactions() -> None:
    async def scenario() -> None:
        async with world() as w:
            fake, bot = w.fake, w.bot
            ix = await fake.slash(w.alice, w.general, "pick")
            menu = await ix.wait_original()
            with pytest.raises(ValueError, match=r"takes 1\.\.2 values"):
                await fake.click(w.alice, menu, "style", values=["oil", "ink", "neon"])
            picked = await fake.click(w.alice, menu, "style", values=["oil", "neon"])
            assert picked.payload["data"]["component_type"] == 3
            assert (await picked.wait_original()).content == "chose oil+neon"

            v2 = await fake.slash(w.alice, w.general, "gallery")
            card = await v2.wait_original()
            assert card.flags & discord.MessageFlags(components_v2=True).value and card.content == ""
            assert "your grid" in card.text
            gallery_item = card.components[0]["components"][1]["items"][0]["media"]
            assert gallery_item["url"] == card.attachments[0]["url"] and gallery_item["width"] == 8

            auto = await fake.autocomplete(w.alice, w.general, "imagine", "prompt", "abraza")
            assert (await auto.wait_callback()).json["type"] == 8
            assert [c["value"] for c in auto.choices or []] == ["abraza as thor", "abraza in space"]

            wave = await fake.user_command(w.alice, w.general, "Wave", w.mod)
            assert (await wave.wait_original()).content == "👋 mod"

            opened = await fake.slash(w.alice, w.general, "thread")
            starter = await opened.wait_original()
            inside = await fake.wait_message(starter.id)  # a thread started from a message has its id
            assert inside.content == "inside the thread" and w.guild.channels[starter.id].name == "chat"
            assert bot.get_channel(starter.id) is not None  # THREAD_CREATE reached the cache

            guild = bot.get_guild(w.guild.id)
            assert guild is not None
            members = await guild.chunk()  # op 8 REQUEST_GUILD_MEMBERS -> GUILD_MEMBERS_CHUNK
            assert {m.id for m in members} == set(w.guild.members)

            dm = fake.dm_channel_id(w.alice)
            in_dm = await fake.slash(w.alice, dm, "model delete", name="from-dm")
            assert "member" not in in_dm.payload and in_dm.payload["context"] == 1
            reply = await in_dm.wait_original()
            assert reply.content == "deleted from-dm" and reply.channel_id == dm

    run(scenario)


def test_a_restarted_bot_handles_clicks_on_the_old_panel() -> None:
    async def scenario() -> None:
        guild = FakeGuild("Dream Lab")
        alice = guild.add_member("alice")
        general = guild.channel_id("general")
        async with FakeDiscord(guild) as fake:
            async with fake.run_bot(DreamTestBot(intents=full_intents())):
                await (await fake.slash(alice, general, "panel")).wait_original()
                panel = await fake.wait_message(general, lambda m: m.custom_ids)
            async with fake.run_bot(DreamTestBot(intents=full_intents())):  # same fake, a new process
                assert len(fake.identifies) == 2 and fake.sync_count == 2
                click = await fake.click(alice, panel, "panel:name")  # the persistent view still answers
                assert (await click.wait_modal())["custom_id"] == "name-modal"
            assert not fake.errors

    run(scenario)

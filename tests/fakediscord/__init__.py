"""A fake Discord (REST + gateway + CDN) on 127.0.0.1 that a real discord.py bot can run against.

``FakeDiscord`` is an aiohttp server: REST under ``/api/v10``, the gateway websocket at ``/`` (HELLO,
IDENTIFY -> READY + GUILD_CREATE, heartbeats, RESUME, zlib-stream compression) and a CDN for attachments.
While it runs, discord.py is patched to talk to it (``Route.BASE``, ``DiscordWebSocket.DEFAULT_GATEWAY``,
``Asset.BASE``). Tests act as users (slash commands, buttons, modals, context menus, messages, reactions)
and assert on what the bot sent, which the fake records as ``Request`` objects and stores as
``FakeMessage`` objects (``.content``, ``.embeds``, ``.components``, ``.files``, ``.flags`` ...)::

    from fakediscord import FakeDiscord, FakeGuild, run_async   # tests/ is on sys.path under pytest

    guild = FakeGuild("Dream Lab")                       # has #general, @everyone and an owner
    general, prompts = guild.channel_id("general"), guild.add_channel("prompts")
    alice, bob = guild.add_member("alice"), guild.add_member("bob")
    admin = guild.add_member("admin", admin=True)        # a role with MANAGE_GUILD

    async def scenario() -> None:
        async with FakeDiscord(guild) as fake:           # server up + discord.py patched
            async with fake.run_bot(DreamBot(config)):   # bot.start(); READY; commands synced
                photos = [fake.add_attachment(f"me{i}.jpg", jpeg) for i, jpeg in enumerate(jpegs, 1)]
                ix = await fake.slash(alice, general, "train", name="abraza", subject="person",
                                      **{f"photo{i}": photo for i, photo in enumerate(photos, 1)})
                assert (await ix.wait_callback()).json["type"] == 5          # deferred: "thinking..."
                report = await ix.wait_original()                            # the photos' report
                assert report.ephemeral and "Ready:" in report.content
                ...                                                          # once it has trained:
                await fake.slash(alice, general, "model share", name="abraza", state="on")
                ix = await fake.slash(bob, prompts, "imagine", prompt="abraza as thor", count=4)
                post = await ix.wait_original(lambda m: m.files and m.embeds)   # files: (name, bytes)
                assert post.files[0][1].startswith(b"\x89PNG") and not post.ephemeral
                ix = await fake.message_command(bob, prompts, "Picture info", post)
                assert (await ix.wait_original()).ephemeral                  # how it was made
                await fake.click(bob, post, "dreambot:reroll:1")

    run_async(scenario)                                  # asyncio.run + leak checks, no pytest plugin

Notes: interaction helpers (``slash``, ``click``, ``submit_modal``, ``message_command`` ...) are coroutines
that return a ``FakeInteraction`` once INTERACTION_CREATE has been written to the socket; its
``wait_callback``/``wait_original``/``wait_followups``/``wait_modal`` wait for the bot's answers.
``post_user_message`` and ``add_reaction`` are plain functions that queue their gateway event (delivered in
order before anything queued later; ``await fake.flush()`` waits for delivery). Like Discord, a deferred
(type 5) response's first followup fills the "thinking" message, which is ``ix.original``; attachment
filenames get spaces replaced by underscores; the client enforces ``default_member_permissions`` and nsfw
commands, so ``slash`` raises ``CommandUnavailable`` (``force=True`` skips the check). Unknown routes
answer 404 and land in ``fake.unhandled``; ERROR logs during ``run_bot`` land in ``fake.errors``.
``hold_downloads``/``release_downloads`` keep attachment downloads waiting (each recorded in ``cdn_requests``).
``run_bot`` lowers discord.py's ``guild_ready_timeout`` (2 s by default) to 0.05 s.

The modules, lowest first (each imports only those above it): ``model`` (the guild model, ids and
permission bits), ``errors``, ``records`` (requests, messages, interactions), ``checks`` (what Discord
refuses in a payload), ``connection`` (one websocket), ``patching``, ``state`` (what the fake holds, its
lookups and waits), then FakeDiscord's parts: ``gateway``, ``cdn``, ``messages``, ``rest`` (the routes),
``actions`` (acting as users), and ``server``, which puts them together.
"""

from __future__ import annotations

from fakediscord.connection import GatewayConnection
from fakediscord.errors import CommandUnavailable, WaitTimeout
from fakediscord.model import (
    DEFAULT_UPLOAD_LIMIT,
    FakeChannel,
    FakeGuild,
    FakeMember,
    FakeRole,
    FakeUser,
    new_snowflake,
)
from fakediscord.patching import patch_discord
from fakediscord.records import FakeInteraction, FakeMessage, Request, UploadedFile, modal_text_fields
from fakediscord.server import FakeDiscord, run_async

__all__ = [
    "DEFAULT_UPLOAD_LIMIT",
    "CommandUnavailable",
    "FakeChannel",
    "FakeDiscord",
    "FakeGuild",
    "FakeInteraction",
    "FakeMember",
    "FakeMessage",
    "FakeRole",
    "FakeUser",
    "GatewayConnection",
    "Request",
    "UploadedFile",
    "WaitTimeout",
    "modal_text_fields",
    "new_snowflake",
    "patch_discord",
    "run_async",
]

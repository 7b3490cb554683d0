"""The bot's configuration: the engine's sections (engine.contract.config) and the bot's own, [discord],
[intake], [limits] and [safety], read from the same file. The bot, the CLI and the tests read it with
load_bot_config; an engine worker reads the same file as the engine's Config, passing over these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from engine.contract.config import Config, ConfigError, load_config
from engine.contract.prompt_syntax import PromptSyntaxError, parse_prompt


@dataclass(frozen=True)
class DiscordSection:
    # Guilds to sync commands to at start-up (instant); empty means a global sync (up to an hour).
    guild_ids: list[int] = field(default_factory=list)
    # Channel id or name; empty means /imagine works anywhere and nothing is mirrored.
    prompts_channel: str = ""
    gallery_channel: str = ""


@dataclass(frozen=True)
class IntakeSection:
    min_photos: int = 5
    max_photos: int = 20
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 80_000_000
    warn_below_side: int = 720
    # Photo sets checked at once, in all (a member's own sets always one at a time); more wait their
    # turn. Each check keeps one core busy and holds one decoded photo at a time.
    max_concurrent: int = 2


@dataclass(frozen=True)
class LimitsSection:
    max_queued_jobs_per_user: int = 3
    max_models_per_user: int = 3


@dataclass(frozen=True)
class SafetySection:
    blocked_words: list[str] = field(default_factory=list)
    default_negative_prompt: str = "lowres, blurry, deformed, bad anatomy, watermark, text"
    # NSFW-leaning prompts are refused everywhere unless this is on, and then only in
    # age-restricted channels.
    allow_nsfw: bool = False
    nsfw_words: list[str] = field(
        default_factory=lambda: ["nsfw", "nude", "naked", "topless", "explicit", "porn", "sex", "lingerie"]
    )


@dataclass(frozen=True)
class BotConfig(Config):
    discord: DiscordSection = field(default_factory=DiscordSection)
    intake: IntakeSection = field(default_factory=IntakeSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    safety: SafetySection = field(default_factory=SafetySection)

    other_sections: ClassVar[tuple[str, ...]] = ()

    def check(self) -> None:
        super().check()
        positive = {
            "[intake] min_photos": self.intake.min_photos,
            "[intake] max_bytes": self.intake.max_bytes,
            "[intake] max_concurrent": self.intake.max_concurrent,
            "[limits] max_queued_jobs_per_user": self.limits.max_queued_jobs_per_user,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key}: expected a positive number, got {value!r}")
        if self.intake.max_photos < self.intake.min_photos:
            raise ConfigError(
                f"[intake] max_photos: expected at least min_photos ({self.intake.min_photos}), "
                f"got {self.intake.max_photos!r}"
            )
        # Every member's negative prompt starts with it: one that does not read would refuse them all.
        try:
            parse_prompt(self.safety.default_negative_prompt, loras=False)
        except PromptSyntaxError as error:
            raise ConfigError(f"[safety] default_negative_prompt: {error}") from None


def load_bot_config(path: str | Path | None = None) -> BotConfig:
    """The whole file (every section checked), or config.toml here, or the defaults (load_config)."""
    return load_config(path, BotConfig)

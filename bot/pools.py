"""The worker pool a config asks for ([engine] backend), for the composition roots: the bot and the CLI."""

from __future__ import annotations

from bot.workers import LocalPool, WorkerPool
from engine.contract.config import Config


def worker_pool(config: Config) -> WorkerPool:
    """One `python -m engine` process per [model] device here, or an actor per GPU of a Ray cluster."""
    if config.engine.backend == "ray":
        from bot.cluster import RayPool  # Ray is an extra: imported only when asked for

        return RayPool(config)
    return LocalPool(config)

"""The engine's Ray actor class, which Ray needs to start an engine on a node (bot.cluster): the one
piece of the engine the bot reaches beyond this package, imported only when asked for."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.ray_actor import EngineActor


def engine_actor_class() -> type[EngineActor]:
    """The engine's actor class, for ray.remote. Its module imports neither torch nor ray until the
    actor starts on its node."""
    from engine.ray_actor import EngineActor

    return EngineActor

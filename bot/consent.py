"""Who may put a member's face in a picture: the model's owner, and anyone else only while the owner
shares it. The rule is checked when a picture is asked for (bot.service) and again whenever what its
owner allows may have changed since: when the job is sent to an engine, at each preview, at its result
and right before it is posted.
"""

from __future__ import annotations

from bot.db import Database, JobRow, ModelRow
from engine.contract.protocol import GenerateJob


def may_use(model: ModelRow, user_id: int) -> bool:
    return model.owner_id == user_id or bool(model.shared)


def generation_refusal(db: Database, job: JobRow) -> str | None:
    """Why a generation asked for earlier may no longer be drawn or shown, None while it may: a model
    it uses was deleted (or another model took its name), or its owner stopped sharing it."""
    if job.kind != "generate":
        return None  # a training names no one else's model (and its payload is not read for nothing)
    request = job.request
    assert isinstance(request, GenerateJob)
    for adapter in request.adapters:
        model = db.model_by_token(job.guild_id, adapter.token)
        if model is None or model.state != "ready" or model.adapter_path != adapter.path:
            return f"the model “{adapter.token}” was deleted before your picture was drawn."
        if not may_use(model, job.user_id):
            return f"the owner of “{adapter.token}” stopped sharing it before your picture was drawn."
    return None

"""Payload checks: what Discord refuses in the commands the bot syncs, the messages it sends or edits
and the modals it opens. Each *_problems function returns (path, code, message) problems, which the
caller raises as form_error(problems): 400 Invalid Form Body (50035)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fakediscord.errors import ApiError, Problem, form_error
from fakediscord.model import JSON
from fakediscord.records import FLAG_COMPONENTS_V2, UploadedFile, walk_components

_NAME_RE = re.compile(r"^[-_'\w]{1,32}$")


def check_uploads(files: Sequence[UploadedFile], limit: int) -> None:
    if any(f.size > limit for f in files):
        raise ApiError(413, 40005, "Request entity too large")
    if len(files) > 10:
        raise form_error([(("files",), "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")])


def command_problems(payload: list[Any]) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[tuple[int, str]] = set()
    for i, cmd in enumerate(payload):
        if not isinstance(cmd, dict) or not isinstance(cmd.get("name"), str):
            problems.append(((i, "name"), "BASE_TYPE_REQUIRED", "This field is required"))
            continue
        cmd_type, name = cmd.get("type", 1), cmd["name"]
        if cmd_type == 1:
            if not _NAME_RE.match(name) or name != name.lower():
                problems.append(((i, "name"), "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid"))
            if not 1 <= len(cmd.get("description") or "") <= 100:
                problems.append(
                    ((i, "description"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")
                )
            problems += _option_problems(cmd.get("options") or [], (i, "options"))
        elif not 1 <= len(name) <= 32:
            problems.append(((i, "name"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 32 in length."))
        if (cmd_type, name) in seen:
            problems.append(((i, "name"), "APPLICATION_COMMANDS_DUPLICATE_NAME", f"Duplicate name {name!r}"))
        seen.add((cmd_type, name))
    return problems


def _option_problems(options: list[JSON], path: tuple[Any, ...]) -> list[Problem]:
    problems: list[Problem] = []
    if len(options) > 25:
        problems.append((path, "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length."))
    optional_seen = False
    names: set[str] = set()
    for j, opt in enumerate(options):
        name = opt.get("name") or ""
        if not _NAME_RE.match(name) or name != name.lower():
            problems.append(
                ((*path, j, "name"), "APPLICATION_COMMAND_INVALID_NAME", "Option name is invalid")
            )
        if name in names:
            problems.append(
                ((*path, j, "name"), "APPLICATION_COMMAND_OPTIONS_NAME_ALREADY_EXISTS", "Duplicate")
            )
        names.add(name)
        if not 1 <= len(opt.get("description") or "") <= 100:
            problems.append(
                (
                    (*path, j, "description"),
                    "BASE_TYPE_BAD_LENGTH",
                    "Must be between 1 and 100 in length.",
                )
            )
        if opt.get("type") in (1, 2):
            problems += _option_problems(opt.get("options") or [], (*path, j, "options"))
            continue
        if opt.get("required"):
            if optional_seen:
                problems.append(
                    (
                        (*path, j),
                        "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                        "Required options must be first",
                    )
                )
        else:
            optional_seen = True
        if len(opt.get("choices") or []) > 25:
            problems.append(((*path, j, "choices"), "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length."))
    return problems


def message_problems(body: JSON, flags: int) -> list[Problem]:
    problems: list[Problem] = []
    content = body.get("content")
    if isinstance(content, str) and len(content) > 2000:
        problems.append((("content",), "BASE_TYPE_MAX_LENGTH", "Must be 2000 or fewer in length."))
    embeds = body.get("embeds") or []
    if len(embeds) > 10:
        problems.append((("embeds",), "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length."))
    total = 0
    limits = {"title": 256, "description": 4096}
    for i, embed in enumerate(embeds):
        for key, limit in limits.items():
            value = embed.get(key) or ""
            total += len(value)
            if len(value) > limit:
                problems.append(
                    (("embeds", i, key), "BASE_TYPE_MAX_LENGTH", f"Must be {limit} or fewer in length.")
                )
        fields = embed.get("fields") or []
        if len(fields) > 25:
            problems.append(
                (("embeds", i, "fields"), "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
            )
        for j, fld in enumerate(fields):
            for key, limit in (("name", 256), ("value", 1024)):
                value = fld.get(key)
                if not value:
                    problems.append(
                        (("embeds", i, "fields", j, key), "BASE_TYPE_REQUIRED", "This field is required")
                    )
                elif len(value) > limit:
                    problems.append(
                        (
                            ("embeds", i, "fields", j, key),
                            "BASE_TYPE_MAX_LENGTH",
                            f"Must be {limit} or fewer in length.",
                        )
                    )
                total += len(value or "")
        for key, sub, limit in (("footer", "text", 2048), ("author", "name", 256)):
            value = (embed.get(key) or {}).get(sub) or ""
            total += len(value)
            if len(value) > limit:
                problems.append(
                    (
                        ("embeds", i, key, sub),
                        "BASE_TYPE_MAX_LENGTH",
                        f"Must be {limit} or fewer in length.",
                    )
                )
    if total > 6000:
        problems.append((("embeds",), "MAX_EMBED_SIZE_EXCEEDED", "Embed size exceeds maximum size of 6000"))
    components = body.get("components") or []
    if flags & FLAG_COMPONENTS_V2:
        if content or embeds:
            problems.append(
                (("content",), "MESSAGE_CANNOT_USE_LEGACY_FIELDS_WITH_COMPONENTS_V2", "Not allowed")
            )
    else:
        if len(components) > 5:
            problems.append((("components",), "BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length."))
        for i, row in enumerate(components):
            children = row.get("components") or []
            if row.get("type") != 1:
                problems.append(
                    (("components", i, "type"), "UNION_TYPE_CHOICES", "Must be an action row (1).")
                )
            elif not 1 <= len(children) <= 5 or (
                len(children) > 1 and any(c.get("type") != 2 for c in children)
            ):
                problems.append(
                    (("components", i, "components"), "COMPONENT_LAYOUT_WIDTH_EXCEEDED", "Too wide")
                )
    problems += component_problems(components, ("components",))
    return problems


def component_problems(components: list[JSON], path: tuple[Any, ...]) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[str] = set()
    for component in walk_components(components):
        custom_id = component.get("custom_id")
        if custom_id is not None:
            if not 1 <= len(custom_id) <= 100:
                problems.append(
                    ((*path, "custom_id"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")
                )
            if custom_id in seen:
                problems.append(
                    ((*path, "custom_id"), "COMPONENT_CUSTOM_ID_DUPLICATED", f"Duplicate {custom_id!r}")
                )
            seen.add(custom_id)
        if component.get("type") == 2:
            if len(component.get("label") or "") > 80:
                problems.append(((*path, "label"), "BASE_TYPE_MAX_LENGTH", "Must be 80 or fewer in length."))
            if component.get("style") == 5 and not component.get("url"):
                problems.append(((*path, "url"), "BASE_TYPE_REQUIRED", "Link buttons need a url"))
            if component.get("style") in (1, 2, 3, 4) and custom_id is None:
                problems.append(((*path, "custom_id"), "BASE_TYPE_REQUIRED", "Buttons need a custom_id"))
        if component.get("type") in (3,) and len(component.get("options") or []) > 25:
            problems.append(((*path, "options"), "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length."))
    return problems


def modal_problems(data: JSON) -> list[Problem]:
    problems: list[Problem] = []
    if not 1 <= len(data.get("title") or "") <= 45:
        problems.append((("data", "title"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 45 in length."))
    if not 1 <= len(data.get("custom_id") or "") <= 100:
        problems.append(
            (("data", "custom_id"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")
        )
    components = data.get("components") or []
    if not 1 <= len(components) <= 5:
        problems.append(
            (("data", "components"), "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 5 in length.")
        )
    for i, top in enumerate(components):
        label = top.get("label") if top.get("type") == 18 else None
        inputs = [top["component"]] if top.get("type") == 18 else top.get("components") or []
        for field_ in inputs:
            text = label if label is not None else field_.get("label")
            if field_.get("type") == 4 and not 1 <= len(text or "") <= 45:
                problems.append(
                    (("data", "components", i), "BASE_TYPE_BAD_LENGTH", "Labels: 1 to 45 characters.")
                )
            if field_.get("type") == 4 and int(field_.get("max_length") or 0) > 4000:
                problems.append((("data", "components", i), "NUMBER_TYPE_MAX", "max_length is at most 4000."))
    problems += component_problems(components, ("data", "components"))
    return problems

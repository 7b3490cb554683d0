"""Errors: those a test sees (WaitTimeout, CommandUnavailable) and the REST errors the fake answers
with Discord's JSON error bodies (ApiError; form_error makes 50035 Invalid Form Body)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fakediscord.model import JSON


class WaitTimeout(AssertionError):
    """Raised by the ``wait_*`` helpers; the message lists the latest requests and bot errors."""


class CommandUnavailable(Exception):
    """The Discord client would not let this user do that (permissions, nsfw, disabled button ...)."""


class ApiError(Exception):
    """A REST call refused as Discord refuses it: HTTP status, JSON error code and message, and the
    field errors of a 50035."""

    def __init__(self, status: int, code: int, message: str, errors: JSON | None = None) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors

    def body(self) -> JSON:
        body: JSON = {"message": self.message, "code": self.code}
        if self.errors:
            body["errors"] = self.errors
        return body


# What is wrong with a payload: (path to the field, Discord's error code, message).
Problem = tuple[tuple[Any, ...], str, str]


def form_error(problems: Sequence[Problem]) -> ApiError:
    """400 Invalid Form Body (50035) with the problems nested by path, as Discord nests them."""
    root: JSON = {}
    for path, code, message in problems:
        node = root
        for key in path:
            node = node.setdefault(str(key), {})
        node.setdefault("_errors", []).append({"code": code, "message": message})
    return ApiError(400, 50035, "Invalid Form Body", root)


def not_found(kind: str, code: int) -> ApiError:
    return ApiError(404, code, f"Unknown {kind}")

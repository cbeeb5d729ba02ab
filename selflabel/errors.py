"""Typed errors. The CLI turns each into one line and its exit code."""
from __future__ import annotations


class SelflabelError(Exception):
    """Base error with a message a user can act on."""

    exit_code = 1


class InputError(SelflabelError):
    """Bad user input: missing path, empty folder, invalid config or CSV."""

    exit_code = 2


class BackboneUnavailable(SelflabelError):
    """Backbone weights cannot be found locally nor downloaded (e.g. offline)."""

    exit_code = 3


class ImageLoadError(SelflabelError):
    """One image could not be decoded; carries the path and a short reason."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

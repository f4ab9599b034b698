"""Errors a user can cause. Each carries one sentence naming the file, key or field at fault.

The CLI catches :class:`MobileVLAError` at the top and prints its message on one line; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class MobileVLAError(Exception):
    """Base class of every error caused by user input (data, config, request)."""


class ConfigError(MobileVLAError):
    """A config file, key or value is wrong."""


class DataError(MobileVLAError):
    """A dataset as a whole cannot be used (missing folder, no episodes, bad files refused)."""


class EpisodeError(DataError):
    """One episode file is unreadable or malformed."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path.name}: {problem}")

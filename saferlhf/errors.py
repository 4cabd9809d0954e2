"""The errors a user can fix: each message names what is wrong and where (config key, file,
row, line). The ``saferlhf`` command prints them as one line and exits non-zero; anything
else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or configuration; ``str(error)`` is the whole message shown to the user."""


class ConfigError(UserError, ValueError):
    """A config value that cannot be used; the message names its key."""

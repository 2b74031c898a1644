"""User-facing errors: the CLI turns these into one clear line and exit status 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (config, paths, data): exit 2, one line, no traceback."""

    exit_code = 2


class ConfigError(UserError):
    """A bad config key or value; the message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not valid: {allowed}")


class UnsafeWeightsError(UserError):
    """A pickle-based checkpoint where safetensors (or a weights_only load) is required."""

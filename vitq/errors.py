"""User-facing errors: one line naming the bad value, what is allowed, and the fix.

The CLI prints `vitq: error: <message>` and exits with code 2 for any `VitqError`.
"""


class VitqError(Exception):
    """Bad input from the user (config, paths, names). Exit code 2."""


class ConfigError(VitqError):
    """params.yaml does not match the schema."""


class DataError(VitqError):
    """Missing, empty or unreadable data."""


class ModelError(VitqError):
    """Unknown model name, missing or unreadable checkpoint."""

"""Errors a user can fix. The CLI prints them as one line and exits non-zero."""


class LrfError(Exception):
    """Base class: a problem in the user's input, with its fix in the message."""


class ConfigError(LrfError):
    """A config value is missing, mistyped or out of range."""


class DataError(LrfError):
    """A data set is missing, corrupt or malformed."""


class StoreError(LrfError):
    """An experiment directory is unusable for the requested run."""

"""User-facing errors: one clear line naming the problem and the fix, never a traceback wall."""


class UserError(RuntimeError):
    """A problem with the user's input, data or environment that they can fix."""


class DataUnavailableError(UserError):
    """A dataset is neither cached nor reachable."""


class CorruptDataError(UserError):
    """A data file exists but is truncated, altered or unreadable."""


class ModelUnavailableError(UserError):
    """A model cannot be loaded (offline hub id, missing folder)."""


class ConfigError(UserError):
    """A configuration that composes but makes no sense (e.g. an invalid compressor chain)."""

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


def user_error(exc: BaseException | None) -> UserError | None:
    """The UserError behind an exception, if any: Hydra's ``instantiate`` wraps what constructors and data
    sources raise in an InstantiationException; the user should see the one line, not the wrapper."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def instantiate_or_explain(config, **kwargs):
    """``hydra.utils.instantiate`` that re-raises a UserError from inside the target as itself."""
    from hydra.utils import instantiate

    try:
        return instantiate(config, **kwargs)
    except Exception as exc:
        found = user_error(exc)
        if found is not None and found is not exc:
            raise found from None
        raise

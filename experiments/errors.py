"""Errors that the command line reports in one line (``error: ...``, exit status 2)."""


class ConfigError(ValueError):
    """A config value that cannot be run, naming its key."""


class DataError(ValueError):
    """A data source or file that cannot be used, with the reason."""


class RunDirError(ValueError):
    """A run directory that cannot be used as it is: a file is corrupt, it holds results of
    another config or data set, or it cannot be written. Names the file and what to do."""


class RequestError(ValueError):
    """A request that a run directory cannot answer (a figure of a measurement it did not record,
    against a field it did not sweep, at a step no member reached), naming what was asked and
    what there is."""


def require(ok: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` ``config key <key>: <message>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"config key {key}: {message}")

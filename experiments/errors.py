"""Errors that the command line reports in one line (``error: ...``, exit status 2)."""


class ConfigError(ValueError):
    """A config value that cannot be run, naming its key."""


class DataError(ValueError):
    """A data source or file that cannot be used, with the reason."""

"""Renamed arguments: the old name keeps working, with one warning per process that names the new
one (a ``FutureWarning``, shown to end users by default). See the vocabulary table in the README.
"""

from __future__ import annotations

import warnings

__all__ = ["UNSET", "renamed", "warn_once"]


class _Unset:
    def __repr__(self):
        return "<unset>"


#: The default of a deprecated keyword: "not given".
UNSET = _Unset()

_WARNED: set[str] = set()


def warn_once(message: str, *, stacklevel: int = 3) -> None:
    """``message`` as a ``FutureWarning``, once per process."""
    if message in _WARNED:
        return
    _WARNED.add(message)
    warnings.warn(message, FutureWarning, stacklevel=stacklevel + 1)


def renamed(where: str, old: str, new: str, old_value, value, default):
    """The value of keyword ``new`` of ``where``: ``value`` if given, else its deprecated name
    ``old``'s ``old_value`` (which warns once), else ``default``. Both given is an error. A keyword
    with a deprecated name defaults to :data:`UNSET` in the signature, so that passing its
    default value explicitly still counts as given."""
    if old_value is UNSET:
        return default if value is UNSET else value
    if value is not UNSET:
        raise TypeError(f"{where}: pass {new}= only ({old}= is its deprecated name)")
    warn_once(f"{where}: {old}= is deprecated; it is now called {new}=", stacklevel=4)
    return old_value

"""Named things a config can choose (optimizers, losses, activations, models, data sources,
measurements), one registry per kind.

Validation reads its allowed values from here, so adding an optimizer or a measurement is one
``register`` call in one place, and a misspelt name is an error that lists the known ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from experiments.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """An ordered ``name -> entry`` map whose lookups fail with the config key and the choices."""

    def __init__(self, kind: str, key: str):
        self.kind = kind  # "optimizer"
        self.key = key  # the config key that names one: "train.optimizer"
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None, *, replace: bool = False):
        """``registry.register("adam", entry)``, or as a decorator ``@registry.register("adam")``.

        A second registration of a name is an error unless ``replace=True`` (a config file that
        is loaded twice in one process re-registers its own measurement, and may).
        """

        def add(entry: T) -> T:
            if name in self._entries and not replace:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = entry
            return entry

        return add if entry is None else add(entry)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ConfigError(
                f"config key {self.key}: unknown {self.kind} {name!r}; known: {', '.join(self)}"
            ) from None

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()

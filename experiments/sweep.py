"""Sweeps: the members of a run are the product of its activations, seeds and the values of
every swept config field (``config.sweep`` or ``--sweep=train.learning_rate=0.1,0.2``).

Fields joined by ``+`` vary together, one tuple of values per member, rather than as a product:
``train.optimizer+train.learning_rate=(sgd,0.1),(adam,0.001)`` gives two members, SGD at 0.1 and
Adam at 0.001 (each optimizer at its own learning rate).

A member's name says its values (``relu-learning_rate=0.2-seed0``), and so does its folder; its
resolved config is the run's config with those values set, one activation and one seed.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import re

import ml_collections

from experiments import config as config_lib
from experiments.errors import ConfigError

_SAFE = re.compile(r"[^A-Za-z0-9._=+-]")

# A member's name is its folder's: at most this many bytes (NAME_MAX of ext4, XFS, APFS, NTFS),
# checked with the config, before anything is written.
MAX_NAME_BYTES = 255

# Fields that hold for a whole run (one JAX process, one compiled program, one device mesh): not
# sweepable.
RUN_LEVEL = ("dtype", "workers", "share_activations", "measure.devices")


@dataclasses.dataclass(frozen=True)
class Axis:
    """One swept field: its dotted ``path`` and its ``values``; or fields that vary together
    (``path`` ``"a.b+c.d"``): each value a tuple with one entry per field."""

    path: str
    values: tuple

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.path.split("+"))

    def overrides(self, value) -> dict:
        """``{field path: value}`` of one of the values."""
        if len(self.fields) == 1:
            return {self.path: value}
        return dict(zip(self.fields, value, strict=True))


@dataclasses.dataclass(frozen=True)
class MemberSpec:
    name: str  # also its folder under workdir/members
    group: str  # the name without the seed: members of a group differ only in their seed
    activation: str
    activation_index: int  # its position in the run's activations (the model's switch)
    seed: int
    overrides: dict  # {path: value} of the swept fields
    config: ml_collections.ConfigDict  # resolved: one activation, one seed, swept values set


def _split_values(text: str) -> list[str]:
    """``"0.1,(8,16),relu"`` -> ``["0.1", "(8,16)", "relu"]``: commas outside brackets."""
    out, depth, current = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += ch
    out.append(current)
    return [v.strip() for v in out]


def _field(config, path: str):
    path = config_lib.current_key(path)  # a deprecated key: its new name (with a warning)
    node = config
    parts = path.split(".")
    for part in parts[:-1]:
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"sweep {path}: config key {path} does not exist")
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or parts[-1] not in node:
        raise ConfigError(f"sweep {path}: config key {path} does not exist")
    return node, parts[-1]


def _coerce(path: str, text: str, current):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word: a string
    if isinstance(current, float) and isinstance(value, str):
        try:
            value = float(text)  # inf, nan: validation names them
        except ValueError:
            pass
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"sweep {path}: {text!r} is not True or False")
    elif isinstance(value, bool):
        raise ConfigError(
            f"sweep {path}: {text!r} is a bool, the field is a {type(current).__name__}"
        )
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(current, tuple) and isinstance(value, list | tuple):
        value = tuple(value)
    elif isinstance(current, tuple) and not isinstance(value, tuple):
        value = (value,)
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(
            f"sweep {path}: {text!r} is a {type(value).__name__}, the field is a "
            f"{type(current).__name__}"
        )
    return value


def parse(spec: str, config) -> Axis:
    """``"train.learning_rate=0.1,0.2"`` -> an :class:`Axis` with values of the field's type;
    ``"train.optimizer+train.learning_rate=(sgd,0.1),(adam,0.001)"``: fields that vary together."""
    path, eq, text = str(spec).partition("=")
    path = path.strip()
    if not eq or not text.strip():
        raise ConfigError(
            f"sweep {spec!r}: write FIELD=VALUE1,VALUE2,... (e.g. train.learning_rate=0.1,0.2)"
        )
    fields = [f.strip() for f in path.split("+")]
    path = "+".join(fields)
    currents = [_current(spec, field, config) for field in fields]
    if len(set(fields)) != len(fields):
        raise ConfigError(f"sweep {spec!r}: a field is named twice")
    if len(fields) == 1:
        values = tuple(_coerce(path, v, currents[0]) for v in _split_values(text))
    else:
        values = tuple(_zipped(path, fields, v, currents) for v in _split_values(text))
    if len(set(map(repr, values))) != len(values):
        raise ConfigError(f"sweep {path}: duplicate values in {text!r}")
    return Axis(path, values)


def _current(spec: str, path: str, config):
    """The config's value of a sweepable field ``path``."""
    if path in ("activations", "seeds", "sweep"):
        raise ConfigError(f"sweep {spec!r}: {path} is swept by setting it (it is already a list)")
    if path in RUN_LEVEL:
        raise ConfigError(f"sweep {spec!r}: {path} holds for the whole run; it cannot be swept")
    node, leaf = _field(config, path)
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise ConfigError(f"sweep {path}: a section, not a field; sweep one of its fields")
    return node[leaf]


def _zipped(path: str, fields: list[str], text: str, currents: list) -> tuple:
    """``"(sgd,0.1)"`` -> ``("sgd", 0.1)``: one value per field of ``path``, each of its type."""
    inner = text.strip()
    parts = _split_values(inner[1:-1]) if inner[:1] == "(" and inner[-1:] == ")" else []
    if len(parts) != len(fields):
        raise ConfigError(
            f"sweep {path}: {text!r} is not a tuple of {len(fields)} values, one per field "
            f"(write {path}=({','.join(f.split('.')[-1] for f in fields)}),(...))"
        )
    return tuple(
        _coerce(field, part, current)
        for field, part, current in zip(fields, parts, currents, strict=True)
    )


def axes(config) -> list[Axis]:
    found = [parse(spec, config) for spec in config.sweep]
    paths = [field for a in found for field in a.fields]
    if len(set(paths)) != len(paths):
        raise ConfigError(f"config key sweep: a field is swept twice in {list(config.sweep)}")
    return found


def _labels(paths: list[str]) -> dict[str, str]:
    """The shortest unambiguous label of each path: its last component, or more when needed."""
    labels = {}
    for path in paths:
        parts = path.split(".")
        for n in range(1, len(parts) + 1):
            label = ".".join(parts[-n:])
            if sum(p.split(".")[-n:] == parts[-n:] for p in paths) == 1:
                break
        labels[path] = label
    return labels


def _text(value) -> str:
    if isinstance(value, tuple):
        return "x".join(_text(v) for v in value)
    return _SAFE.sub("_", str(value))


def members(config) -> list[MemberSpec]:
    """Every member of the run, activations outermost, seeds innermost."""
    found = axes(config)
    labels = _labels([field for a in found for field in a.fields])
    out = []
    for index, activation in enumerate(config.activations):
        for values in itertools.product(*(a.values for a in found)):
            overrides = {}
            for a, v in zip(found, values, strict=True):
                overrides.update(a.overrides(v))
            group = "-".join(
                [_SAFE.sub("_", activation)]
                + [f"{labels[p]}={_text(v)}" for p, v in overrides.items()]
            )
            for seed in config.seeds:
                resolved = resolve(config, activation, seed, overrides)
                out.append(
                    MemberSpec(
                        f"{group}-seed{seed}", group, activation, index, seed, overrides, resolved
                    )
                )
    names = [m.name for m in out]
    longest = max(out, key=lambda m: len(m.name.encode()))
    if len(longest.name.encode()) > MAX_NAME_BYTES:
        value = max(longest.overrides.items(), key=lambda item: len(_text(item[1])))
        raise ConfigError(
            f"config key sweep: member {longest.name[:40]}... would be a folder name of "
            f"{len(longest.name.encode())} bytes, more than a file system allows "
            f"({MAX_NAME_BYTES}); sweep shorter values (the longest: {value[0]}, "
            f"{len(_text(value[1]))} characters)"
        )
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ConfigError(
            f"config key sweep: different values give the same member name {clash[0]!r} "
            "(names keep letters, digits and ._=+-); choose values that differ there"
        )
    return out


def resolve(config, activation: str, seed: int, overrides: dict) -> ml_collections.ConfigDict:
    """The config of one member: the swept values set, one activation, one seed, no sweep."""
    member = ml_collections.ConfigDict(config.to_dict())
    for path, value in overrides.items():
        node, leaf = _field(member, path)
        node[leaf] = value
    member.activations = (activation,)
    member.seeds = (seed,)
    member.sweep = ()
    member.lock()
    return member

"""The experiment configuration: the run-level keys, one section per concept, and a validation
that names the offending key.

Configs are ``configs/*.py`` files whose ``get_config()`` returns an ``ml_collections.ConfigDict``
(the flax-examples convention); variants start from :func:`base_config` and change a few fields.
The command line overrides fields as ``--config.train.steps=500`` and sweeps any field as
``--sweep=train.learning_rate=0.1,0.2``. The config is locked, so a misspelt key is an error, and
ml_collections rejects a value of the wrong type.

Each concept owns its section, its defaults and its checks: ``data`` (:mod:`experiments.data`),
``model`` and the activation names (:mod:`experiments.models`), ``train`` with each optimizer's
own section (:mod:`experiments.train`, :mod:`experiments.optimizers`), ``measure`` with each
measurement's own section (:mod:`experiments.measure`, :mod:`experiments.measurements`). This
module assembles them and checks the run-level keys.

One vocabulary for budgets: ``num_steps`` (Krylov steps), ``num_matvecs`` (Monte Carlo
products), ``num_probes`` (SLQ probes). Keys renamed to it (:data:`RENAMED_KEYS`, declared by
each measurement) stay usable: a config file, a command-line override or a sweep that names the
old key sets the new one, with a ``FutureWarning`` once per key and process; a run directory
written with the old names loads, resumes and plots as before (its member fingerprints hash the
first names, so they do not change).
"""

from __future__ import annotations

import json
import pathlib
import warnings

import ml_collections

from experiments import data as data_lib
from experiments import measure, models, storage, train
from experiments.errors import require
from experiments.measurements import BUILTINS
from experiments.optimizers import OPTIMIZERS

# Keys that a resumed run may change: they change how, not what, is computed (at most the
# round-off: measure.batch_size and measure.devices change the order of summation).
RESUMABLE_CHANGES = ("measure.batch_size", "measure.devices", "workers", "share_activations")

MOVED_KEYS = measure.MOVED_KEYS  # keys of release 0.1 and where they went: errors only

# Measurements added after the fingerprints of record format 2: their sections, unplanned and at
# their defaults, are not part of a member's fingerprint (see drop_resumable).
ADDED_MEASUREMENTS = ("approximations", "block_spectra", "gradient_overlap", "landscape")

# Keys added after the fingerprints of record format 2 (the sequence data and the transformer):
# at their defaults they are not part of a member's fingerprint, so run directories from before
# them keep theirs. Their defaults are read from the sections that own them.
ADDED_KEYS = (
    "data.context",
    "data.modulus",
    "data.operation",
    "model.heads",
    "model.mlp_ratio",
    "model.context",
    "model.pre_norm",
    "model.readout",
    "model.norm",
)

# Deprecated keys and their new names: ``{"measure.trace.matvecs": "measure.trace.num_matvecs"}``.
RENAMED_KEYS = {
    f"measure.{m.name}.{old}": f"measure.{m.name}.{new}"
    for m in BUILTINS
    for old, new in m.renamed.items()
}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # The sweep: every activation x every seed x every value of each `sweep` field. A seed fixes
    # initialisation, data order and probes, so members that share a seed differ only in what
    # the sweep changes.
    c.activations = ("relu", "tanh", "gelu", "silu", "softplus")
    c.seeds = (0, 1)
    c.sweep = ()  # e.g. ("train.learning_rate=0.1,0.2,0.4",), as --sweep on the command line
    c.dtype = "float32"  # or "float64"
    # Members trained and measured at once, in threads (each compiled program runs on one CPU
    # core for small networks). 0: one per CPU core on a CPU, 2 on an accelerator.
    c.workers = 0
    # One compiled program for every activation ("yes"), one per activation ("no"), or "auto":
    # shared whenever the run has more than one activation.
    c.share_activations = "auto"
    c.data = data_lib.section()
    c.model = models.section()
    c.train = train.section()
    c.measure = measure.section()
    return c


def validate(config, num_params: int | None = None) -> None:
    """Raise :class:`~experiments.errors.ConfigError` naming the first bad key, before any
    training: the run-level keys here, each section by its concept. Deprecated keys are first
    moved to their new names (:func:`rename_deprecated_keys`)."""
    rename_deprecated_keys(config)
    _check_run(config)
    for concept in (models, data_lib, train):
        concept.check(config)
    measure.check(config, num_params)


def _check_run(config) -> None:
    require(len(config.seeds) > 0, "seeds", "empty")
    require(
        all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in config.seeds),
        "seeds",
        "need integers >= 0",
    )
    require(len(set(config.seeds)) == len(config.seeds), "seeds", "duplicates")
    require(config.workers >= 0, "workers", "must be >= 0 (0: automatic)")
    require(
        config.share_activations in ("auto", "yes", "no"),
        "share_activations",
        f"{config.share_activations!r} is not 'auto', 'yes' or 'no'",
    )
    require(
        config.dtype in ("float32", "float64"),
        "dtype",
        f"{config.dtype!r} is not float32 or float64",
    )


def drop_resumable(resolved: dict) -> dict:
    """A resolved config (as JSON) without the keys that may change when a run is resumed."""
    out = json.loads(json.dumps(resolved))
    for path in RESUMABLE_CHANGES:
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    # An optimizer's section at its defaults is left out: runs from before it existed (those of
    # release 0.1 for train.hessian_free) compare equal.
    for entry in OPTIMIZERS.values():
        at_defaults = json.loads(json.dumps(entry.defaults))
        if entry.section and out.get("train", {}).get(entry.section) == at_defaults:
            out["train"].pop(entry.section)
    # A measurement added since the record format's fingerprints, unplanned and at its
    # defaults, is left out too: run directories from before it existed keep their fingerprints.
    for (section, leaf), default in _added_defaults().items():
        node = out.get(section, {})
        if leaf in node and node[leaf] == default:
            node.pop(leaf)
    measure_section = out.get("measure", {})
    planned = set(measure_section.get("quantities", ()))
    for entry in BUILTINS:
        if entry.name not in ADDED_MEASUREMENTS or entry.name in planned:
            continue
        at_defaults = json.loads(json.dumps({**measure.SCHEDULE_KEYS, **entry.defaults}))
        if measure_section.get(entry.name) == at_defaults:
            measure_section.pop(entry.name)
    return out


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """``"key: A on disk, B now"`` for every key where two configs (as JSON) differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        path = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += differences(a[k], b[k], path + ".")
        elif a.get(k) != b.get(k):
            out.append(f"{path}: {a.get(k)!r} on disk, {b.get(k)!r} now")
    return out


# --------------------------------------------------------------------------------------------
# Renamed keys.

_warned: set[str] = set()


def _warn_renamed(old: str) -> None:
    if old not in _warned:
        _warned.add(old)
        warnings.warn(
            f"config key {old} is deprecated: use {RENAMED_KEYS[old]}", FutureWarning, stacklevel=4
        )


def current_key(path: str) -> str:
    """The name a config key has now: a deprecated key's new name (with a ``FutureWarning``,
    once per key and process), any other key itself."""
    if path in RENAMED_KEYS:
        _warn_renamed(path)
        return RENAMED_KEYS[path]
    return path


def rename_deprecated_keys(config) -> None:
    """Move every deprecated key that ``config`` holds (a config file set it) to its new name,
    in place, with a ``FutureWarning`` once per key and process; the old key's value wins."""
    for old, new in RENAMED_KEYS.items():
        *parents, leaf = old.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            continue
        _warn_renamed(old)
        value = node[leaf]
        with config.unlocked():
            del node[leaf]
            node[new.rsplit(".", 1)[1]] = value


def _moved(resolved: dict, pairs) -> dict:
    """A copy of a config as JSON with each key ``a`` of ``pairs`` moved to ``b``."""
    out = json.loads(json.dumps(resolved))
    for a, b in pairs:
        *parents, leaf = a.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[b.rsplit(".", 1)[1]] = node.pop(leaf)
    return out


def upgrade(resolved: dict) -> dict:
    """A stored config (JSON of ``config.json`` or ``member.json``) with today's key names: a run
    directory written before a rename reads as if written now. Silent: the run directory did
    nothing wrong. Keys added since it was written (:data:`ADDED_KEYS`) read at their defaults,
    which is what the run computed with."""
    out = _moved(resolved, RENAMED_KEYS.items())
    for (section, leaf), default in _added_defaults().items():
        node = out.get(section)
        if isinstance(node, dict) and leaf not in node:
            node[leaf] = default
    return out


def _added_defaults() -> dict[tuple[str, str], object]:
    """``{(section, key): default as JSON}`` of :data:`ADDED_KEYS`, from the sections that own
    them."""
    sections = {"data": data_lib.section(), "model": models.section()}
    out = {}
    for path in ADDED_KEYS:
        section, leaf = path.split(".")
        out[(section, leaf)] = json.loads(json.dumps(sections[section][leaf]))
    return out


def fingerprint_form(resolved: dict) -> dict:
    """What a member's fingerprint hashes: its resolved config (as JSON) less the keys that may
    change on resume, renamed keys under their first names, so that a run directory keeps its
    fingerprints across the renames."""
    return _moved(drop_resumable(upgrade(resolved)), ((b, a) for a, b in RENAMED_KEYS.items()))


def stored(workdir) -> ml_collections.ConfigDict | None:
    """The config of the run in ``workdir`` (its ``config.json``, upgraded), locked; ``None``
    when it holds none: ``python -m experiments run --workdir=DIR`` resumes with it."""
    found = storage.read_json(pathlib.Path(workdir).expanduser() / "config.json")
    if found is None:
        return None
    config = ml_collections.ConfigDict(upgrade(found))
    config.lock()
    return config

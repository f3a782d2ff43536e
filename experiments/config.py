"""The experiment configuration: defaults, sweeps, and a validation that names the offending key.

Configs are ``configs/*.py`` files whose ``get_config()`` returns an ``ml_collections.ConfigDict``
(the flax-examples convention); variants start from :func:`base_config` and change a few fields.
The command line overrides fields as ``--config.train.steps=500`` and sweeps any field as
``--sweep=train.learning_rate=0.1,0.2``. The config is locked, so a misspelt key is an error, and
ml_collections rejects a value of the wrong type. Allowed names (activations, optimizers, losses,
models, data sources, measurements) come from their registries.
"""

from __future__ import annotations

import math

import jax
import ml_collections

from experiments import data as data_lib
from experiments import hessian_free, models, train
from experiments import measure as measure_lib
from experiments.errors import ConfigError

# The plan of the default comparison: everything but the optional diagnostics.
DEFAULT_QUANTITIES = (
    "top_eigenvalues",
    "bottom_eigenvalues",
    "trace",
    "gauss_newton",
    "frobenius",
    "density",
)

# Keys that a resumed run may change: they change how, not what, is computed (at most the
# round-off: measure.batch_size and measure.devices change the order of summation).
RESUMABLE_CHANGES = ("measure.batch_size", "measure.devices", "workers", "share_activations")

# Old keys (release 0.1) and where they went, for the "does not exist" error.
MOVED_KEYS = {
    "measure.top_k": "measure.top_eigenvalues.k",
    "measure.bottom_k": "measure.bottom_eigenvalues.k",
    "measure.lanczos_steps": "measure.top_eigenvalues.lanczos_steps (and each measurement's own)",
    "measure.trace_matvecs": "measure.trace.matvecs",
    "measure.frobenius_probes": "measure.frobenius.probes",
    "measure.slq_probes": "measure.density.probes",
    "measure.slq_steps": "measure.density.lanczos_steps",
}


SCHEDULE_KEYS = {"every": 0, "steps": ()}
HESSIAN_FREE = dict(hessian_free.HESSIAN_FREE_DEFAULTS)


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

    c.data = ml_collections.ConfigDict()
    c.data.source = "digits"  # digits | teacher | mixture | npz | idx (data.SOURCES)
    c.data.path = ""  # npz file, or folder of idx / idx.gz files
    c.data.test_fraction = 0.25  # for sources without their own test split
    c.data.split_seed = 0
    c.data.standardize = True
    c.data.num_train = 0  # 0: all
    c.data.num_test = 0
    c.data.image_shape = ()  # e.g. (8, 8, 1) for a CNN on digits
    c.data.num_examples = 2000  # synthetic sources
    c.data.input_dim = 20
    c.data.num_classes = 10
    c.data.teacher_width = 32
    c.data.separation = 3.0
    c.data.synthetic_seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.kind = "mlp"  # mlp | cnn (models.MODELS)
    c.model.width = 32
    c.model.depth = 2
    c.model.channels = (8, 16)  # cnn

    c.train = ml_collections.ConfigDict()
    c.train.loss = "cross_entropy"  # cross_entropy | mse on one-hot labels (models.LOSSES)
    # sgd | momentum | adam | rmsprop | hessian_free (train.OPTIMIZERS)
    c.train.optimizer = "sgd"
    c.train.learning_rate = 0.1  # Hessian-free: scales its step (Martens: 1.0)
    c.train.momentum = 0.9
    # curvature.optim.hessian_free's settings (experiments.hessian_free has their meaning).
    c.train.hessian_free = ml_collections.ConfigDict(HESSIAN_FREE)
    c.train.steps = 1000
    c.train.batch_size = 0  # 0: full batch
    # Stop a member whose training loss exceeds this multiple of its initial loss (0: never).
    c.train.divergence_factor = 10.0

    c.measure = ml_collections.ConfigDict()
    c.measure.every = 100  # measure every k steps; step 0 and the last step always
    c.measure.steps = ()  # or an explicit list of steps (then `every` is ignored)
    c.measure.split = "train"  # the measurement set: "train" or "test" examples
    c.measure.num_examples = 0  # the first N examples of that split; 0: all of it
    c.measure.batch_size = 0  # chunk size inside the curvature matvec; 0: all at once
    # Data-parallel measurement: the measurement set is sharded along its example axis over a
    # one-axis mesh of this many devices (the first of jax.devices()) and the parameters are
    # replicated, so every estimator runs through XLA's partitioning. An integer >= 1, which
    # must divide the measurement examples, or "all": the most devices, up to
    # jax.device_count(), that divide them. 1: unsharded, as before the key existed.
    c.measure.devices = ml_collections.FieldReference(1, field_type=object)  # int or "all"
    c.measure.quantities = DEFAULT_QUANTITIES  # the plan (measure.MEASUREMENTS)
    c.measure.keep_params = True  # parameters at every measured step (False: the last only)
    c.measure.save_eigenvectors = 0  # keep this many top Hessian eigenvectors per step
    # Each measurement's accuracy settings, with the defaults it registered, and its own schedule:
    # `every` k steps or at explicit `steps` (plus step 0 and the last); neither: at every
    # measurement step of the run.
    for name, entry in measure_lib.MEASUREMENTS.items():
        c.measure[name] = ml_collections.ConfigDict({**SCHEDULE_KEYS, **entry.defaults})
    return c


def validate(config, num_params: int | None = None) -> None:
    """Raise :class:`ConfigError` naming the first bad key. Runs before any training."""

    def need(ok, key, message):
        if not ok:
            raise ConfigError(f"config key {key}: {message}")

    need(len(config.activations) > 0, "activations", "empty")
    for name in config.activations:
        try:
            models.parse_activation(name)
        except ValueError as err:
            raise ConfigError(f"config key activations: {err}") from None
    need(len(set(config.activations)) == len(config.activations), "activations", "duplicates")
    need(len(config.seeds) > 0, "seeds", "empty")
    need(
        all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in config.seeds),
        "seeds",
        "need integers >= 0",
    )
    need(len(set(config.seeds)) == len(config.seeds), "seeds", "duplicates")
    need(config.workers >= 0, "workers", "must be >= 0 (0: automatic)")
    need(
        config.share_activations in ("auto", "yes", "no"),
        "share_activations",
        f"{config.share_activations!r} is not 'auto', 'yes' or 'no'",
    )
    need(
        config.dtype in ("float32", "float64"),
        "dtype",
        f"{config.dtype!r} is not float32 or float64",
    )
    data_lib.SOURCES.get(config.data.source)
    models.MODELS.get(config.model.kind)
    models.LOSSES.get(config.train.loss)
    train.OPTIMIZERS.get(config.train.optimizer)
    need(config.model.width >= 1 and config.model.depth >= 1, "model.width/depth", "must be >= 1")
    lr = config.train.learning_rate
    need(
        math.isfinite(lr) and lr > 0, "train.learning_rate", f"{lr} is not a finite positive number"
    )
    need(config.train.steps >= 0, "train.steps", "must be >= 0")
    need(config.train.batch_size >= 0, "train.batch_size", "must be >= 0 (0: full batch)")
    factor = config.train.divergence_factor
    need(
        factor == 0 or (math.isfinite(factor) and factor > 1),
        "train.divergence_factor",
        f"{factor} must be > 1 (or 0: never stop)",
    )
    need(
        0.0 <= config.train.momentum < 1.0,
        "train.momentum",
        f"{config.train.momentum} is not in [0, 1)",
    )
    for key, message in hessian_free.check_settings(config.train):
        need(False, key, message)
    m = config.measure
    need(m.every >= 1, "measure.every", "must be >= 1")
    need(
        all(isinstance(s, int) and not isinstance(s, bool) for s in m.steps),
        "measure.steps",
        f"steps must be integers, got {tuple(m.steps)}",
    )
    need(
        all(0 <= s <= config.train.steps for s in m.steps),
        "measure.steps",
        f"steps must lie in [0, train.steps={config.train.steps}]",
    )
    need(m.split in ("train", "test"), "measure.split", f"{m.split!r} is not 'train' or 'test'")
    need(m.num_examples >= 0, "measure.num_examples", "must be >= 0 (0: the whole split)")
    need(m.batch_size >= 0, "measure.batch_size", "must be >= 0 (0: all examples at once)")
    devices = m.devices
    need(
        devices == "all"
        or (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1),
        "measure.devices",
        f"{devices!r} is not an integer >= 1 or 'all'",
    )
    need(
        devices == "all" or devices <= jax.device_count(),
        "measure.devices",
        f"{devices} devices asked for, but jax.device_count() is {jax.device_count()}",
    )
    need(m.save_eigenvectors >= 0, "measure.save_eigenvectors", "must be >= 0")
    need(
        config.data.num_train >= 0 and config.data.num_test >= 0,
        "data.num_train/num_test",
        "must be >= 0 (0: all)",
    )
    known = set(base_config().measure.keys())
    for key in m.keys():
        moved = MOVED_KEYS.get(f"measure.{key}")
        need(
            key in known,
            f"measure.{key}",
            f"does not exist{f'; it moved to {moved}' if moved else ''}",
        )
    need(len(m.quantities) > 0, "measure.quantities", "empty: name at least one measurement")
    if m.save_eigenvectors:
        source = next((q for q in ("top_eigenvalues", "lambda_max") if q in m.quantities), None)
        need(
            source is not None,
            "measure.save_eigenvectors",
            "needs top_eigenvalues or lambda_max in measure.quantities",
        )
        k = m.top_eigenvalues.k if source == "top_eigenvalues" else 1
        need(
            m.save_eigenvectors <= k,
            "measure.save_eigenvectors",
            f"{m.save_eigenvectors} exceeds the {k} eigenvalues that {source} computes",
        )
    if "top_eigenvalues" in m.quantities and "bottom_eigenvalues" in m.quantities:
        k_end = max(m.top_eigenvalues.k, m.bottom_eigenvalues.k)
        steps = max(m.top_eigenvalues.lanczos_steps, m.bottom_eigenvalues.lanczos_steps)
        need(
            steps >= 2 * k_end,
            "measure.top_eigenvalues.lanczos_steps",
            f"{steps} is smaller than 2 * max(top k, bottom k) = {2 * k_end} "
            "(both ends come from one Lanczos run)",
        )
    for name in m.quantities:
        section = m.get(name)
        if section is None or "every" not in section:
            continue
        need(
            isinstance(section.every, int) and section.every >= 0,
            f"measure.{name}.every",
            "must be an integer >= 0 (0: the run's schedule)",
        )
        need(
            all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= config.train.steps
                for x in section.steps
            ),
            f"measure.{name}.steps",
            f"steps must be integers in [0, train.steps={config.train.steps}]",
        )
    info = {"optimizer": config.train.optimizer}
    if num_params is not None:
        info["num_params"] = num_params
    measure_lib.check_plan(config, info)


def _own_steps(section, last: int) -> set[int] | None:
    """A measurement's own schedule, or ``None`` when it follows the run's."""
    if section is None or not (section.get("every") or section.get("steps")):
        return None
    if section.steps:
        own = set(section.steps)
    else:
        own = set(range(0, last + 1, section.every))
    return own | {0, last}


def schedule(config) -> list[int]:
    """The measurement steps: explicit or every k, always with step 0 and the last step, and
    every step of a measurement with its own schedule."""
    last = config.train.steps
    m = config.measure
    steps = set(m.steps) if m.steps else set(range(0, last + 1, m.every))
    for name in m.quantities:
        own = _own_steps(m.get(name), last)
        steps |= own or set()
    return sorted(steps | {0, last})


def plan_at(config, step: int) -> tuple[str, ...]:
    """The measurements taken at ``step``: those on the run's schedule and those whose own
    schedule holds it."""
    last = config.train.steps
    m = config.measure
    run_steps = set(m.steps) if m.steps else set(range(0, last + 1, m.every))
    run_steps |= {0, last}
    out = []
    for name in m.quantities:
        own = _own_steps(m.get(name), last)
        if (own is None and step in run_steps) or (own is not None and step in own):
            out.append(name)
    return tuple(out)


def drop_resumable(resolved: dict) -> dict:
    """A resolved config (as JSON) without the keys that may change when a run is resumed."""
    import json

    out = json.loads(json.dumps(resolved))
    for path in RESUMABLE_CHANGES:
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    # A section at its defaults is left out: runs from before it existed compare equal.
    if out.get("train", {}).get("hessian_free") == json.loads(json.dumps(HESSIAN_FREE)):
        out["train"].pop("hessian_free")
    return out

"""Taking measurements: the config section ``measure`` (what to measure, when, on which
examples), the schedule, and the function that takes every planned measurement of a member at
one step (and compiles them ahead of the members).

A config's ``measure.quantities`` is the plan: the names to measure at every scheduled step, e.g.
``("lambda_max",)`` for an edge-of-stability run (its cost is its Lanczos steps), or the full set
of the default comparison. Each measurement's settings are the config section of its name
(``measure.top_eigenvalues.k``), with the defaults its declaration gives
(:mod:`experiments.measurements`).

A user registers a measurement from their config file::

    from experiments import measure

    @measure.register_measurement("gradient_norm_ratio", defaults={"scale": 1.0})
    def gradient_norm_ratio(ctx):  # ctx: model, loss, params, data, key, settings, ...
        ...
        return {"ratio": value}  # numbers, Estimate / Eigenvalues, or a dict of them

and adds its name to ``measure.quantities``; its value lands in ``record.extra[name]``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments import train
from experiments.errors import ConfigError, require
from experiments.measurements import (
    BUILTINS,
    MEASUREMENTS,
    Context,
    Measurement,
    Record,
    measurement_key,
    register_measurement,
)


class MeasurementFailed(RuntimeError):
    """A measurement could not be taken (a non-finite loss or matvec); the member stops."""


# --------------------------------------------------------------------------------------------
# The config section ``measure``: what to measure, when and on which examples.

# The plan of the default comparison: everything but the optional diagnostics.
DEFAULT_QUANTITIES = (
    "top_eigenvalues",
    "bottom_eigenvalues",
    "trace",
    "gauss_newton",
    "frobenius",
    "density",
)

# A measurement's own schedule, added to its section: `every` k steps or at explicit `steps`
# (plus step 0 and the last); neither: at every measurement step of the run.
SCHEDULE_KEYS = {"every": 0, "steps": ()}

# Keys of release 0.1 and where they went, for the "does not exist" error.
MOVED_KEYS = {
    "measure.top_k": "measure.top_eigenvalues.k",
    "measure.bottom_k": "measure.bottom_eigenvalues.k",
    "measure.lanczos_steps": "measure.top_eigenvalues.num_steps (and each measurement's own)",
    "measure.trace_matvecs": "measure.trace.num_matvecs",
    "measure.frobenius_probes": "measure.frobenius.num_matvecs",
    "measure.slq_probes": "measure.density.num_probes",
    "measure.slq_steps": "measure.density.num_steps",
}


def section() -> ml_collections.ConfigDict:
    """The config section ``measure``, with each registered measurement's own section at its
    defaults (register a measurement before making a config that plans it)."""
    s = ml_collections.ConfigDict()
    s.every = 100  # measure every k steps; step 0 and the last step always
    s.steps = ()  # or an explicit list of steps (then `every` is ignored)
    s.split = "train"  # the measurement set: "train" or "test" examples
    s.num_examples = 0  # the first N examples of that split; 0: all of it
    s.batch_size = 0  # chunk size inside the curvature matvec; 0: all at once
    # Data-parallel measurement: the measurement set is sharded along its example axis over a
    # one-axis mesh of this many devices (the first of jax.devices()) and the parameters are
    # replicated, so every estimator runs through XLA's partitioning. An integer >= 1, which
    # must divide the measurement examples, or "all": the most devices, up to
    # jax.device_count(), that divide them. 1: unsharded, as before the key existed.
    s.devices = ml_collections.FieldReference(1, field_type=object)  # int or "all"
    s.quantities = DEFAULT_QUANTITIES  # the plan (MEASUREMENTS)
    s.keep_params = True  # parameters at every measured step (False: the last only)
    s.save_eigenvectors = 0  # keep this many top Hessian eigenvectors per step
    # Each measurement's accuracy settings, with the defaults it declares, and its own schedule.
    for name, entry in MEASUREMENTS.items():
        s[name] = ml_collections.ConfigDict({**SCHEDULE_KEYS, **entry.defaults})
    return s


def check(config, num_params: int | None = None) -> None:
    """Raise :class:`ConfigError` for the first bad key of ``measure``: the schedule, the
    measurement set, the plan and each planned measurement's settings."""
    m, last = config.measure, config.train.steps
    require(m.every >= 1, "measure.every", "must be >= 1")
    require(
        all(isinstance(s, int) and not isinstance(s, bool) for s in m.steps),
        "measure.steps",
        f"steps must be integers, got {tuple(m.steps)}",
    )
    require(
        all(0 <= s <= last for s in m.steps),
        "measure.steps",
        f"steps must lie in [0, train.steps={last}]",
    )
    require(m.split in ("train", "test"), "measure.split", f"{m.split!r} is not 'train' or 'test'")
    require(m.num_examples >= 0, "measure.num_examples", "must be >= 0 (0: the whole split)")
    require(m.batch_size >= 0, "measure.batch_size", "must be >= 0 (0: all examples at once)")
    devices = m.devices
    require(
        devices == "all"
        or (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1),
        "measure.devices",
        f"{devices!r} is not an integer >= 1 or 'all'",
    )
    require(
        devices == "all" or devices <= jax.device_count(),
        "measure.devices",
        f"{devices} devices asked for, but jax.device_count() is {jax.device_count()}",
    )
    require(m.save_eigenvectors >= 0, "measure.save_eigenvectors", "must be >= 0")
    known = set(section().keys())
    for key in m.keys():
        moved = MOVED_KEYS.get(f"measure.{key}")
        require(
            key in known,
            f"measure.{key}",
            f"does not exist{f'; it moved to {moved}' if moved else ''}",
        )
    for name, entry in MEASUREMENTS.items():
        own = m.get(name)
        known = [*SCHEDULE_KEYS, *entry.defaults]
        for key in own.keys() if isinstance(own, ml_collections.ConfigDict) else ():
            require(
                key in known, f"measure.{name}.{key}", f"does not exist; known: {', '.join(known)}"
            )
    require(len(m.quantities) > 0, "measure.quantities", "empty: name at least one measurement")
    if m.save_eigenvectors:
        source = next((q for q in ("top_eigenvalues", "lambda_max") if q in m.quantities), None)
        require(
            source is not None,
            "measure.save_eigenvectors",
            "needs top_eigenvalues or lambda_max in measure.quantities",
        )
        k = m.top_eigenvalues.k if source == "top_eigenvalues" else 1
        require(
            m.save_eigenvectors <= k,
            "measure.save_eigenvectors",
            f"{m.save_eigenvectors} exceeds the {k} eigenvalues that {source} computes",
        )
    for name in m.quantities:
        own = m.get(name)
        if own is None or "every" not in own:
            continue
        require(
            isinstance(own.every, int) and own.every >= 0,
            f"measure.{name}.every",
            "must be an integer >= 0 (0: the run's schedule)",
        )
        require(
            all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= last for x in own.steps
            ),
            f"measure.{name}.steps",
            f"steps must be integers in [0, train.steps={last}]",
        )
    info = {"optimizer": config.train.optimizer, "plan": tuple(m.quantities), "measure": m}
    if num_params is not None:
        info["num_params"] = num_params
    check_plan(config, info)


def _own_steps(own, last: int) -> set[int] | None:
    """A measurement's own schedule, or ``None`` when it follows the run's."""
    if own is None or not (own.get("every") or own.get("steps")):
        return None
    found = set(own.steps) if own.steps else set(range(0, last + 1, own.every))
    return found | {0, last}


def schedule(config) -> list[int]:
    """The measurement steps: explicit or every k, always with step 0 and the last step, and
    every step of a measurement with its own schedule."""
    last = config.train.steps
    m = config.measure
    steps = set(m.steps) if m.steps else set(range(0, last + 1, m.every))
    for name in m.quantities:
        steps |= _own_steps(m.get(name), last) or set()
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


# --------------------------------------------------------------------------------------------
# One measurement.


def check_plan(config, info: dict) -> None:
    """Raise :class:`ConfigError` for an unknown name in the plan or settings that cannot run.
    ``info`` (what each measurement's check reads) may hold ``num_params``, ``optimizer``,
    ``plan`` and the ``measure`` section."""
    plan = tuple(config.measure.quantities)
    for name in plan:
        entry = MEASUREMENTS.get(name)
        if entry.check is None:
            continue
        settings = getattr(config.measure, name, None)
        message = entry.check(settings, info)
        if message:
            raise ConfigError(f"config key measure.{name}: {message}")
    if len(set(plan)) != len(plan):
        raise ConfigError(f"config key measure.quantities: duplicates in {plan}")


def measure(ctx: Context, *, test_data: dict, member: str, fingerprint: str) -> tuple[Record, dict]:
    """Every quantity of the plan at ``ctx.step``: ``(record, spectra arrays)``.

    Raises :class:`MeasurementFailed` when the loss on the measurement set is not finite or an
    estimator meets a non-finite matvec."""
    timings = {}
    t0 = time.perf_counter()
    evaluate = train.evaluator(ctx.loss, ctx.model)
    loss, accuracy, grad_norm = jax.block_until_ready(evaluate(ctx.params, ctx.data))
    test_loss, test_accuracy, _ = evaluate(ctx.params, test_data)
    timings["evaluate"] = time.perf_counter() - t0
    if not np.isfinite(float(loss)):
        raise MeasurementFailed(f"the loss on the measurement set is {float(loss)}")
    fields, extra = {}, {}
    for name in ctx.plan:
        entry = MEASUREMENTS.get(name)
        t0 = time.perf_counter()
        registered = entry.fn is not _BUILTIN_FUNCTIONS.get(name)  # a user's, or a replaced one
        try:
            value = jax.block_until_ready(entry.fn(ctx.taking(name, ctx.config.measure.get(name))))
        except FloatingPointError as err:
            raise MeasurementFailed(f"{name}: {err}") from None
        except Exception as err:  # noqa: BLE001
            if not registered:
                raise  # a built-in measurement's error is a bug to see whole
            raise MeasurementFailed(
                f"the registered measurement {name!r} raised {type(err).__name__}: {err}"
            ) from err
        timings[name] = time.perf_counter() - t0
        if entry.field is not None:
            # A replaced built-in's value must fit the field (None: nothing to record here).
            if value is not None and not isinstance(value, entry.record_type):
                raise MeasurementFailed(
                    f"the registered measurement {name!r} returned a {type(value).__name__}, "
                    f"not the {entry.record_type.__name__} its record field {entry.field} holds"
                )
            fields[entry.field] = value
        else:
            try:
                extra[name] = _plain(value)
            except TypeError as err:
                raise MeasurementFailed(
                    f"the registered measurement {name!r} returned a value the record cannot "
                    f"hold ({err}); return numbers, arrays, Estimate / Eigenvalues, or dicts "
                    "and lists of them"
                ) from None
    train_cfg = ctx.config.train
    record = Record(
        step=ctx.step,
        member=member,
        fingerprint=fingerprint,
        train_loss=float(loss),
        train_accuracy=float(accuracy),
        test_loss=float(test_loss),
        test_accuracy=float(test_accuracy),
        grad_norm=float(grad_norm),
        learning_rate=float(train_cfg.learning_rate),
        edge_of_stability=train.edge_of_stability(train_cfg),
        extra=extra,
        timings=timings,
        **fields,
    )
    return record, dict(ctx.spectra)


def warm_up(
    make_context: Callable[[], Context],
    plan: tuple[str, ...],
    workers: int,
    extra: tuple[Callable[[], Any], ...] = (),
    *,
    x64: bool = False,
) -> None:
    """Compile every measurement of ``plan`` at once, one measurement a thread, by taking it on
    ``make_context()`` and discarding the result. XLA compiles distinct programs in parallel
    (it releases the GIL), where the members' first measurements would compile them one after
    another; the members then find every program compiled."""

    def one(name):
        ctx = make_context()
        ctx.plan = plan
        jax.block_until_ready(
            MEASUREMENTS.get(name).fn(ctx.taking(name, ctx.config.measure.get(name)))
        )

    def guarded(fn, *args):
        # x64 is per thread; an error here is the members' to report, with their step and name.
        with jax.enable_x64(x64):
            try:
                fn(*args)
            except Exception:  # noqa: BLE001
                pass

    # The costliest to compile first (their declared cost), so that the threads finish together.
    order = sorted(plan, key=lambda n: -MEASUREMENTS.get(n).cost)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(guarded, one, name) for name in order]
        futures += [pool.submit(guarded, f) for f in extra]
        for f in futures:
            f.result()


_BUILTIN_FUNCTIONS = {m.name: m.fn for m in BUILTINS}


def _as_float(array: np.ndarray) -> np.ndarray | None:
    try:
        return array.astype(np.float64)
    except (TypeError, ValueError):
        return None


def _plain(value, where: str = ""):
    """A user measurement's value as JSON: numbers, strings, arrays as lists, dataclasses and
    dicts as dicts. ``TypeError`` (``"<type> at <where>"``) for anything else: it would not
    survive the metrics log."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray | jax.Array | np.generic):
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":  # bfloat16 and other extension floats are numbers
            numbers = _as_float(array) if array.dtype.kind == "V" else None
            if numbers is None:
                raise TypeError(f"an array of {array.dtype}{f' at {where}' if where else ''}")
            array = numbers
        return array.item() if array.ndim == 0 else array.tolist()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"{type(value).__name__}{f' at {where}' if where else ''}")


__all__ = [
    "MEASUREMENTS",
    "Context",
    "Measurement",
    "MeasurementFailed",
    "check",
    "measure",
    "measurement_key",
    "plan_at",
    "register_measurement",
    "schedule",
    "section",
    "warm_up",
]

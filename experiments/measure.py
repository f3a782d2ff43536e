"""Measurements: a registry of named curvature quantities, each with its own accuracy settings,
and the function that takes one measurement of a member at one step.

A config's ``measure.quantities`` is the plan: the names to measure at every scheduled step, e.g.
``("lambda_max",)`` for an edge-of-stability run (its cost is its Lanczos steps), or the full set
of the default comparison. Each measurement's settings are the config section of its name
(``measure.top_eigenvalues.k``), with defaults declared once, at registration.

A user registers a measurement from their config file::

    from experiments import measure

    @measure.register_measurement("gradient_norm_ratio", defaults={"scale": 1.0})
    def gradient_norm_ratio(ctx):  # ctx: model, loss, params, data, key, settings, ...
        ...
        return {"ratio": value}  # numbers, Estimate / Eigenvalues, or a dict of them

and adds its name to ``measure.quantities``; its value lands in ``record.extra[name]``.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import curvature as cv
from experiments import train
from experiments.errors import ConfigError
from experiments.record import (
    Record,
)
from experiments.registry import Registry


class MeasurementFailed(RuntimeError):
    """A measurement could not be taken (a non-finite loss or matvec); the member stops."""


@dataclasses.dataclass(frozen=True)
class Measurement:
    """``fn(ctx)`` returns the value of record field ``field`` (``None``: a user measurement,
    kept in ``record.extra``); ``defaults`` are its settings; ``check(settings, ctx_info)``
    returns an error message for settings that cannot run, or ``None``."""

    fn: Callable[[Context], Any]
    defaults: dict
    check: Callable[[Any, dict], str | None] | None = None
    field: str | None = None
    doc: str = ""


MEASUREMENTS: Registry[Measurement] = Registry("measurement", "measure.quantities")


def register_measurement(
    name: str,
    fn: Callable | None = None,
    *,
    defaults: dict | None = None,
    check: Callable | None = None,
    replace: bool = True,
):
    """Register ``fn(ctx)`` as measurement ``name`` (usable as a decorator).

    ``defaults`` become the config section ``measure.<name>`` of configs made afterwards by
    :func:`experiments.config.base_config` (register before calling it). A user measurement may be
    registered again (a config file loaded twice), replacing the first."""

    def add(fn):
        field = name if name in _RECORD_FIELDS else None
        MEASUREMENTS.register(
            name,
            Measurement(fn, dict(defaults or {}), check, field, (fn.__doc__ or "").strip()),
            replace=replace,
        )
        return fn

    return add if fn is None else add(fn)


_RECORD_FIELDS = {f.name for f in dataclasses.fields(Record)}


def measurement_key(seed: int, step: int, name: str) -> jax.Array:
    """The PRNG key of measurement ``name`` at ``step``: a function of the seed, the step and the
    name alone, so members that share a seed share their probes, a resumed run draws the same
    ones, and ``trace`` and ``gauss_newton`` (which asks for the ``"trace"`` key) share probes."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 2), step)
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


@dataclasses.dataclass
class Context:
    """What a measurement sees: the member's pure ``model(params, batch)`` and
    ``loss(params, batch)``, its ``params`` and ``opt_state`` at this step, the measurement set
    ``data`` (with its ``activation`` column), the member's resolved ``config``, this measurement's
    ``settings``, the plan, and ``key_for(name)``. ``spectra`` collects arrays saved in the step's
    spectra file; ``hessian()`` / ``gauss_newton()`` build the operators once per measurement.
    With ``measure.devices`` > 1, ``data`` is sharded along its examples over a one-axis mesh
    and ``params`` and ``opt_state`` are replicated on it: jitted code runs data-parallel."""

    model: Callable
    loss: Callable
    params: Any
    opt_state: Any
    data: dict
    config: Any
    seed: int
    step: int
    plan: tuple[str, ...]
    settings: Any = None
    spectra: dict = dataclasses.field(default_factory=dict)
    _cache: dict = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> jax.Array:
        return self.key_for(self._name)

    _name: str = ""

    def key_for(self, name: str) -> jax.Array:
        return measurement_key(self.seed, self.step, name)

    @property
    def batch_size(self) -> int | None:
        return self.config.measure.batch_size or None

    def cached(self, name: str, make: Callable):
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]

    def hessian(self) -> cv.LinearOperator:
        return self.cached(
            "H",
            lambda: cv.hessian(
                self.loss, self.params, self.data, batch_size=self.batch_size, check=False
            ),
        )

    def gauss_newton(self) -> cv.LinearOperator:
        from experiments import models

        output_loss = models.LOSSES.get(self.config.train.loss).gauss_newton
        return self.cached(
            "G",
            lambda: cv.gauss_newton(
                self.model,
                self.params,
                self.data,
                loss=output_loss,
                batch_size=self.batch_size,
                check=False,
            ),
        )

    def section(self, name: str):
        return getattr(self.config.measure, name)


# --------------------------------------------------------------------------------------------
# One measurement.


def check_plan(config, info: dict) -> None:
    """Raise :class:`ConfigError` for an unknown name in the plan or settings that cannot run.
    ``info`` may hold ``num_params`` and ``optimizer``."""
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
        ctx.settings = getattr(ctx.config.measure, name, None)
        ctx._name = name
        t0 = time.perf_counter()
        try:
            value = jax.block_until_ready(entry.fn(ctx))
        except FloatingPointError as err:
            raise MeasurementFailed(f"{name}: {err}") from None
        except Exception as err:  # noqa: BLE001
            if entry.field is not None:
                raise  # a built-in measurement's error is a bug to see whole
            raise MeasurementFailed(
                f"the registered measurement {name!r} raised {type(err).__name__}: {err}"
            ) from err
        timings[name] = time.perf_counter() - t0
        if entry.field is not None:
            fields[entry.field] = value
        else:
            extra[name] = _plain(value)
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
    import concurrent.futures

    def one(name):
        ctx = make_context()
        ctx.plan, ctx._name = plan, name
        ctx.settings = getattr(ctx.config.measure, name, None)
        jax.block_until_ready(MEASUREMENTS.get(name).fn(ctx))

    def guarded(fn, *args):
        # x64 is per thread; an error here is the members' to report, with their step and name.
        with jax.enable_x64(x64):
            try:
                fn(*args)
            except Exception:  # noqa: BLE001
                pass

    # The costliest first, so that the threads finish together.
    order = sorted(plan, key=lambda n: n not in ("gauss_newton", "density", "frobenius"))
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(guarded, one, name) for name in order]
        futures += [pool.submit(guarded, f) for f in extra]
        for f in futures:
            f.result()


def _plain(value):
    """A user measurement's value as JSON: numbers, arrays as lists, dataclasses as dicts."""
    if dataclasses.is_dataclass(value):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray | jax.Array | np.generic):
        array = np.asarray(value)
        return array.item() if array.ndim == 0 else array.tolist()
    return value


# The built-in measurements register themselves on import (after everything above exists).
from experiments import measurements as _builtins  # noqa: E402, F401

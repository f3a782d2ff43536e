"""What a measurement is: its declaration (:class:`Measurement`), what it sees when it runs
(:class:`Context`), and the helpers the built-in measurements share."""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import curvature as cv
from experiments import models
from experiments.figures.common import Figure
from experiments.record import Eigenvalues, Estimate
from experiments.table import Column


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Everything about one measurement, in one place.

    * ``name``: what a plan lists (``measure.quantities``), its config section ``measure.<name>``
      and, for a built-in, its record field ``record.<name>``;
    * ``fn(ctx)``: its value at one step (:class:`Context`);
    * ``defaults``: its settings, the keys of its config section (to which every section adds a
      schedule of its own, ``every`` and ``steps``);
    * ``check(settings, info)``: an error message for settings that cannot run, or ``None``;
      ``info`` holds ``optimizer``, ``plan``, the ``measure`` section and, once the model is
      built, ``num_params``;
    * ``record_type``: the type of its record field; ``None`` for a user's measurement, whose
      value is kept as JSON in ``record.extra[name]``;
    * ``columns``: its columns in the summary tables; ``figures``: its figures, with captions;
    * ``spectra``: whether it writes arrays to the step's spectra file (a step whose file is
      lost is measured again);
    * ``cost``: how long it takes to compile, relative to the others (the warm-up compiles the
      costliest first, so that its threads finish together);
    * ``renamed``: settings renamed since an earlier release, ``{old: new}``: the old names stay
      usable, with a warning (:mod:`experiments.config`).
    """

    name: str
    fn: Callable[[Context], Any]
    defaults: dict = dataclasses.field(default_factory=dict)
    check: Callable[[Any, dict], str | None] | None = None
    record_type: type | None = None
    columns: tuple[Column, ...] = ()
    figures: tuple[Figure, ...] = ()
    spectra: bool = False
    cost: int = 0
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def field(self) -> str | None:
        """The record field that holds its value (``None``: ``record.extra[name]``)."""
        return self.name if self.record_type is not None else None

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip()


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
    _name: str = ""

    @property
    def key(self) -> jax.Array:
        """The key of the measurement being taken."""
        return self.key_for(self._name)

    def key_for(self, name: str) -> jax.Array:
        return measurement_key(self.seed, self.step, name)

    def taking(self, name: str, settings) -> Context:
        """This context for measurement ``name`` with its ``settings`` (the same caches)."""
        self._name, self.settings = name, settings
        return self

    @property
    def batch_size(self) -> int | None:
        return self.config.measure.batch_size or None

    def cached(self, name, make: Callable):
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

    def empirical_fisher(self) -> cv.LinearOperator:
        return self.cached(
            "F",
            lambda: cv.empirical_fisher(
                self.loss, self.params, self.data, batch_size=self.batch_size, check=False
            ),
        )

    def section(self, name: str):
        return getattr(self.config.measure, name)


# --------------------------------------------------------------------------------------------
# Shared by the built-in measurements.


def eigenvalues(result: cv.EigshResult, index=slice(None)) -> Eigenvalues:
    """The record of Ritz pairs ``result[index]`` (values, residuals, converged flags)."""
    return Eigenvalues(
        tuple(float(v) for v in np.asarray(result.eigenvalues)[index]),
        tuple(float(v) for v in np.asarray(result.residual_norms)[index]),
        tuple(bool(c) for c in np.asarray(result.converged)[index]),
        int(result.num_matvecs),
    )


def estimate(result) -> Estimate:
    """The record of a stochastic estimate (value, standard error, matvecs)."""
    return Estimate(float(result.value), float(result.standard_error), int(result.num_matvecs))


def finite(value: Estimate, name: str) -> Estimate:
    if not np.isfinite(value.value):
        raise FloatingPointError(f"{name}: a matvec returned NaN or inf")
    return value


def at_least(minimum: int, keys: str):
    """A check: each of the comma-separated settings ``keys`` is an integer >= ``minimum``."""

    def check(settings, info):
        for key in keys.split(","):
            value = settings[key]
            if not isinstance(value, int) or value < minimum:
                return f"{key}={value!r} must be an integer >= {minimum}"
        return None

    return check


def steps_check(*, k_key: str | None = "k", steps_key: str = "num_steps"):
    """A check of a Lanczos run: ``k`` >= 1 eigenvalues from ``k`` <= steps <= parameters."""

    def check(settings, info):
        k = settings[k_key] if k_key else 1
        steps = settings[steps_key]
        if not isinstance(k, int) or k < 1:
            return f"{k_key}={k!r} must be an integer >= 1"
        if not isinstance(steps, int) or steps < k:
            return f"{steps_key}={steps!r} must be an integer >= {k_key}={k}"
        if "num_params" in info and steps > info["num_params"]:
            return f"{steps_key}={steps} exceeds the {info['num_params']} parameters"
        return None

    return check

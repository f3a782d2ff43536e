"""The measurements: one declaration each (:class:`~experiments.measurements.base.Measurement`),
holding its function, its settings (the config section ``measure.<name>``) and their checks, its
record type, its summary columns, its figures with captions and its compile cost.

A built-in measurement is one module here, listed in :data:`BUILTINS`:

* :mod:`~experiments.measurements.eigenvalues`: ``lambda_max``, ``top_eigenvalues``,
  ``bottom_eigenvalues`` (Lanczos);
* :mod:`~experiments.measurements.traces`: ``trace`` and ``gauss_newton`` (Hutch++ on one shared
  sketch, tr R = tr H − tr G);
* :mod:`~experiments.measurements.frobenius`, :mod:`~experiments.measurements.density` (SLQ),
  :mod:`~experiments.measurements.diagonal`, :mod:`~experiments.measurements.optimizer_state`,
  :mod:`~experiments.measurements.gradient_noise`, :mod:`~experiments.measurements.fisher`,
  :mod:`~experiments.measurements.blocks` (by layer),
  :mod:`~experiments.measurements.preconditioner` (the second moment against the curvature),
  :mod:`~experiments.measurements.approximations` (K-FAC, the Fishers, diagonals against H
  and G), :mod:`~experiments.measurements.block_spectra` (per-block spectra and their
  heterogeneity), :mod:`~experiments.measurements.gradient_overlap` (the gradient in the top-k
  eigenspace), :mod:`~experiments.measurements.landscape` (the loss along directions);
* :mod:`~experiments.measurements.base`: the declaration, the :class:`Context` a measurement
  sees, and shared helpers. The estimators are the library's public ones (shared probes:
  ``curvature.trace((H, G, H - G), ...)``, ``frobenius_norm_squared``, ``hutchinson``,
  ``block_summary``).

The record of a measurement step (:data:`Record`) has one typed field per built-in, in the order
of :data:`BUILTINS` (which is the order of a record's JSON). A user's measurement
(:func:`register_measurement`) lands in ``record.extra[name]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from experiments.errors import ConfigError
from experiments.measurements import (
    approximations,
    block_spectra,
    blocks,
    density,
    diagonal,
    eigenvalues,
    fisher,
    frobenius,
    gradient_noise,
    gradient_overlap,
    landscape,
    optimizer_state,
    preconditioner,
    traces,
)
from experiments.measurements.base import Context, Measurement, measurement_key
from experiments.record import record_class
from experiments.registry import Registry

BUILTINS: tuple[Measurement, ...] = (
    eigenvalues.LAMBDA_MAX,
    eigenvalues.TOP_EIGENVALUES,
    eigenvalues.BOTTOM_EIGENVALUES,
    traces.TRACE,
    traces.GAUSS_NEWTON,
    frobenius.FROBENIUS,
    density.DENSITY,
    diagonal.DIAGONAL,
    optimizer_state.OPTIMIZER_STATE,
    gradient_noise.GRADIENT_NOISE,
    fisher.FISHER,
    blocks.BLOCKS,
    preconditioner.PRECONDITIONER,
    approximations.APPROXIMATIONS,
    block_spectra.BLOCK_SPECTRA,
    gradient_overlap.GRADIENT_OVERLAP,
    landscape.LANDSCAPE,
)
"""The built-in measurement declarations (one module of ``experiments/measurements/`` each),
registered in :data:`MEASUREMENTS` at import."""

Record = record_class(BUILTINS)
"""The typed record of one member at one step: the run's step, loss and accuracy fields, the
training cost to the step (``record.training``), one field per built-in measurement (``None``
when not measured at that step) and ``extra`` for registered ones (``record.extra[name]``)."""

MEASUREMENTS: Registry[Measurement] = Registry("measurement", "measure.quantities")
"""Measurements by name (``measure.quantities``): the built-in declarations and those added with
:func:`register_measurement`."""
for _entry in BUILTINS:
    MEASUREMENTS.register(_entry.name, _entry)


def register_measurement(
    name: str,
    fn: Callable | None = None,
    *,
    defaults: dict | None = None,
    check: Callable | None = None,
    replace: bool = False,
):
    """Register ``fn(ctx)`` as measurement ``name`` (usable as a decorator).

    ``defaults`` become the config section ``measure.<name>`` of configs made afterwards by
    :func:`experiments.config.base_config` (register before calling it); ``check(settings,
    info)`` returns an error message for settings that cannot run, or ``None``. The value lands
    in ``record.extra[name]``: numbers, arrays, ``Estimate`` / ``Eigenvalues``, or dicts and
    lists of them (anything else fails the member at that step, naming the measurement).

    A name that is taken is a :class:`~experiments.errors.ConfigError` naming the measurement
    that holds it, unless ``replace=True``, or unless it is the same function registered again
    (a config file loaded twice in one process: same file, same name). Replacing a built-in
    replaces its function, settings and check and keeps its record field, columns and figures:
    the function must then return the field's type (``Estimate`` for ``trace``), or the member
    fails at that step with the finished measurements kept, so that the run directory stays
    readable."""

    def add(fn):
        builtin = next((m for m in BUILTINS if m.name == name), None)
        if name in MEASUREMENTS and not replace and not _same_function(MEASUREMENTS.get(name), fn):
            held = MEASUREMENTS.get(name)
            if builtin is not None and held.fn is builtin.fn:
                what = f"the built-in measurement {name!r}"
            else:
                what = f"measurement {name!r} ({_origin(held.fn)})"
            raise ConfigError(
                f"register_measurement: {what} is already registered; choose another name, or "
                "pass replace=True to replace it"
            )
        if builtin is not None:
            entry = dataclasses.replace(builtin, fn=fn, defaults=dict(defaults or {}), check=check)
        else:
            entry = Measurement(name, fn, dict(defaults or {}), check)
        MEASUREMENTS.register(name, entry, replace=True)
        return fn

    return add if fn is None else add(fn)


def _origin(fn) -> str:
    """Where a function comes from: ``qualname`` in ``file``."""
    code = getattr(fn, "__code__", None)
    where = f" in {code.co_filename}" if code is not None else ""
    return f"{getattr(fn, '__qualname__', repr(fn))}{where}"


def _same_function(entry: Measurement, fn) -> bool:
    """Whether ``fn`` is the function of ``entry``, or one of the same name in the same file."""
    if entry.fn is fn:
        return True
    if any(entry.fn is m.fn for m in BUILTINS):
        return False
    return _origin(entry.fn) == _origin(fn) and hasattr(fn, "__code__")


__all__ = [
    "BUILTINS",
    "MEASUREMENTS",
    "Context",
    "Measurement",
    "Record",
    "measurement_key",
    "register_measurement",
]

"""The measurement record: one JSON line per measurement of a member at a step.

A record holds what every measured step has (the step, the losses and accuracies on the
measurement and test sets, the gradient norm, the learning rate and its edge of stability), one
typed field per built-in measurement (named and typed by its declaration: the
:data:`experiments.measurements.Record` class is assembled from them by :func:`record_class`),
what training to the step cost (:class:`Training`), and a user measurement's value as JSON in
``extra``. Fields of measurements a plan did not ask for are ``None``.

Reports, figures, ``load_run`` and tests read fields by name (``record.trace.value``,
``record.top_eigenvalues.converged``). Every number carries its error bar: an :class:`Estimate`
its standard error, an :class:`Eigenvalues` its residual norms and converged flags.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

FORMAT = 2  # the record layout; bumped when a field changes meaning


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A stochastic estimate with its standard error (a Monte Carlo estimate of its spread)."""

    value: float
    standard_error: float
    num_matvecs: int = 0

    def readable(self) -> bool:
        """Whether the estimate tells its value from zero: ``|value| >= 2 SE`` and finite.

        An estimate that does not (a 4-probe trace, the zero trace of a ReLU network's residual)
        is printed as "≈0 (±2 SE)" rather than as a number."""
        v, se = self.value, self.standard_error
        return math.isfinite(v) and math.isfinite(se) and abs(v) >= 2.0 * se


@dataclasses.dataclass(frozen=True)
class Eigenvalues:
    """Ritz values with their residual norms ``||A x - θ x||`` (recomputed, not from the
    recurrence) and a converged flag per value (residual <= sqrt(eps) · max|θ|)."""

    values: tuple[float, ...]
    residuals: tuple[float, ...]
    converged: tuple[bool, ...]
    num_matvecs: int = 0

    @property
    def relative_residuals(self) -> tuple[float, ...]:
        scale = max((abs(v) for v in self.values), default=0.0) or 1.0
        return tuple(r / scale for r in self.residuals)

    def all_converged(self) -> bool:
        return all(self.converged)


@dataclasses.dataclass(frozen=True)
class Training:
    """What training up to this step cost: ``gradient_equivalents`` (in gradients of the
    training batch, see :func:`experiments.train.gradient_equivalents`) and ``seconds`` of the
    compiled training loop, compilation excluded (it is in the member's training log)."""

    gradient_equivalents: float
    seconds: float


class RecordMethods:
    """What every :func:`record_class` record can do besides holding its fields."""

    @property
    def sharpness(self) -> Eigenvalues | None:
        """The largest Hessian eigenvalue, from ``lambda_max`` or else ``top_eigenvalues``."""
        found = self.lambda_max or self.top_eigenvalues
        if found is None:
            return None
        return Eigenvalues(found.values[:1], found.residuals[:1], found.converged[:1], 0)

    @property
    def sharpness_ratio(self) -> float | None:
        """``λmax / edge``: ``η λmax / 2`` for gradient descent; above 1 past the edge."""
        top = self.sharpness
        if top is None or not self.edge_of_stability:
            return None
        return top.values[0] / self.edge_of_stability

    def to_json(self) -> dict:
        return _encode(self)

    @classmethod
    def from_json(cls, obj: dict):
        return _decode(cls, obj)


# The fields of every record, before the measurements' and after them (the JSON order).
HEAD = (
    ("step", int),
    ("member", str),
    ("fingerprint", str),  # of the member's config and data: a resumed run checks it
    ("train_loss", float),
    ("train_accuracy", float),
    ("test_loss", float),
    ("test_accuracy", float),
    ("grad_norm", float),
    ("learning_rate", float),
    # 2/η (gradient descent), (2 + 2β)/η (heavy ball), else None
    ("edge_of_stability", float | None),
)
TAIL = (
    ("training", Training | None, None),
    ("extra", dict[str, Any], dataclasses.field(default_factory=dict)),
    ("timings", dict[str, float], dataclasses.field(default_factory=dict)),
    ("format", int, FORMAT),
)


def record_class(measurements) -> type:
    """The frozen dataclass ``Record``: :data:`HEAD`, then for each of ``measurements`` with a
    record type its field (``None`` when not measured), then :data:`TAIL`."""
    fields = [
        *HEAD,
        *((m.field, m.record_type | None, None) for m in measurements if m.field),
        *TAIL,
    ]
    cls = dataclasses.make_dataclass("Record", fields, bases=(RecordMethods,), frozen=True)
    cls.__module__ = "experiments.measurements"
    cls.__doc__ = "One measurement of one sweep member at one training step."
    return cls


def _encode(x):
    if dataclasses.is_dataclass(x):
        return {f.name: _encode(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {k: _encode(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_encode(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)  # "nan", "inf": JSON has no literal for them
    return x


def _decode(tp, obj):
    if obj is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _decode(args[0], obj)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        return tp(**{k: _decode(hints[k], v) for k, v in obj.items() if k in names})
    if origin is tuple:
        (item, *_) = typing.get_args(tp)
        return tuple(_decode(item, v) for v in obj)
    if origin is dict:
        _, item = typing.get_args(tp)
        return {k: _decode(item, v) for k, v in obj.items()}
    if tp is float:
        return float(obj)  # "nan" and "inf" back to floats
    if tp is Any:  # a user measurement's value: its "nan" and "inf" too, at any depth
        return _non_finite(obj)
    return obj


_NON_FINITE = {repr(x): x for x in (math.nan, math.inf, -math.inf)}  # as _encode writes them


def _non_finite(obj):
    if isinstance(obj, str):
        return _NON_FINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: _non_finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_non_finite(v) for v in obj]
    return obj

"""The measurement record: one typed value per measurement, written as one JSON line.

Reports, figures, ``load_run`` and tests read fields by name (``record.trace.value``,
``record.top_eigenvalues.converged``); a field's name is written once, here. Every number carries
its error bar: an :class:`Estimate` its standard error, an :class:`Eigenvalues` its residual
norms and converged flags. Fields of measurements a plan did not ask for are ``None``; a user's
registered measurement lands in ``extra`` under its name.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

import numpy as np

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
class GaussNewton:
    """The Gauss-Newton part G of the Hessian and the residual R = H - G."""

    top: Eigenvalues
    trace: Estimate
    residual_trace: Estimate


@dataclasses.dataclass(frozen=True)
class Frobenius:
    """Squared Frobenius norms of H, G and R = H - G from shared Rademacher probes."""

    hessian: Estimate
    gauss_newton: Estimate
    residual: Estimate

    @property
    def relative_residual(self) -> float:
        """``||R||_F / ||H||_F``; NaN when an estimate is not positive (too few probes)."""
        h, r = self.hessian.value, self.residual.value
        return math.sqrt(r / h) if h > 0 and r >= 0 else math.nan


@dataclasses.dataclass(frozen=True)
class Density:
    """A summary of an SLQ spectral density; nodes and weights are in the step's spectra file."""

    negative_mass: Estimate
    num_probes: int
    num_steps: int

    def coarse(self) -> bool:
        """Fewer than 20 Lanczos nodes per probe: the negative mass is a smoothing artefact."""
        return self.num_steps < 20


@dataclasses.dataclass(frozen=True)
class Diagonal:
    """A Hessian diagonal estimate (Bekas et al.), summarised; the vector is in the spectra file."""

    mean: Estimate  # tr H / n
    negative_fraction: float  # of entries significantly below zero (more than 2 SE)
    exact: bool  # computed from n matvecs rather than estimated


@dataclasses.dataclass(frozen=True)
class Correlation:
    pearson: float
    spearman: float
    num_parameters: int
    num_zeros: int  # exact zeros of the curvature diagonal, excluded from both correlations


@dataclasses.dataclass(frozen=True)
class OptimizerState:
    """Adam / RMSProp's bias-corrected second moment against the Hessian diagonal estimate."""

    second_moment: Correlation  # nu against diag(H)
    sqrt_second_moment: Correlation  # sqrt(nu), what the update divides by, against |diag(H)|
    per_layer: dict[str, Correlation]


@dataclasses.dataclass(frozen=True)
class DiagonalMatch:
    """A second moment against an exact curvature diagonal (``curvature.compare_diagonals``):
    entries where the exact diagonal is exactly 0 are excluded from every correlation and
    counted (``num_zeros``; ``num_both_zero`` of them have a zero moment too)."""

    pearson: float
    spearman: float
    log_pearson: float  # of the logs, over the num_log entries where both are > 0
    num_compared: int
    num_zeros: int
    num_both_zero: int
    num_log: int


@dataclasses.dataclass(frozen=True)
class DiagonalMatches:
    overall: DiagonalMatch
    per_layer: dict[str, DiagonalMatch]  # by curvature.layer_groups


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """Both ends of a spectrum (one Lanczos run) and ``condition = λmax / mean``, the mean
    eigenvalue over the nonzero diagonal entries (exact, from the diagonal)."""

    top: Eigenvalues  # descending
    bottom: Eigenvalues  # ascending
    mean: float
    condition: float


@dataclasses.dataclass(frozen=True)
class Preconditioner:
    """Adam / RMSProp's second moment ν (bias-corrected where the optimizer corrects it) against
    the exact diagonals of ``hessian``, ``gauss_newton`` and ``fisher`` (empirical), and the
    spectrum of ``P^-1/2 H P^-1/2`` with ``P`` what the update divides by."""

    second_moment: dict[str, DiagonalMatches]  # ν against each diagonal
    sqrt_second_moment: dict[str, DiagonalMatches]  # √ν (only Pearson differs from ν's)
    hessian: Conditioning
    preconditioned: Conditioning
    # The same with exact diagonals for P: "sqrt_fisher" √diag F + ε (what √ν estimates, without
    # minibatch noise or lag), "gauss_newton" diag G + δ (the Gauss-Newton diagonal, Jacobi).
    references: dict[str, Conditioning] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class GradientNoise:
    """Per-example gradient noise: ``tr Σ`` (covariance of per-example gradients) against the
    squared mean gradient; ``simple_noise_scale = tr Σ / |g|^2`` is McCandlish et al.'s B_simple."""

    trace_covariance: float
    gradient_norm_sq: float
    simple_noise_scale: float
    num_examples: int


@dataclasses.dataclass(frozen=True)
class Fisher:
    """The empirical Fisher (mean of per-example gradient outer products): top eigenvalues and
    Hutch++ trace."""

    top: Eigenvalues
    trace: Estimate


@dataclasses.dataclass(frozen=True)
class Blocks:
    """The curvature by layer: per operator (``hessian``, ``gauss_newton``, ``residual``) the
    per-layer traces and the table of squared block Frobenius norms ``[i][j]`` (layer i's rows,
    layer j's columns), each with standard errors."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    trace: dict[str, tuple[float, ...]]
    trace_se: dict[str, tuple[float, ...]]
    frobenius_sq: dict[str, tuple[tuple[float, ...], ...]]
    frobenius_sq_se: dict[str, tuple[tuple[float, ...], ...]]

    def same_layer_share(self, operator: str = "residual") -> Estimate:
        """The share of ``||A||_F^2`` in same-layer blocks (the diagonal of the table), with a
        delta-method standard error (blocks estimated independently)."""
        table = np.asarray(self.frobenius_sq[operator])
        se = np.asarray(self.frobenius_sq_se[operator])
        same, total = float(np.trace(table)), float(table.sum())
        if total <= 0:
            return Estimate(math.nan, math.nan)
        share = same / total
        # d share / d block: (1 - share) / total on the diagonal, -share / total elsewhere.
        grad = np.where(np.eye(len(table), dtype=bool), 1.0 - share, -share) / total
        error = float(np.sqrt(np.sum((grad * se) ** 2)))
        # R's products are differences of H's and G's, each exact to round-off only: a share
        # below ROUND_OFF_SHARE cannot be told from zero (ReLU's same-layer R, measured at
        # ~1e-9 in float32), so the error bar is never smaller.
        return Estimate(share, max(error, ROUND_OFF_SHARE))


ROUND_OFF_SHARE = 1e-6


@dataclasses.dataclass(frozen=True)
class Training:
    """What training up to this step cost: ``gradient_equivalents`` (in gradients of the
    training batch, see :func:`experiments.train.gradient_equivalents`) and ``seconds`` of the
    compiled training loop, compilation excluded (it is in the member's training log)."""

    gradient_equivalents: float
    seconds: float


@dataclasses.dataclass(frozen=True)
class Record:
    """One measurement of one sweep member at one training step."""

    step: int
    member: str
    fingerprint: str  # of the member's config and data: a resumed run checks it
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    grad_norm: float
    learning_rate: float
    edge_of_stability: float | None  # 2/η (gradient descent), (2 + 2β)/η (heavy ball), else None
    lambda_max: Eigenvalues | None = None
    top_eigenvalues: Eigenvalues | None = None
    bottom_eigenvalues: Eigenvalues | None = None
    trace: Estimate | None = None
    gauss_newton: GaussNewton | None = None
    frobenius: Frobenius | None = None
    density: Density | None = None
    diagonal: Diagonal | None = None
    optimizer_state: OptimizerState | None = None
    gradient_noise: GradientNoise | None = None
    fisher: Fisher | None = None
    blocks: Blocks | None = None
    preconditioner: Preconditioner | None = None
    training: Training | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    format: int = FORMAT

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
    def from_json(cls, obj: dict) -> Record:
        return _decode(cls, obj)


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
    if origin in (typing.Union, _union_type()):
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
    return obj


def _union_type():
    import types

    return types.UnionType

"""The ``preconditioner`` measurement: how well Adam's or RMSProp's second moment tracks the
curvature, and what dividing by it does to the Hessian's spectrum (issue 10, item 4).

At a measured step of an adaptive run it compares the second moment ν (bias-corrected for Adam,
as ``experiments.train``'s ``second_moment`` gives it) and its root √ν with the exact diagonals
of the Hessian H (``n`` matvecs with the unit vectors: small networks), of its Gauss-Newton part
G and of the empirical Fisher F (both from per-example Jacobians): Pearson, Spearman and log-log
correlation over the parameters, overall and per layer, the exact zeros of each diagonal (weights
on constant inputs) excluded and counted (:func:`curvature.compare_diagonals`). Then both ends of
the spectrum of H and of ``P^-1/2 H P^-1/2`` with ``P`` what the update divides by, and their
condition numbers ``λmax / mean eigenvalue`` (:func:`curvature.compare_conditioning`); for
reference, the same with ``P`` from the exact diagonals (√diag F + ε and diag G + δ).

The exact diagonal of H costs ``n`` Hessian-vector products: about 3.5 s for the 3,466
parameters and 1,348 digits of ``configs/preconditioner.py`` on one CPU core.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

import curvature as cv
from experiments.figures import preconditioner as figure
from experiments.measurements.base import Context, Measurement, steps_check
from experiments.measurements.diagonal import hessian_diagonal
from experiments.optimizers import OPTIMIZERS
from experiments.record import Eigenvalues
from experiments.table import Column


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


# What each optimizer's update divides by, from its second moment ν: optax's defaults (ε = 1e-8).
DIVISORS = {
    "adam": lambda nu: np.sqrt(nu) + 1e-8,  # optax.adam: ε outside the root, ν bias-corrected
    "rmsprop": lambda nu: np.sqrt(nu + 1e-8),  # optax.rmsprop: ε inside the root
}
CURVATURES = ("hessian", "gauss_newton", "fisher")


def _check(settings, info):
    optimizer = info.get("optimizer")
    if optimizer is not None and optimizer not in DIVISORS:
        return f"needs an optimizer with a second moment ({', '.join(DIVISORS)}), not {optimizer!r}"
    message = steps_check()(settings, info)
    if message is None and settings.num_steps < 2 * settings.k:
        # Both ends from one Lanczos run: k eigenvalues from each.
        return f"num_steps={settings.num_steps} is smaller than 2 k = {2 * settings.k}"
    return message


def _matches(comparison: cv.DiagonalComparison) -> DiagonalMatches:
    return DiagonalMatches(
        DiagonalMatch(*comparison.overall),
        {name: DiagonalMatch(*c) for name, c in comparison.groups.items()},
    )


def _ends(c: cv.Conditioning, num_matvecs: int) -> Conditioning:
    k = len(c.eigenvalues) // 2
    values, residuals = np.asarray(c.eigenvalues), np.asarray(c.residual_norms)
    converged = np.asarray(c.converged)

    def part(index):
        return Eigenvalues(
            tuple(float(v) for v in values[index]),
            tuple(float(r) for r in residuals[index]),
            tuple(bool(x) for x in converged[index]),
            num_matvecs,
        )

    return Conditioning(part(slice(0, k)), part(slice(None, k - 1, -1)), c.mean, c.condition)


def curvature_diagonals(ctx: Context) -> dict[str, np.ndarray]:
    """The exact diagonals of H (shared with an exact ``diagonal`` measurement), G and the
    empirical Fisher F (shared with ``fisher``'s operator), flat, once per measurement."""

    def run():
        diag_h, _, _ = hessian_diagonal(ctx, ctx.section("diagonal").num_matvecs, True)
        F = ctx.empirical_fisher()
        out = {"hessian": np.asarray(diag_h)}
        for name, op in (("gauss_newton", ctx.gauss_newton()), ("fisher", F)):
            out[name] = np.asarray(cv.diagonal(op, method="exact").diagonal)
        for name, d in out.items():
            if not np.all(np.isfinite(d)):
                raise FloatingPointError(f"preconditioner: the {name} diagonal is not finite")
        return out

    return ctx.cached("curvature_diagonals", run)


def preconditioner(ctx: Context) -> Preconditioner | None:
    """Adam / RMSProp's second moment ν and √ν against the exact diagonals of H, G and the
    empirical Fisher (Pearson, Spearman, log-log; per layer and overall; exact zeros excluded and
    counted), and the k largest and smallest eigenvalues and the condition number λmax / mean
    eigenvalue of H and of P^-1/2 H P^-1/2, P = what the update divides by (Adam: √ν̂ + ε), and
    for reference with P from the exact diagonals (√diag F + ε; diag G + δ).
    Cost: n + 4 (num_steps + 2 k) matvecs of H, and G's and F's per-example Jacobians."""
    s = ctx.settings
    if ctx.step == 0:
        return None  # no gradient seen yet: Adam's bias-corrected moment is 0/0
    optimizer = ctx.config.train.optimizer
    H = ctx.hessian()
    nu = np.asarray(H.ravel(OPTIMIZERS.get(optimizer).second_moment(ctx.opt_state)))
    nu = nu.astype(np.float64)
    if not np.all(np.isfinite(nu)):
        raise FloatingPointError("preconditioner: the second moment is not finite")
    diagonals = curvature_diagonals(ctx)
    groups = cv.layer_groups(ctx.params)
    second, root = {}, {}
    for name in CURVATURES:
        exact = H.unravel(diagonals[name])
        second[name] = _matches(cv.compare_diagonals(H.unravel(nu), exact, groups=groups))
        root[name] = _matches(cv.compare_diagonals(H.unravel(np.sqrt(nu)), exact, groups=groups))
    divisor = DIVISORS[optimizer](nu)
    out = cv.compare_conditioning(
        H,
        divisor,
        k=s.k,
        num_steps=s.num_steps,
        key=ctx.key_for("preconditioner"),
        diagonal=diagonals["hessian"],
    )
    ctx.spectra.update(
        preconditioner_nu=nu,
        preconditioner_divisor=divisor,
        **{f"diagonal_{name}": d for name, d in diagonals.items()},
    )
    for c in (out.original, out.preconditioned):
        if not np.all(np.isfinite(np.asarray(c.eigenvalues))):
            raise FloatingPointError("preconditioner: a Lanczos run met a non-finite matvec")
    matvecs = out.original.num_matvecs
    references = {}
    for name, p in _references(diagonals).items():
        c = cv.conditioning(
            cv.preconditioned(H, p),
            k=s.k,
            num_steps=s.num_steps,
            key=ctx.key_for("preconditioner"),
            diagonal=diagonals["hessian"] / p,
        )
        references[name] = _ends(c, c.num_matvecs)
    return Preconditioner(
        second, root, _ends(out.original, matvecs), _ends(out.preconditioned, matvecs), references
    )


def _references(diagonals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Preconditioners from the exact diagonals: ``sqrt_fisher`` = √diag F + ε (Adam's form with
    the exact empirical Fisher: what √ν estimates without minibatch noise or lag) and
    ``gauss_newton`` = diag G + δ, δ = 1e-6 max diag G (the Gauss-Newton diagonal: Jacobi)."""
    g = diagonals["gauss_newton"]
    return {
        "sqrt_fisher": np.sqrt(diagonals["fisher"]) + 1e-8,
        "gauss_newton": g + 1e-6 * max(float(g.max()), 1e-30),
    }


def _moment(which: str, curvature: str, stat: str) -> Callable:
    """A correlation of the measurement, over all parameters."""
    return lambda r: (
        getattr(getattr(r.preconditioner, which)[curvature].overall, stat)
        if r.preconditioner
        else None
    )


def _condition(which: str) -> Callable:
    def get(r):
        p = r.preconditioner
        if p is None:
            return None
        c = {"H": p.hessian, "P": p.preconditioned}.get(which) or p.references.get(which)
        return c.condition if c else None

    return get


_COLUMNS = []
for _short, _name in (("H", "hessian"), ("G", "gauss_newton"), ("F", "fisher")):
    _COLUMNS += [
        (f"r(ν,{_short})", _moment("second_moment", _name, "pearson")),
        (f"r(√ν,{_short})", _moment("sqrt_second_moment", _name, "pearson")),
        (f"ρ(ν,{_short})", _moment("second_moment", _name, "spearman")),
    ]
_COLUMNS += [
    ("κ(H)", _condition("H")),
    ("κ(P⁻½HP⁻½)", _condition("P")),
    ("κ, P=√F", _condition("sqrt_fisher")),
    ("κ, P=G", _condition("gauss_newton")),
]
_LEGEND = (
    "r(ν,H), ρ(ν,H): Pearson and Spearman correlation over the parameters of the second moment "
    "ν (√ν: its root, what the update divides by) with the exact diagonal of H (G; F: the "
    "empirical Fisher), entries where that diagonal is exactly 0 excluded; κ: λmax / mean "
    "eigenvalue of H and of P⁻½HP⁻½, P what the update divides by, or √diag F + ε, or diag G + δ"
)

PRECONDITIONER = Measurement(
    "preconditioner",
    preconditioner,
    defaults={"k": 3, "num_steps": 40},
    check=_check,
    record_type=Preconditioner,
    columns=tuple(
        Column(
            title,
            get,
            rank=190 + i,
            legend=_LEGEND if i == 0 else "",
            explains=tuple(t for t, _ in _COLUMNS[1:]) if i == 0 else (),
        )
        for i, (title, get) in enumerate(_COLUMNS)
    ),
    figures=(figure.PRECONDITIONER,),
    spectra=True,
    renamed={"lanczos_steps": "num_steps"},
)

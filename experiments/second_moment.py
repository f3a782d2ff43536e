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

import numpy as np

import curvature as cv
from experiments import train
from experiments.diagnostics import _hessian_diagonal
from experiments.measure import Context, register_measurement
from experiments.measurements import _steps_check
from experiments.record import (
    Conditioning,
    DiagonalMatch,
    DiagonalMatches,
    Eigenvalues,
    Preconditioner,
)

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
    message = _steps_check()(settings, info)
    if message is None and settings.lanczos_steps < 2 * settings.k:
        # Both ends from one Lanczos run: k eigenvalues from each.
        return f"lanczos_steps={settings.lanczos_steps} is smaller than 2 k = {2 * settings.k}"
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
        diag_h, _, _ = _hessian_diagonal(ctx, ctx.section("diagonal").matvecs, True)
        F = ctx.cached(
            "F",
            lambda: cv.empirical_fisher(
                ctx.loss, ctx.params, ctx.data, batch_size=ctx.batch_size, check=False
            ),
        )
        out = {"hessian": np.asarray(diag_h)}
        for name, op in (("gauss_newton", ctx.gauss_newton()), ("fisher", F)):
            out[name] = np.asarray(cv.diagonal(op, method="exact").diagonal)
        for name, d in out.items():
            if not np.all(np.isfinite(d)):
                raise FloatingPointError(f"preconditioner: the {name} diagonal is not finite")
        return out

    return ctx.cached("curvature_diagonals", run)


@register_measurement("preconditioner", defaults={"k": 3, "lanczos_steps": 40}, check=_check)
def _preconditioner(ctx: Context) -> Preconditioner | None:
    """Adam / RMSProp's second moment ν and √ν against the exact diagonals of H, G and the
    empirical Fisher (Pearson, Spearman, log-log; per layer and overall; exact zeros excluded and
    counted), and the k largest and smallest eigenvalues and the condition number λmax / mean
    eigenvalue of H and of P^-1/2 H P^-1/2, P = what the update divides by (Adam: √ν̂ + ε), and
    for reference with P from the exact diagonals (√diag F + ε; diag G + δ).
    Cost: n + 4 (lanczos_steps + 2 k) matvecs of H, and G's and F's per-example Jacobians."""
    s = ctx.settings
    if ctx.step == 0:
        return None  # no gradient seen yet: Adam's bias-corrected moment is 0/0
    optimizer = ctx.config.train.optimizer
    H = ctx.hessian()
    nu = np.asarray(H.ravel(train.OPTIMIZERS.get(optimizer).second_moment(ctx.opt_state)))
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
        num_steps=s.lanczos_steps,
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
            num_steps=s.lanczos_steps,
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

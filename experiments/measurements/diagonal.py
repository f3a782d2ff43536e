"""``diagonal``: the Hessian diagonal, by Bekas et al.'s estimator with per-entry standard errors
or exactly (n matvecs with the unit vectors), saved as a vector; and the diagonal that
``optimizer_state`` and ``preconditioner`` compare the second moment with."""

from __future__ import annotations

import dataclasses

import numpy as np

import curvature as cv
from experiments.measurements.base import Context, Measurement, at_least
from experiments.record import Estimate


@dataclasses.dataclass(frozen=True)
class Diagonal:
    """A Hessian diagonal estimate (Bekas et al.), summarised; the vector is in the spectra file."""

    mean: Estimate  # tr H / n
    negative_fraction: float  # of entries significantly below zero (more than 2 SE)
    exact: bool  # computed from n matvecs rather than estimated


def hessian_diagonal(ctx: Context, num_matvecs: int, exact: bool):
    """``(diagonal, per-entry SE, Estimate of its mean)``, once per measurement and settings."""

    def run():
        H = ctx.hessian()
        if exact:  # n matvecs with the unit vectors, never the n x n matrix
            diag = np.asarray(cv.diagonal(H, method="exact").diagonal)
            return diag, np.zeros(H.size), Estimate(float(diag.mean()), 0.0, H.size)
        # The diagonal and the trace on the same probes: the diagonal's mean is tr / n, its error
        # bar the trace's over n (the entries share probes, so they are correlated).
        out = cv.hutchinson(
            H, ("diagonal", "trace"), num_matvecs=num_matvecs, key=ctx.key_for("diagonal")
        )
        d, tr = out["diagonal"], out["trace"]
        mean = Estimate(float(tr.value) / H.size, float(tr.standard_error) / H.size, num_matvecs)
        return np.asarray(d.diagonal), np.asarray(d.standard_error), mean

    return ctx.cached(("diagonal", num_matvecs, exact), run)


def diagonal(ctx: Context) -> Diagonal:
    """The Hessian diagonal: Bekas et al.'s estimator with per-entry standard errors, or with
    ``exact=True`` the exact diagonal (``curvature.diagonal(H, method="exact")``: n matvecs;
    small networks)."""
    s = ctx.settings
    diag, se, mean = hessian_diagonal(ctx, s.num_matvecs, s.exact)
    ctx.spectra.update(diagonal=diag, diagonal_standard_error=se)
    negative = float(np.mean(diag < -2 * se)) if not s.exact else float(np.mean(diag < 0))
    return Diagonal(mean, negative, bool(s.exact))


DIAGONAL = Measurement(
    "diagonal",
    diagonal,
    defaults={"num_matvecs": 100, "exact": False},
    check=at_least(2, "num_matvecs"),
    record_type=Diagonal,
    spectra=True,
    renamed={"matvecs": "num_matvecs"},
)

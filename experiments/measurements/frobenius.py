"""``frobenius``: the squared Frobenius norms of H, of its Gauss-Newton part G and of the residual
R = H - G from shared Rademacher probes, so that their ratios are tight."""

from __future__ import annotations

import dataclasses
import math

import curvature as cv
from experiments.measurements.base import Context, Measurement, at_least, estimate, finite
from experiments.record import Estimate
from experiments.table import Column


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


def frobenius(ctx: Context) -> Frobenius:
    """‖H‖F², ‖G‖F², ‖R‖F² from shared Rademacher probes, so their ratios are tight (two
    matvecs a probe: R z = H z - G z)."""
    m = ctx.settings.num_matvecs
    H, G = ctx.hessian(), ctx.gauss_newton()
    parts = cv.frobenius_norm_squared((H, G, H - G), num_matvecs=m, key=ctx.key_for("fro"))
    return Frobenius(*(finite(estimate(f), "frobenius") for f in parts))


def relative_residual(r) -> Estimate | None:
    """‖R‖F/‖H‖F with a delta-method error bar (shared probes make it conservative)."""
    if r.frobenius is None:
        return None
    h, res = r.frobenius.hessian, r.frobenius.residual
    ratio = r.frobenius.relative_residual
    if not (h.value > 0 and res.value > 0):
        return Estimate(ratio, math.nan)
    rel = 0.5 * math.hypot(res.standard_error / res.value, h.standard_error / h.value)
    return Estimate(ratio, ratio * rel)


FROBENIUS = Measurement(
    "frobenius",
    frobenius,
    defaults={"num_matvecs": 16},
    check=at_least(2, "num_matvecs"),
    record_type=Frobenius,
    columns=(
        Column(
            "‖R‖F/‖H‖F",
            relative_residual,
            rank=110,
            legend="‖·‖F² from shared Rademacher probes",
        ),
    ),
    cost=1,
    renamed={"probes": "num_matvecs"},
)

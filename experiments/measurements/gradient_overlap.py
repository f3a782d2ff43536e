"""``gradient_overlap``: the share of the gradient in the top-k Hessian eigenspace,
‖P_k g‖² / ‖g‖² (Gur-Ari, Roberts & Dyer 2018, "Gradient descent happens in a tiny subspace",
who find it near 1 for k the number of classes soon after training starts)."""

from __future__ import annotations

import dataclasses

import jax

import curvature as cv
from experiments.figures import geometry
from experiments.measurements.base import Context, Measurement, eigenvalues, steps_check
from experiments.record import Eigenvalues
from experiments.table import Column


@dataclasses.dataclass(frozen=True)
class GradientOverlap:
    """``overlap`` = ‖P_k g‖² / ‖g‖² for the top-``k`` eigenvectors of H (NaN for a zero
    gradient); ``shares[i]`` = (v_i·g)² / ‖g‖² per eigenvector, largest eigenvalue first (their
    running sum is the overlap of every k' <= k); ``eigenvalues`` the Ritz pairs' values with
    residuals and converged flags: an overlap is as good as the eigenvectors behind it."""

    overlap: float
    shares: tuple[float, ...]
    eigenvalues: Eigenvalues

    def converged(self) -> bool:
        return self.eigenvalues.all_converged()

    def cell(self) -> Eigenvalues:
        """The overlap as a table cell: marked † unless every Ritz pair converged, with the
        worst relative residual of the pairs."""
        worst = max(self.eigenvalues.relative_residuals, default=0.0)
        return Eigenvalues((self.overlap,), (worst * abs(self.overlap),), (self.converged(),))


@jax.jit
def _gradient(loss: cv.Closure, params, batch):
    """The gradient of the mean loss: one program per architecture (closures compare by
    structure), not an eager evaluation at every step."""
    return jax.grad(loss.bind())(params, batch)


def gradient_overlap(ctx: Context) -> GradientOverlap:
    """‖P_k g‖² / ‖g‖²: the share of the full-batch gradient g (on the measurement set) in the
    span of the top-``k`` Hessian eigenvectors (``curvature.gradient_overlap``; Lanczos of
    ``num_steps`` steps). Cost: one gradient and the Lanczos run's matvecs."""
    s = ctx.settings
    grad = _gradient(cv.closure(ctx.loss), ctx.params, ctx.data)
    out = cv.gradient_overlap(
        ctx.hessian(), grad, k=s.k, key=ctx.key_for("gradient_overlap"), num_steps=s.num_steps
    )
    return GradientOverlap(
        overlap=float(out.overlap),
        shares=tuple(float(v) for v in out.shares),
        eigenvalues=eigenvalues(out),  # its Ritz pairs' record, as for an eigsh result
    )


GRADIENT_OVERLAP = Measurement(
    "gradient_overlap",
    gradient_overlap,
    defaults={"k": 10, "num_steps": 60},
    check=steps_check(),
    record_type=GradientOverlap,
    columns=(
        Column(
            "grad in top-k",
            lambda r: r.gradient_overlap.cell() if r.gradient_overlap else None,
            rank=140,
            legend="grad in top-k: ‖P_k g‖²/‖g‖², the share of the gradient in the top-k Hessian "
            "eigenspace (Gur-Ari et al. 2018; k = measure.gradient_overlap.k)",
        ),
    ),
    figures=(geometry.GRADIENT_OVERLAP,),
    cost=1,
)

"""Damped inverses of curvature operators: ``(A + lambda I)^-1`` as an operator.

Second-order optimisers, Laplace approximations and influence functions apply damped inverses
of a curvature, never the curvature itself. :func:`inverse` returns one as an operator that
every estimator accepts (the top eigenvalues of ``(G + lambda I)^-1`` are ``1 / (lambda_min +
lambda)``, say): exactly where the operator's structure allows it
(:meth:`~curvature.LinearOperator.damped_inverse`: K-FAC and EK-FAC through their factors'
eigenbases, a diagonal, low rank plus diagonal by the Woodbury identity, a dense matrix),
otherwise by conjugate gradient, a fixed number of steps at most, one compiled solve a
product. :meth:`CGInverse.solve` gives a solve's residual and stop reason.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from curvature import _cg
from curvature._checks import is_traced, positive_int
from curvature.linear_operator import Layout, LinearOperator, operator_type, static

__all__ = ["CGInverse", "inverse"]


@operator_type
class CGInverse(LinearOperator):
    """``(inner + damping I)^-1`` applied by conjugate gradient: :func:`inverse`. A product is one
    CG solve of at most ``max_steps`` products with ``inner``, stopped at
    ``||r|| <= tol ||b||``."""

    inner: LinearOperator
    damping: jax.Array
    tol: jax.Array
    max_steps: int = static()

    @property
    def layout(self) -> Layout:
        return self.inner.layout

    @property
    def name(self) -> str:
        return f"inverse of {self.inner.name} (CG)"

    def solve(self, b: jax.Array) -> _cg.CGResult:
        """The CG solve of ``(A + damping I) x = b``: ``x`` with ``residual_norm``,
        ``converged``, ``num_steps`` and ``stop_reason`` (a :class:`curvature.optim.CGResult`).
        Cost: at most ``max_steps`` products with the inner operator."""
        return _cg.conjugate_gradient(
            self.inner, b, damping=self.damping, max_steps=self.max_steps, tol=self.tol
        )

    def apply(self, v):
        solved = _cg.solve(
            self.inner.apply,
            v.astype(self.dtype),
            None,
            damping=self.damping,
            max_steps=self.max_steps,
            tol=self.tol,
        )
        return solved.x

    def prepared(self):
        # Every CG step multiplies by the inner operator: prepare it once.
        return CGInverse(self.inner.prepared(), self.damping, self.tol, self.max_steps)


def inverse(
    op: LinearOperator,
    /,
    *,
    damping: float,
    max_steps: int | None = None,
    tol: float | None = None,
) -> LinearOperator:
    """``(A + damping I)^-1`` as an operator.

    Args:
      op: a symmetric operator, positive semi-definite (a Gauss-Newton or Fisher matrix) or
        made positive definite by ``damping``; conjugate gradient assumes it.
      damping: ``lambda``, added to every eigenvalue before inverting.
      max_steps: the most CG steps of one product (default ``min(n, 100)``); unused by an exact
        inverse.
      tol: CG stops at ``||r|| <= tol ||b||`` (default ``sqrt(eps)`` of the dtype).

    Returns ``op.damped_inverse(damping)`` when the operator's structure gives the inverse
    exactly (:func:`curvature.kfac` and :func:`curvature.ekfac`: through the factors'
    eigendecompositions; :func:`curvature.from_diagonal`;
    :func:`curvature.low_rank_plus_diagonal`: Woodbury; a dense matrix: its eigendecomposition;
    each once), otherwise a
    :class:`CGInverse`, whose products are CG solves and whose :meth:`CGInverse.solve` reports
    a solve's residual norm, convergence and stop reason. A streamed operator is refused (a
    product would be a host loop of passes inside another product): use
    :func:`curvature.optim.conjugate_gradient` on it.

    Cost: an exact inverse, its construction (``O(n^3)`` for a dense matrix, ``O(rows^3 +
    fan_out^3)`` per layer for K-FAC) and then about one product's worth a product; by CG, at most ``max_steps`` products with ``op`` a product.
    """
    if not isinstance(op, LinearOperator):
        raise TypeError(f"inverse needs a LinearOperator, got {type(op).__name__}")
    if not is_traced(damping) and not float(damping) >= 0:
        raise ValueError(f"inverse: damping must be a number >= 0, got {damping!r}")
    exact = op.damped_inverse(damping)
    if exact is not None:
        return exact
    if op.streamed:
        raise ValueError(
            "inverse: a streamed operator's product is a pass over the data, and a CG inverse "
            "would run a loop of passes inside every product; solve with "
            "curvature.optim.conjugate_gradient(op, b, damping=..., max_steps=...) instead"
        )
    max_steps = min(op.size, 100) if max_steps is None else positive_int(max_steps, "max_steps")
    if tol is None:
        tol = float(jnp.sqrt(jnp.finfo(op.dtype).eps))
    return CGInverse(op, jnp.asarray(damping, op.dtype), jnp.asarray(tol, op.dtype), max_steps)

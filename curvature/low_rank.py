"""Low rank plus diagonal: the top of a curvature's spectrum kept exactly, the rest as a diagonal.

:func:`low_rank_plus_diagonal` approximates a symmetric operator ``A`` by ``U Λ U^T + D``: its
``k`` largest eigenpairs (Lanczos) and a diagonal ``D = max(diag(A) - diag(U Λ U^T), 0)`` that
restores the diagonal the low-rank part leaves out (the approximation Laplace approximations
call "LowRank+Diag"; its diagonal matches ``A``'s wherever the correction is not clipped). Its
damped inverse is exact (the Woodbury identity) and of the same kind, :class:`LowRankPlusDiagonal`:
``diag(d) + B C B^T`` with ``B`` ``(n, k)`` and a symmetric ``(k, k)`` core ``C``.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from curvature._checks import positive_int
from curvature.krylov import eigsh
from curvature.linear_operator import Layout, LinearOperator, operator_type, static

__all__ = ["LowRankPlusDiagonal", "low_rank_plus_diagonal"]


@operator_type
class LowRankPlusDiagonal(LinearOperator):
    """``diag(diagonal) + basis @ core @ basis.T``: :func:`low_rank_plus_diagonal`, and its
    damped inverse. A product costs ``O(n k)``; its damped inverse is exact (Woodbury)."""

    diagonal: jax.Array
    basis: jax.Array
    core: jax.Array
    layout: Layout = static()
    label: str = static(default="low rank plus diagonal")

    has_fast_diagonal: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return self.label

    def apply(self, v):
        v = v.astype(self.dtype)
        return self.diagonal * v + self.basis @ (self.core @ (self.basis.T @ v))

    def exact_diagonal(self):
        return self.diagonal + jnp.einsum("ik,kl,il->i", self.basis, self.core, self.basis)

    def damped_power(self, damping, power):
        if power != -1:
            return None  # only the inverse has a closed form of this kind
        # (D + B C B^T)^-1 = D^-1 - D^-1 B (C^-1 + B^T D^-1 B)^-1 B^T D^-1, written without
        # C^-1: (C^-1 + S)^-1 = (I + C S)^-1 C, symmetric.
        inv_d = 1.0 / (self.diagonal + damping)
        scaled = self.basis * inv_d[:, None]
        s = self.basis.T @ scaled
        k = self.core.shape[0]
        core = jnp.linalg.solve(jnp.eye(k, dtype=self.dtype) + self.core @ s, self.core)
        core = 0.5 * (core + core.T)
        return LowRankPlusDiagonal(inv_d, scaled, -core, self.layout, f"inverse of {self.label}")


def low_rank_plus_diagonal(
    op: LinearOperator,
    /,
    *,
    k: int,
    key: jax.Array,
    num_steps: int | None = None,
    diagonal: jax.Array | None = None,
) -> LowRankPlusDiagonal:
    """``U Λ U^T + D``: the ``k`` largest eigenpairs of ``op`` and the diagonal they leave out,
    ``D = max(diag(op) - diag(U Λ U^T), 0)``.

    Args:
      op: a symmetric operator (a Gauss-Newton matrix or Fisher: positive semi-definite, so the
        clipped correction is the diagonal the low-rank part misses).
      k: eigenpairs kept (largest algebraic).
      key: PRNG key of the Lanczos start.
      num_steps: Lanczos steps (:func:`curvature.eigsh`'s default otherwise).
      diagonal: ``op``'s exact diagonal, flat, if you have it; otherwise
        ``op.host_exact_diagonal()`` for an operator with a fast one (Gauss-Newton, Fisher,
        K-FAC), and an error for one without (pass ``curvature.diagonal(op, method="exact")``,
        ``n`` products).

    Returns a :class:`LowRankPlusDiagonal`. Cost: one eigsh run, plus the diagonal's.
    """
    k = positive_int(k, "k")
    if diagonal is None:
        if not op.has_fast_diagonal:
            raise ValueError(
                f"low_rank_plus_diagonal: {op.name} has no fast exact diagonal; pass "
                "diagonal=curvature.diagonal(op, method='exact').diagonal (n products)"
            )
        diagonal = op.host_exact_diagonal()
    diagonal = jnp.asarray(diagonal, op.dtype)
    if diagonal.shape != (op.size,):
        raise ValueError(
            f"low_rank_plus_diagonal: diagonal of shape {diagonal.shape}, expected ({op.size},)"
        )
    kwargs = {} if num_steps is None else {"num_steps": num_steps}
    top = eigsh(op, k=k, key=key, **kwargs)
    values = top.eigenvalues.astype(op.dtype)
    basis = top.eigenvectors.astype(op.dtype)
    kept = jnp.einsum("ik,k,ik->i", basis, values, basis)
    return LowRankPlusDiagonal(
        jnp.maximum(diagonal - kept, 0.0),
        basis,
        jnp.diag(values),
        op.layout,
        f"rank {k} plus diagonal of {op.name}",
    )

"""How close two curvature estimates are: subspaces of eigenvectors compared by their principal
angles.

The principal angles ``0 <= phi_1 <= ... <= phi_k <= pi/2`` between the column spaces of ``U``
and ``V`` have cosines the singular values of ``Q_U^T Q_V`` (``Q`` orthonormal bases; Björck &
Golub 1973). Their mean squared cosine, ``||Q_U^T Q_V||_F^2 / k``, is 1 for the same subspace, 0
for orthogonal ones, and ``k / n`` in expectation for a random ``k``-dimensional subspace of
``R^n``: the overlap of top eigenspaces used to compare a Hessian with its approximations
(Gur-Ari, Roberts & Dyer 2018).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["subspace_overlap"]


def subspace_overlap(u: jax.Array, v: jax.Array, /) -> jax.Array:
    """The mean squared cosine of the principal angles between the column spaces of ``u`` and
    ``v``: ``||Q_u^T Q_v||_F^2 / min(k_u, k_v)``, in ``[0, 1]``.

    Args:
      u: ``(n, k_u)`` columns spanning one subspace (e.g. ``eigsh(H, k=10, ...).eigenvectors``);
        they need not be orthonormal (they are orthonormalised by a QR decomposition) but must
        be linearly independent.
      v: ``(n, k_v)`` columns spanning the other, in the same flat parameter layout.

    Returns a scalar: 1 when one subspace contains the other, 0 when they are orthogonal, about
    ``max(k_u, k_v) / n`` for random subspaces. Cost: two QR decompositions of ``(n, k)``
    matrices and one ``(k_u, k_v)`` product; no matvecs.
    """
    u, v = jnp.asarray(u), jnp.asarray(v)
    if u.ndim != 2 or v.ndim != 2 or u.shape[0] != v.shape[0]:
        raise ValueError(
            f"subspace_overlap needs two (n, k) matrices with the same n, got shapes {u.shape} "
            f"and {v.shape}"
        )
    if min(u.shape[1], v.shape[1]) == 0 or max(u.shape[1], v.shape[1]) > u.shape[0]:
        raise ValueError(
            f"subspace_overlap needs 1 <= k <= n columns, got shapes {u.shape} and {v.shape}"
        )
    qu, _ = jnp.linalg.qr(u)
    qv, _ = jnp.linalg.qr(v)
    return jnp.sum((qu.T @ qv) ** 2) / min(u.shape[1], v.shape[1])

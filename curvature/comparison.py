"""How close an approximation is to a curvature operator: their top eigenspaces compared by
the principal angles between them (:func:`subspace_overlap`), and :func:`compare`, which adds the
relative Frobenius error with its standard error and both top spectra.

The principal angles ``0 <= phi_1 <= ... <= phi_k <= pi/2`` between the column spaces of ``U``
and ``V`` have cosines the singular values of ``Q_U^T Q_V`` (``Q`` orthonormal bases; Björck &
Golub 1973). Their mean squared cosine, ``||Q_U^T Q_V||_F^2 / k``, is 1 for the same subspace, 0
for orthogonal ones, and ``k / n`` in expectation for a random ``k``-dimensional subspace of
``R^n``: the overlap of top eigenspaces used to compare a Hessian with its approximations
(Gur-Ari, Roberts & Dyer 2018).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from curvature.krylov import EigshResult, eigsh
from curvature.linear_operator import LinearOperator
from curvature.stochastic_trace import frobenius_norm_squared

__all__ = ["Comparison", "compare", "subspace_overlap"]


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


class Comparison(NamedTuple):
    """How close ``approx`` is to ``exact`` (:func:`compare`).

    Attributes:
      overlap: the mean squared cosine of the principal angles between their top-``k``
        eigenspaces (:func:`subspace_overlap`): 1 the same subspace, 0 orthogonal.
      relative_error: ``||A - Â||_F / ||A||_F`` estimated on shared Rademacher probes.
      relative_error_se: its standard error (delta method; the two norms' errors taken as
        independent, which overstates it when they are positively correlated, as shared
        probes make them).
      exact_top: ``eigsh(exact, k=k)``: eigenvalues, residuals, ``converged``.
      approx_top: ``eigsh(approx, k=k)``.
    """

    overlap: float
    relative_error: float
    relative_error_se: float
    exact_top: EigshResult
    approx_top: EigshResult


def compare(
    exact: LinearOperator,
    approx: LinearOperator,
    /,
    *,
    k: int,
    key: jax.Array,
    num_matvecs: int = 32,
    num_steps: int | None = None,
) -> Comparison:
    """How good an approximation is: the overlap of the top-``k`` eigenspaces of ``exact`` and
    ``approx``, the relative Frobenius error ``||A - Â||_F / ||A||_F`` with its standard error,
    and both top-``k`` spectra with their convergence flags.

    Args:
      exact: the reference operator (e.g. ``hessian`` or ``gauss_newton``).
      approx: an operator of the same layout (a Monte Carlo Fisher, a block of it, a
        diagonal...).
      k: eigenpairs at the top (largest algebraic) of each.
      key: PRNG key: the two eigsh runs and the Frobenius probes use keys folded from it.
      num_matvecs: Rademacher probes of the Frobenius norms (shared by ``A - Â`` and ``A``).
      num_steps: Lanczos steps of each eigsh (its default otherwise).

    Returns a :class:`Comparison`. Cost: two eigsh runs (``num_steps + k + check_steps`` each)
    and ``num_matvecs`` products with each of ``exact`` and ``approx``. The top eigenspaces are
    only as good as their ``converged`` flags: check them before reading ``overlap``.
    """
    if exact.shape != approx.shape:
        raise ValueError(
            f"compare: the operators have different shapes, {exact.shape} and {approx.shape}"
        )
    kwargs = {} if num_steps is None else {"num_steps": num_steps}
    exact_top = eigsh(exact, k=k, key=jax.random.fold_in(key, 0), **kwargs)
    approx_top = eigsh(approx, k=k, key=jax.random.fold_in(key, 1), **kwargs)
    overlap = float(subspace_overlap(exact_top.eigenvectors, approx_top.eigenvectors))
    difference, reference = frobenius_norm_squared(
        (exact - approx, exact), num_matvecs=num_matvecs, key=jax.random.fold_in(key, 2)
    )
    d, d_se = float(difference.value), float(difference.standard_error)
    a, a_se = float(reference.value), float(reference.standard_error)
    if not a > 0:
        raise ValueError(f"compare: ||exact||_F^2 is estimated at {a:.6g}; nothing to compare to")
    ratio = max(d, 0.0) / a
    error = math.sqrt(ratio)
    # The delta method for sqrt(d / a): (1/2) sqrt(d / a) times the relative errors in
    # quadrature. At d <= 0 (identical operators: exactly 0 with no spread) it has no first
    # order; sqrt(d_se / a) bounds the error there.
    if d > 0:
        error_se = 0.5 * error * math.hypot(d_se / d, a_se / a)
    else:
        error_se = math.sqrt(d_se / a)
    return Comparison(overlap, error, error_se, exact_top, approx_top)

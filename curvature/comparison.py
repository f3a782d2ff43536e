"""How close an approximation is to a curvature operator: their top eigenspaces compared by
the principal angles between them (:func:`subspace_overlap`), and :func:`compare`, which adds the
relative Frobenius error with its standard error and both top spectra, and, with a damping, how
well the approximation preconditions the operator: the condition number of
``(Â + λI)^{-1/2} (A + λI) (Â + λI)^{-1/2}``, whose eigenvalues are those of
``(Â + λI)^{-1} (A + λI)`` (what conjugate gradient or a damped Newton step with ``Â`` as the
preconditioner sees), against that of ``A + λI`` alone.

The principal angles ``0 <= phi_1 <= ... <= phi_k <= pi/2`` between the column spaces of ``U``
and ``V`` have cosines the singular values of ``Q_U^T Q_V`` (``Q`` orthonormal bases; Björck &
Golub 1973). Their mean squared cosine, ``||Q_U^T Q_V||_F^2 / k``, is 1 for the same subspace, 0
for orthogonal ones, and ``k / n`` in expectation for a random ``k``-dimensional subspace of
``R^n``: the overlap of top eigenspaces used to compare a Hessian with its approximations
(Gur-Ari, Roberts & Dyer 2018).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from curvature.krylov import EigshResult, eigsh
from curvature.linear_operator import Layout, LinearOperator, from_diagonal, operator_type
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
      condition: with ``damping``: ``λmax / λmin`` of ``(Â + λI)^{-1/2} (A + λI) (Â +
        λI)^{-1/2}`` (NaN when ``λmin <= 0``, an indefinite ``A + λI``; NaN without
        ``damping``). 1 is a perfect preconditioner.
      reference_condition: ``λmax / λmin`` of ``A + λI`` itself, the same way: ``condition``
        below it means ``Â`` helps.
      preconditioned_ends: ``eigsh(..., k=2, which="BE")`` of the preconditioned operator
        (``None`` without ``damping``): its eigenvalues and convergence.
      reference_ends: the same for ``A + λI``.
    """

    overlap: float
    relative_error: float
    relative_error_se: float
    exact_top: EigshResult
    approx_top: EigshResult
    condition: float = math.nan
    reference_condition: float = math.nan
    preconditioned_ends: EigshResult | None = None
    reference_ends: EigshResult | None = None


@operator_type
class _Congruence(LinearOperator):
    """``S A S`` for symmetric operators ``S`` and ``A``: a product is one of ``A`` and two of
    ``S``."""

    outer: LinearOperator
    inner: LinearOperator

    @property
    def layout(self) -> Layout:
        return self.inner.layout

    @property
    def name(self) -> str:
        return f"{self.inner.name} preconditioned by {self.outer.name}"

    def apply(self, v):
        return self.outer.apply(self.inner.apply(self.outer.apply(v)))

    def prepared(self):
        return _Congruence(self.outer.prepared(), self.inner.prepared())


def _ratio(ends: EigshResult) -> float:
    top, bottom = float(ends.eigenvalues[0]), float(ends.eigenvalues[-1])
    return top / bottom if bottom > 0 else math.nan


def _root(approx: LinearOperator, damping, required: bool):
    root = approx.damped_power(damping, -0.5)
    if root is None and required:
        raise ValueError(
            f"compare(damping=...): {approx.name} has no exact inverse square root; the "
            "conditioning needs an approximation with structure (curvature.kfac, curvature.ekfac, "
            "curvature.from_diagonal, curvature.from_matrix)"
        )
    return root


def _relative_error(difference, reference) -> tuple[float, float]:
    d, d_se = float(difference.value), float(difference.standard_error)
    a, a_se = float(reference.value), float(reference.standard_error)
    error = math.sqrt(max(d, 0.0) / a)
    # The delta method for sqrt(d / a): (1/2) sqrt(d / a) times the relative errors in
    # quadrature. At d <= 0 (identical operators: exactly 0 with no spread) it has no first
    # order; sqrt(d_se / a) bounds the error there.
    if d > 0:
        return error, 0.5 * error * math.hypot(d_se / d, a_se / a)
    return error, math.sqrt(d_se / a)


def compare(
    exact: LinearOperator,
    approx: LinearOperator | Sequence[LinearOperator],
    /,
    *,
    k: int,
    key: jax.Array,
    num_matvecs: int = 32,
    num_steps: int | None = None,
    damping: float | None = None,
) -> Comparison | tuple[Comparison, ...]:
    """How good an approximation is: the overlap of the top-``k`` eigenspaces of ``exact`` and
    ``approx``, the relative Frobenius error ``||A - Â||_F / ||A||_F`` with its standard error,
    and both top-``k`` spectra with their convergence flags.

    Args:
      exact: the reference operator (e.g. ``hessian`` or ``gauss_newton``).
      approx: an operator of the same layout (K-FAC, a Monte Carlo Fisher, a diagonal...), or a
        tuple of them: then one :class:`Comparison` each, with ``exact``'s eigsh runs done once
        and every Frobenius norm on the same probes (each result equals the one of its own
        call with the same key).
      k: eigenpairs at the top (largest algebraic) of each.
      key: PRNG key: the eigsh runs and the Frobenius probes use keys folded from it.
      num_matvecs: Rademacher probes of the Frobenius norms (shared by ``A - Â`` and ``A``).
      num_steps: Lanczos steps of each eigsh (its default otherwise).
      damping: ``λ > 0``: also the conditioning of ``A + λI`` preconditioned by ``Â + λI``
        (``condition``) and alone (``reference_condition``). Needs ``approx`` with an exact
        inverse square root (:meth:`~curvature.LinearOperator.damped_power`: K-FAC, EK-FAC, a
        diagonal, a dense matrix): an error for one operator without, NaN and ``None`` ends
        for such an operator in a tuple.

    Returns a :class:`Comparison` (a tuple of them for a tuple). Cost: an eigsh run of ``exact``
    and of each approximation (``num_steps + k + check_steps`` each) and ``num_matvecs``
    products with ``exact`` and with each approximation; with ``damping`` two more eigsh runs at
    both ends (the largest and the smallest eigenpair) for ``A + λI`` (once) and for each
    preconditioned form. The top eigenspaces are only as good as their ``converged`` flags:
    check them before reading ``overlap``, as the ends' flags before ``condition``.
    """
    single = isinstance(approx, LinearOperator)
    approximations = (approx,) if single else tuple(approx)
    if not approximations or not all(isinstance(a, LinearOperator) for a in approximations):
        raise TypeError("compare: approx must be an operator or a non-empty tuple of operators")
    for a in approximations:
        if exact.shape != a.shape:
            raise ValueError(
                f"compare: the operators have different shapes, {exact.shape} and {a.shape}"
            )
    roots = [None] * len(approximations)
    if damping is not None:
        if not float(damping) > 0:
            raise ValueError(f"compare: damping must be > 0, got {damping!r}")
        roots = [_root(a, damping, required=single) for a in approximations]
    kwargs = {} if num_steps is None else {"num_steps": num_steps}
    exact_top = eigsh(exact, k=k, key=jax.random.fold_in(key, 0), **kwargs)
    *differences, reference = frobenius_norm_squared(
        (*(exact - a for a in approximations), exact),
        num_matvecs=num_matvecs,
        key=jax.random.fold_in(key, 2),
    )
    a = float(reference.value)
    if not a > 0:
        raise ValueError(f"compare: ||exact||_F^2 is estimated at {a:.6g}; nothing to compare to")
    shifted, reference_ends = None, None
    if any(root is not None for root in roots):
        shifted = exact + from_diagonal(jnp.full((exact.size,), damping, exact.dtype), like=exact)
    ends = {"k": 2, "which": "BE", **kwargs}  # the largest and the smallest
    results = []
    for approximation, difference, root in zip(approximations, differences, roots, strict=True):
        approx_top = eigsh(approximation, k=k, key=jax.random.fold_in(key, 1), **kwargs)
        overlap = float(subspace_overlap(exact_top.eigenvectors, approx_top.eigenvectors))
        error, error_se = _relative_error(difference, reference)
        if root is None:
            results.append(Comparison(overlap, error, error_se, exact_top, approx_top))
            continue
        if reference_ends is None:
            reference_ends = eigsh(shifted, key=jax.random.fold_in(key, 4), **ends)
        congruence = _Congruence(root, shifted)
        preconditioned = eigsh(congruence, key=jax.random.fold_in(key, 3), **ends)
        results.append(
            Comparison(
                overlap,
                error,
                error_se,
                exact_top,
                approx_top,
                _ratio(preconditioned),
                _ratio(reference_ends),
                preconditioned,
                reference_ends,
            )
        )
    return results[0] if single else tuple(results)

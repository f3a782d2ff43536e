"""Lanczos tridiagonalisation and Ritz eigenpairs (``eigsh``).

Lanczos (1950) builds an orthonormal basis ``Q = [q_0, ..., q_{m-1}]`` of the Krylov space
$\\mathrm{span}\\{v, Av, \\dots, A^{m-1} v\\}$ in which $Q^T A Q = T$ is tridiagonal. The eigenvalues of
``T`` (Ritz values) converge to the extreme eigenvalues of ``A`` first (Kaniel-Paige-Saad bounds).

In floating point the plain three-term recurrence loses orthogonality as Ritz values converge and
then produces spurious copies ("ghosts") of converged eigenvalues (Paige 1971). We keep the basis and
re-orthogonalise every new vector against all of it with classical Gram-Schmidt, repeating the
pass when it removed more than ``1 - 1/sqrt(2)`` of the norm (Daniel, Gragg, Kaufman & Stewart
1976: "twice is enough"). Cost per step: one matvec plus two to four passes over the ``(m, n)``
basis.

When the Krylov space becomes invariant (``beta_j`` at round-off level, e.g. an operator with few
distinct eigenvalues) the run restarts from a random vector orthogonal to the basis and records
``beta_j = 0``: ``T`` becomes block-diagonal, ``Q`` stays orthonormal and ``Q^T A Q = T`` still holds.

The whole run is one compiled ``lax.fori_loop`` over a preallocated basis (the recurrences are in
:mod:`curvature._lanczos`); for streamed data the loop runs on the host, one pass over the data
and one compiled update a step.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from curvature._checks import (
    check_finite_result,
    check_key,
    check_steps,
    positive_int,
    require_square,
)
from curvature._driving import compiled, host_driven
from curvature._lanczos import LanczosResult, _lanczos_recurrence, _lanczos_run, safe_norm
from curvature._memory import check_basis_memory
from curvature.linear_operator import LinearOperator, apply_rows

__all__ = ["EigshResult", "LanczosResult", "eigsh", "lanczos", "safe_norm", "tridiagonal"]

_WHICH = ("LA", "SA", "LM", "BE")


class EigshResult(NamedTuple):
    """Ritz pairs of a symmetric operator.

    Attributes:
      eigenvalues: ``(k,)``; ordered by ``which``: ``"LA"`` descending, ``"SA"`` ascending,
        ``"LM"`` by descending magnitude, ``"BE"`` descending (the largest first, the smallest last).
      eigenvectors: ``(n, k)`` orthonormal columns (``op.unravel(v[:, i])`` gives a pytree).
      residual_norms: ``(k,)`` recomputed ``||A v_i - lambda_i v_i||`` (``k`` extra matvecs).
      converged: ``(k,)`` whether ``residual_norm <= tol * max_j |theta_j|``: relative to the
        operator's scale, not to each eigenvalue, so a small eigenvalue (say the bottom of a
        Hessian) can be "converged" with a residual larger than itself; compare
        ``residual_norms`` with ``|eigenvalues|`` before trusting its sign.
      num_matvecs: matvecs used, the residual check included.
    """

    eigenvalues: jax.Array
    eigenvectors: jax.Array
    residual_norms: jax.Array
    converged: jax.Array
    num_matvecs: jax.Array


@host_driven
@functools.partial(jax.jit, static_argnames=("num_steps", "reorthogonalize", "store_basis"))
def _lanczos(op, key, *, num_steps, reorthogonalize, store_basis=True):
    op = op.prepared()
    key_start, key_restart = _split(key)
    v0 = _normal(key_start, op.size, op.dtype)
    if not store_basis:
        return _lanczos_recurrence(op, v0, key_restart, num_steps)
    return _lanczos_run(op, v0, key_restart, num_steps, reorthogonalize)


def lanczos(
    op: LinearOperator,
    /,
    *,
    num_steps: int,
    key: jax.Array,
    reorthogonalize: bool = True,
    store_basis: bool = True,
) -> LanczosResult:
    """``num_steps`` Lanczos steps from a Gaussian start vector drawn with ``key``.

    Cost: ``num_steps`` matvecs; memory: the ``(num_steps + 1, n)`` basis, checked against the
    device's memory before it is allocated (a ``MemoryError`` names the ways out). With
    ``reorthogonalize=False`` only the three-term recurrence is used (cheaper, but once Ritz
    values converge the vectors lose orthogonality and ``T`` gets spurious copies, "ghosts", of
    them). ``store_basis=False`` (with ``reorthogonalize=False``) keeps two vectors instead of
    the basis, memory ``O(n)``: ``T`` is the same as with the stored basis, ``basis`` is returned
    empty. Use :func:`tridiagonal` to form ``T``.
    """
    check_key(key)
    require_square(op, "lanczos")
    num_steps = check_steps(op, num_steps)
    if not store_basis and reorthogonalize:
        raise ValueError(
            "lanczos(store_basis=False) needs reorthogonalize=False: reorthogonalising against "
            "the basis needs the basis"
        )
    if store_basis:
        check_basis_memory(op, num_steps, "lanczos")
    return _lanczos(
        op, key, num_steps=num_steps, reorthogonalize=reorthogonalize, store_basis=store_basis
    )


_split = compiled(jax.random.split)
_normal = compiled(lambda key, n, dtype: jax.random.normal(key, (n,), dtype), static_argnums=(1, 2))


def tridiagonal(result: LanczosResult) -> jax.Array:
    """The ``(m, m)`` symmetric tridiagonal ``T`` of a :class:`LanczosResult`."""
    return jnp.diag(result.alphas) + jnp.diag(result.betas, 1) + jnp.diag(result.betas, -1)


def _select(theta: jax.Array, k: int, which: str) -> jax.Array:
    """Indices into ascending Ritz values ``theta`` for the requested end(s)."""
    m = theta.shape[0]
    if which == "LA":
        return jnp.arange(m - 1, m - 1 - k, -1)
    if which == "SA":
        return jnp.arange(k)
    if which == "LM":
        return jnp.argsort(-jnp.abs(theta))[:k]
    top, bottom = (k + 1) // 2, k // 2
    return jnp.concatenate([jnp.arange(m - 1, m - 1 - top, -1), jnp.arange(bottom - 1, -1, -1)])


@compiled
def eigh_tridiagonal(run: LanczosResult) -> tuple[jax.Array, jax.Array]:
    """Eigenpairs of ``T``, computed on ``T`` scaled to unit max entry (any operator scale)."""
    t = tridiagonal(run)
    scale = jnp.max(jnp.abs(t))
    scale = jnp.where(scale > 0, scale, 1.0)
    theta, s = jnp.linalg.eigh(t / scale)
    return theta * scale, s


def _no_gradient(tree):
    return jax.tree_util.tree_map(
        lambda x: jax.lax.stop_gradient(x) if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _hellmann_feynman(fn, layout, values, vectors, operands):
    """``values``, with the derivative ``v_i^T (dA) v_i`` in the operator's arrays."""
    return values


@_hellmann_feynman.defjvp
def _hellmann_feynman_jvp(fn, layout, primals, tangents):
    values, vectors, operands = primals
    _, _, d_operands = tangents

    def rayleigh(ops):
        op = LinearOperator(fn, ops, layout)
        return jnp.sum(vectors.T * jax.vmap(op.apply)(vectors.T), axis=1)

    _, d_values = jax.jvp(rayleigh, (operands,), (d_operands,))
    return values, d_values


@host_driven
@functools.partial(
    jax.jit, static_argnames=("k", "which", "num_steps", "reorthogonalize", "probe_batch_size")
)
def _eigsh(op, key, tol, *, k, which, num_steps, reorthogonalize, probe_batch_size):
    # The Lanczos run is not differentiated (its operands are frozen); the eigenvalues' derivative
    # is Hellmann-Feynman's, attached at the end at no cost when nothing is differentiated.
    frozen = _no_gradient(op).prepared()
    run = _lanczos(frozen, key, num_steps=num_steps, reorthogonalize=reorthogonalize)
    theta, values, vectors = _ritz(run, k, which)
    av = apply_rows(frozen, vectors.T, probe_batch_size)
    residuals, converged = _judge(theta, values, vectors, av, tol)
    values = _hellmann_feynman(op.fn, op.layout, values, vectors, op.operands)
    return EigshResult(values, vectors, residuals, converged, jnp.asarray(num_steps + k))


@compiled(static_argnums=(1, 2))
def _ritz(run: LanczosResult, k: int, which: str):
    theta, s = eigh_tridiagonal(run)
    idx = _select(theta, k, which)
    return theta, theta[idx], run.basis.T @ s[:, idx]


@compiled
def _judge(theta, values, vectors, av, tol):
    residuals = safe_norm(av - values[:, None] * vectors.T, axis=1)
    return residuals, residuals <= tol * jnp.max(jnp.abs(theta))


def eigsh(
    op: LinearOperator,
    /,
    *,
    k: int,
    which: str = "LA",
    num_steps: int | None = None,
    key: jax.Array,
    tol: float | None = None,
    reorthogonalize: bool = True,
    probe_batch_size: int | None = None,
) -> EigshResult:
    """``k`` eigenpairs of a symmetric operator at one or both ends of its spectrum (Lanczos).

    Args:
      op: the operator (e.g. :func:`curvature.hessian`).
      k: how many eigenpairs; with ``which="BE"``, ``ceil(k/2)`` from the top and ``floor(k/2)``
        from the bottom.
      which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest magnitude,
        ``"BE"`` both ends.
      num_steps: Lanczos steps (matvecs); default ``min(n, max(4 k, 40))``. Extreme, well-separated
        eigenvalues converge first; more steps resolve more of them.
      key: PRNG key for the start vector (and restarts after a breakdown).
      tol: a pair is ``converged`` when its residual norm is at most ``tol`` times the largest
        Ritz value magnitude (an estimate of ``||A||_2``); default ``sqrt(eps)`` of the dtype.
      reorthogonalize: full re-orthogonalisation (default; without it, ghosts appear).
      probe_batch_size: vmap this many vectors at once in the final residual check.

    Returns an :class:`EigshResult` whose residual norms are recomputed with ``k`` extra matvecs,
    so they are honest whatever happened in the recurrence. Cost: ``num_steps + k`` matvecs.
    Results do not depend on the operator's scale (norms are computed without underflow, ``T``
    is diagonalised at unit scale): an operator of norm 1e-20 in float32 gives its eigenvalues.

    Differentiable: under ``jax.grad`` / ``jax.jvp`` the eigenvalues have the derivative
    ``v_i^T (dA) v_i`` (Hellmann-Feynman), exact for a converged, simple eigenvalue; the Lanczos
    run itself is not differentiated, and the eigenvectors and residuals carry no derivative.
    For a repeated eigenvalue the derivative is that of the Rayleigh quotient of the returned
    vector (the eigenvalue itself is not differentiable there).
    """
    check_key(key)
    require_square(op, "eigsh")
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    k = positive_int(k, "k")
    if k > op.size:
        raise ValueError(f"k={k} exceeds the operator's dimension n={op.size}")
    if num_steps is None:
        num_steps = min(op.size, max(4 * k, 40))
    num_steps = check_steps(op, num_steps)
    if probe_batch_size is not None:
        probe_batch_size = positive_int(probe_batch_size, "probe_batch_size")
    if num_steps < k:
        raise ValueError(
            f"num_steps={num_steps} is smaller than k={k}: Lanczos gives at most num_steps Ritz pairs"
        )
    check_basis_memory(op, num_steps, "eigsh")
    if tol is None:
        tol = float(jnp.finfo(op.dtype).eps) ** 0.5
    result = _eigsh(
        op,
        key,
        jnp.asarray(tol, op.dtype),
        k=k,
        which=which,
        num_steps=num_steps,
        reorthogonalize=reorthogonalize,
        probe_batch_size=probe_batch_size,
    )
    check_finite_result(result.eigenvalues, "eigsh")
    return result

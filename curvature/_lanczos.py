"""The Lanczos recurrences as steps of a program (:mod:`curvature._driver`): with the whole basis
and re-orthogonalisation (:func:`basis_steps`) or with two vectors (:func:`recurrence_steps`).

Each step is a product with the operator followed by an update of a small state; the driver runs
the steps as one compiled loop for in-memory data, or from the host (one pass over the data, then
the compiled update) for streamed data. See :mod:`curvature.krylov` for the algorithm, and
:mod:`curvature.density` for its use in stochastic Lanczos quadrature.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from curvature._driver import Apply, Repeat


class LanczosResult(NamedTuple):
    """A Lanczos decomposition ``A Q^T = Q^T T + beta_m q_m e_m^T``.

    Attributes:
      alphas: ``(m,)`` diagonal of ``T``.
      betas: ``(m - 1,)`` off-diagonal of ``T`` (zeros where the run restarted after a breakdown).
      basis: ``(m, n)`` orthonormal rows ``q_0, ..., q_{m-1}``.
      residual_norm: ``beta_m``, the norm of the part of ``A q_{m-1}`` outside the basis.
      num_restarts: how many invariant subspaces were found (breakdowns).
    """

    alphas: jax.Array
    betas: jax.Array
    basis: jax.Array
    residual_norm: jax.Array
    num_restarts: jax.Array


def safe_norm(x: jax.Array, axis=None) -> jax.Array:
    """``||x||_2`` computed as ``m ||x / m||`` with ``m = max |x|``: no underflow of the squares
    for tiny vectors (an operator of scale 1e-20 in float32), no overflow for huge ones."""
    m = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    m_safe = jnp.where(m > 0, m, 1.0)
    out = jnp.linalg.norm(x / m_safe, axis=axis, keepdims=True) * m
    return out.reshape(()) if axis is None else jnp.squeeze(out, axis)


def _orthogonalize(basis: jax.Array, w: jax.Array) -> jax.Array:
    """Remove from ``w`` its components along the rows of ``basis``; twice when needed (DGKS)."""

    def cgs(x):
        return x - basis.T @ (basis @ x)

    norm_before = safe_norm(w)
    w = cgs(w)
    return jax.lax.cond(safe_norm(w) < norm_before / math.sqrt(2.0), cgs, lambda x: x, w)


def basis_init(v0, num_steps: int):
    """The state of Lanczos with the whole basis, started from ``v0`` (``num_steps`` rows)."""
    n, dtype = v0.shape[0], v0.dtype
    # One spare row receives q_m, so every step writes row j + 1 in place.
    basis = jnp.zeros((num_steps + 1, n), dtype).at[0].set(v0 / safe_norm(v0))
    zeros = jnp.zeros((num_steps,), dtype)
    return (basis, zeros, zeros, jnp.zeros((), jnp.int32), jnp.zeros((), dtype))


def basis_update(state, j, w, key, num_steps: int, reorthogonalize: bool):
    """Step ``j`` of Lanczos after its matvec ``w = A q_j``."""
    basis, alphas, betas, restarts, anorm = state
    n, dtype = basis.shape[1], basis.dtype
    breakdown_tol = jnp.finfo(dtype).eps ** 0.75
    q = basis[j]
    q_prev = basis[jnp.maximum(j - 1, 0)]
    beta_prev = jnp.where(j > 0, betas[jnp.maximum(j - 1, 0)], 0.0)
    anorm = jnp.maximum(anorm, safe_norm(w))
    alpha = jnp.vdot(q, w)
    w = w - alpha * q - beta_prev * q_prev
    if reorthogonalize:
        w = _orthogonalize(basis, w)
    beta = safe_norm(w)
    is_last = j == num_steps - 1
    broke = (beta <= breakdown_tol * anorm) & ~is_last

    def restart(_):
        r = jax.random.normal(jax.random.fold_in(key, j), (n,), dtype)
        r = _orthogonalize(basis, _orthogonalize(basis, r))
        return r / safe_norm(r), jnp.zeros((), dtype)

    def proceed(_):
        return w / jnp.where(beta > 0, beta, 1.0), beta

    q_next, beta = jax.lax.cond(broke, restart, proceed, None)
    return (
        basis.at[j + 1].set(q_next),
        alphas.at[j].set(alpha),
        betas.at[j].set(beta),
        restarts + broke.astype(jnp.int32),
        anorm,
    )


def recurrence_init(v0: jax.Array, num_steps: int):
    """The state of the three-term recurrence alone: two vectors instead of the basis."""
    q0 = v0 / safe_norm(v0)
    zeros = jnp.zeros((num_steps,), q0.dtype)
    return (jnp.zeros_like(q0), q0, zeros, zeros, jnp.zeros((), jnp.int32), jnp.zeros((), q0.dtype))


def recurrence_result(state) -> LanczosResult:
    """A :class:`LanczosResult` whose ``basis`` has no rows (memory ``O(n)``)."""
    _, q, alphas, betas, restarts, _ = state
    return LanczosResult(
        alphas, betas[:-1], jnp.zeros((0, q.shape[0]), q.dtype), betas[-1], restarts
    )


def recurrence_update(state, j, w, key, num_steps: int):
    """Step ``j`` of the three-term recurrence after its product ``w = A q_j``."""
    q_prev, q, alphas, betas, restarts, anorm = state
    n, dtype = q.shape[0], q.dtype
    breakdown_tol = jnp.finfo(dtype).eps ** 0.75
    beta_prev = jnp.where(j > 0, betas[jnp.maximum(j - 1, 0)], 0.0)
    anorm = jnp.maximum(anorm, safe_norm(w))
    alpha = jnp.vdot(q, w)
    w = w - alpha * q - beta_prev * q_prev
    beta = safe_norm(w)
    broke = (beta <= breakdown_tol * anorm) & (j < num_steps - 1)

    def restart(_):  # orthogonal to the last two vectors only: all this mode keeps
        r = jax.random.normal(jax.random.fold_in(key, j), (n,), dtype)
        for v in (q, q_prev, q, q_prev):
            r = r - jnp.vdot(v, r) * v
        return r / safe_norm(r), jnp.zeros((), dtype)

    def proceed(_):
        return w / jnp.where(beta > 0, beta, 1.0), beta

    q_next, beta = jax.lax.cond(broke, restart, proceed, None)
    return (
        q,
        q_next,
        alphas.at[j].set(alpha),
        betas.at[j].set(beta),
        restarts + broke.astype(jnp.int32),
        anorm,
    )


def basis_result(state, num_steps: int) -> LanczosResult:
    basis, alphas, betas, restarts, _ = state
    return LanczosResult(alphas, betas[:-1], basis[:num_steps], betas[-1], restarts)


# --------------------------------------------------------------------------------------------
# The steps of a program: Lanczos on the sub-state state["lanczos"], restart key state["key"].


def lanczos_steps(num_steps: int, reorthogonalize: bool, store_basis: bool = True) -> Repeat:
    """``num_steps`` Lanczos steps on ``state["lanczos"]`` (made by :func:`basis_init` or, with
    ``store_basis=False``, :func:`recurrence_init`), restarting after a breakdown from vectors
    drawn with ``state["key"]``."""
    if store_basis:

        def rows(state, j):
            return state["lanczos"][0][j]

        def update(state, j, w):
            new = basis_update(state["lanczos"], j, w, state["key"], num_steps, reorthogonalize)
            return {**state, "lanczos": new}

    else:

        def rows(state, j):
            return state["lanczos"][1]

        def update(state, j, w):
            new = recurrence_update(state["lanczos"], j, w, state["key"], num_steps)
            return {**state, "lanczos": new}

    return Repeat(num_steps, Apply(rows, update))

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


def basis_update(state, j, w, key, num_steps, reorthogonalize: bool, project=None):
    """Step ``j`` of Lanczos after its matvec ``w = A q_j``. ``num_steps`` may be traced (the
    run's length in a larger preallocated basis); ``project(r)`` keeps a restart vector in the
    subspace the operator acts on (a block ``P A P`` on full-length vectors, a deflated
    operator)."""
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
        if project is not None:
            r = project(r)
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


def recurrence_update(state, j, w, key, num_steps):
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


# --------------------------------------------------------------------------------------------
# Preallocated sizes: one compiled program for every run length within a bucket.

_BUCKETS = (12, 16, 20, 24, 30, 40, 48, 60, 80, 100)


def bucket(count: int, limit: int | None = None) -> int:
    """The preallocated size for ``count`` steps (or vectors): ``count`` itself up to 10, then
    the next of 12, 16, 20, 24, 30, 40, 48, 60, 80, 100, 120, 160, ... (a third more at most),
    never above ``limit``. Runs of any length within a bucket share one compiled program."""
    if count <= 10:
        size = count
    else:
        scale = 1
        while count > _BUCKETS[-1] * scale:
            scale *= 10
        size = next(b * scale for b in _BUCKETS if b * scale >= count)
    return size if limit is None else max(count, min(size, limit))


def padded_eigh(alphas: jax.Array, betas: jax.Array, num_steps) -> tuple[jax.Array, jax.Array]:
    """Eigenpairs of the ``num_steps x num_steps`` tridiagonal ``T`` of a run whose ``alphas``
    and ``betas`` are preallocated to a larger size (``num_steps`` may be traced), computed on
    ``T`` at unit scale: the Ritz values ascending, then the padding's (sorted last, above every
    Ritz value, with eigenvectors that are zero on ``T``'s rows), so that ``theta[:num_steps]``
    and ``s[:num_steps, :num_steps]`` are ``T``'s. With ``num_steps`` the preallocated size,
    exactly the eigendecomposition of ``T``."""
    rows = alphas.shape[0]
    index = jnp.arange(rows)
    a = jnp.where(index < num_steps, alphas, 0)
    b = jnp.where(index[:-1] < num_steps - 1, betas[: rows - 1], 0)
    t = jnp.diag(a) + jnp.diag(b, 1) + jnp.diag(b, -1)
    scale = jnp.max(jnp.abs(t))
    scale = jnp.where(scale > 0, scale, 1.0)
    # At unit scale every eigenvalue of T lies in [-3, 3] (Gershgorin): the padding at 4 is above.
    pad = jnp.where(index < num_steps, 0.0, 4.0).astype(t.dtype)
    theta, s = jnp.linalg.eigh(t / scale + jnp.diag(pad))
    return theta * scale, s


# --------------------------------------------------------------------------------------------
# The steps of a program: Lanczos on the sub-state state["lanczos"], restart key state["key"].


def lanczos_steps(reorthogonalize: bool, store_basis: bool = True, field: str = "lanczos"):
    """``state["num_steps"]`` Lanczos steps (traced: any count within the preallocated size) on
    ``state[field]`` (made by :func:`basis_init` or, with ``store_basis=False``,
    :func:`recurrence_init`), restarting after a breakdown from vectors drawn with
    ``state["key"]``. With ``state["mask"]`` (0/1 entries) the operator is the block
    ``P A P`` on the masked entries of full-length vectors: products and restarts are masked."""
    if store_basis:

        def rows(state, j):
            return state[field][0][j]

        def update(state, j, w):
            mask = state.get("mask")
            project = None if mask is None else (lambda r: r * mask)
            new = basis_update(
                state[field],
                j,
                w if mask is None else w * mask,
                state["key"],
                state["num_steps"],
                reorthogonalize,
                project,
            )
            return {**state, field: new}

    else:

        def rows(state, j):
            return state[field][1]

        def update(state, j, w):
            new = recurrence_update(state[field], j, w, state["key"], state["num_steps"])
            return {**state, field: new}

    return Repeat(lambda state: state["num_steps"], Apply(rows, update))

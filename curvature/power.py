"""Deflated power iteration: the method of PyHessian and hessian-eigenthings, done right.

Power iteration converges to the eigenvalue of largest *magnitude* at the rate
$|\\lambda_2 / \\lambda_1|$ per matvec, so it needs many more matvecs than Lanczos for the same
accuracy (see ``benchmarks/``); it is here for comparison with the peers. Pairs are found one
after another; each later pair iterates with the deflated operator
$A - \\sum_{j<i} \\lambda_j v_j v_j^T$. Convergence is judged by the residual
$\\|A v - \\lambda v\\| \\le tol\\,|\\lambda|$, not by the change of the Rayleigh quotient (which
stalls long before the vector converges when eigenvalues are close).

A final Rayleigh-Ritz step on the span of the ``k`` iterates (with the ``k`` matvecs of the
residual check) gives the reported pairs: it removes what inexact deflation mixed into later
pairs. Equal magnitudes of opposite sign (``lambda`` and ``-lambda`` both largest): the first
iterate does not converge but alternates inside their two-dimensional eigenspace and spends
``max_iters``; with ``k >= 2`` the Rayleigh-Ritz step then resolves both (tested on
``diag(2, -2, 1, 0.1, 0)``), with ``k = 1`` the pair is reported unconverged, its value somewhere
in ``[-lambda, lambda]``. :func:`curvature.eigsh` (``which="LM"``) needs no such luck.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from curvature._checks import check_finite_result, check_key, positive_int, require_square
from curvature._driving import host_driven
from curvature.krylov import safe_norm
from curvature.linear_operator import LinearOperator, apply_rows

__all__ = ["PowerIterationResult", "power_iteration"]


class PowerIterationResult(NamedTuple):
    """Eigenpairs of largest magnitude.

    Attributes:
      eigenvalues: ``(k,)`` Ritz values (signed) of the span of the ``k`` iterates, by descending
        magnitude.
      eigenvectors: ``(n, k)`` unit columns.
      residual_norms: ``(k,)`` recomputed ``||A v_i - lambda_i v_i||`` with the undeflated operator.
      num_iters: ``(k,)`` matvecs spent on each pair.
      converged: ``(k,)`` whether the recomputed residual with the undeflated operator meets
        ``tol * |lambda|`` (a pair found after an unconverged one is an eigenpair of the deflated
        operator, and only sometimes of ``A``).
      num_matvecs: total matvecs, the final residual check included.
    """

    eigenvalues: jax.Array
    eigenvectors: jax.Array
    residual_norms: jax.Array
    num_iters: jax.Array
    converged: jax.Array
    num_matvecs: jax.Array


@host_driven
@functools.partial(jax.jit, static_argnames=("k",))
def _power(op, key, tol, max_iters, *, k):
    op = op.prepared()
    n, dtype = op.size, op.dtype
    found_vecs = jnp.zeros((k, n), dtype)
    found_vals = jnp.zeros((k,), dtype)

    def deflated(v, vecs, vals):
        return op.apply(v) - vecs.T @ (vals * (vecs @ v))

    def one_pair(carry, i):
        vecs, vals = carry
        v = jax.random.normal(jax.random.fold_in(key, i), (n,), dtype)
        v = v - vecs.T @ (vecs @ v)
        v = v / safe_norm(v)

        def cond(state):
            _, _, res, lam, it = state
            return (it < max_iters) & (res > tol * jnp.abs(lam))

        def body(state):
            v, _, _, _, it = state
            w = deflated(v, vecs, vals)
            lam = jnp.vdot(v, w)
            res = safe_norm(w - lam * v)
            w_norm = safe_norm(w)
            v_next = jnp.where(res > tol * jnp.abs(lam), w / jnp.where(w_norm > 0, w_norm, 1.0), v)
            return v_next, v, res, lam, it + 1

        inf = jnp.asarray(jnp.inf, dtype)
        _, v, res, lam, iters = jax.lax.while_loop(
            cond, body, (v, v, inf, jnp.zeros((), dtype), jnp.zeros((), jnp.int32))
        )
        vecs = vecs.at[i].set(v)
        vals = vals.at[i].set(lam)
        return (vecs, vals), iters

    (vecs, vals), iters = jax.lax.scan(one_pair, (found_vecs, found_vals), jnp.arange(k))
    # Rayleigh-Ritz on the span of the k vectors (with the k matvecs of the residual check):
    # removes what inexact deflation mixed into later pairs, and resolves +-lambda pairs whose
    # eigenspace the iterates span. A pair is converged only if its recomputed residual with the
    # undeflated operator meets tol: after an unconverged pair, the later ones can converge for
    # the deflated operator without being eigenpairs of A.
    q, _ = jnp.linalg.qr(vecs.T)  # (n, k)
    aq = apply_rows(op, q.T).T
    theta, s = jnp.linalg.eigh(0.5 * (q.T @ aq + aq.T @ q))
    order = jnp.argsort(-jnp.abs(theta))
    vals, s = theta[order], s[:, order]
    vecs, avecs = q @ s, aq @ s
    residuals = safe_norm(avecs - vals * vecs, axis=0)
    converged = residuals <= tol * jnp.abs(vals)
    return PowerIterationResult(vals, vecs, residuals, iters, converged, jnp.sum(iters) + k)


def power_iteration(
    op: LinearOperator,
    /,
    *,
    k: int = 1,
    key: jax.Array,
    max_iters: int = 1000,
    tol: float | None = None,
) -> PowerIterationResult:
    """The ``k`` eigenpairs of largest magnitude by deflated power iteration.

    Args:
      op: the operator.
      k: how many pairs, found one after another with deflation.
      key: PRNG key for the start vectors.
      max_iters: matvec budget per pair.
      tol: stop a pair when ``||A v - lambda v|| <= tol * |lambda|``; default ``sqrt(eps)``.

    Cost: ``sum(num_iters) + k`` matvecs, one compiled program (a ``scan`` over pairs of
    ``while_loop`` s).
    """
    check_key(key)
    require_square(op, "power_iteration")
    k = positive_int(k, "k")
    if k > op.size:
        raise ValueError(f"k={k} exceeds the operator's dimension n={op.size}")
    max_iters = positive_int(max_iters, "max_iters")
    if tol is None:
        tol = float(jnp.finfo(op.dtype).eps) ** 0.5
    result = _power(op, key, jnp.asarray(tol, op.dtype), jnp.asarray(max_iters, jnp.int32), k=k)
    check_finite_result(result.eigenvalues, "power_iteration")
    return result

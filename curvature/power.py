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
``max_steps``; with ``k >= 2`` the Rayleigh-Ritz step then resolves both (tested on
``diag(2, -2, 1, 0.1, 0)``), with ``k = 1`` the pair is reported unconverged, its value somewhere
in ``[-lambda, lambda]``. :func:`curvature.eigsh` (``which="LM"``) needs no such luck.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from curvature import _driver
from curvature._checks import check_finite_result, check_key, positive_int, require_square
from curvature._deprecations import UNSET, renamed, warn_once
from curvature._lanczos import safe_norm
from curvature._memory import check_vectors
from curvature.linear_operator import LinearOperator

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


@functools.cache
def _power_program(k: int) -> _driver.Program:
    def init(specs, key, tol, max_steps):
        n, dtype = specs[0].size, specs[0].dtype
        return {
            "key": key,
            "tol": tol,
            "max_steps": max_steps,
            "vecs": jnp.zeros((k, n), dtype),
            "vals": jnp.zeros((k,), dtype),
            "iters": jnp.zeros((k,), jnp.int32),
        }

    def start(state, i):
        vecs = state["vecs"]
        n, dtype = vecs.shape[1], vecs.dtype
        v = jax.random.normal(jax.random.fold_in(state["key"], i), (n,), dtype)
        v = v - vecs.T @ (vecs @ v)
        v = v / safe_norm(v)
        inf = jnp.asarray(jnp.inf, dtype)
        pair = (v, v, inf, jnp.zeros((), dtype), jnp.zeros((), jnp.int32))
        return {**state, "pair": pair}

    def going(state):
        _, _, res, lam, it = state["pair"]
        return (it < state["max_steps"]) & (res > state["tol"] * jnp.abs(lam))

    def step(state, i, av):
        # The deflated operator A - sum_j lambda_j v_j v_j^T on the current vector.
        v, _, _, _, it = state["pair"]
        vecs, vals, tol = state["vecs"], state["vals"], state["tol"]
        w = av - vecs.T @ (vals * (vecs @ v))
        lam = jnp.vdot(v, w)
        res = safe_norm(w - lam * v)
        w_norm = safe_norm(w)
        v_next = jnp.where(res > tol * jnp.abs(lam), w / jnp.where(w_norm > 0, w_norm, 1.0), v)
        return {**state, "pair": (v_next, v, res, lam, it + 1)}

    def end(state, i):
        _, v, _, lam, iters = state["pair"]
        out = {key: value for key, value in state.items() if key != "pair"}
        out["vecs"] = state["vecs"].at[i].set(v)
        out["vals"] = state["vals"].at[i].set(lam)
        out["iters"] = state["iters"].at[i].set(iters)
        return out

    def basis(state, i):
        q, _ = jnp.linalg.qr(state["vecs"].T)  # (n, k)
        return {**state, "q": q}

    def ritz(state, i, aq_rows):
        return {**state, "aq": aq_rows.T}

    def finish(state, specs, key, tol, max_steps):
        # Rayleigh-Ritz on the span of the k vectors (with the k matvecs of the residual check):
        # removes what inexact deflation mixed into later pairs, and resolves +-lambda pairs
        # whose eigenspace the iterates span. A pair is converged only if its recomputed residual
        # with the undeflated operator meets tol: after an unconverged pair, the later ones can
        # converge for the deflated operator without being eigenpairs of A.
        q, aq, iters = state["q"], state["aq"], state["iters"]
        theta, s = jnp.linalg.eigh(0.5 * (q.T @ aq + aq.T @ q))
        order = jnp.argsort(-jnp.abs(theta))
        vals, s = theta[order], s[:, order]
        vecs, avecs = q @ s, aq @ s
        residuals = safe_norm(avecs - vals * vecs, axis=0)
        converged = residuals <= tol * jnp.abs(vals)
        return PowerIterationResult(vals, vecs, residuals, iters, converged, jnp.sum(iters) + k)

    pair = _driver.Seq(
        _driver.Map(start),
        _driver.While(going, _driver.Apply(lambda state, i: state["pair"][0], step)),
        _driver.Map(end),
    )
    body = _driver.Seq(
        _driver.Repeat(k, pair),
        _driver.Map(basis),
        _driver.Apply(lambda state, i: state["q"].T, ritz, mode="map"),
    )
    return _driver.Program(init, body, finish, name="power_iteration")


def power_iteration(
    op: LinearOperator,
    /,
    *,
    k: int = UNSET,
    key: jax.Array,
    max_steps: int = UNSET,
    tol: float | None = None,
    max_iters: int = UNSET,
) -> PowerIterationResult:
    """The ``k`` eigenpairs of largest magnitude by deflated power iteration.

    Args:
      op: the operator.
      k: how many pairs, found one after another with deflation. Required (as in
        :func:`~curvature.eigsh`); for now, leaving it out warns and takes 1.
      key: PRNG key for the start vectors.
      max_steps: matvec budget per pair, default 1000 (its deprecated name: ``max_iters``).
      tol: stop a pair when ``||A v - lambda v|| <= tol * |lambda|``; default ``sqrt(eps)``.

    Cost: ``sum(num_iters) + k`` matvecs, one compiled program (a loop over pairs of
    ``while_loop`` s; for streamed data, a host loop of compiled steps).
    """
    check_key(key)
    require_square(op, "power_iteration")
    if k is UNSET:
        warn_once("power_iteration: k will be required, as in eigsh; pass k=1 for one pair")
        k = 1
    max_steps = renamed("power_iteration", "max_iters", "max_steps", max_iters, max_steps, 1000)
    k = positive_int(k, "k")
    if k > op.size:
        raise ValueError(f"k={k} exceeds the operator's dimension n={op.size}")
    check_vectors(
        op,
        k + 3,
        "power_iteration",
        f"its {k} eigenvectors and the iterate",
        "fewer pairs k; restrict() to a block of the parameters; or shard the parameters",
    )
    max_steps = positive_int(max_steps, "max_steps")
    if tol is None:
        tol = float(jnp.finfo(op.dtype).eps) ** 0.5
    args = (key, jnp.asarray(tol, op.dtype), jnp.asarray(max_steps, jnp.int32))
    result = _driver.run(_power_program(k), (op,), *args)
    check_finite_result(result.eigenvalues, "power_iteration")
    return result

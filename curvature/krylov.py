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
:mod:`curvature._lanczos`, run by :mod:`curvature._driver`); for streamed data the loop runs on
the host, one pass over the data and one compiled update a step.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from curvature import _driver
from curvature._checks import (
    check_finite_result,
    check_key,
    check_steps,
    is_traced,
    positive_int,
    require_square,
)
from curvature._lanczos import (
    LanczosResult,
    basis_init,
    basis_result,
    lanczos_steps,
    recurrence_init,
    recurrence_result,
    safe_norm,
)
from curvature._memory import check_basis_memory
from curvature.linear_operator import LinearOperator

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


def _start(key, spec, num_steps: int, store_basis: bool = True) -> dict:
    """A Gaussian start vector from ``key``, and the key of restarts after a breakdown."""
    key_start, key_restart = jax.random.split(key)
    v0 = jax.random.normal(key_start, (spec.size,), spec.dtype)
    init = basis_init if store_basis else recurrence_init
    return {"lanczos": init(v0.astype(spec.dtype), num_steps), "key": key_restart}


@functools.cache
def _lanczos_program(num_steps: int, reorthogonalize: bool, store_basis: bool) -> _driver.Program:
    def finish(state, specs, key):
        if store_basis:
            return basis_result(state["lanczos"], num_steps)
        return recurrence_result(state["lanczos"])

    return _driver.Program(
        lambda specs, key: _start(key, specs[0], num_steps, store_basis),
        lanczos_steps(num_steps, reorthogonalize, store_basis),
        finish,
        name="lanczos",
    )


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
    return _driver.run(_lanczos_program(num_steps, reorthogonalize, store_basis), (op,), key)


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


def eigh_tridiagonal(run: LanczosResult) -> tuple[jax.Array, jax.Array]:
    """Eigenpairs of ``T``, computed on ``T`` scaled to unit max entry (any operator scale)."""
    t = tridiagonal(run)
    scale = jnp.max(jnp.abs(t))
    scale = jnp.where(scale > 0, scale, 1.0)
    theta, s = jnp.linalg.eigh(t / scale)
    return theta * scale, s


@jax.custom_jvp
def _hellmann_feynman(values, vectors, op):
    """``values``, with the derivative ``v_i^T (dA) v_i`` in the operator's arrays."""
    return values


@_hellmann_feynman.defjvp
def _hellmann_feynman_jvp(primals, tangents):
    values, vectors, op = primals
    _, _, d_op = tangents

    def rayleigh(op):
        return jnp.sum(vectors.T * jax.vmap(op.apply)(vectors.T), axis=1)

    _, d_values = jax.jvp(rayleigh, (op,), (d_op,))
    return values, d_values


@functools.cache
def _eigsh_program(k, which, num_steps, reorthogonalize, probe_batch_size) -> _driver.Program:
    # The Lanczos run is not differentiated (the program is frozen); the eigenvalues' derivative
    # is Hellmann-Feynman's, attached afterwards at no cost when nothing is differentiated.
    def init(specs, key, tol):
        return _start(key, specs[0], num_steps)

    def ritz(state, i):
        run = basis_result(state["lanczos"], num_steps)
        theta, s = eigh_tridiagonal(run)
        idx = _select(theta, k, which)
        return {"theta": theta, "values": theta[idx], "vectors": run.basis.T @ s[:, idx]}

    def judge(state, i, av):
        values, vectors = state["values"], state["vectors"]
        residuals = safe_norm(av - values[:, None] * vectors.T, axis=1)
        return {**state, "residuals": residuals}

    def finish(state, specs, key, tol):
        converged = state["residuals"] <= tol * jnp.max(jnp.abs(state["theta"]))
        return EigshResult(
            state["values"],
            state["vectors"],
            state["residuals"],
            converged,
            jnp.asarray(num_steps + k),
        )

    body = _driver.Seq(
        lanczos_steps(num_steps, reorthogonalize),
        _driver.Map(ritz),
        _driver.Apply(
            lambda state, i: state["vectors"].T, judge, mode="map", batch_size=probe_batch_size
        ),
    )
    return _driver.Program(init, body, finish, frozen=True, name="eigsh")


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
    program = _eigsh_program(k, which, num_steps, reorthogonalize, probe_batch_size)
    result = _driver.run(program, (op,), key, jnp.asarray(tol, op.dtype))
    if is_traced(op):  # under a transformation: the eigenvalues' derivative
        values = _hellmann_feynman(result.eigenvalues, result.eigenvectors, op)
        result = result._replace(eigenvalues=values)
    check_finite_result(result.eigenvalues, "eigsh")
    return result

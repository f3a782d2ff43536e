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
    is_traced,
    positive_int,
    require_square,
)
from curvature._checks import check_steps as valid_steps
from curvature._lanczos import (
    LanczosResult,
    basis_init,
    basis_update,
    bucket,
    lanczos_steps,
    padded_eigh,
    recurrence_init,
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
      converged: ``(k,)`` whether this is the ``i``-th eigenvalue at its end to tolerance: its
        residual is at most ``tol * max_j |theta_j|`` and the rank check (``check_steps``)
        found no eigenvalue beyond it. The tolerance is relative to the operator's scale, not to
        each eigenvalue, so a small eigenvalue (say the bottom of a Hessian) can be "converged"
        with a residual larger than itself; compare ``residual_norms`` with ``|eigenvalues|``
        before trusting its sign.
      num_matvecs: matvecs used, the residual check included.
    """

    eigenvalues: jax.Array
    eigenvectors: jax.Array
    residual_norms: jax.Array
    converged: jax.Array
    num_matvecs: jax.Array


def _start(key, spec, rows: int, store_basis: bool = True) -> dict:
    """A Gaussian start vector from ``key``, and the key of restarts after a breakdown, in a
    basis preallocated for ``rows`` steps."""
    key_start, key_restart = jax.random.split(key)
    v0 = jax.random.normal(key_start, (spec.size,), spec.dtype)
    init = basis_init if store_basis else recurrence_init
    return {"lanczos": init(v0.astype(spec.dtype), rows), "key": key_restart}


@functools.cache
def _lanczos_program(rows: int, reorthogonalize: bool, store_basis: bool) -> _driver.Program:
    """Lanczos to a traced number of steps in a basis preallocated for ``rows``: one compiled
    program for every run length up to ``rows``."""

    def init(specs, key, num_steps):
        return {**_start(key, specs[0], rows, store_basis), "num_steps": num_steps}

    def finish(state, specs, key, num_steps):
        return state["lanczos"]

    body = lanczos_steps(reorthogonalize, store_basis)
    return _driver.Program(init, body, finish, name="lanczos")


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

    Cost: ``num_steps`` matvecs; memory: the ``(num_steps + 1, n)`` basis (preallocated to the
    size bucket of ``num_steps``, at most a third more, so that runs of other lengths reuse the
    compiled program), checked against the device's memory before it is allocated (a
    ``MemoryError`` names the ways out). With ``reorthogonalize=False`` only the three-term
    recurrence is used (cheaper, but once Ritz values converge the vectors lose orthogonality and
    ``T`` gets spurious copies, "ghosts", of them). ``store_basis=False`` (with
    ``reorthogonalize=False``) keeps two vectors instead of the basis, memory ``O(n)``: ``T`` is
    the same as with the stored basis, ``basis`` is returned empty. Use :func:`tridiagonal` to
    form ``T``.
    """
    check_key(key)
    require_square(op, "lanczos")
    num_steps = valid_steps(op, num_steps)
    if not store_basis and reorthogonalize:
        raise ValueError(
            "lanczos(store_basis=False) needs reorthogonalize=False: reorthogonalising against "
            "the basis needs the basis"
        )
    rows = bucket(num_steps, op.size)
    if store_basis:
        check_basis_memory(op, rows, "lanczos")
    program = _lanczos_program(rows, reorthogonalize, store_basis)
    state = _driver.run(program, (op,), key, jnp.asarray(num_steps, jnp.int32))
    if store_basis:
        basis, alphas, betas, restarts, _ = state
    else:
        _, q, alphas, betas, restarts, _ = state
        basis = jnp.zeros((0, q.shape[0]), q.dtype)
    m = num_steps
    return LanczosResult(alphas[:m], betas[: m - 1], basis[:m], betas[m - 1], restarts)


def tridiagonal(result: LanczosResult) -> jax.Array:
    """The ``(m, m)`` symmetric tridiagonal ``T`` of a :class:`LanczosResult`."""
    return jnp.diag(result.alphas) + jnp.diag(result.betas, 1) + jnp.diag(result.betas, -1)


def _select(theta: jax.Array, m, k, which, size: int) -> jax.Array:
    """``size`` indices into the ascending Ritz values ``theta[:m]`` for the requested end(s):
    the first ``k`` are the answer (``m``, ``k`` and ``which``, an index into ``_WHICH``, may be
    traced; the rest repeat valid indices)."""
    i = jnp.arange(size)
    top = (k + 1) // 2
    largest = jnp.maximum(m - 1 - i, 0)
    smallest = jnp.minimum(i, m - 1)
    magnitude = jnp.argsort(jnp.where(jnp.arange(theta.shape[0]) < m, -jnp.abs(theta), jnp.inf))
    both = jnp.where(i < top, largest, jnp.clip(k // 2 - 1 - (i - top), 0, m - 1))
    return jax.lax.switch(
        which,
        [lambda: largest, lambda: smallest, lambda: magnitude[:size], lambda: both],
    )


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


def _empty_basis(n: int, rows: int, dtype) -> tuple:
    """A Lanczos state shaped like ``basis_init``'s, all zeros (a placeholder in a loop carry)."""
    zeros = jnp.zeros((rows,), dtype)
    return (jnp.zeros((rows + 1, n), dtype), zeros, zeros, jnp.zeros((), jnp.int32), zeros[0])


def eigsh_state(key, n, dtype, rows, size, check_rows, settings, mask=None, rank=None) -> dict:
    """The whole state of :func:`eigsh_steps` (every field, so that it can be a loop's carry):
    Lanczos started from a Gaussian vector drawn with ``key``. ``settings``: ``tol``,
    ``num_steps``, ``k``, ``which`` (an index into ``"LA", "SA", "LM", "BE"``) and
    ``check_steps``, any of them traced. With ``mask`` (0/1 entries), the block ``P A P`` of the
    masked entries on full-length vectors; ``rank[i]`` (entry ``i``'s position within its block)
    makes the start vector that of the block on its own vectors (``normal(key, (n_block,))``)."""
    key_start, key_restart = jax.random.split(key)
    v0 = jax.random.normal(key_start, (n,), dtype)
    if mask is not None:
        v0 = (v0 if rank is None else v0[rank]) * mask
    state = {
        "lanczos": basis_init(v0, rows),
        "key": key_restart,
        "check_key": jax.random.fold_in(key, 0xC4EC),
        **settings,
        "scale": jnp.zeros((), dtype),
        "values": jnp.zeros((size,), dtype),
        "vectors": jnp.zeros((n, size), dtype),
        "residuals": jnp.zeros((size,), dtype),
        "deflate": jnp.zeros((n, size), dtype),
    }
    if check_rows:
        state["check"] = _empty_basis(n, check_rows, dtype)
    if mask is not None:
        state["mask"] = mask
    return state


def eigsh_steps(rows, size, check_rows, reorthogonalize, probe_batch_size) -> _driver.Seq:
    """The steps of :func:`eigsh` on an :func:`eigsh_state`: Lanczos to a traced ``num_steps``
    in a basis preallocated for ``rows``; the ``k`` Ritz pairs at the end(s) ``which`` (both
    traced: ``size`` preallocated vectors); their residuals from ``k`` products; and a check of
    their ranks: a second Lanczos run of ``check_steps`` (traced, at most ``check_rows``) from
    another start, on the operator deflated of the converged pairs, whose extreme Ritz values
    must not lie beyond the reported ones."""

    def masked(state, x):
        return x if "mask" not in state else x * state["mask"]

    def ritz(state, i):
        basis, alphas, betas, _, _ = state["lanczos"]
        m, k = state["num_steps"], state["k"]
        theta, s = padded_eigh(alphas, betas, m)
        idx = _select(theta, m, k, state["which"], size)
        scale = jnp.max(jnp.where(jnp.arange(theta.shape[0]) < m, jnp.abs(theta), 0))
        vectors = basis[:rows].T @ s[:, idx]
        vectors = jnp.where(jnp.arange(size) < k, vectors, 0)  # unused columns: zero
        return {**state, "scale": scale, "values": theta[idx], "vectors": vectors}

    def residuals(state, i, av):
        values, vectors = state["values"], state["vectors"]
        residuals_ = safe_norm(masked(state, av) - values[:, None] * vectors.T, axis=1)
        # The check deflates the pairs that converged only: an unconverged Ritz vector mixes in
        # the eigenvectors not yet found, and deflating it would move them.
        ok = (residuals_ <= state["tol"] * state["scale"]) & (jnp.arange(size) < state["k"])
        return {**state, "residuals": residuals_, "deflate": vectors * ok}

    def deflate(state, x):
        y = state["deflate"]
        return x - y @ (y.T @ x)

    def check_start(state, i):
        y = state["deflate"]
        v0 = jax.random.normal(state["check_key"], (y.shape[0],), y.dtype)
        v0 = deflate(state, masked(state, v0))
        check = basis_init(v0, check_rows)
        return {**state, "check": check, "key": jax.random.fold_in(state["check_key"], 1)}

    def check_step(state, j, w):
        def project(x):
            return deflate(state, masked(state, x))

        key, steps = state["key"], state["check_steps"]
        new = basis_update(state["check"], j, project(w), key, steps, True, project)
        return {**state, "check": new}

    body = [
        lanczos_steps(reorthogonalize),
        _driver.Map(ritz),
        _driver.Apply(
            lambda state, i: state["vectors"].T,
            residuals,
            mode="map",
            batch_size=probe_batch_size,
            valid=lambda state: state["k"],
        ),
    ]
    if check_rows:
        body += [
            _driver.Map(check_start),
            _driver.Repeat(
                lambda state: state["check_steps"],
                _driver.Apply(lambda state, j: deflate(state, state["check"][0][j]), check_step),
            ),
        ]
    return _driver.Seq(*body)


def eigsh_result(state, size: int, check_rows: int) -> EigshResult:
    """The :class:`EigshResult` of a finished :func:`eigsh_steps` run (``size`` pairs, the first
    ``k`` of them the answer). ``converged``: the residual is within tolerance and no Ritz value
    of the check run lies beyond the pair (by more than the tolerance)."""
    values, residuals_ = state["values"], state["residuals"]
    k, which, check_steps = state["k"], state["which"], state["check_steps"]
    slack = state["tol"] * state["scale"]
    converged = (residuals_ <= slack) & (jnp.arange(size) < k)
    if check_rows:
        _, alphas, betas, _, _ = state["check"]
        mu, _ = padded_eigh(alphas, betas, check_steps)
        ran = check_steps > 0
        low = jnp.where(ran, mu[0], jnp.inf)
        high = jnp.where(ran, mu[jnp.maximum(check_steps - 1, 0)], -jnp.inf)
        top_end = (which == 0) | ((which == 3) & (jnp.arange(size) < (k + 1) // 2))
        ranked = jax.lax.switch(
            which,
            [
                lambda: high <= values + slack,
                lambda: low >= values - slack,
                lambda: jnp.maximum(jnp.abs(high), jnp.abs(low)) <= jnp.abs(values) + slack,
                lambda: jnp.where(top_end, high <= values + slack, low >= values - slack),
            ],
        )
        converged = converged & ranked
    num_matvecs = state["num_steps"] + k + check_steps
    return EigshResult(values, state["vectors"], residuals_, converged, num_matvecs)


@functools.cache
def _eigsh_program(rows, size, check_rows, reorthogonalize, probe_batch_size) -> _driver.Program:
    """:func:`eigsh_steps` as a program: one compiled program for every ``k``, ``which`` and
    run lengths within the buckets. Not differentiated (frozen): the eigenvalues' derivative is
    Hellmann-Feynman's, attached afterwards."""
    names = ("tol", "num_steps", "k", "which", "check_steps")

    def init(specs, key, *settings):
        spec = specs[0]
        settings = dict(zip(names, settings, strict=True))
        return eigsh_state(key, spec.size, spec.dtype, rows, size, check_rows, settings)

    def finish(state, specs, *args):
        return eigsh_result(state, size, check_rows)

    body = eigsh_steps(rows, size, check_rows, reorthogonalize, probe_batch_size)
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
    check_steps: int | None = None,
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
      key: PRNG key for the start vectors (and restarts after a breakdown).
      tol: a pair is ``converged`` when its residual norm is at most ``tol`` times the largest
        Ritz value magnitude (an estimate of ``||A||_2``) and its rank is checked (below);
        default ``sqrt(eps)`` of the dtype.
      reorthogonalize: full re-orthogonalisation (default; without it, ghosts appear).
      probe_batch_size: vmap this many vectors at once in the final residual check.
      check_steps: steps of the rank check (default ``min(num_steps, n - k)``, and none when
        ``num_steps == n``: the run then spans the whole space; ``0`` skips it).
        A small residual certifies an eigenvalue, not its rank: a Ritz value can converge to the
        fourth eigenvalue while the third has not appeared yet. So a second Lanczos run, from
        another start vector, explores the operator deflated of the converged pairs; if one of
        its extreme Ritz values lies beyond a reported eigenvalue (by more than the tolerance),
        an eigenvalue was missed there, and that pair and the ones after it are reported
        unconverged. With the check, ``converged[i]`` means: this is the ``i``-th eigenvalue at
        that end, to tolerance (with high probability: a missed eigenvalue whose eigenvector the
        second start vector nearly misses too can escape). The default was measured on the main
        job's Hessian spectrum (tanh, step 50: bottom -0.08916, -0.08221, -0.07985, -0.07928),
        ``k=10, which="BE", num_steps=60``, 300 start keys: without the check 30 runs called a
        wrong value converged; with 15, 30 and 60 check steps, 30, 6 and 0 did.

    Returns an :class:`EigshResult` whose residual norms are recomputed with ``k`` extra matvecs,
    so they are honest whatever happened in the recurrence. Cost: ``num_steps + k +
    check_steps`` matvecs. Results do not depend on the operator's scale (norms are computed
    without underflow, ``T`` is diagonalised at unit scale): an operator of norm 1e-20 in
    float32 gives its eigenvalues.

    Compiled once for every ``which``, every ``k`` up to 8 (then up to each power of 2) and
    every ``num_steps`` and ``check_steps`` within a size bucket: the basis is preallocated to
    the bucket (at most a third more than asked), the loop runs to a traced bound and the
    ``k`` pairs are chosen inside the program.

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
    n = op.size
    if k > n:
        raise ValueError(f"k={k} exceeds the operator's dimension n={n}")
    if num_steps is None:
        num_steps = min(n, max(4 * k, 40))
    num_steps = valid_steps(op, num_steps)
    if probe_batch_size is not None:
        probe_batch_size = positive_int(probe_batch_size, "probe_batch_size")
    if num_steps < k:
        raise ValueError(
            f"num_steps={num_steps} is smaller than k={k}: Lanczos gives at most num_steps Ritz pairs"
        )
    if check_steps is None:  # n steps span the whole space: every rank is known already
        check_steps = 0 if num_steps == n else min(num_steps, n - k)
    elif check_steps != 0:
        check_steps = positive_int(check_steps, "check_steps")
    check_steps = min(check_steps, n - k)
    # k: 8 vectors, or the next power of 2 (unused ones cost no product, n floats each).
    rows = bucket(num_steps, n)
    size = min(max(8, 1 << (k - 1).bit_length()), rows)  # k <= num_steps <= rows
    check_rows = bucket(check_steps, n) if check_steps else 0
    check_basis_memory(op, rows + check_rows, "eigsh")
    if tol is None:
        tol = float(jnp.finfo(op.dtype).eps) ** 0.5
    program = _eigsh_program(rows, size, check_rows, reorthogonalize, probe_batch_size)
    args = (jnp.asarray(tol, op.dtype),) + tuple(
        jnp.asarray(x, jnp.int32) for x in (num_steps, k, _WHICH.index(which), check_steps)
    )
    result = _driver.run(program, (op,), key, *args)
    result = EigshResult(
        result.eigenvalues[:k],
        result.eigenvectors[:, :k],
        result.residual_norms[:k],
        result.converged[:k],
        result.num_matvecs,
    )
    if is_traced(op):  # under a transformation: the eigenvalues' derivative
        values = _hellmann_feynman(result.eigenvalues, result.eigenvectors, op)
        result = result._replace(eigenvalues=values)
    check_finite_result(result.eigenvalues, "eigsh")
    return result

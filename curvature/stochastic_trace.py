"""Stochastic trace and diagonal estimation.

* Hutchinson (1989): $\\mathrm{tr}(A) = E[z^T A z]$ for Rademacher $z$; the standard error is the
  sample standard deviation over probes divided by $\\sqrt{m}$.
* Hutch++ (Meyer, Musco, Musco & Woodruff 2021): spend a third of the matvecs on a sketch
  $Q = \\mathrm{orth}(A S)$, take $\\mathrm{tr}(Q^T A Q)$ exactly (another third) and estimate the
  remainder $\\mathrm{tr}((I - QQ^T) A (I - QQ^T))$ by Hutchinson with the last third. Its error
  decays as $1/m$ instead of $1/\\sqrt{m}$ when the spectrum decays fast. The standard error is that
  of the Hutchinson part, conditional on the sketch (the exact part has no variance given ``Q``).
* Diagonal (Bekas, Kokiopoulou & Saad 2007): $\\mathrm{diag}(A) = E[z \\odot A z]$, with a
  standard error per entry.

Memory: probes are drawn, multiplied and folded into running statistics a block at a time
(``probe_batch_size`` probes, vmapped; by default one, which was fastest on CPU), so an
estimator holds ``O(block * n)`` numbers whatever ``num_matvecs`` is; Hutch++
adds its sketch, ``num_matvecs / 3`` vectors of length ``n`` by nature, orthonormalised in place
(Gram-Schmidt twice, no QR workspace).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvature._checks import check_finite_result, check_key, positive_int, require_square
from curvature._driving import compiled, host_driven
from curvature.krylov import safe_norm
from curvature.linear_operator import LinearOperator

__all__ = ["DiagonalResult", "TraceResult", "diagonal", "frobenius_norm_squared", "trace"]

_METHODS = ("hutch++", "hutchinson")


class TraceResult(NamedTuple):
    """A trace estimate: ``value`` +- ``standard_error``, from ``num_matvecs`` matvecs."""

    value: jax.Array
    standard_error: jax.Array
    num_matvecs: jax.Array


class DiagonalResult(NamedTuple):
    """A diagonal estimate ``(n,)`` with a standard error per entry."""

    diagonal: jax.Array
    standard_error: jax.Array
    num_matvecs: jax.Array


def rademacher(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """The +-1 probes used by every estimator here: ``trace``, :func:`diagonal`,
    :func:`frobenius_norm_squared` and ``spectral_density`` draw probe ``i`` as row ``i`` of
    ``rademacher(key, (num_probes, n), op.dtype)`` from the key they are given, so estimators
    called with the same key share their probes. Row ``i`` comes from ``fold_in(key, i)``, so a
    block of rows can be drawn alone (:func:`probe_rows`): the estimators never hold them all."""
    shape = tuple(shape)
    if len(shape) == 1:
        return probe_rows(key, jnp.zeros((1,), jnp.int32), shape[0], dtype)[0]
    rows = probe_rows(key, jnp.arange(int(np.prod(shape[:-1]))), shape[-1], dtype)
    return rows.reshape(shape)


@compiled(static_argnums=(2, 3))
def probe_rows(key: jax.Array, rows: jax.Array, n: int, dtype) -> jax.Array:
    """Rows ``rows`` (indices) of ``rademacher(key, (m, n), dtype)``, shape ``(len(rows), n)``."""
    draw = lambda i: jax.random.rademacher(jax.random.fold_in(key, i), (n,), jnp.int8)  # noqa: E731
    return jax.vmap(draw)(rows).astype(dtype)


def block_size(n: int, dtype, count: int, probe_batch_size: int | None) -> int:
    """Probes per block: ``probe_batch_size``, or by default one; never more than ``count``.

    One, because vmapping probes was slower on CPU: a 26k-parameter MLP's Hutchinson run took
    4.2 ms a matvec one at a time, 6.3 with 4 together, 11.3 with 16 (jax 0.10.2, 2 cores)."""
    del n, dtype  # the block's memory is block * n: the caller's choice
    if probe_batch_size is None:
        return 1
    return max(1, min(positive_int(probe_batch_size, "probe_batch_size"), count))


def _merge(stats, block_stats):
    """Chan et al.'s parallel update of (count, mean, M2) with a block's (count, mean, M2)."""
    n_a, mean_a, m2_a = stats
    n_b, mean_b, m2_b = block_stats
    total = n_a + n_b
    delta = mean_b - mean_a
    weight = n_b / jnp.maximum(total, 1)
    return total, mean_a + delta * weight, m2_a + m2_b + delta**2 * n_a * weight


def monte_carlo(op, key, count: int, sample, block: int, project=None):
    """The body of every Monte Carlo estimator here: the mean of ``sample(z, A z)`` over probes
    ``z_i = rademacher(key, (count, n))[i]`` (each projected by ``project`` if given) and the
    standard error of that mean.

    Probes are drawn, multiplied (``block`` at a time, vmapped) and folded into running
    statistics block by block in one ``scan``: memory ``O(block * n)``, whatever ``count`` is.
    """
    n, dtype = op.shape[1], op.dtype
    num_blocks = -(-count // block)
    acc = jnp.promote_types(dtype, jnp.float32)
    if num_blocks == 1:  # one block: no loop (and less to compile)
        z = probe_rows(key, jnp.arange(count), n, dtype)
        if project is not None:
            z = project(z)
        samples = sample(z, op.apply_rows(z)).astype(acc)
        mean = jnp.mean(samples, axis=0)
        error = jnp.std(samples, axis=0, ddof=1) / jnp.sqrt(count)
        return mean.astype(dtype), error.astype(dtype)

    def body(stats, b):
        idx = b * block + jnp.arange(block)
        valid = idx < count
        z = probe_rows(key, idx, n, dtype)
        if project is not None:
            z = project(z)
        z = jnp.where(valid[:, None], z, 0)
        return _fold(stats, z, op.apply_rows(z), valid, sample), None

    shape = jax.eval_shape(
        sample,
        jax.ShapeDtypeStruct((block, n), dtype),
        jax.ShapeDtypeStruct((block, op.shape[0]), dtype),
    ).shape[1:]
    zeros = jnp.zeros(shape, acc)
    init = (jnp.zeros((), acc), zeros, zeros)
    (total, mean, m2), _ = jax.lax.scan(body, init, jnp.arange(num_blocks))
    error = jnp.sqrt(m2 / (total - 1) / total)
    return mean.astype(dtype), error.astype(dtype)


@compiled(static_argnums=(4,))
def _fold(stats, z, az, valid, sample):
    """A block's samples ``sample(z, A z)`` (rows not ``valid`` left out) merged into ``stats``."""
    acc = stats[1].dtype
    samples = sample(z, az).astype(acc)
    mask = valid.reshape((-1,) + (1,) * (samples.ndim - 1))
    m = jnp.sum(valid)
    mean = jnp.sum(jnp.where(mask, samples, 0), axis=0) / jnp.maximum(m, 1)
    m2 = jnp.sum(jnp.where(mask, (samples - mean) ** 2, 0), axis=0)
    return _merge(stats, (m.astype(acc), mean, m2))


@compiled
def orthonormal_rows(y: jax.Array) -> jax.Array:
    """Orthonormal rows spanning the rows of ``y`` (``(k, n)``): classical Gram-Schmidt twice,
    row by row in place. Unlike a Householder QR of the ``n x k`` matrix it needs no workspace
    beyond ``y`` (XLA's QR fails for ``n k > 2^31``) and keeps float32 orthogonality at round-off;
    a row that is (numerically) in the span of the previous ones becomes zero."""
    k = y.shape[0]
    tiny = jnp.finfo(y.dtype).eps ** 0.75

    def step(i, q):
        v = q[i]
        norm0 = safe_norm(v)
        done = jnp.arange(k) < i
        for _ in range(2):
            v = v - q.T @ jnp.where(done, q @ v, 0)
        norm = safe_norm(v)
        keep = norm > tiny * norm0
        return q.at[i].set(jnp.where(keep, v / jnp.where(keep, norm, 1.0), 0))

    return jax.lax.fori_loop(0, k, step, y)


def _trace_sample(z, az):
    return jnp.sum(z * az, axis=1)


def _diagonal_sample(z, az):
    return z * az


def _norm_sample(z, az):
    return jnp.sum(az**2, axis=1)


def _blocks_of(rows: jax.Array, block: int) -> jax.Array:
    """``rows`` (``(k, n)``) zero-padded to whole blocks, ``(k / block, block, n)``."""
    k = rows.shape[0]
    padded = -(-k // block) * block
    return jnp.pad(rows, ((0, padded - k), (0, 0))).reshape(padded // block, block, -1)


def hutch_plus_plus_sketch(op, key_s, sketch: int, block: int) -> jax.Array:
    """``Q``: orthonormal rows spanning ``A S`` for ``sketch`` probes (``(sketch, n)``); the
    probes are drawn a block at a time, so only ``A S`` is held."""
    block = min(block, sketch)
    n, dtype = op.shape[1], op.dtype

    def one(b):
        return op.apply_rows(probe_rows(key_s, b * block + jnp.arange(block), n, dtype))

    num_blocks = -(-sketch // block)
    if num_blocks == 1:
        y = one(0)
    else:
        y = jax.lax.map(one, jnp.arange(num_blocks)).reshape(-1, op.shape[0])[:sketch]
    return orthonormal_rows(y)


def quadratic_forms(op, q: jax.Array, block: int) -> jax.Array:
    """``sum_i q_i^T A q_i`` over the rows of ``q``, a block at a time."""
    if block >= q.shape[0]:
        return jnp.sum(q * op.apply_rows(q))
    blocks = _blocks_of(q, block)
    return jnp.sum(jax.lax.map(lambda qb: jnp.sum(qb * op.apply_rows(qb)), blocks))


@host_driven
@functools.partial(jax.jit, static_argnames=("num_matvecs", "method", "block"))
def _trace(op, key, *, num_matvecs, method, block):
    op = op.prepared()
    if method == "hutchinson":
        value, error = monte_carlo(op, key, num_matvecs, _trace_sample, block)
        return TraceResult(value, error, jnp.asarray(num_matvecs))
    sketch = num_matvecs // 3
    key_s, key_g = jax.random.split(key)
    q = hutch_plus_plus_sketch(op, key_s, sketch, block)
    exact = quadratic_forms(op, q, block)
    value, error = monte_carlo(
        op, key_g, num_matvecs - 2 * sketch, _trace_sample, block, lambda g: g - (g @ q.T) @ q
    )
    return TraceResult(exact + value, error, jnp.asarray(num_matvecs))


def trace(
    op: LinearOperator,
    /,
    *,
    num_matvecs: int,
    key: jax.Array,
    method: str = "hutch++",
    probe_batch_size: int | None = None,
) -> TraceResult:
    """Estimate ``tr(A)`` with its standard error from ``num_matvecs`` matvecs.

    Args:
      method: ``"hutch++"`` (default; needs ``num_matvecs >= 4``) or ``"hutchinson"``
        (``num_matvecs >= 2``). See the module docstring for both and their standard errors.
      probe_batch_size: probes per block, vmapped (more memory, shared forward passes); memory
        is ``O(probe_batch_size * n)`` plus, for Hutch++, its ``num_matvecs / 3`` sketch
        vectors. Default: one at a time (vmapping probes was slower on CPU).
    """
    check_key(key)
    require_square(op, "trace")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    minimum = 4 if method == "hutch++" else 2
    num_matvecs = positive_int(num_matvecs, "num_matvecs")
    block = block_size(op.size, op.dtype, num_matvecs, probe_batch_size)
    if num_matvecs < minimum:
        raise ValueError(
            f"{method} needs num_matvecs >= {minimum} for a standard error, got {num_matvecs!r}"
        )
    if method == "hutch++" and num_matvecs // 3 > op.size:
        raise ValueError(f"hutch++ sketch of {num_matvecs // 3} exceeds the dimension n={op.size}")
    result = _trace(op, key, num_matvecs=num_matvecs, method=method, block=block)
    check_finite_result(result.value, "trace")
    return result


@host_driven
@functools.partial(jax.jit, static_argnames=("num_matvecs", "block"))
def _diagonal(op, key, *, num_matvecs, block):
    op = op.prepared()
    d, error = monte_carlo(op, key, num_matvecs, _diagonal_sample, block)
    return DiagonalResult(d, error, jnp.asarray(num_matvecs))


def diagonal(
    op: LinearOperator,
    /,
    *,
    num_matvecs: int | None = None,
    key: jax.Array | None = None,
    method: str = "bekas",
    probe_batch_size: int | None = None,
) -> DiagonalResult:
    """``diag(A)`` (flat, ``(n,)``; ``op.unravel`` gives per-parameter maps).

    Args:
      method: ``"bekas"`` (default): each entry is the mean of ``z_i (A z)_i`` over
        ``num_matvecs`` Rademacher probes (``key``), with its standard error; the variance of
        entry ``i`` is ``sum_{j != i} A_ij^2``, small for diagonally dominant operators.
        ``"exact"``: the exact diagonal, standard errors zero. For a Gauss-Newton operator or an
        empirical Fisher it comes from per-example Jacobians (a few gradients' cost, memory of a
        chunk's Jacobians); for any other operator from ``n`` matvecs with the unit vectors,
        ``probe_batch_size`` (default 32) at a time: for small networks and tests.
    """
    require_square(op, "diagonal")
    if method == "exact":
        fast = getattr(op.fn, "exact_diagonal", None)
        if fast is not None:
            result = _fast_exact_diagonal(op)
        else:
            block = positive_int(probe_batch_size or 32, "probe_batch_size")
            result = _exact_diagonal(op, block=min(block, op.size))
        check_finite_result(result.diagonal, "diagonal")
        return result
    if method != "bekas":
        raise ValueError(f"method must be 'bekas' or 'exact', got {method!r}")
    if num_matvecs is None or key is None:
        raise ValueError("diagonal(method='bekas') needs num_matvecs and key")
    check_key(key)
    num_matvecs = positive_int(num_matvecs, "num_matvecs")
    block = block_size(op.size, op.dtype, num_matvecs, probe_batch_size)
    if num_matvecs < 2:
        raise ValueError(f"diagonal needs num_matvecs >= 2 for a standard error, got {num_matvecs}")
    result = _diagonal(op, key, num_matvecs=num_matvecs, block=block)
    check_finite_result(result.diagonal, "diagonal")
    return result


@host_driven
@jax.jit
def _fast_exact_diagonal(op):
    d = op.fn.exact_diagonal(op.operands)
    return DiagonalResult(d, jnp.zeros_like(d), jnp.asarray(0))


@host_driven
@functools.partial(jax.jit, static_argnames=("block",))
def _exact_diagonal(op, *, block):
    # Unit vectors in blocks: e_j^T A e_j for j in the block, through lax.map over the blocks.
    op = op.prepared()
    n = op.size
    starts = jnp.arange(0, n, block)

    def one(start):
        idx = start + jnp.arange(block)
        rows = jax.nn.one_hot(idx, n, dtype=op.dtype)  # past the end: a zero row, dropped below
        products = op.apply_rows(rows)
        return jnp.sum(rows * products, axis=1)

    d = jax.lax.map(one, starts).reshape(-1)[:n]
    return DiagonalResult(d, jnp.zeros_like(d), jnp.asarray(n))


@host_driven
@functools.partial(jax.jit, static_argnames=("num_matvecs", "block"))
def _frobenius(op, key, *, num_matvecs, block):
    op = op.prepared()
    value, error = monte_carlo(op, key, num_matvecs, _norm_sample, block)
    return TraceResult(value, error, jnp.asarray(num_matvecs))


def frobenius_norm_squared(
    op: LinearOperator,
    /,
    *,
    num_matvecs: int,
    key: jax.Array,
    probe_batch_size: int | None = None,
) -> TraceResult:
    """Estimate ``||A||_F^2 = tr(A^T A) = E ||A z||^2`` (Rademacher ``z``) with its standard error.

    Pass the same ``key`` for two operators to compare them on shared probes (e.g. ``H`` and
    ``H - G``), which cancels much of the noise in their ratio.
    """
    check_key(key)
    num_matvecs = positive_int(num_matvecs, "num_matvecs")
    block = block_size(op.shape[1], op.dtype, num_matvecs, probe_batch_size)
    if num_matvecs < 2:
        raise ValueError(f"num_matvecs must be >= 2 for a standard error, got {num_matvecs!r}")
    result = _frobenius(op, key, num_matvecs=num_matvecs, block=block)
    check_finite_result(result.value, "frobenius_norm_squared")
    return result

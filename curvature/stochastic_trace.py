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

Probes go through ``lax.map`` in groups of ``probe_batch_size`` (vmapped within a group).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from curvature._checks import check_finite_result, check_key, positive_int, require_square
from curvature.linear_operator import LinearOperator, apply_rows

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
    """The +-1 probes used by every estimator here: ``trace(method="hutchinson")``,
    :func:`diagonal`, :func:`frobenius_norm_squared` and ``spectral_density`` draw
    ``rademacher(key, (num_probes, n), op.dtype)`` from the key they are given, so estimators called
    with the same key share their probes."""
    return jax.random.rademacher(key, shape, jnp.int8).astype(dtype)


def _batch(probe_batch_size):
    return None if probe_batch_size is None else positive_int(probe_batch_size, "probe_batch_size")


def _mean_and_error(samples: jax.Array):
    m = samples.shape[0]
    return jnp.mean(samples, axis=0), jnp.std(samples, axis=0, ddof=1) / jnp.sqrt(m)


def _trace_sample(z, az):
    return jnp.sum(z * az, axis=1)


def _diagonal_sample(z, az):
    return z * az


def _norm_sample(z, az):
    return jnp.sum(az**2, axis=1)


def _monte_carlo(op, probes, sample, probe_batch_size):
    """The body of every Monte Carlo estimator here: ``sample(z, A z)`` per probe row of
    ``probes``, its mean and the standard error of the mean."""
    return _mean_and_error(sample(probes, apply_rows(op, probes, probe_batch_size)))


@functools.partial(jax.jit, static_argnames=("num_matvecs", "method", "probe_batch_size"))
def _trace(op, key, *, num_matvecs, method, probe_batch_size):
    op = op.prepared()
    n, dtype = op.size, op.dtype
    if method == "hutchinson":
        z = rademacher(key, (num_matvecs, n), dtype)
        value, error = _monte_carlo(op, z, _trace_sample, probe_batch_size)
        return TraceResult(value, error, jnp.asarray(num_matvecs))
    sketch = num_matvecs // 3
    key_s, key_g = jax.random.split(key)
    s = rademacher(key_s, (sketch, n), dtype)
    q, _ = jnp.linalg.qr(apply_rows(op, s, probe_batch_size).T)  # (n, sketch)
    exact = jnp.sum(q.T * apply_rows(op, q.T, probe_batch_size))
    g = rademacher(key_g, (num_matvecs - 2 * sketch, n), dtype)
    g = g - (g @ q) @ q.T
    value, error = _monte_carlo(op, g, _trace_sample, probe_batch_size)
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
      probe_batch_size: vmap this many probes at once (more memory, shared forward passes).
    """
    check_key(key)
    require_square(op, "trace")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    minimum = 4 if method == "hutch++" else 2
    num_matvecs = positive_int(num_matvecs, "num_matvecs")
    probe_batch_size = _batch(probe_batch_size)
    if num_matvecs < minimum:
        raise ValueError(
            f"{method} needs num_matvecs >= {minimum} for a standard error, got {num_matvecs!r}"
        )
    if method == "hutch++" and num_matvecs // 3 > op.size:
        raise ValueError(f"hutch++ sketch of {num_matvecs // 3} exceeds the dimension n={op.size}")
    result = _trace(
        op, key, num_matvecs=num_matvecs, method=method, probe_batch_size=probe_batch_size
    )
    check_finite_result(result.value, "trace")
    return result


@functools.partial(jax.jit, static_argnames=("num_matvecs", "probe_batch_size"))
def _diagonal(op, key, *, num_matvecs, probe_batch_size):
    op = op.prepared()
    z = rademacher(key, (num_matvecs, op.size), op.dtype)
    d, error = _monte_carlo(op, z, _diagonal_sample, probe_batch_size)
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
    probe_batch_size = _batch(probe_batch_size)
    if num_matvecs < 2:
        raise ValueError(f"diagonal needs num_matvecs >= 2 for a standard error, got {num_matvecs}")
    result = _diagonal(op, key, num_matvecs=num_matvecs, probe_batch_size=probe_batch_size)
    check_finite_result(result.diagonal, "diagonal")
    return result


@jax.jit
def _fast_exact_diagonal(op):
    d = op.fn.exact_diagonal(op.operands)
    return DiagonalResult(d, jnp.zeros_like(d), jnp.asarray(0))


@functools.partial(jax.jit, static_argnames=("block",))
def _exact_diagonal(op, *, block):
    # Unit vectors in blocks: e_j^T A e_j for j in the block, through lax.map over the blocks.
    op = op.prepared()
    n = op.size
    starts = jnp.arange(0, n, block)

    def one(start):
        idx = start + jnp.arange(block)
        rows = jax.nn.one_hot(idx, n, dtype=op.dtype)  # past the end: a zero row, dropped below
        products = jax.vmap(op.apply)(rows)
        return jnp.sum(rows * products, axis=1)

    d = jax.lax.map(one, starts).reshape(-1)[:n]
    return DiagonalResult(d, jnp.zeros_like(d), jnp.asarray(n))


@functools.partial(jax.jit, static_argnames=("num_matvecs", "probe_batch_size"))
def _frobenius(op, key, *, num_matvecs, probe_batch_size):
    op = op.prepared()
    z = rademacher(key, (num_matvecs, op.shape[1]), op.dtype)
    value, error = _monte_carlo(op, z, _norm_sample, probe_batch_size)
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
    probe_batch_size = _batch(probe_batch_size)
    if num_matvecs < 2:
        raise ValueError(f"num_matvecs must be >= 2 for a standard error, got {num_matvecs!r}")
    result = _frobenius(op, key, num_matvecs=num_matvecs, probe_batch_size=probe_batch_size)
    check_finite_result(result.value, "frobenius_norm_squared")
    return result

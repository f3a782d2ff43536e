"""Convolutions that stay fast inside compiled loops on the CPU backend.

XLA:CPU runs a convolution with its fast multithreaded (Eigen) kernel only in one layout: input
``(N, spatial..., C)``, kernel ``(spatial..., I, O)``, output ``(N, spatial..., C)``. Its
``ConvCanonicalization`` pass puts other convolutions into that layout with transposes, but it
visits only the entry computation, never a ``while`` body. The backward convolutions of a
Hessian-vector product (weight gradient ``f01b_i01o->01bf``, input gradient ``b01f_01oi->b01f``)
inside the Lanczos, Hutchinson or chunking loops therefore fall back to a naive emitted loop,
about 20x slower (measured: a small CNN's matvec 26 ms alone, 430-535 ms inside ``eigsh``,
``lanczos`` and ``trace``; ``benchmarks/bench_cnn_loops.py``).

:func:`canonical_convs` wraps a matvec so that, at trace time, its jaxpr is
re-emitted with every ``conv_general_dilated`` already in that layout (the same transposes XLA
would add at the top level), recursing into nested jaxprs (``scan``, ``cond``, ``while``,
``custom_jvp``, ``jit``). The numbers are unchanged; the builders set the flag on the CPU backend
for operators whose function contains a convolution, and their products (also the prepared ones)
go through :func:`rewritten_if`. GPU and TPU compilers choose convolution layouts
themselves and are left alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

# The benchmark turns this off to measure the loops without the rewrite.
enabled = True


def _canonical_conv(lhs, rhs, *, dimension_numbers, **params):
    """``conv_general_dilated`` as transpose -> (N, spatial..., C) x (spatial..., I, O) conv ->
    transpose back: the form XLA:CPU runs with Eigen."""
    lhs_spec, rhs_spec, out_spec = (tuple(s) for s in dimension_numbers)
    nd = lhs.ndim
    spatial = tuple(range(1, nd - 1))
    canon = lax.ConvDimensionNumbers(
        (0, nd - 1, *spatial), (nd - 1, nd - 2, *range(nd - 2)), (0, nd - 1, *spatial)
    )
    if (lhs_spec, rhs_spec, out_spec) == tuple(tuple(s) for s in canon):
        return lax.conv_general_dilated_p.bind(
            lhs, rhs, dimension_numbers=dimension_numbers, **params
        )
    lhs = jnp.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    rhs = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    out = lax.conv_general_dilated_p.bind(lhs, rhs, dimension_numbers=canon, **params)
    source = (out_spec[0], *out_spec[2:], out_spec[1])  # original axis of each canonical axis
    return jnp.transpose(out, np.argsort(source))


def _subjaxprs(value):
    for v in value if isinstance(value, tuple | list) else (value,):
        if isinstance(v, jcore.ClosedJaxpr):
            yield v.jaxpr
        elif isinstance(v, jcore.Jaxpr):
            yield v


def _has_conv(jaxpr) -> bool:
    return any(
        eqn.primitive is lax.conv_general_dilated_p
        or any(_has_conv(j) for p in eqn.params.values() for j in _subjaxprs(p))
        for eqn in jaxpr.eqns
    )


def _rewrite_param(value):
    if isinstance(value, tuple) and value and all(isinstance(v, jcore.ClosedJaxpr) for v in value):
        return tuple(_rewrite_param(v) for v in value)
    if not isinstance(value, jcore.ClosedJaxpr) or not _has_conv(value.jaxpr):
        return value
    avals = [v.aval for v in value.jaxpr.invars]
    return jax.make_jaxpr(lambda *a: _eval(value.jaxpr, value.consts, *a))(*avals)


def _eval(jaxpr, consts, *args):
    env = {}

    def read(a):
        return a.val if isinstance(a, jcore.Literal) else env[a]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        ins = [read(a) for a in eqn.invars]
        if eqn.primitive is lax.conv_general_dilated_p:
            outs = [_canonical_conv(*ins, **eqn.params)]
        elif eqn.primitive.name in ("pjit", "jit", "closed_call"):
            inner = eqn.params["jaxpr"]
            outs = _eval(inner.jaxpr, inner.consts, *ins)
        else:
            params = {k: _rewrite_param(v) for k, v in eqn.params.items()}
            outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(a) for a in jaxpr.outvars]


def canonical_convs(f: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """``f`` with every convolution in canonical form; ``f`` itself when it has none."""

    def g(v):
        closed = jax.make_jaxpr(f)(v)
        if not _has_conv(closed.jaxpr):
            return f(v)
        (out,) = _eval(closed.jaxpr, closed.consts, v)
        return out

    return g


def needs_rewrite(fn: Callable, *args) -> bool:
    """Host-side, at build time: the CPU backend, and ``fn(*args)`` contains a convolution."""
    if not enabled or jax.default_backend() != "cpu":
        return False
    return _has_conv(jax.make_jaxpr(fn)(*args).jaxpr)


_WARNED = []


def _rewritten(f: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """:func:`canonical_convs` with a fallback: on any failure of the rewrite (a primitive it does
    not know how to re-emit), ``f`` itself, correct but slow in loops, with one warning."""
    fast = canonical_convs(f)

    def g(v):
        try:
            return fast(v)
        except Exception as err:  # noqa: BLE001 - any failure falls back to the plain matvec
            if not _WARNED:
                _WARNED.append(err)
                warnings.warn(
                    f"curvature: the CPU convolution rewrite failed ({type(err).__name__}: {err}); "
                    "using the plain matvec, which is slower inside loops on CPU",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return f(v)

    return g


def rewritten_if(needed: bool, f: Callable[[jax.Array], jax.Array]):
    """``f`` with its convolutions in XLA:CPU's fast layout when ``needed`` (an operator's static
    flag, set by the builders from :func:`needs_rewrite`), else ``f`` itself."""
    return _rewritten(f) if needed else f

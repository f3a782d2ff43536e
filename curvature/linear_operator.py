"""The operator: a matrix applied, never formed, with its flat-vector layout and its algebra.

An operator is a :class:`LinearOperator`: a symmetric ``n x n`` matrix that is never formed, only
applied (``op @ v``). It is a pytree whose leaves are the arrays it closes over (parameters, data,
the arrays a loss captures) and whose static part is the matvec function, so a jit-compiled
algorithm that takes an operator compiles once per (function, shapes) and is reused for new
parameters along training.

* :class:`Layout`: how a parameter pytree maps to a flat vector.
* ``op1 - op2``, ``c * op``: linear combinations, e.g. the residual ``H - G``.
* :func:`from_matrix`: a dense matrix as an operator (tests, small problems); :func:`dense` the
  other way.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from curvature._checks import check_float_params
from curvature._driving import host_driven

__all__ = ["Layout", "LinearOperator", "apply_rows", "dense", "from_matrix"]

PyTree = Any

# --------------------------------------------------------------------------------------------
# Flat vectors <-> parameter pytrees.


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a parameter pytree maps to a flat vector. Static and hashable (part of jit keys)."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]

    @classmethod
    def of(cls, tree: PyTree) -> Layout:
        check_float_params(tree)
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        shapes = tuple(tuple(np.shape(x)) for x in leaves)
        dtypes = tuple(np.dtype(jnp.result_type(x)) for x in leaves)
        return cls(treedef, shapes, dtypes)

    @property
    def dtype(self) -> np.dtype:
        """The flat vectors' dtype: the parameters' common dtype, at least float32, so that
        Krylov vectors, eigh and QR never run in bfloat16 or float16."""
        return np.dtype(np.promote_types(jnp.result_type(*self.dtypes), np.float32))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def ravel(self, tree: PyTree) -> jax.Array:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        if treedef != self.treedef:
            raise ValueError(
                f"pytree structure {treedef} does not match the parameters' {self.treedef}"
            )
        for leaf, shape in zip(leaves, self.shapes, strict=True):
            if tuple(jnp.shape(leaf)) != shape:
                raise ValueError(
                    f"leaf of shape {jnp.shape(leaf)} where the parameters have {shape}"
                )
        return jnp.concatenate([jnp.ravel(x).astype(self.dtype) for x in leaves])

    def unravel(self, vector: jax.Array) -> PyTree:
        vector = jnp.asarray(vector)
        if vector.shape != (self.size,):
            raise ValueError(f"expected a flat vector of shape ({self.size},), got {vector.shape}")
        splits = np.cumsum(self.sizes)[:-1].tolist()
        parts = jnp.split(vector, splits) if splits else [vector]
        leaves = [
            p.reshape(s).astype(d) for p, s, d in zip(parts, self.shapes, self.dtypes, strict=True)
        ]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


# --------------------------------------------------------------------------------------------
# The operator.


@jax.tree_util.register_pytree_node_class
class LinearOperator:
    """A symmetric linear operator on flat vectors of length ``n``, applied matrix-free.

    ``fn(operands, v) -> A v`` is a static, hashable function; ``operands`` is a pytree of arrays.
    Use ``op @ v`` (a vector ``(n,)`` or a matrix ``(n, k)`` of columns), ``op.matvec(v)``,
    ``op.ravel(tree)`` / ``op.unravel(v)`` between flat vectors and parameter pytrees, and
    ``op1 + op2``, ``op1 - op2``, ``c * op``, ``-op``.
    """

    def __init__(
        self, fn: Callable[[PyTree, jax.Array], jax.Array], operands: PyTree, layout: Layout
    ):
        self.fn = fn
        self.operands = operands
        self.layout = layout

    # pytree protocol: arrays are children, the function and layout are static.
    def tree_flatten(self):
        return (self.operands,), (self.fn, self.layout)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(aux[0], children[0], aux[1])

    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    @property
    def dtype(self) -> np.dtype:
        return self.layout.dtype

    def ravel(self, tree: PyTree) -> jax.Array:
        """A parameter-shaped pytree as a flat vector of length ``n``."""
        return self.layout.ravel(tree)

    def unravel(self, vector: jax.Array) -> PyTree:
        """A flat vector of length ``n`` as a pytree shaped like the parameters."""
        return self.layout.unravel(vector)

    def apply(self, v: jax.Array) -> jax.Array:
        """``A v`` without a jit boundary: for use inside compiled code."""
        return self.fn(self.operands, v.astype(self.dtype))

    def apply_rows(self, rows: jax.Array) -> jax.Array:
        """``A`` applied to every row of ``rows`` (``(k, n)``) without a jit boundary: vmapped,
        or one pass over the data for a streamed operator (:mod:`curvature.streaming`)."""
        rows = rows.astype(self.dtype)
        hook = getattr(self.fn, "apply_rows", None)
        if hook is not None:
            return hook(self.operands, rows)
        return jax.vmap(self.apply)(rows)

    @property
    def streamed(self) -> bool:
        """Whether the data come from a loader: estimators then drive the matvecs from the host
        (:mod:`curvature.streaming`)."""
        return bool(getattr(self.fn, "streamed", False))

    def prepared(self) -> LinearOperator:
        """Before many matvecs at one point: the same operator, with the work that does not
        depend on ``v`` done once.

        For a Hessian or Gauss-Newton operator whose data are one chunk (``batch_size=None``),
        the forward pass and the linearisation at the parameters (``jax.linearize``) are
        computed here and kept, so each matvec runs only the tangent (linear) part: the same
        numbers, about 15-40% less work per matvec, at the memory of one forward pass's
        activations. Chunked operators (and others) return themselves. Every estimator calls
        it once at the top of its compiled program.

        Outside compiled code it returns an operator that holds that work as arrays (the
        pullback of the gradient, ``H v = (v^T H)^T``; for the Gauss-Newton matrix the model's
        pullback): ``Hp = H.prepared()`` once, then ``Hp @ v`` for many ``v`` costs about 1.5
        gradients instead of 1.8 (``benchmarks/bench_core.py``), at the memory of a backward
        pass's residuals, held until ``Hp`` is dropped. Take it again after the parameters change.
        """
        if self.streamed:  # a pass over the data per matvec: nothing to keep
            return self
        if not _traced(self.operands):  # never a closure over concrete arrays (constants)
            if getattr(type(self.fn), "pulled", None) is None:
                return self
            pulled = _pull(self)  # None for a chunked operator
            return self if pulled is None else pulled
        prepare = getattr(self.fn, "prepare", None)
        linear = prepare(self.operands) if prepare is not None else None
        if linear is None:
            return self
        return LinearOperator(_Prepared(linear), (), self.layout)

    def matvec(self, v: jax.Array) -> jax.Array:
        """``A v`` for a flat vector ``v`` of shape ``(n,)`` (jit-compiled, cached)."""
        v = jnp.asarray(v)
        if v.shape != (self.size,):
            raise ValueError(f"matvec expects a vector of shape ({self.size},), got {v.shape}")
        return _matvec(self, v)

    def __matmul__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim == 1:
            return self.matvec(x)
        if x.ndim == 2 and x.shape[0] == self.size:
            return _matmat(self, x)
        raise ValueError(
            f"op @ x needs x of shape ({self.size},) or ({self.size}, k); got {x.shape}"
        )

    def _combine(self, other: LinearOperator, sign: float) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        if other.layout != self.layout:
            raise ValueError("cannot combine operators on different parameter layouts")
        ones = jnp.ones((), self.dtype)
        return LinearOperator(
            _Combination((self.fn, other.fn)),
            ((ones, self.operands), (sign * ones, other.operands)),
            self.layout,
        )

    def __add__(self, other):
        return self._combine(other, 1.0)

    def __sub__(self, other):
        return self._combine(other, -1.0)

    def __mul__(self, c):
        if isinstance(c, LinearOperator):
            return NotImplemented
        c = jnp.asarray(c, self.dtype)
        if c.shape != ():
            raise ValueError(f"an operator can only be scaled by a scalar, got shape {c.shape}")
        return LinearOperator(_Combination((self.fn,)), ((c, self.operands),), self.layout)

    __rmul__ = __mul__

    def __neg__(self):
        return -1.0 * self

    def __repr__(self):
        name = getattr(self.fn, "name", type(self.fn).__name__)
        return f"LinearOperator({name}, n={self.size}, dtype={self.dtype})"


def _traced(tree) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


@jax.jit
def _pull(op: LinearOperator) -> LinearOperator:
    return op.fn.pulled(op.operands)


@host_driven
@jax.jit
def _matvec(op: LinearOperator, v: jax.Array) -> jax.Array:
    return op.apply(v)


@host_driven
@jax.jit
def _matmat(op: LinearOperator, x: jax.Array) -> jax.Array:
    # One linearisation shared by every column (prepared), then the columns' tangent passes.
    return op.prepared().apply_rows(x.T).T


def apply_rows(op: LinearOperator, rows: jax.Array, batch_size: int | None = None) -> jax.Array:
    """``A`` applied to each row of ``rows`` (shape ``(k, n)``), inside compiled code.

    Rows go through ``lax.map`` in groups of ``batch_size`` (vmapped within a group): vmapping
    shares the forward pass of all tangents in a group, at the price of group-sized activations.
    A streamed operator takes each group in one pass over the data.
    """
    if op.streamed:
        if batch_size is None or batch_size >= rows.shape[0]:
            return op.apply_rows(rows)
        groups = [
            op.apply_rows(rows[i : i + batch_size]) for i in range(0, rows.shape[0], batch_size)
        ]
        return jnp.concatenate(groups)
    if batch_size is None or batch_size <= 1:
        return jax.lax.map(op.apply, rows)
    return jax.lax.map(op.apply, rows, batch_size=batch_size)


@dataclasses.dataclass(frozen=True)
class _Combination:
    fns: tuple[Callable, ...]
    name = "combination"

    def __call__(self, operands, v):
        out = None
        for fn, (c, ops) in zip(self.fns, operands, strict=True):
            term = c * fn(ops, v)
            out = term if out is None else out + term
        return out

    def prepare(self, operands):
        parts = []
        for fn, (c, ops) in zip(self.fns, operands, strict=True):
            prepare = getattr(fn, "prepare", None)
            linear = prepare(ops) if prepare is not None else None
            parts.append((c, linear if linear is not None else functools.partial(fn, ops)))

        def combined(v):
            out = None
            for c, linear in parts:
                term = c * linear(v)
                out = term if out is None else out + term
            return out

        return combined

    @property
    def streamed(self) -> bool:
        return any(getattr(fn, "streamed", False) for fn in self.fns)

    def apply_rows(self, operands, rows):
        out = None
        for fn, (c, ops) in zip(self.fns, operands, strict=True):
            hook = getattr(fn, "apply_rows", None)
            products = hook(ops, rows) if hook else jax.vmap(functools.partial(fn, ops))(rows)
            out = c * products if out is None else out + c * products
        return out


class _Prepared:
    """The matvec of :meth:`LinearOperator.prepared`: a closure over traced values, used only
    inside the compiled program that made it."""

    name = "prepared"

    def __init__(self, linear: Callable[[jax.Array], jax.Array]):
        self.linear = linear

    def __call__(self, operands, v):
        return self.linear(v)


@dataclasses.dataclass(frozen=True)
class _MatrixMatvec:
    name = "matrix"

    def __call__(self, matrix, v):
        return matrix @ v


def from_matrix(matrix: jax.Array) -> LinearOperator:
    """A symmetric ``(n, n)`` matrix as a :class:`LinearOperator` (flat vectors of length ``n``)."""
    matrix = jnp.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"from_matrix needs a square matrix, got shape {matrix.shape}")
    if jnp.issubdtype(matrix.dtype, jnp.complexfloating):
        raise TypeError("from_matrix needs a real symmetric matrix; got a complex one")
    if not jnp.issubdtype(matrix.dtype, jnp.floating):
        matrix = matrix.astype(jnp.result_type(float))
    if not isinstance(matrix, jax.core.Tracer):
        host = np.asarray(matrix, np.float64)
        asym = np.abs(host - host.T).max(initial=0.0)
        scale = np.abs(host).max(initial=0.0)
        if asym > np.sqrt(np.finfo(matrix.dtype).eps) * scale:
            raise ValueError(
                f"from_matrix needs a symmetric matrix; max |A - A^T| = {asym:.3g} "
                f"against max |A| = {scale:.3g}"
            )
    layout = Layout(
        jax.tree_util.tree_structure(0), ((matrix.shape[0],),), (np.dtype(matrix.dtype),)
    )
    return LinearOperator(_MatrixMatvec(), matrix, layout)


def dense(op: LinearOperator, *, max_size: int = 20_000) -> jax.Array:
    """Materialise ``op`` as an ``(n, n)`` array with ``n`` matvecs (columns ``A e_i``).

    Meant for small models: tests, and a user's own check against :func:`jax.hessian`.
    """
    m, k = op.shape
    if max(m, k) > max_size:
        raise ValueError(f"dense() would build a {m} x {k} matrix; raise max_size if you mean it")
    return _dense(op)


@host_driven
@jax.jit
def _dense(op):
    # Rows A e_i in groups of 64 tangents: bounded memory for the model's activations.
    op = op.prepared()
    n = op.shape[1]
    block = min(64, n)
    groups = -(-n // block)
    eye = jnp.eye(groups * block, n, dtype=op.dtype).reshape(groups, block, n)  # zero rows past n
    rows = jax.lax.map(op.apply_rows, eye).reshape(groups * block, -1)[:n]
    return rows.T

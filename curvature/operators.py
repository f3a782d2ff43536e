"""Matrix-free curvature operators on flat parameter vectors.

An operator is a :class:`LinearOperator`: a symmetric ``n x n`` matrix that is never formed, only
applied (``op @ v``). It is a pytree whose leaves are the arrays it closes over (parameters, data)
and whose static part is the matvec function, so a jit-compiled algorithm that takes an operator
compiles once per (function, shapes) and is reused for new parameters along training.

Builders:

* :func:`hessian`: the Hessian of the dataset-mean loss,
  $H v = \\partial_\\epsilon \\nabla L(\\theta + \\epsilon v)|_{\\epsilon=0}$ (forward-over-reverse).
* :func:`gauss_newton`: the generalised Gauss-Newton $G = \\sum_b w_b J_b^T H^{out}_b J_b$
  (Schraudolph 2002; Martens 2014).
* :func:`from_matrix`: a dense matrix as an operator (tests, small problems).
* ``op1 - op2``, ``c * op``: linear combinations, e.g. the residual ``H - G``.

Normalisation: with ``n`` examples split into batches of sizes ``b_1, ..., b_m`` (the last one may be
shorter), the operator is $\\sum_j (b_j / n) \\nabla^2 \\ell_j$ where $\\ell_j$ is the user's loss on
batch ``j`` (a batch *mean*). This is exactly the Hessian of the mean loss over all ``n`` examples,
whatever ``batch_size`` is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Layout",
    "LinearOperator",
    "dense",
    "from_matrix",
    "gauss_newton",
    "hessian",
]

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
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        if not leaves:
            raise ValueError("params has no array leaves: there is nothing to differentiate.")
        shapes = tuple(tuple(np.shape(x)) for x in leaves)
        dtypes = tuple(np.dtype(jnp.result_type(x)) for x in leaves)
        for (path, _), dt in zip(
            jax.tree_util.tree_flatten_with_path(tree)[0], dtypes, strict=True
        ):
            if not jnp.issubdtype(dt, jnp.floating):
                raise TypeError(
                    f"params leaf {jax.tree_util.keystr(path)} has dtype {dt}; curvature needs "
                    "floating-point parameters."
                )
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

    def prepared(self) -> LinearOperator:
        """Inside compiled code, before a loop of matvecs: the same operator, with the work that
        does not depend on ``v`` done once.

        For a Hessian or Gauss-Newton operator whose data are one chunk (``batch_size=None``),
        the forward pass and the linearisation at the parameters (``jax.linearize``) are
        computed here and kept, so each matvec runs only the tangent (linear) part: the same
        numbers, about 15-40% less work per matvec, at the memory of one forward pass's
        activations. Chunked operators (and others) return themselves. Every estimator calls
        it once at the top of its compiled program.
        """
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


@jax.jit
def _matvec(op: LinearOperator, v: jax.Array) -> jax.Array:
    return op.apply(v)


@jax.jit
def _matmat(op: LinearOperator, x: jax.Array) -> jax.Array:
    return jax.vmap(op.apply, in_axes=1, out_axes=1)(x)


def require_square(op: LinearOperator, what: str) -> None:
    """A clear error for an off-diagonal block given to an estimator that needs a square,
    symmetric operator."""
    m, k = op.shape
    if m != k:
        raise ValueError(
            f"{what} needs a square, symmetric operator; this is an off-diagonal block of shape "
            f"({m}, {k}) from restrict(op, rows, cols): use restrict(op, rows) for a diagonal "
            "block, or frobenius_norm_squared / dense / @ for this one"
        )


def apply_rows(op: LinearOperator, rows: jax.Array, batch_size: int | None = None) -> jax.Array:
    """``A`` applied to each row of ``rows`` (shape ``(k, n)``), inside compiled code.

    Rows go through ``lax.map`` in groups of ``batch_size`` (vmapped within a group): vmapping
    shares the forward pass of all tangents in a group, at the price of group-sized activations.
    """
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


@jax.jit
def _dense(op):
    # Rows A e_i in groups of 64 tangents: bounded memory for the model's activations.
    rows = jax.lax.map(op.apply, jnp.eye(op.shape[1], dtype=op.dtype), batch_size=64)
    return rows.T


# --------------------------------------------------------------------------------------------
# Data: a pytree of arrays with a leading example axis, cut into equal chunks plus a remainder.


def _num_examples(data: PyTree) -> int:
    leaves = jax.tree_util.tree_flatten_with_path(data)[0]
    if not leaves:
        raise ValueError("data has no array leaves")
    sizes = {}
    for path, x in leaves:
        if np.ndim(x) == 0:
            raise ValueError(
                f"data leaf {jax.tree_util.keystr(path) or '<root>'} is a scalar; every data leaf "
                "needs a leading axis that indexes examples"
            )
        sizes[jax.tree_util.keystr(path) or "<root>"] = np.shape(x)[0]
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(f"data leaves have different leading (example) sizes: {listing}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError("data has zero examples")
    return n


def positive_int(value, name: str) -> int:
    """``value`` as a Python int if it is a positive integer (numpy integers too), else an error."""
    try:
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if out < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return out


@dataclasses.dataclass(frozen=True)
class Batching:
    """Static chunking of ``num_examples`` into ``m`` chunks of ``batch_size`` plus a remainder.

    Chunks are cut inside the compiled matvec with ``dynamic_slice``: the data are stored once,
    never copied into a chunked layout.
    """

    num_examples: int
    batch_size: int

    @classmethod
    def of(cls, data: PyTree, batch_size: int | None) -> Batching:
        n = _num_examples(data)
        if batch_size is not None:
            batch_size = positive_int(batch_size, "batch_size")
        return cls(n, n if batch_size is None else min(batch_size, n))

    def first(self, data: PyTree) -> PyTree:
        return jax.tree_util.tree_map(lambda x: x[: self.batch_size], data)

    @property
    def single_chunk(self) -> bool:
        return self.batch_size == self.num_examples


def data_mean(f: Callable[[PyTree], PyTree], data: PyTree, batching: Batching) -> PyTree:
    """``sum_j (b_j / n) f(batch_j)``: the example-weighted mean of per-batch means.

    Full chunks are scanned (one compiled body whatever their number); a shorter last chunk is
    one more call with its own static shape.
    """
    n, b = batching.num_examples, batching.batch_size
    m, r = divmod(n, b)
    if m == 1 and r == 0:
        return f(data)
    total = None
    if m == 1:
        total = f(batching.first(data))
    elif m > 1:
        zeros = jax.tree_util.tree_map(
            lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(f, batching.first(data))
        )

        def body(acc, i):
            batch = jax.tree_util.tree_map(
                lambda x: jax.lax.dynamic_slice_in_dim(x, i * b, b), data
            )
            return jax.tree_util.tree_map(jnp.add, acc, f(batch)), None

        total, _ = jax.lax.scan(body, zeros, jnp.arange(m))
    total = jax.tree_util.tree_map(lambda t: t * (b / n), total)
    if r:
        rest = f(jax.tree_util.tree_map(lambda x: x[m * b :], data))
        total = jax.tree_util.tree_map(lambda t, y: t + y * (r / n), total, rest)
    return total


# --------------------------------------------------------------------------------------------
# Input checks (host-side, at construction; skipped for traced values).


def _is_traced(tree) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


@jax.jit
def _leaves_finite(params):
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(params)])


def _check_finite_params(params: PyTree) -> None:
    if _is_traced(params) or bool(np.all(_leaves_finite(params))):  # one device sync
        return
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        arr = np.asarray(x)
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise ValueError(
                f"params leaf {jax.tree_util.keystr(path) or '<root>'} has {bad} non-finite "
                f"value(s) (NaN or inf) out of {arr.size}"
            )


def _check_scalar(fn: Callable, args: tuple, what: str) -> None:
    out = jax.eval_shape(fn, *args)
    shape = getattr(out, "shape", None)
    if shape != ():
        raise ValueError(
            f"{what} must return a scalar (the mean over its batch); it returned "
            f"{'shape ' + str(shape) if shape is not None else type(out).__name__}"
        )


def _check_finite_value(value: jax.Array, what: str) -> None:
    if isinstance(value, jax.core.Tracer):
        return
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{what} is not finite at the given parameters: {v}")


# --------------------------------------------------------------------------------------------
# Hessian.


@dataclasses.dataclass(frozen=True)
class _HessianMatvec:
    loss: Callable
    layout: Layout
    batching: Batching
    name = "hessian"

    def __call__(self, operands, v):
        params = operands["params"]
        tangent = self.layout.unravel(v)
        grad = jax.grad(self.loss)

        def hvp(batch):
            # Raveled per chunk, so chunks accumulate in the operator's dtype (>= float32).
            return self.layout.ravel(jax.jvp(lambda p: grad(p, batch), (params,), (tangent,))[1])

        return data_mean(hvp, operands["data"], self.batching)

    def prepare(self, operands):
        if not self.batching.single_chunk:
            return None
        params, data = operands["params"], operands["data"]
        _, tangent_of = jax.linearize(lambda p: jax.grad(self.loss)(p, data), params)
        return lambda v: self.layout.ravel(tangent_of(self.layout.unravel(v)))


def _at_least_float32(x):
    # Sum chunk losses in float32 or wider: never in bfloat16, never downcast from float64.
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _mean_loss(loss, params, data, batching):
    return data_mean(lambda batch: _at_least_float32(loss(params, batch)), data, batching)


def hessian(
    loss: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    data: PyTree,
    *,
    batch_size: int | None = None,
    check: bool = True,
) -> LinearOperator:
    """The Hessian of the dataset-mean loss, as a matrix-free operator on flat vectors.

    Args:
      loss: ``loss(params, batch) -> scalar``, the *mean* loss over the examples of ``batch``.
      params: a pytree of floating-point arrays; its raveled length is ``n`` and its dtype is the
        operator's (float32 params give a float32 operator; float64 under ``jax.enable_x64``).
      data: a pytree of arrays whose leading axis indexes the same examples in every leaf.
      batch_size: examples per chunk; chunks are scanned inside the compiled matvec and the last,
        shorter chunk is weighted by its size, so the operator is the Hessian of the mean over all
        examples whatever ``batch_size`` is. ``None`` uses all data at once.
      check: verify, once on the host, that the parameters and the loss are finite and that the
        loss is a scalar. Skipped automatically under tracing.

    Cost: one matvec is a forward-over-reverse product (``jax.jvp`` of ``jax.grad``), about two
    gradient evaluations on the whole data set.

    Example:
      >>> import jax.numpy as jnp, curvature
      >>> loss = lambda w, batch: jnp.mean((batch["x"] @ w) ** 2)
      >>> data = {"x": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
      >>> op = curvature.hessian(loss, jnp.ones(2), data)
      >>> curvature.dense(op)  # 2/2 * x^T x
      Array([[1., 0.],
             [0., 4.]], dtype=float32)
    """
    return loss_operator(_HessianMatvec, loss, params, data, batch_size=batch_size, check=check)


def loss_operator(matvec_type, loss, params, data, *, batch_size, check) -> LinearOperator:
    """An operator ``matvec_type(loss, layout, batching)`` of a batch-mean ``loss``: the checks
    and the chunking shared by :func:`hessian` and :func:`curvature.empirical_fisher`."""
    layout = Layout.of(params)
    batching = Batching.of(data, batch_size)
    data = jax.tree_util.tree_map(jnp.asarray, data)
    if check:
        _check_finite_params(params)
        _check_scalar(loss, (params, batching.first(data)), "loss(params, batch)")
        if not _is_traced(data):
            _check_finite_value(_mean_loss(loss, params, data, batching), "the mean loss")
    matvec = matvec_type(loss, layout, batching)
    return LinearOperator(matvec, {"params": params, "data": data}, layout)


# --------------------------------------------------------------------------------------------
# Generalised Gauss-Newton.

_TARGET_KEYS = ("y", "label", "labels", "target", "targets")


def _targets(batch):
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[1]
    if isinstance(batch, Mapping):
        for key in _TARGET_KEYS:
            if key in batch:
                return batch[key]
    raise TypeError(
        "a named output loss needs targets: pass batches as (inputs, targets) pairs or mappings "
        f"with one of the keys {_TARGET_KEYS}, or pass loss as a function loss(outputs, batch)"
    )


def _mse_targets(out, batch):
    # Shape checks run at trace time (static shapes), so they hold with check=False too.
    y = _targets(batch)
    if y.shape != out.shape:
        raise ValueError(
            f"mse: targets of shape {y.shape} do not match outputs of shape {out.shape}"
        )
    return y


def _mse_value(out, batch):
    y = _mse_targets(out, batch)
    return 0.5 * jnp.mean(jnp.sum(((out - y) ** 2).reshape(out.shape[0], -1), axis=1))


def _mse_hvp(out, u, batch):
    _mse_targets(out, batch)
    return u / out.shape[0]


def _ce_labels(out, batch):
    y = _targets(batch)
    if out.ndim != 2 or y.shape != out.shape[:1] or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(
            "cross_entropy needs logits of shape (batch, classes) and integer labels of shape "
            f"(batch,); got logits {out.shape} and labels {y.shape} of dtype {y.dtype}"
        )
    return y


def _ce_value(out, batch):
    y = _ce_labels(out, batch)
    logz = jax.nn.logsumexp(out, axis=-1)
    return jnp.mean(logz - jnp.take_along_axis(out, y[:, None], axis=-1)[:, 0])


def _ce_hvp(out, u, batch):
    # Hessian of the mean softmax cross-entropy w.r.t. logits: (diag(p) - p p^T) / B per example.
    _ce_labels(out, batch)
    p = jax.nn.softmax(out, axis=-1)
    return (p * u - p * jnp.sum(p * u, axis=-1, keepdims=True)) / out.shape[0]


_NAMED_LOSSES = {"mse": (_mse_value, _mse_hvp), "cross_entropy": (_ce_value, _ce_hvp)}


@dataclasses.dataclass(frozen=True)
class _OutputLoss:
    """An output loss ``l(outputs, batch)``: its value and its Hessian-vector product in outputs."""

    fn: Callable | str

    def value(self, out, batch):
        if isinstance(self.fn, str):
            return _NAMED_LOSSES[self.fn][0](out, batch)
        return self.fn(out, batch)

    def hvp(self, out, u, batch):
        if isinstance(self.fn, str):
            return _NAMED_LOSSES[self.fn][1](out, u, batch)
        grad = jax.grad(self.fn)
        return jax.jvp(lambda o: grad(o, batch), (out,), (u,))[1]


@dataclasses.dataclass(frozen=True)
class _GaussNewtonMatvec:
    model: Callable
    loss: _OutputLoss
    layout: Layout
    batching: Batching
    name = "gauss_newton"

    def __call__(self, operands, v):
        params = operands["params"]
        tangent = self.layout.unravel(v)

        def ggn(batch):
            out, jvp = jax.linearize(lambda p: self.model(p, batch), params)
            (vjp_out,) = jax.linear_transpose(jvp, params)(self.loss.hvp(out, jvp(tangent), batch))
            return self.layout.ravel(vjp_out)

        return data_mean(ggn, operands["data"], self.batching)

    def exact_diagonal(self, operands):
        """``diag(G)`` from per-example Jacobians: ``diag(J_i^T H_i J_i)`` summed over the
        examples, with ``H_i`` the output loss's Hessian on example ``i`` (exact when the output
        loss is a mean of per-example terms, as the named losses are). Memory: a chunk's
        Jacobians, ``batch x outputs x n``."""
        params = operands["params"]

        def chunk(batch):
            size = jax.tree_util.tree_leaves(batch)[0].shape[0]

            def one(example):
                ex = jax.tree_util.tree_map(lambda x: x[None], example)
                out = self.model(params, ex)
                jac = jax.jacrev(lambda p: self.model(p, ex).reshape(-1))(params)
                jac = jax.vmap(self.layout.ravel)(jac)  # (outputs, n)
                hess = jax.hessian(lambda o: self.loss.value(o.reshape(out.shape), ex))(
                    out.reshape(-1)
                )
                return jnp.sum(jac * (hess @ jac), axis=0)

            return jnp.sum(jax.vmap(one)(batch), axis=0) / size

        return data_mean(chunk, operands["data"], self.batching)

    def prepare(self, operands):
        if not self.batching.single_chunk:
            return None
        params, data = operands["params"], operands["data"]
        out, jvp = jax.linearize(lambda p: self.model(p, data), params)
        transpose = jax.linear_transpose(jvp, params)

        def ggn(v):
            (vjp_out,) = transpose(self.loss.hvp(out, jvp(self.layout.unravel(v)), data))
            return self.layout.ravel(vjp_out)

        return ggn


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def _mean_output_loss(model, loss, params, data, batching):
    def value(batch):
        return _at_least_float32(loss.value(model(params, batch), batch))

    return data_mean(value, data, batching)


def gauss_newton(
    model: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    data: PyTree,
    *,
    loss: str | Callable[[jax.Array, PyTree], jax.Array],
    batch_size: int | None = None,
    check: bool = True,
) -> LinearOperator:
    """The generalised Gauss-Newton matrix $G = J^T (\\partial^2 \\ell / \\partial f^2) J$.

    ``J`` is the Jacobian of ``model(params, batch) -> outputs`` in the parameters and the middle
    factor is the Hessian of the output loss in the outputs, so ``G`` is the Hessian of the loss
    with the model linearised at ``params``: ``H = G + R`` where ``R`` collects the model's own
    second derivatives (zero for a linear model). ``G`` is positive semi-definite when the output
    loss is convex (both named losses).

    Args:
      model: ``model(params, batch) -> outputs`` with a leading batch axis.
      params, data, batch_size, check: as for :func:`hessian` (same normalisation: the operator
        is the GGN of the dataset-mean loss).
      loss: ``"mse"`` for ``0.5 * mean over examples of the squared error summed over outputs``;
        ``"cross_entropy"`` for softmax cross-entropy on logits ``(batch, classes)`` with integer
        labels ``(batch,)``. Named losses read targets from ``(inputs, targets)`` batches or
        mappings with a key ``y``/``label(s)``/``target(s)``. Or a function
        ``loss(outputs, batch) -> scalar`` (the batch mean), differentiated twice by JAX.

    Cost: one matvec is a linearisation, a JVP and its transpose: about a gradient and a half.
    """
    if isinstance(loss, str):
        if loss not in _NAMED_LOSSES:
            raise ValueError(
                f"unknown output loss {loss!r}; use one of {sorted(_NAMED_LOSSES)} or a function"
            )
    elif not callable(loss):
        raise TypeError(f"loss must be a name or a function loss(outputs, batch), got {loss!r}")
    out_loss = _OutputLoss(loss)
    layout = Layout.of(params)
    batching = Batching.of(data, batch_size)
    data = jax.tree_util.tree_map(jnp.asarray, data)
    if check:
        _check_finite_params(params)
        first = batching.first(data)
        _check_scalar(
            lambda p, b: out_loss.value(model(p, b), b), (params, first), "the output loss"
        )
        if not _is_traced(data):
            value = _mean_output_loss(model, out_loss, params, data, batching)
            _check_finite_value(value, "the mean loss")
    matvec = _GaussNewtonMatvec(model, out_loss, layout, batching)
    return LinearOperator(matvec, {"params": params, "data": data}, layout)

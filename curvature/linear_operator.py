"""The operator: a matrix applied, never formed, as a type with its capabilities.

:class:`LinearOperator` is the base class of every operator here. An operator is a pytree (a
frozen dataclass whose array fields are leaves and whose other fields are static), so a compiled
algorithm that takes one compiles once per (type, static fields, shapes) and is reused for new
parameters along training. What an operator can do is a method of the base class, with a
default; a type overrides what it does better:

* :meth:`~LinearOperator.apply` (required) and :meth:`~LinearOperator.apply_rows`: products
  inside compiled code; :meth:`~LinearOperator.host_apply_rows`: products from the host (a pass
  over the data for streamed operators, a compiled program otherwise).
* :meth:`~LinearOperator.prepared`: the work that does not depend on the vector, done once.
* :attr:`~LinearOperator.has_fast_diagonal` / :meth:`~LinearOperator.exact_diagonal`: an exact
  diagonal cheaper than ``n`` products.
* :attr:`~LinearOperator.streamed`: whether products are passes over a loader's batches.
* :attr:`~LinearOperator.layout` (and :attr:`~LinearOperator.in_layout`): how flat vectors map to
  parameter pytrees, so every operator knows its parameters' structure.

Kinds here: :class:`Combination` (``H - G``, ``c * A``), :class:`Matrix` (:func:`from_matrix`),
:class:`FunctionOperator` (:func:`from_function`, bring your own matvec), :class:`Linearized` (a
prepared operator inside compiled code). Elsewhere: the Hessian, Gauss-Newton and empirical
Fisher (:mod:`curvature.builders`, :mod:`curvature.fisher`), restricted blocks
(:mod:`curvature.blocks`), preconditioned operators (:mod:`curvature.preconditioning`) and
streamed ones (:mod:`curvature.streaming`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from curvature import _driver
from curvature._checks import check_float_params, check_product_input, is_traced
from curvature._closures import Closure, closure
from curvature._columns import unit_products
from curvature._driver import map_rows

__all__ = [
    "Combination",
    "Diagonal",
    "Family",
    "FunctionOperator",
    "Layout",
    "Linearized",
    "LinearOperator",
    "Matrix",
    "combine",
    "dense",
    "family",
    "recipe_atoms",
    "from_diagonal",
    "from_function",
    "from_matrix",
    "map_rows",
    "operator_type",
    "static",
]

PyTree = Any

# --------------------------------------------------------------------------------------------
# Flat vectors <-> parameter pytrees.


def _shape_dtype(x) -> tuple[tuple[int, ...], np.dtype]:
    if isinstance(x, jax.ShapeDtypeStruct):
        return tuple(x.shape), np.dtype(x.dtype)
    return tuple(np.shape(x)), np.dtype(jnp.result_type(x))


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a parameter pytree maps to a flat vector. Static and hashable (part of jit keys)."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]

    @classmethod
    def of(cls, tree: PyTree, what: str = "params") -> Layout:
        """The layout of a pytree of floating-point arrays (or ``jax.ShapeDtypeStruct``)."""
        check_float_params(tree, what)
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        shapes, dtypes = zip(*(_shape_dtype(x) for x in leaves), strict=True)
        return cls(treedef, tuple(shapes), tuple(dtypes))

    @property
    def dtype(self) -> np.dtype:
        """The flat vectors' dtype: the parameters' common dtype, at least float32, so that
        Krylov vectors, eigh and QR never run in bfloat16 or float16. Parameters built under
        ``jax.enable_x64(True)`` keep float64 here when 64-bit types are off (no JAX warning):
        products then refuse the operator with the reason."""
        if not jax.config.jax_enable_x64 and any(np.dtype(d).itemsize >= 8 for d in self.dtypes):
            return np.dtype(np.float64)
        return np.dtype(np.promote_types(jnp.result_type(*self.dtypes), np.float32))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def skeleton(self) -> PyTree:
        """A pytree shaped like the parameters with ``jax.ShapeDtypeStruct`` leaves: their
        structure, paths, shapes and dtypes, without values (what selectors look at)."""
        leaves = [jax.ShapeDtypeStruct(s, d) for s, d in zip(self.shapes, self.dtypes, strict=True)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

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
# Operator types as pytrees.


def static(**kwargs):
    """A dataclass field that is part of an operator's static structure (not a pytree leaf):
    compared by equality when compiled programs are looked up."""
    return dataclasses.field(metadata={"static": True}, **kwargs)


def operator_type(cls):
    """Make ``cls`` (a :class:`LinearOperator` subclass) a frozen dataclass registered as a
    pytree: fields declared with :func:`static` are its static part, the others its children."""
    cls = dataclasses.dataclass(frozen=True, eq=False, repr=False)(cls)
    fields = dataclasses.fields(cls)
    children = tuple(f.name for f in fields if not f.metadata.get("static"))
    statics = tuple(f.name for f in fields if f.metadata.get("static"))

    def flatten_with_keys(op):
        keyed = [(jax.tree_util.GetAttrKey(name), getattr(op, name)) for name in children]
        return keyed, tuple(getattr(op, name) for name in statics)

    def flatten(op):
        return [getattr(op, name) for name in children], tuple(getattr(op, n) for n in statics)

    def unflatten(aux, values):
        op = object.__new__(cls)
        for name, value in zip(children, values, strict=True):
            object.__setattr__(op, name, value)
        for name, value in zip(statics, aux, strict=True):
            object.__setattr__(op, name, value)
        return op

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls


class LinearOperator:
    """A linear operator on flat vectors, applied matrix-free: the base class of every operator.

    Use ``op @ v`` (a vector ``(n,)`` or a matrix ``(n, k)`` of columns), ``op.matvec(v)``,
    ``op.ravel(tree)`` / ``op.unravel(v)`` between flat vectors and parameter pytrees, and
    ``op1 + op2``, ``op1 - op2``, ``c * op``, ``-op``. Every estimator takes any subclass.

    A subclass is declared with :func:`operator_type` (a frozen dataclass whose array fields are
    pytree leaves and whose :func:`static` fields are static), has a ``layout`` (a field or a
    property) and implements :meth:`apply`; the other capabilities have defaults. To bring a
    matvec of your own, :func:`from_function` is simpler.

    ``LinearOperator(fn, operands, layout)`` (the low-level form of earlier versions) still
    builds an operator applying ``fn(operands, v)``: ``fn`` static and hashable, ``operands`` a
    pytree of arrays.
    """

    layout: Layout
    #: Whether products are passes over batches from a loader (driven from the host).
    streamed: ClassVar[bool] = False
    #: Whether :meth:`exact_diagonal` is cheaper than ``n`` products.
    has_fast_diagonal: ClassVar[bool] = False

    def __new__(cls, *args, **kwargs):
        if cls is LinearOperator:
            return object.__new__(_Raw)  # LinearOperator(fn, operands, layout)
        return object.__new__(cls)

    # -- what every operator has -------------------------------------------------------------

    @property
    def in_layout(self) -> Layout:
        """The layout of the vectors the operator takes (``layout`` for a square operator)."""
        return self.layout

    @property
    def shape(self) -> tuple[int, int]:
        return (self.layout.size, self.in_layout.size)

    @property
    def size(self) -> int:
        """``n``: the length of the vectors it takes."""
        return self.in_layout.size

    @property
    def dtype(self) -> np.dtype:
        return self.layout.dtype

    def ravel(self, tree: PyTree) -> jax.Array:
        """A parameter-shaped pytree as a flat vector of length ``n``."""
        return self.layout.ravel(tree)

    def unravel(self, vector: jax.Array) -> PyTree:
        """A flat vector of length ``n`` as a pytree shaped like the parameters."""
        return self.layout.unravel(vector)

    # -- capabilities, with defaults ---------------------------------------------------------

    def apply(self, v: jax.Array) -> jax.Array:
        """``A v`` inside compiled code (no jit boundary); ``v`` has shape ``(n,)``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement apply")

    def apply_rows(self, rows: jax.Array) -> jax.Array:
        """``A`` applied to every row of ``rows`` (``(k, n)``) inside compiled code: vmapped, so
        the rows share one forward pass."""
        return jax.vmap(self.apply)(rows.astype(self.dtype))

    def host_apply_rows(self, rows: jax.Array) -> jax.Array:
        """``A`` applied to every row of ``rows`` from the host: one compiled program (prepared
        once for all rows), or, for a streamed operator, one pass over the data."""
        return _host_rows(self, rows)

    def prepared(self) -> LinearOperator:
        """Before many products at one point: the same operator, with the work that does not
        depend on ``v`` done once (the default: nothing to do, ``self``).

        Inside compiled code a Hessian or Gauss-Newton operator whose data are one chunk
        linearises there (``jax.linearize``), so each product runs only the tangent part: the
        same numbers, 15-40% less work per product. Every estimator calls it at the top of its
        compiled program.

        Outside compiled code it returns an operator that holds that work as arrays (the
        pullback of the gradient, ``H v = (v^T H)^T``; for the Gauss-Newton matrix the model's
        pullback): ``Hp = H.prepared()`` once, then ``Hp @ v`` for many ``v`` costs about 1.5
        gradients instead of 1.8 (``benchmarks/bench_core.py``), at the memory of a backward
        pass's residuals, held until ``Hp`` is dropped. Take it again after the parameters change.
        Inside compiled code every wrapper (combination, block, preconditioned operator) prepares
        what it wraps; outside it, a preconditioned operator holds its operator's prepared form,
        combinations and blocks return themselves.

        Call it where the operator is used: an operator prepared inside a transformation
        (``jax.jit``, ``jax.grad``) holds the trace's values in its static part and is valid only
        in that trace, where estimators treat it as a constant (no eigenvalue derivatives).
        """
        return self

    def exact_diagonal(self) -> jax.Array:
        """``diag(A)`` inside compiled code, for operators with :attr:`has_fast_diagonal`
        (:func:`curvature.diagonal` with ``method="exact"`` takes ``n`` products otherwise)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no fast exact diagonal; "
            "curvature.diagonal(op, method='exact') computes it from n products"
        )

    def host_exact_diagonal(self) -> jax.Array:
        """:meth:`exact_diagonal` from the host (a pass over the data when streamed)."""
        return _host_diagonal(self)

    def damped_inverse(self, damping) -> LinearOperator | None:
        """``(A + damping I)^-1`` as an operator, exactly, for operators whose structure allows
        it (a dense matrix, a diagonal, K-FAC through its factors); ``None`` otherwise, and
        :func:`curvature.inverse` solves by conjugate gradient."""
        return self.damped_power(damping, -1.0)

    def damped_power(self, damping, power: float) -> LinearOperator | None:
        """``(A + damping I)^power`` as an operator, exactly, through the eigendecomposition the
        structure gives (a dense matrix, a diagonal, K-FAC); ``None`` otherwise.
        :func:`curvature.compare` uses ``power=-1/2`` for the conditioning of ``A``
        preconditioned by an approximation. The eigenvalues plus ``damping`` should be
        positive for a fractional power."""
        return None

    # -- products from the host --------------------------------------------------------------

    def matvec(self, v: jax.Array) -> jax.Array:
        """``A v`` for a flat real vector ``v`` of shape ``(n,)`` (jit-compiled, cached). A
        complex ``v``, or a float64 operator used outside ``jax.enable_x64``, is refused."""
        v = jnp.asarray(v)
        check_product_input(self, v, "op.matvec(v): v")
        if v.shape != (self.size,):
            raise ValueError(f"matvec expects a vector of shape ({self.size},), got {v.shape}")
        return _driver.run(_matvec_program(), (self,), v)

    def __matmul__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        check_product_input(self, x, "op @ x: x")
        if x.ndim == 1:
            return self.matvec(x)
        if x.ndim == 2 and x.shape[0] == self.size:
            return _driver.run(_matmat_program(), (self,), x)
        raise ValueError(
            f"op @ x needs x of shape ({self.size},) or ({self.size}, k); got {x.shape}"
        )

    # -- algebra -----------------------------------------------------------------------------

    def _combine(self, other, sign: float):
        if not isinstance(other, LinearOperator):
            return NotImplemented
        if other.shape[0] != other.shape[1] or self.shape[0] != self.shape[1]:
            raise TypeError("off-diagonal blocks do not combine; restrict the combination instead")
        if other.layout != self.layout:
            raise ValueError("cannot combine operators on different parameter layouts")
        ones = jnp.ones((), self.dtype)
        return Combination(((ones, self), (sign * ones, other)), self.layout)

    def __add__(self, other):
        return self._combine(other, 1.0)

    def __sub__(self, other):
        return self._combine(other, -1.0)

    def __mul__(self, c):
        if isinstance(c, LinearOperator):
            return NotImplemented
        if self.shape[0] != self.shape[1]:
            raise TypeError("off-diagonal blocks do not combine; restrict the combination instead")
        c = jnp.asarray(c, self.dtype)
        if c.shape != ():
            raise ValueError(f"an operator can only be scaled by a scalar, got shape {c.shape}")
        return Combination(((c, self),), self.layout)

    __rmul__ = __mul__

    def __neg__(self):
        return -1.0 * self

    @property
    def name(self) -> str:
        """What the operator is, for messages and ``repr``."""
        return type(self).__name__

    def __repr__(self):
        m, k = self.shape
        size = f"n={k}" if m == k else f"shape=({m}, {k})"
        return f"{type(self).__name__}({self.name}, {size}, dtype={self.dtype})"


@jax.jit
def _host_rows(op: LinearOperator, rows: jax.Array) -> jax.Array:
    return op.prepared().apply_rows(rows)


@jax.jit
def _host_diagonal(op: LinearOperator) -> jax.Array:
    return op.exact_diagonal()


# --------------------------------------------------------------------------------------------
# Combinations.


@operator_type
class Combination(LinearOperator):
    """``sum_i c_i A_i``: ``op1 + op2``, ``op1 - op2``, ``c * op`` (e.g. the residual ``H - G``).

    ``terms``: ``((c_1, A_1), ...)`` with scalar arrays ``c_i`` of the operators' dtype. A
    product costs one product of each term."""

    terms: tuple
    layout: Layout = static()

    @property
    def streamed(self) -> bool:
        return any(op.streamed for _, op in self.terms)

    @property
    def has_fast_diagonal(self) -> bool:
        return all(op.has_fast_diagonal for _, op in self.terms)

    @property
    def name(self) -> str:
        return "combination"

    def apply(self, v):
        return _weighted_sum((c, op.apply(v)) for c, op in self.terms)

    def apply_rows(self, rows):
        rows = rows.astype(self.dtype)
        return _weighted_sum((c, op.apply_rows(rows)) for c, op in self.terms)

    def host_apply_rows(self, rows):
        if not self.streamed:
            return _host_rows(self, rows)
        products = tuple(op.host_apply_rows(rows) for _, op in self.terms)
        return _weighted_sum_jit(tuple(c for c, _ in self.terms), products)

    def prepared(self):
        if not is_traced(self):  # outside compiled code: products term by term, nothing held
            return self
        return Combination(tuple((c, op.prepared()) for c, op in self.terms), self.layout)

    def exact_diagonal(self):
        return _weighted_sum((c, op.exact_diagonal()) for c, op in self.terms)

    def host_exact_diagonal(self):
        if not self.streamed:
            return _host_diagonal(self)
        diagonals = tuple(op.host_exact_diagonal() for _, op in self.terms)
        return _weighted_sum_jit(tuple(c for c, _ in self.terms), diagonals)


def _weighted_sum(pairs):
    out = None
    for c, value in pairs:
        term = c * value
        out = term if out is None else out + term
    return out


@jax.jit
def _weighted_sum_jit(coefficients, values):
    return _weighted_sum(zip(coefficients, values, strict=True))


# --------------------------------------------------------------------------------------------
# Operators of one family: shared products for estimators that take several operators.


@dataclasses.dataclass(frozen=True)
class Family:
    """Operators taken together (:func:`family`): the distinct non-combination operators
    (``atoms``) whose products an estimator computes once, and for each requested operator a
    static ``recipe`` combining them, with its coefficients (arrays) in ``coefficients``."""

    atoms: tuple
    recipes: tuple
    coefficients: tuple


def family(operators: tuple) -> Family:
    """The atoms of ``operators``: combinations are expanded into their terms, and an operator
    that appears several times (``H``, ``G`` and ``H - G``) is one atom, multiplied once. Atoms
    are matched by identity, so the same objects must be passed: a copy (a pytree round trip,
    ``jax.tree_util.tree_map``, or operators passed into ``jax.jit`` separately) is another atom,
    multiplied again, with the same results."""
    atoms: list = []
    coefficients: list = []

    def expand(op):
        if isinstance(op, Combination):
            parts = []
            for c, term in op.terms:
                coefficients.append(c)
                parts.append((len(coefficients) - 1, expand(term)))
            return ("sum", tuple(parts))
        for j, atom in enumerate(atoms):
            if atom is op:
                return ("atom", j)
        atoms.append(op)
        return ("atom", len(atoms) - 1)

    recipes = tuple(expand(op) for op in operators)
    return Family(tuple(atoms), recipes, tuple(coefficients))


def recipe_atoms(recipe) -> set[int]:
    """The atoms a recipe combines (indices into :attr:`Family.atoms`)."""
    kind, body = recipe
    return {body} if kind == "atom" else set().union(*(recipe_atoms(sub) for _, sub in body))


def combine(recipe, values, coefficients):
    """A requested operator's value from its atoms' (products, scalars): the arithmetic of
    :meth:`Combination.apply` (``c_1 x_1 + c_2 x_2 + ...``, in the order of the terms)."""
    kind, body = recipe
    if kind == "atom":
        return values[body]
    return _weighted_sum(
        (coefficients[slot], combine(sub, values, coefficients)) for slot, sub in body
    )


# --------------------------------------------------------------------------------------------
# A prepared operator inside compiled code.


@operator_type
class Linearized(LinearOperator):
    """The product of :meth:`LinearOperator.prepared` inside compiled code: a closure over traced
    values (a linearisation), used only inside the compiled program that made it."""

    linear: Callable[[jax.Array], jax.Array] = static()
    layout: Layout = static()
    kind: str = static(default="prepared")

    @property
    def name(self) -> str:
        return self.kind

    def apply(self, v):
        return self.linear(v.astype(self.dtype))


# --------------------------------------------------------------------------------------------
# Dense matrices.


@operator_type
class Matrix(LinearOperator):
    """A dense symmetric ``(n, n)`` matrix (:func:`from_matrix`)."""

    matrix: jax.Array
    layout: Layout = static()
    has_fast_diagonal: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return "matrix"

    def apply(self, v):
        return self.matrix @ v

    def exact_diagonal(self):
        return jnp.diagonal(self.matrix).astype(self.dtype)

    def damped_power(self, damping, power):
        # The symmetric eigendecomposition: the result stays symmetric to round-off.
        values, vectors = jnp.linalg.eigh(self.matrix)
        result = (vectors * (values + damping) ** power) @ vectors.T
        return Matrix(result.astype(self.dtype), self.layout)


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
    return Matrix(matrix, layout)


# --------------------------------------------------------------------------------------------
# Diagonal matrices.


@operator_type
class Diagonal(LinearOperator):
    """A diagonal matrix ``diag(values)`` on a parameter layout (:func:`from_diagonal`)."""

    values: jax.Array
    layout: Layout = static()
    label: str = static(default="diagonal")
    has_fast_diagonal: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return self.label

    def apply(self, v):
        return self.values * v.astype(self.dtype)

    def apply_rows(self, rows):
        return rows.astype(self.dtype) * self.values

    def exact_diagonal(self):
        return self.values

    def damped_power(self, damping, power):
        values = (self.values + damping) ** power
        return Diagonal(values.astype(self.dtype), self.layout, self.label)


def from_diagonal(diagonal, /, *, like: PyTree | None = None, name: str = "diagonal"):
    """``diag(d)`` as an operator: a diagonal approximation (the exact Gauss-Newton diagonal,
    Adam's second moment) that every estimator, :func:`curvature.compare` and
    :func:`curvature.inverse` (exactly) accept.

    Args:
      diagonal: ``d``, a pytree shaped like the parameters (its layout is the operator's), or a
        flat vector of length ``n`` with ``like``.
      like: the parameters (or an operator) whose layout a flat ``diagonal`` takes, so that the
        operator combines with (and compares against) operators on those parameters; without
        it a flat vector has a layout of its own.
      name: what the operator is called in messages.

    Cost: a product is ``n`` multiplies; its damped powers are exact.
    """
    if isinstance(like, LinearOperator):
        layout = like.layout
    elif like is not None:
        layout = Layout.of(like, "like")
    else:
        layout = None
    if (
        layout is not None
        and isinstance(diagonal, jax.Array | np.ndarray)
        and np.ndim(diagonal) == 1
    ):
        values = jnp.asarray(diagonal)
    elif layout is not None:
        values = layout.ravel(diagonal)
    else:
        layout = Layout.of(diagonal, "diagonal")
        values = layout.ravel(diagonal)
    if values.shape != (layout.size,):
        raise ValueError(
            f"from_diagonal: the diagonal has {values.size} entries; the layout has {layout.size}"
        )
    return Diagonal(values.astype(layout.dtype), layout, name)


# --------------------------------------------------------------------------------------------
# Bring your own operator.


@operator_type
class FunctionOperator(LinearOperator):
    """A user's matvec on parameter-shaped pytrees (:func:`from_function`): ``matvec`` is a
    :class:`~curvature.Closure` (compared by structure, its captured arrays as leaves)."""

    matvec_fn: Closure
    layout: Layout = static()

    @property
    def name(self) -> str:
        return self.matvec_fn.name

    def apply(self, v):
        return self.layout.ravel(self.matvec_fn(self.layout.unravel(v.astype(self.dtype))))


def from_function(matvec: Callable[[PyTree], PyTree], like: PyTree) -> LinearOperator:
    """Your own matrix-free operator: ``matvec`` maps a pytree shaped like ``like`` to one of the
    same shapes, linearly (``A v``; symmetric for the eigensolvers and SLQ).

    Args:
      matvec: ``v -> A v`` on pytrees shaped like ``like``. A fresh ``lambda`` or
        ``functools.partial`` each time is fine: equivalent functions share compiled programs,
        and the JAX arrays they capture are passed as operands (as for :func:`hessian`).
      like: a pytree of floating-point arrays or ``jax.ShapeDtypeStruct`` (e.g. the
        parameters): the operator's layout; its flat vectors have length ``n``, the total size.

    The operator works everywhere an operator does: every estimator, ``op1 - op2``,
    :func:`~curvature.restrict`, :func:`~curvature.preconditioned`, conjugate gradient and
    :func:`curvature.optim.hessian_free`. Cost: a product is one call of ``matvec``.

    Examples:
      >>> import jax.numpy as jnp, curvature
      >>> d = jnp.array([3.0, 1.0, 2.0])
      >>> op = curvature.from_function(lambda v: d * v, jnp.zeros(3))
      >>> [round(float(x), 4) for x in curvature.eigsh(op, k=2, key=jax.random.key(0)).eigenvalues]
      [3.0, 2.0]
    """
    if not callable(matvec):
        raise TypeError(f"from_function: matvec must be a function v -> A v, got {matvec!r}")
    layout = Layout.of(like, "like")
    if layout.size == 0:
        raise ValueError("from_function: like has no entries (an operator on vectors of length 0)")
    example = layout.skeleton()
    try:
        out = jax.eval_shape(matvec, example)
    except Exception as error:  # the user's function failed on a pytree shaped like `like`
        raise ValueError(
            f"from_function: matvec failed on a pytree shaped like `like`: "
            f"{type(error).__name__}: {error}"
        ) from error
    leaves, treedef = jax.tree_util.tree_flatten(out)
    shapes = tuple(tuple(x.shape) for x in leaves)
    if treedef != layout.treedef or shapes != layout.shapes:
        raise ValueError(
            "from_function: matvec must return a pytree shaped like its input (an n x n "
            f"operator); given {layout.treedef} with leaf shapes {layout.shapes}, it returned "
            f"{treedef} with leaf shapes {shapes}"
        )
    return FunctionOperator(closure(matvec, example), layout)


# --------------------------------------------------------------------------------------------
# The low-level form LinearOperator(fn, operands, layout).


@operator_type
class _Raw(LinearOperator):
    fn: Callable = static()
    operands: Any = None
    layout: Layout = static(default=None)

    def __post_init__(self):
        if not isinstance(self.layout, Layout):
            raise TypeError(
                "LinearOperator(fn, operands, layout) needs a Layout (curvature.Layout.of(params)); "
                "or use curvature.from_function(matvec, like)"
            )

    @property
    def name(self) -> str:
        return getattr(self.fn, "name", type(self.fn).__name__)

    def apply(self, v):
        return self.fn(self.operands, v.astype(self.dtype))


# --------------------------------------------------------------------------------------------
# Products as programs of the driver, and dense matrices.


@functools.cache
def _matvec_program() -> _driver.Program:
    return _driver.Program(
        init=lambda specs, v: v.astype(specs[0].dtype),
        body=_driver.Apply(lambda v, i: v, lambda v, i, product: product),
        finish=lambda product, specs, v: product,
        name="matvec",
    )


@functools.cache
def _matmat_program() -> _driver.Program:
    # One linearisation shared by every column (the operator is prepared), then the columns'
    # tangent passes together.
    return _driver.Program(
        init=lambda specs, x: x.T.astype(specs[0].dtype),
        body=_driver.Apply(lambda rows, i: rows, lambda rows, i, products: products, mode="rows"),
        finish=lambda products, specs, x: products.T,
        name="matmat",
    )


def dense(
    op: LinearOperator,
    *,
    max_size: int = 20_000,
    block_size: int | None = None,
    progress: bool | None = None,
) -> jax.Array:
    """Materialise ``op`` as an ``(m, n)`` array with ``n`` products (columns ``A e_i``).

    Meant for small models: tests, and a user's own check against :func:`jax.hessian`.

    The unit vectors go ``block_size`` at a time (default 16, fewer when a block would take a
    quarter of the available memory) through one compiled program, the same for every block
    (the operator prepared once a block, its products vmapped); between blocks the host shows
    progress on stderr (``progress=None``: when the run looks longer than 5 seconds) and
    Ctrl-C stops the run. Cost: ``n`` products, ``m n`` numbers of memory on the host.
    """
    m, k = op.shape
    if max(m, k) > max_size:
        raise ValueError(f"dense() would build a {m} x {k} matrix; raise max_size if you mean it")
    return unit_products(op, diagonal=False, block=block_size, progress=progress, what="dense")

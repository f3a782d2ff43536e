"""Functions as static, structurally compared parts of compiled programs.

A :class:`~curvature.LinearOperator` keeps its matvec function in the static part of its pytree,
so a compiled estimator is reused exactly when that part compares equal. A user's loss is often a
fresh ``lambda`` or ``functools.partial`` on every call (inside a training loop, say), and plain
functions compare by identity: every operator would compile anew. :func:`canonical` turns a
function into

* a hashable :class:`Canonical` that compares equal for equivalent functions: the same code, the
  same globals dictionary, and captured values (closure cells, defaults, ``partial`` arguments,
  bound ``self``, the globals the code names) that are equal: Python scalars and strings by value,
  numpy arrays by content, pytrees by structure, anything else by identity; and
* the JAX arrays it captures, which become operands of the compiled program (passed, not baked
  in as constants), so a new array of the same shape reuses the program.

``Canonical.bind(arrays)`` rebuilds the function around the given (possibly traced) arrays.
Captured JAX arrays that the function needs as concrete values (Python control flow on them)
cannot be operands; :func:`canonical` callers check this once by tracing and fall back to the
function itself (see :func:`stable`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import types
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

_MAX_DEPTH = 24
_BY_IDENTITY = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType)
_SCALARS = (bool, int, float, complex, str, bytes, type(None), type(Ellipsis))


class _Identity:
    """An object compared by identity (the fallback for values with no structural equality)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Identity) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


@dataclasses.dataclass(frozen=True)
class _NumpyConstant:
    """A numpy array captured by value: compared by content, kept as a constant."""

    digest: str
    shape: tuple
    dtype: str
    array: np.ndarray = dataclasses.field(compare=False, hash=False)


@dataclasses.dataclass(frozen=True)
class _Slot:
    index: int


@dataclasses.dataclass(frozen=True)
class _Function:
    code: types.CodeType
    globals_: _Identity
    name: str
    defaults: Any
    kwdefaults: Any
    closure: Any
    names: tuple  # (name, template) for the globals the code reads
    original: _Identity = dataclasses.field(compare=False, hash=False)


@dataclasses.dataclass(frozen=True)
class _Partial:
    func: Any
    args: Any
    keywords: Any


@dataclasses.dataclass(frozen=True)
class _Method:
    func: Any
    self_: Any


@dataclasses.dataclass(frozen=True)
class _Dataclass:
    cls: type
    fields: tuple  # (name, template) for every field of the constructor


@dataclasses.dataclass(frozen=True)
class _Tree:
    treedef: Any
    leaves: tuple


class _Builder:
    def __init__(self):
        self.arrays: list = []
        self.opaque: list[str] = []  # type names compared by identity (for the warning)
        self.on_path: set[int] = set()

    def slot(self, x) -> _Slot:
        self.arrays.append(x)
        return _Slot(len(self.arrays) - 1)

    def identity(self, obj) -> _Identity:
        if not isinstance(obj, types.ModuleType | type | types.BuiltinFunctionType):
            self.opaque.append(type(obj).__name__)
        return _Identity(obj)

    def template(self, obj, depth: int = 0):
        if isinstance(obj, _SCALARS):
            return (type(obj), obj)
        if isinstance(obj, jax.Array):
            return self.slot(obj)
        if isinstance(obj, np.ndarray | np.generic):
            arr = np.asarray(obj)
            if arr.dtype == object:
                return self.identity(obj)
            digest = hashlib.sha1(np.ascontiguousarray(arr).view(np.uint8).tobytes()).hexdigest()
            return _NumpyConstant(digest, arr.shape, arr.dtype.str, arr)
        if depth > _MAX_DEPTH or id(obj) in self.on_path:
            return self.identity(obj)
        self.on_path.add(id(obj))
        try:
            return self._compound(obj, depth + 1)
        finally:
            self.on_path.discard(id(obj))

    def _compound(self, obj, depth):
        if isinstance(obj, types.FunctionType):
            return self._function(obj, depth)
        if isinstance(obj, functools.partial):
            return _Partial(
                self.template(obj.func, depth),
                tuple(self.template(a, depth) for a in obj.args),
                tuple((k, self.template(v, depth)) for k, v in sorted(obj.keywords.items())),
            )
        if isinstance(obj, types.MethodType):
            return _Method(self.template(obj.__func__, depth), self.template(obj.__self__, depth))
        if type(obj) in (tuple, list):
            return (type(obj), tuple(self.template(x, depth) for x in obj))
        if type(obj) is dict:
            return (dict, tuple((k, self.template(v, depth)) for k, v in obj.items()))
        if _plain_dataclass(obj):
            return _Dataclass(
                type(obj),
                tuple(
                    (f.name, self.template(getattr(obj, f.name), depth))
                    for f in dataclasses.fields(obj)
                ),
            )
        leaves, treedef = jax.tree_util.tree_flatten(obj)
        if not (len(leaves) == 1 and leaves[0] is obj):
            try:
                hash(treedef)
            except TypeError:
                return self.identity(obj)
            return _Tree(treedef, tuple(self.template(x, depth) for x in leaves))
        try:
            hash(obj)
        except TypeError:
            return self.identity(obj)
        if type(obj).__eq__ is object.__eq__:
            return self.identity(obj)
        return (type(obj), obj)  # hashable, compared by its own equality (e.g. a flax graphdef)

    def _function(self, fn, depth):
        cells = fn.__closure__ or ()
        closure = []
        for cell in cells:
            try:
                closure.append(self.template(cell.cell_contents, depth))
            except ValueError:  # an empty cell (a name assigned after the function was made)
                return self.identity(fn)
        names = []
        for name in sorted(_global_names(fn.__code__)):
            if name in fn.__globals__:
                value = fn.__globals__[name]
                if (
                    isinstance(value, _BY_IDENTITY)
                    or callable(value)
                    and not hasattr(value, "__dataclass_fields__")
                ):  # modules, functions, classes: by identity, as jax.jit would
                    names.append((name, _Identity(value)))
                else:  # arrays, scalars, containers, dataclasses (a linen Module): by value
                    names.append((name, self.template(value, depth)))
        defaults = fn.__defaults__ or ()
        kwdefaults = fn.__kwdefaults__ or {}
        return _Function(
            fn.__code__,
            _Identity(fn.__globals__),
            fn.__name__,
            tuple(self.template(d, depth) for d in defaults),
            tuple((k, self.template(v, depth)) for k, v in sorted(kwdefaults.items())),
            tuple(closure),
            tuple(names),
            _Identity(fn),
        )


def _plain_dataclass(obj) -> bool:
    """A frozen dataclass instance that its constructor rebuilds from its fields (and not a
    pytree). Mutable dataclasses (a linen Module, say) are compared by their own equality."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return False
    if not obj.__dataclass_params__.frozen:
        return False
    if not all(f.init for f in dataclasses.fields(obj)):
        return False
    leaves = jax.tree_util.tree_leaves(obj)
    return len(leaves) == 1 and leaves[0] is obj


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _uses_slots(t) -> bool:
    if isinstance(t, _Slot):
        return True
    if isinstance(t, _Function):
        return any(_uses_slots(x) for x in (t.defaults, t.kwdefaults, t.closure, t.names))
    if isinstance(t, _Partial):
        return any(_uses_slots(x) for x in (t.func, t.args, t.keywords))
    if isinstance(t, _Method):
        return _uses_slots(t.func) or _uses_slots(t.self_)
    if isinstance(t, _Tree):
        return any(_uses_slots(x) for x in t.leaves)
    if isinstance(t, _Dataclass):
        return any(_uses_slots(v) for _, v in t.fields)
    if isinstance(t, tuple):
        return any(_uses_slots(x) for x in t)
    return False


def _build(t, arrays):
    if isinstance(t, _Slot):
        return arrays[t.index]
    if isinstance(t, _Identity):
        return t.obj
    if isinstance(t, _NumpyConstant):
        return t.array
    if isinstance(t, _Function):
        fn = t.original.obj
        if not _uses_slots(t):
            return fn
        closure = tuple(types.CellType(_build(c, arrays)) for c in t.closure)
        namespace = fn.__globals__
        if any(_uses_slots(v) for _, v in t.names):
            namespace = dict(namespace)
            namespace.update((k, _build(v, arrays)) for k, v in t.names)
        new = types.FunctionType(
            t.code, namespace, t.name, tuple(_build(d, arrays) for d in t.defaults), closure
        )
        new.__kwdefaults__ = {k: _build(v, arrays) for k, v in t.kwdefaults} or None
        new.__dict__.update(fn.__dict__)
        return new
    if isinstance(t, _Partial):
        return functools.partial(
            _build(t.func, arrays),
            *(_build(a, arrays) for a in t.args),
            **{k: _build(v, arrays) for k, v in t.keywords},
        )
    if isinstance(t, _Method):
        return types.MethodType(_build(t.func, arrays), _build(t.self_, arrays))
    if isinstance(t, _Dataclass):
        return t.cls(**{k: _build(v, arrays) for k, v in t.fields})
    if isinstance(t, _Tree):
        return jax.tree_util.tree_unflatten(t.treedef, [_build(x, arrays) for x in t.leaves])
    if isinstance(t, tuple) and len(t) == 2 and t[0] in (tuple, list, dict):
        kind, items = t
        if kind is dict:
            return {k: _build(v, arrays) for k, v in items}
        return kind(_build(x, arrays) for x in items)
    if isinstance(t, tuple) and len(t) == 2 and isinstance(t[0], type):
        return t[1]
    raise TypeError(f"internal: unknown template {t!r}")


@dataclasses.dataclass(frozen=True)
class Canonical:
    """A function with its captured JAX arrays taken out: hashable, compared by structure.

    ``bind(arrays)`` gives the function back, its captured arrays replaced by ``arrays`` (which
    may be tracers). A ``Canonical`` that took nothing out is just the function, compared by
    identity when it is not a closure.
    """

    template: Any
    name: str = dataclasses.field(compare=False, default="function")

    def bind(self, arrays) -> Callable:
        return _build(self.template, arrays)


def canonical(fn: Callable) -> tuple[Canonical, tuple, tuple[str, ...]]:
    """``(Canonical, captured JAX arrays, names of types compared by identity)`` for ``fn``."""
    builder = _Builder()
    template = builder.template(fn)
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return Canonical(template, name), tuple(builder.arrays), tuple(builder.opaque)


_TRACER_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)


@jax.tree_util.register_pytree_node_class
class Closure:
    """A function as a pytree: its structure static (compared as :class:`Canonical` compares),
    the JAX arrays it captures as leaves. Made by :func:`closure`.

    ``jax.jit(f)(closure, ...)`` compiles once per function *structure*: a fresh ``lambda`` or
    ``functools.partial`` with the same code, equal constants and captured arrays of the same
    shapes reuses the compiled program, and the captured arrays are passed as operands (never
    baked in as constants). Call it like the function.
    """

    __slots__ = ("arrays", "function")

    def __init__(self, function: Canonical, arrays: tuple = ()):
        self.function = function
        self.arrays = tuple(arrays)

    def tree_flatten(self):
        return (self.arrays,), self.function

    @classmethod
    def tree_unflatten(cls, function, children):
        return cls(function, children[0])

    @property
    def name(self) -> str:
        return self.function.name

    def bind(self) -> Callable:
        """The function itself, rebuilt around this closure's (possibly traced) arrays."""
        return self.function.bind(self.arrays)

    def __call__(self, *args, **kwargs):
        return self.function.bind(self.arrays)(*args, **kwargs)

    def __repr__(self):
        return f"Closure({self.name}, {len(self.arrays)} captured arrays)"


def closure(fn: Callable, *example_args, what: str = "closure()") -> Closure:
    """``fn`` as a :class:`Closure`: compared by structure, its captured JAX arrays as leaves.

    With ``example_args`` (arguments ``fn`` may be called with, arrays or
    ``jax.ShapeDtypeStruct``), a function that needs its captured arrays as concrete values
    (Python control flow on them) is detected once by tracing and kept whole instead, compared by
    identity. Warns once per source location when the same code keeps being built around values
    compared by identity (a cache that keeps growing), naming the culprits.

    Examples:
      >>> import jax, jax.numpy as jnp, curvature
      >>> w = jnp.ones(3)
      >>> f = curvature.closure(lambda x: w @ x)
      >>> g = curvature.closure(lambda x: w @ x)  # a fresh lambda: the same structure
      >>> jax.tree_util.tree_structure(f) == jax.tree_util.tree_structure(g), float(f(w))
      (True, 3.0)
    """
    if isinstance(fn, Closure):
        return fn
    if example_args:
        static, arrays = stable(fn, example_args, what)
        return Closure(static, arrays)
    static, arrays, opaque = canonical(fn)
    if opaque:
        _note_growth(fn, static, opaque, what)
    return Closure(static, arrays)


def stable(fn: Callable, example_args: tuple, what: str) -> tuple[Canonical, tuple]:
    """:func:`canonical` checked: if ``fn`` cannot run with its captured arrays as traced
    operands (it needs them as concrete values), ``fn`` itself with nothing taken out.

    Warns once per source location when the same code has been compiled for many different
    captured values compared by identity (a cache that keeps growing), naming the culprits.
    """
    static, arrays, opaque = canonical(fn)
    if arrays:
        try:
            abstract = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays)
            jax.eval_shape(lambda c, *a: static.bind(c)(*a), abstract, *example_args)
        except _TRACER_ERRORS:
            static, arrays = Canonical(_Identity(fn), static.name), ()
    if opaque:
        _note_growth(fn, static, opaque, what)
    return static, arrays


_SEEN: dict[tuple, set[int]] = {}
_WARNED: set[tuple] = set()
_GROWTH_LIMIT = 8


def _note_growth(fn, static: Canonical, opaque: tuple[str, ...], what: str) -> None:
    code = getattr(getattr(fn, "func", fn), "__code__", None)
    where = (code.co_filename, code.co_firstlineno) if code is not None else (type(fn).__name__,)
    seen = _SEEN.setdefault(where, set())
    seen.add(hash(static))
    if len(seen) > _GROWTH_LIMIT and where not in _WARNED:
        _WARNED.add(where)
        location = f"{where[0]}:{where[1]}" if len(where) == 2 else where[0]
        warnings.warn(
            f"{what} has been built from {len(seen)} versions of {static.name} ({location}) that "
            "each compile their own programs, because it captures "
            f"{', '.join(sorted(set(opaque)))} compared by identity. Create that object once "
            "outside the loop, or pass what changes as arrays (captured JAX arrays, params and "
            "data are operands and never cause a recompilation).",
            stacklevel=4,
        )

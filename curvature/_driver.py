"""How an algorithm runs: written once as a small program of steps, run as one compiled program
for in-memory data and as a host loop of compiled steps for streamed data.

An algorithm here (Lanczos, a Monte Carlo block of probes, Hutch++, power iteration, SLQ, CG, the
columns of ``dense``) is a :class:`Program`: ``init`` makes a state (a pytree), ``body`` is a tree
of steps over that state, ``finish`` turns the state into the result. The steps are

* :class:`Apply`: ``rows(state, i)`` are multiplied by the operators and ``update(state, i,
  products)`` takes the products (the only place an algorithm meets an operator);
* :class:`Map`: ``fn(state, i)``, work between products;
* :class:`Repeat` (a fixed count, the index ``i`` passed to the steps inside), :class:`While`
  (``cond(state)``) and :class:`Seq`;
* :class:`Vmap`: steps written for one item (a probe, say) run on a batch of them at once, the
  state's ``field`` holding the batch on a leading axis (in compiled code only).

:func:`run` interprets a program in one of two ways, decided by the operators alone:

* in memory: the whole program is one ``jax.jit`` (``fori_loop`` / ``while_loop``), the operators
  prepared once at the top (:meth:`~curvature.LinearOperator.prepared`); a second call with the
  same shapes compiles nothing;
* streamed (an operator whose data come from a loader): the loops run on the host, every
  ``init``, ``rows``, ``update``, ``Map``, ``cond`` and ``finish`` is its own compiled program
  (compiled once, cached by the step), and each product is a pass over the data
  (:meth:`~curvature.LinearOperator.host_apply_rows`). Nothing runs op by op, and no global mode
  is switched.

The step functions never see an operator: ``init`` and ``finish`` get the operators' static
:class:`Spec` (shape, dtype), so the same compiled steps serve every operator of those shapes.
Programs are hashable (their step functions compare by identity): build them with a cached
constructor so equal settings give the same program and reuse its compiled code.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Apply",
    "Map",
    "Program",
    "Repeat",
    "Seq",
    "Spec",
    "Vmap",
    "While",
    "inline",
    "map_rows",
    "run",
]

State = Any


class Spec(NamedTuple):
    """What the steps may know of an operator: its shape ``(m, k)`` and its vectors' dtype."""

    shape: tuple[int, int]
    dtype: np.dtype

    @property
    def size(self) -> int:
        return self.shape[1]


@dataclasses.dataclass(frozen=True)
class Map:
    """``state = fn(state, i)``: work between products (compiled on its own when streamed)."""

    fn: Callable[[State, Any], State]


@dataclasses.dataclass(frozen=True)
class Apply:
    """``state = update(state, i, products)`` with the products of ``rows(state, i)``.

    ``operators``: which operators multiply (an index: ``products`` is that operator's array; a
    tuple of indices: a tuple of arrays). ``mode``: ``"vector"`` for one vector ``(k,)`` (a
    matvec), ``"rows"`` for a block ``(b, k)`` multiplied together (vmapped: shared forward
    passes; one pass over streamed data), ``"map"`` for a block taken a row at a time
    (``lax.map``, ``batch_size`` rows vmapped together; streamed: one pass per group). With
    ``valid(state)`` (a traced count, ``"map"`` only) the rows from that count on are not
    multiplied and their products are zero: a preallocated block of vectors, partly used.
    """

    rows: Callable[[State, Any], jax.Array]
    update: Callable[[State, Any, Any], State]
    operators: int | tuple[int, ...] = 0
    mode: str = "vector"
    batch_size: int | None = None
    valid: Callable[[State], jax.Array] | None = None  # "map": rows multiplied; the rest 0


@dataclasses.dataclass(frozen=True)
class Repeat:
    """``body`` ``count`` times; the steps inside get the index ``i = 0 .. count - 1``.

    ``count`` is an int, or a function ``count(state)`` giving a traced count (a loop to a
    traced bound: one compiled program for every count, e.g. Lanczos steps in a preallocated
    basis); from the host it is read once, before the loop."""

    count: int | Callable[[State], jax.Array]
    body: Any


@dataclasses.dataclass(frozen=True)
class While:
    """``body`` while ``cond(state)``; the steps inside get the enclosing index."""

    cond: Callable[[State], jax.Array]
    body: Any


@dataclasses.dataclass(frozen=True)
class Vmap:
    """``body`` (written for one item) on every item of ``state[field]`` (a pytree whose leaves
    have a leading batch axis) at once: ``jax.vmap`` of the whole body, its products batched.
    In compiled code only (not for streamed operators). ``shared``: a field of the state given
    to every item unbatched, under the same name (a traced loop bound, say)."""

    field: str
    body: Any
    shared: str | None = None


@dataclasses.dataclass(frozen=True)
class Seq:
    steps: tuple

    def __init__(self, *steps):
        object.__setattr__(self, "steps", tuple(steps))


@dataclasses.dataclass(frozen=True)
class Program:
    """``finish(state, specs, *args)`` after ``body`` on ``init(specs, *args)``.

    ``frozen``: the products are not differentiated (their operands are stopped), as for an
    eigensolver whose derivative is attached afterwards. ``name``: the algorithm, for
    :data:`TRACES`."""

    init: Callable
    body: Any
    finish: Callable
    frozen: bool = False
    name: str = "program"


# --------------------------------------------------------------------------------------------
# Running a program.


def run(program: Program, operators: tuple, *args):
    """``program`` on ``operators`` (a tuple) and ``args`` (a pytree of arrays, or ``None``): one
    compiled program for in-memory operators, host-driven when one of them is streamed."""
    for op in operators:
        if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(op)):
            raise TypeError(
                f"{type(op).__name__} is not a pytree: declare an operator type with "
                "@curvature.operator_type (its array fields leaves, curvature.static() fields "
                "static), or use curvature.from_function"
            )
    if any(op.streamed for op in operators):
        return _run_on_host(program, operators, args)
    return _run_compiled(program, operators, args)


#: How often each algorithm (``Program.name``) was traced into a compiled program: once per
#: compilation, so tests can check that the same shapes never compile again.
TRACES: collections.Counter = collections.Counter()


@functools.partial(jax.jit, static_argnums=(0,))
def _run_compiled(program: Program, operators: tuple, args):
    TRACES[program.name] += 1
    specs = specs_of(operators)
    active = _stopped(operators) if program.frozen else operators
    prepared = tuple(op.prepared() for op in active)
    state = program.init(specs, *args)
    state = _traced(program.body, prepared, state, 0)
    return program.finish(state, specs, *args)


def inline(program: Program, operators: tuple, *args):
    """``program`` traced into the caller's compiled code (operators already prepared, e.g. a
    closure over a linearisation): for algorithms used inside another compiled algorithm."""
    specs = specs_of(operators)
    state = program.init(specs, *args)
    state = _traced(program.body, operators, state, 0)
    return program.finish(state, specs, *args)


def specs_of(operators: tuple) -> tuple[Spec, ...]:
    return tuple(Spec(tuple(op.shape), np.dtype(op.dtype)) for op in operators)


def _stopped(tree):
    return jax.tree_util.tree_map(
        lambda x: jax.lax.stop_gradient(x) if jnp.issubdtype(x.dtype, np.inexact) else x,
        tree,
    )


def _select(products: tuple, which):
    if isinstance(which, int):
        return products[which]
    return tuple(products[j] for j in which)


def _indices(which) -> tuple[int, ...]:
    return (which,) if isinstance(which, int) else tuple(which)


def map_rows(op, rows: jax.Array, batch_size: int | None = None) -> jax.Array:
    """``A`` applied to each row of ``rows`` (``(k, n)``) inside compiled code, ``lax.map``-ed
    in groups of ``batch_size`` (vmapped within a group): memory of one group's activations,
    where :meth:`~curvature.LinearOperator.apply_rows` vmaps them all."""
    if batch_size is None or batch_size <= 1:
        return jax.lax.map(op.apply, rows)
    return jax.lax.map(op.apply, rows, batch_size=batch_size)


def _traced_products(op, rows: jax.Array, step: Apply, valid=None) -> jax.Array:
    if step.mode == "vector":
        return op.apply(rows)
    if step.mode == "rows":
        return op.apply_rows(rows)
    if valid is None:
        return map_rows(op, rows, step.batch_size)

    def one(item):
        i, row = item
        return jax.lax.cond(i < valid, op.apply, jnp.zeros_like, row)

    index = jnp.arange(rows.shape[0])
    batch = None if step.batch_size is None or step.batch_size <= 1 else step.batch_size
    return jax.lax.map(one, (index, rows), batch_size=batch)


def _traced(node, operators: tuple, state, i):
    if isinstance(node, Map):
        return node.fn(state, i)
    if isinstance(node, Apply):
        rows = node.rows(state, i)
        valid = None if node.valid is None else node.valid(state)
        products = {
            j: _traced_products(operators[j], rows, node, valid) for j in _indices(node.operators)
        }
        return node.update(state, i, _select(products, node.operators))
    if isinstance(node, Repeat):
        count = node.count(state) if callable(node.count) else node.count
        return jax.lax.fori_loop(0, count, lambda j, s: _traced(node.body, operators, s, j), state)
    if isinstance(node, While):
        return jax.lax.while_loop(node.cond, lambda s: _traced(node.body, operators, s, i), state)
    if isinstance(node, Seq):
        for step in node.steps:
            state = _traced(step, operators, state, i)
        return state
    if isinstance(node, Vmap):
        if node.shared is None:
            batch = jax.vmap(lambda item: _traced(node.body, operators, item, i))(state[node.field])
            return {**state, node.field: batch}

        def one(item, shared):
            out = _traced(node.body, operators, {**item, node.shared: shared}, i)
            return {k: v for k, v in out.items() if k != node.shared}

        batch = jax.vmap(one, in_axes=(0, None))(state[node.field], state[node.shared])
        return {**state, node.field: batch}
    raise TypeError(f"internal: unknown program step {node!r}")


# --------------------------------------------------------------------------------------------
# Host-driven: the loops on the host, every step compiled.


_COMPILED: dict = {}


def _compiled(fn: Callable, **jit_kwargs) -> Callable:
    """``jax.jit(fn)``, one per step function (kept for the life of the process, as the cached
    program constructors keep their steps)."""
    key = (fn, tuple(sorted(jit_kwargs.items())))
    jitted = _COMPILED.get(key)
    if jitted is None:
        jitted = _COMPILED[key] = jax.jit(fn, **jit_kwargs)
    return jitted


def _host_products(op, rows: jax.Array, step: Apply) -> jax.Array:
    if step.mode == "vector":
        return op.host_apply_rows(rows[None])[0]
    if step.mode == "rows":
        return op.host_apply_rows(rows)
    size = rows.shape[0] if step.batch_size is None else step.batch_size
    if size >= rows.shape[0]:
        return op.host_apply_rows(rows)
    parts = [op.host_apply_rows(rows[s : s + size]) for s in range(0, rows.shape[0], size)]
    return _compiled(_concatenate)(parts)


def _concatenate(parts):
    return jnp.concatenate(parts)


def _host_valid_products(op, rows, step: Apply, valid: int):
    if step.mode == "vector" or valid >= rows.shape[0]:
        return _host_products(op, rows, step)
    products = _host_products(op, rows[:valid], step) if valid > 0 else None
    shape = (rows.shape[0], op.shape[0])
    return _compiled(_padded, static_argnums=(1, 2))(products, shape, np.dtype(op.dtype))


def _padded(products, shape, dtype):
    """``products`` (the first rows of a block) followed by zero rows, to ``shape``."""
    zeros = jnp.zeros(shape, dtype)
    return zeros if products is None else zeros.at[: products.shape[0]].set(products)


def _run_on_host(program: Program, operators: tuple, args):
    specs = specs_of(operators)
    state = _compiled(program.init, static_argnums=0)(specs, *args)
    state = _hosted(program.body, operators, state, 0)
    return _compiled(program.finish, static_argnums=1)(state, specs, *args)


def _hosted(node, operators: tuple, state, i):
    """``node`` from the host: loops in Python, every step its own compiled program."""
    if isinstance(node, Map):
        return _compiled(node.fn)(state, i)
    if isinstance(node, Apply):
        rows = _compiled(node.rows)(state, i)
        valid = rows.shape[0] if node.valid is None else int(_compiled(node.valid)(state))
        products = {
            j: _host_valid_products(operators[j], rows, node, valid)
            for j in _indices(node.operators)
        }
        return _compiled(node.update)(state, i, _select(products, node.operators))
    if isinstance(node, Repeat):
        count = int(_compiled(node.count)(state)) if callable(node.count) else node.count
        for j in range(count):
            state = _hosted(node.body, operators, state, j)
        return state
    if isinstance(node, While):
        cond = _compiled(node.cond)
        while bool(cond(state)):
            state = _hosted(node.body, operators, state, i)
        return state
    if isinstance(node, Seq):
        for part in node.steps:
            state = _hosted(part, operators, state, i)
        return state
    # Vmap: a batch of items in one compiled program needs the products traced; the estimators
    # that use it (SLQ with probe_batch_size) refuse streamed operators before they get here.
    raise TypeError(f"{type(node).__name__} steps cannot run from the host (streamed data)")

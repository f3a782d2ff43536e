"""The Hessian by blocks: an operator restricted to a subset of the parameters, and summaries of
every block of a partition (per layer, by default).

* :func:`restrict` gives ``P_rows A P_colsᵀ`` for selectors of parameter leaves (every operator
  knows its parameters' layout, so no parameters are needed). A diagonal block (``cols=None``) is
  a :class:`Restricted` operator like any other: every estimator works on it, so
  ``trace(restrict(R, layer))`` is a per-layer trace and ``spectral_density(restrict(H, block))``
  a per-block density (Zhang et al. 2024, "Why Transformers Need Adam: A Hessian Perspective").
  An off-diagonal block is a :class:`BlockOperator` (``m x k``) for ``@``,
  :func:`~curvature.dense` and :func:`~curvature.frobenius_norm_squared`. Either costs one full
  matvec a product.
* :func:`block_summary`: per group the trace and, per pair of groups, the squared Frobenius norm
  of the block, each with its standard error, from the same probes (a probe on group ``j`` yields
  every block of column ``j`` at once and group ``j``'s trace), all groups in one compiled
  program; and per group the top eigenvalue (Lanczos). For several operators on shared probes.
* :func:`block_densities`: the spectral density (SLQ) of every diagonal block;
  :func:`block_eigenvalues`: the top ``k`` eigenvalues of every diagonal block, with residuals.
* :func:`layer_groups`: the default partition, one group per layer of the parameter pytree.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvature import _driver
from curvature._checks import (
    check_finite_result,
    check_key,
    is_traced,
    positive_int,
    require_square,
)
from curvature._deprecations import UNSET, renamed, warn_once
from curvature._lanczos import bucket
from curvature._memory import check_basis_memory
from curvature.density import SpectralDensity, slq_program
from curvature.krylov import eigsh_result, eigsh_state, eigsh_steps
from curvature.linear_operator import (
    Layout,
    LinearOperator,
    combine,
    family,
    operator_type,
    recipe_atoms,
    static,
)
from curvature.stochastic_trace import probe_rows

__all__ = [
    "BlockEigenvalues",
    "BlockOperator",
    "BlockSummary",
    "Restricted",
    "block_densities",
    "block_eigenvalues",
    "block_summary",
    "layer_groups",
    "restrict",
]

PyTree = Any
Selector = PyTree | Callable[[tuple, jax.Array], bool]


def _leaf_mask(selector: Selector, tree: PyTree, what: str) -> list[bool]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if callable(selector):
        mask = [bool(selector(path, leaf)) for path, leaf in flat]
    else:
        try:
            chosen = jax.tree_util.tree_map(lambda _, s: bool(s), tree, selector)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{what}: a selector is a pytree of bools shaped like the parameters (one per "
                f"leaf) or a callable (path, leaf) -> bool; {err}"
            ) from None
        mask = jax.tree_util.tree_leaves(chosen)
    if not any(mask):
        raise ValueError(f"{what} selects no parameter leaf")
    return mask


def _ranges(layout: Layout, mask: list[bool]) -> tuple[tuple[int, int], ...]:
    out, start = [], 0
    for size, keep in zip(layout.sizes, mask, strict=True):
        if keep:
            out.append((start, start + size))
        start += size
    return tuple(out)


def _sub_layout(layout: Layout, mask: list[bool]) -> Layout:
    leaves = jax.tree_util.tree_leaves(layout.skeleton())
    kept = [leaf if keep else None for leaf, keep in zip(leaves, mask, strict=True)]
    return Layout.of(jax.tree_util.tree_unflatten(layout.treedef, kept))


def _embed(v: jax.Array, ranges, size: int) -> jax.Array:
    full = jnp.zeros((size,), v.dtype)
    offset = 0
    for start, stop in ranges:
        full = full.at[start:stop].set(v[offset : offset + stop - start])
        offset += stop - start
    return full


def _extract(w: jax.Array, ranges) -> jax.Array:
    return jnp.concatenate([w[start:stop] for start, stop in ranges])


@operator_type
class Restricted(LinearOperator):
    """A diagonal block ``P A Pᵀ`` of ``inner`` on a subset of its parameter leaves (entries
    ``rows`` of the flat vector, a tuple of ranges): :func:`restrict`. Its layout is the
    parameters' with ``None`` for the leaves left out. A product is one product of ``inner``."""

    inner: LinearOperator
    rows: tuple = static()
    cols: tuple = static()
    layout: Layout = static()
    column_layout: Layout = static()

    @property
    def in_layout(self) -> Layout:
        return self.column_layout

    @property
    def streamed(self) -> bool:
        return self.inner.streamed

    @property
    def has_fast_diagonal(self) -> bool:
        return self.rows == self.cols and self.inner.has_fast_diagonal

    @property
    def name(self) -> str:
        return f"{self.inner.name} block"

    def apply(self, v):
        n = self.inner.size
        return _extract(self.inner.apply(_embed(v.astype(self.dtype), self.cols, n)), self.rows)

    def apply_rows(self, rows):
        full = self._embed_rows(rows.astype(self.dtype))
        return self._extract_rows(self.inner.apply_rows(full))

    @property
    def dtype(self):
        # The products' dtype, the wrapped operator's: with parameters of mixed dtypes a block's
        # own leaves may promote to less (float32 weights in a float64 operator, say).
        return self.inner.dtype

    def _embed_rows(self, rows):
        return _embed_rows(rows, self.cols, self.inner.size)

    def _extract_rows(self, products):
        return _extract_rows(products, self.rows)

    def host_apply_rows(self, rows):
        if not self.streamed:
            return super().host_apply_rows(rows)
        # Compiled on the ranges alone: a streamed operator (its loader) is never a jit key.
        full = _embed_rows_jit(jnp.asarray(rows, self.dtype), self.cols, self.inner.size)
        return _extract_rows_jit(self.inner.host_apply_rows(full), self.rows)

    def prepared(self):
        if not is_traced(self):  # outside compiled code: products through the whole operator
            return self
        return dataclasses.replace(self, inner=self.inner.prepared())

    def exact_diagonal(self):
        return _extract(self.inner.exact_diagonal(), self.rows)

    def host_exact_diagonal(self):
        if not self.streamed:
            return super().host_exact_diagonal()
        return _extract_rows_jit(self.inner.host_exact_diagonal()[None], self.rows)[0]


def _embed_rows(rows, ranges, size: int):
    return jax.vmap(lambda v: _embed(v, ranges, size))(rows)


def _extract_rows(products, ranges):
    return jax.vmap(lambda w: _extract(w, ranges))(products)


_embed_rows_jit = jax.jit(_embed_rows, static_argnums=(1, 2))
_extract_rows_jit = jax.jit(_extract_rows, static_argnums=(1,))


@operator_type
class BlockOperator(Restricted):
    """An off-diagonal block ``P_rows A P_colsᵀ``: ``m x k``, not symmetric. ``op @ v`` takes a
    vector of the columns' parameters (``unravel_in`` / ``ravel_in``) and gives one of the rows'
    (``unravel`` / ``ravel``); only ``@``, :func:`~curvature.dense` and
    :func:`~curvature.frobenius_norm_squared` accept it."""

    def ravel_in(self, tree: PyTree) -> jax.Array:
        return self.in_layout.ravel(tree)

    def unravel_in(self, vector: jax.Array) -> PyTree:
        return self.in_layout.unravel(vector)


def restrict(
    op: LinearOperator, rows: Selector, cols: Selector | None = None, *, params: PyTree = None
) -> LinearOperator:
    """The block ``P_rows A P_colsᵀ`` of ``op`` on a subset of the parameter leaves.

    Args:
      op: any square operator (:func:`~curvature.hessian`, ``gauss_newton``,
        ``empirical_fisher``, combinations such as ``H - G``, :func:`~curvature.from_function`).
      rows: a selector: a pytree of bools shaped like the parameters (one per leaf) or a
        callable ``(path, leaf) -> bool``, where ``leaf`` is a ``jax.ShapeDtypeStruct`` (its
        ``shape``, ``ndim`` and ``dtype``) or, with ``params``, the parameter itself.
      cols: a selector like ``rows``; ``cols=None`` is the diagonal block of ``rows``.
      params: optional: parameters of the operator's layout, handed to callable selectors
        instead of the shapes.

    Returns a :class:`Restricted` operator for a diagonal block (every estimator accepts it;
    ``ravel`` / ``unravel`` map its vectors to pytrees with ``None`` for the leaves left out)
    or a :class:`BlockOperator` for an off-diagonal one. A product costs one full matvec.
    """
    if not isinstance(op, LinearOperator):
        raise TypeError(f"restrict needs a LinearOperator, got {op!r}")
    if isinstance(op, Restricted):
        raise ValueError("restrict applies to a full operator, not to a block of one")
    if op.shape[0] != op.shape[1]:
        raise ValueError("restrict applies to a square operator")
    tree = _tree_of(op, params)
    row_mask = _leaf_mask(rows, tree, "rows")
    col_mask = row_mask if cols is None else _leaf_mask(cols, tree, "cols")
    return _restricted(op, row_mask, col_mask)


def _tree_of(op: LinearOperator, params: PyTree) -> PyTree:
    """What selectors look at: ``params`` if given (checked against the layout), else the
    operator's own parameter structure with shapes and dtypes."""
    if params is None:
        return op.layout.skeleton()
    if Layout.of(params) != op.layout:
        raise ValueError("params do not match the operator's layout (shapes and dtypes of leaves)")
    return params


def _restricted(op, row_mask: list[bool], col_mask: list[bool]) -> LinearOperator:
    rows, cols = _ranges(op.layout, row_mask), _ranges(op.layout, col_mask)
    layout, column_layout = _sub_layout(op.layout, row_mask), _sub_layout(op.layout, col_mask)
    kind = Restricted if row_mask == col_mask else BlockOperator
    return kind(op, rows, cols, layout, column_layout)


def layer_groups(params: PyTree) -> dict[str, PyTree]:
    """One group per layer: leaves whose paths agree up to their last key (a layer's weight and
    bias; flax NNX's trailing ``.value`` is ignored). ``{name: selector}`` in pytree order, each
    selector a pytree of bools shaped like ``params``."""
    groups: dict[str, list[bool]] = {}
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = []
    for path, _ in flat:
        keys = list(path)
        if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
            keys = keys[:-1]
        prefix = keys[:-1] if len(keys) > 1 else keys
        names.append(jax.tree_util.keystr(tuple(prefix), simple=True, separator="/") or "params")
    for name in names:
        groups.setdefault(name, [n == name for n in names])
    return {name: jax.tree_util.tree_unflatten(treedef, mask) for name, mask in groups.items()}


class BlockSummary(NamedTuple):
    """Per group ``g`` (``names``, with ``sizes[g]`` parameters): ``trace[g]`` ± ``trace_se[g]``
    (Hutchinson on the diagonal block, from the probes on group ``g``), ``top[g]`` with
    ``top_residual[g]`` (Lanczos; NaN when not asked for); per pair: ``frobenius_sq[i, j]`` ±
    ``frobenius_sq_se[i, j]``, the squared Frobenius norm of block ``(i, j)``, from the
    ``num_matvecs`` Rademacher probes on group ``j``. Rows of a symmetric operator's summary add
    up: ``frobenius_sq.sum()`` estimates ``||A||_F^2``."""

    names: tuple[str, ...]
    sizes: np.ndarray
    trace: np.ndarray
    trace_se: np.ndarray
    top: np.ndarray
    top_residual: np.ndarray
    frobenius_sq: np.ndarray
    frobenius_sq_se: np.ndarray
    converged: np.ndarray | None = None

    def same_group_share(self) -> tuple[float, float]:
        """``(share, standard_error)``: the share of ``||A||_F^2`` in the diagonal blocks (each
        group with itself; the rest couples different groups), with a delta-method standard
        error from the blocks' own (estimated independently). With layers as groups this is the
        same-layer share: 0 up to round-off for the residual ``H - G`` of a network that is
        piecewise linear in each layer's parameters (ReLU). NaN when the table sums to 0 or
        less. Cost: none (from the table)."""
        table = np.asarray(self.frobenius_sq, np.float64)
        se = np.asarray(self.frobenius_sq_se, np.float64)
        same, total = float(np.trace(table)), float(table.sum())
        if not total > 0:
            return math.nan, math.nan
        share = same / total
        # d share / d block: (1 - share) / total on the diagonal, -share / total elsewhere.
        grad = np.where(np.eye(len(table), dtype=bool), 1.0 - share, -share) / total
        return share, float(np.sqrt(np.sum((grad * se) ** 2)))


def _partition(op, groups, params) -> dict[str, list[bool]]:
    tree = _tree_of(op, params)
    if groups is None:
        groups = layer_groups(tree)
    if not isinstance(groups, dict):
        groups = {f"group{i}": g for i, g in enumerate(groups)}
    return {name: _leaf_mask(sel, tree, f"group {name!r}") for name, sel in groups.items()}


def block_densities(
    op: LinearOperator,
    groups: dict[str, Any] | Sequence | None = None,
    *,
    key: jax.Array,
    num_probes: int = 8,
    num_steps: int = 40,
    params: PyTree = None,
) -> dict:
    """The spectral density (SLQ, :func:`curvature.spectral_density`) of every diagonal block of
    ``groups`` (default :func:`layer_groups`): ``{name: SpectralDensity}``, the per-block view of
    Zhang et al. (2024). Group ``g`` (in order) uses ``jax.random.split(key, len(groups))[g]``:
    its probes are those of ``spectral_density(restrict(op, group), key=that key)``; a block
    smaller than ``num_steps`` gets as many steps as its size (then exact per probe).

    All groups run in one compiled program (each block acts on full-length vectors masked to its
    entries), compiled once whatever the partition and for every ``num_steps`` in a size
    bucket. Cost: ``groups × num_probes × num_steps`` full matvecs; memory: one basis of
    ``num_steps`` full-length vectors."""
    require_square(op, "block_densities")
    check_key(key)
    num_probes = positive_int(num_probes, "num_probes")
    num_steps = positive_int(num_steps, "num_steps")
    masks = _partition(op, groups, params)
    entry_group, rank, sizes = _group_index(op.layout, masks)
    steps = np.minimum(num_steps, sizes)
    rows = bucket(int(steps.max()), op.size)
    check_basis_memory(op, rows, "block_densities")
    keys = jax.random.split(key, len(masks))
    program = slq_program(num_probes, rows, True, None, len(masks))
    nodes, weights = _driver.run(
        program,
        (op,),
        keys,
        jnp.asarray(steps, jnp.int32),
        jnp.asarray(entry_group),
        jnp.asarray(rank),
    )
    out = {}
    for g, name in enumerate(masks):
        m = int(steps[g])
        density = SpectralDensity(nodes[g, :, :m], weights[g, :, :m], jnp.asarray(sizes[g]))
        check_finite_result(density.nodes, f"block_densities (group {name!r})")
        out[name] = density
    return out


def _group_index(layout: Layout, masks: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per entry of the flat vector its group and its position within the group; per group its
    size."""
    entry_group = np.full(layout.size, -1, np.int32)
    rank = np.zeros(layout.size, np.int32)
    sizes = []
    for g, mask in enumerate(masks.values()):
        offset = 0
        for start, stop in _ranges(layout, mask):
            entry_group[start:stop] = g
            rank[start:stop] = offset + np.arange(stop - start)
            offset += stop - start
        sizes.append(offset)
    return entry_group, rank, np.array(sizes)


@functools.cache
def _block_top_program(num_groups: int, rows: int, check_rows: int, size: int) -> _driver.Program:
    """The top ``k`` eigenvalues of every diagonal block (Lanczos with its rank check, as
    :func:`curvature.eigsh` with ``which="LA"``), all in one program: block ``g`` is the operator
    masked to the group's entries on full-length vectors; ``num_steps``, ``check_steps`` and
    ``k`` (at most ``size``) per group are traced."""
    steps = eigsh_steps(rows, size, check_rows, True, None)

    def begin(base, g, n, dtype):
        mask = (base["entry_group"] == g).astype(dtype)
        key = jax.random.fold_in(jax.random.fold_in(base["key0"], 0x70B), g)
        settings = {
            "tol": base["tol"],
            "num_steps": base["group_steps"][g],
            "k": base["group_k"][g],
            "which": jnp.asarray(0, jnp.int32),
            "check_steps": base["group_checks"][g],
        }
        eig = eigsh_state(key, n, dtype, rows, size, check_rows, settings, mask, base["rank"])
        return {**base, "eig": eig}

    def init(specs, key, tol, group_steps, group_checks, group_k, entry_group, rank):
        n, dtype = specs[0].size, specs[0].dtype
        base = {
            "key0": key,
            "tol": tol,
            "group_steps": group_steps,
            "group_checks": group_checks,
            "group_k": group_k,
            "entry_group": entry_group,
            "rank": rank,
            "top": jnp.zeros((num_groups, size), dtype),
            "residual": jnp.zeros((num_groups, size), dtype),
            "converged": jnp.zeros((num_groups, size), bool),
        }
        return begin(base, 0, n, dtype)

    def start(state, g):
        vector = state["eig"]["vectors"]
        return begin(state, g, vector.shape[0], vector.dtype)

    def store(state, g):
        result = eigsh_result(state["eig"], size, check_rows)
        return {
            **state,
            "top": state["top"].at[g].set(result.eigenvalues),
            "residual": state["residual"].at[g].set(result.residual_norms),
            "converged": state["converged"].at[g].set(result.converged),
        }

    def focused(node):
        """``node`` (steps of an eigsh state) on ``state["eig"]``."""
        if isinstance(node, _driver.Seq):
            return _driver.Seq(*(focused(step) for step in node.steps))
        if isinstance(node, _driver.Repeat):
            count = node.count
            if callable(count):
                count = functools.partial(lambda c, state: c(state["eig"]), count)
            return _driver.Repeat(count, focused(node.body))
        if isinstance(node, _driver.Map):
            fn = node.fn
            return _driver.Map(lambda state, i: {**state, "eig": fn(state["eig"], i)})
        if isinstance(node, _driver.Apply):
            rows_fn, update, valid = node.rows, node.update, node.valid
            return dataclasses.replace(
                node,
                rows=lambda state, i: rows_fn(state["eig"], i),
                update=lambda state, i, w: {**state, "eig": update(state["eig"], i, w)},
                valid=None if valid is None else (lambda state: valid(state["eig"])),
            )
        raise TypeError(f"internal: cannot focus {node!r}")

    body = _driver.Repeat(
        num_groups, _driver.Seq(_driver.Map(start), focused(steps), _driver.Map(store))
    )

    def finish(state, specs, *args):
        return state["top"], state["residual"], state["converged"]

    return _driver.Program(init, body, finish, frozen=True, name="block_top")


@functools.cache
def _block_program(num_groups: int, num_probes: int, batch_size, recipes) -> _driver.Program:
    """Per group ``j`` and probe ``i``, for every requested operator: the squared norm of each
    group's part of ``A z`` (the column ``j`` of the blocks' Frobenius norms) and ``z^T A z``
    (group ``j``'s trace), for probes ``z`` on group ``j``'s entries alone."""
    atoms = tuple(range(max(max(recipe_atoms(r)) for r in recipes) + 1))

    def init(specs, key, entry_group, coefficients):
        n, dtype = specs[0].size, specs[0].dtype
        wide = jnp.promote_types(dtype, jnp.float32)
        return {
            "key": key,
            "entry_group": entry_group,
            "coefficients": coefficients,
            "z": jnp.zeros((num_probes, n), dtype),
            "squares": tuple(
                jnp.zeros((num_groups, num_probes, num_groups), wide) for _ in recipes
            ),
            "quads": tuple(jnp.zeros((num_groups, num_probes), wide) for _ in recipes),
        }

    def probes(state, j):
        z = state["z"]
        draws = probe_rows(
            jax.random.fold_in(state["key"], j), jnp.arange(num_probes), z.shape[1], z.dtype
        )
        return {**state, "z": draws * (state["entry_group"] == j).astype(z.dtype)}

    def statistics(state, j, products):
        z, values = state["z"], dict(enumerate(products))
        squares, quads = list(state["squares"]), list(state["quads"])
        for k, recipe in enumerate(recipes):
            az = combine(recipe, values, state["coefficients"])
            wide = az.astype(jnp.promote_types(az.dtype, jnp.float32))
            per_group = jax.ops.segment_sum(
                (wide**2).T, state["entry_group"], num_segments=num_groups
            ).T
            squares[k] = squares[k].at[j].set(per_group)
            quads[k] = quads[k].at[j].set(jnp.sum(z * wide, axis=1))
        return {**state, "squares": tuple(squares), "quads": tuple(quads)}

    step = _driver.Apply(
        lambda state, j: state["z"],
        statistics,
        operators=atoms,
        mode="map",
        batch_size=batch_size,
    )
    body = _driver.Repeat(num_groups, _driver.Seq(_driver.Map(probes), step))
    return _driver.Program(
        init,
        body,
        lambda state, specs, *args: (state["squares"], state["quads"]),
        name="block_summary",
    )


def block_summary(
    op: LinearOperator | tuple[LinearOperator, ...],
    groups: dict[str, Any] | Sequence | None = None,
    *,
    key: jax.Array,
    num_matvecs: int = UNSET,
    num_steps: int = UNSET,
    probe_batch_size: int | None = None,
    params: PyTree = None,
    probes: int = UNSET,
    lanczos_steps: int = UNSET,
    trace_matvecs: int = UNSET,
) -> BlockSummary | tuple[BlockSummary, ...]:
    """Traces, top eigenvalues and Frobenius norms of every block of a partition of the
    parameters.

    Args:
      op: an operator, or a tuple of operators of one layout (e.g. ``(H, G, H - G)``): then a
        tuple of summaries on shared probes, each distinct operator multiplied once a probe.
      groups: ``{name: selector}`` (default :func:`layer_groups`); every parameter leaf must
        belong to exactly one group for the Frobenius table to add up.
      key: PRNG key; group ``j``'s probes are ``rademacher(fold_in(key, j), (num_matvecs, n))``
        restricted to its entries.
      num_matvecs: probes per group, default 16 (deprecated name: ``probes``). Each probe's
        product gives a column of block norms and the group's Hutchinson trace.
      num_steps: Lanczos steps for each diagonal block's top eigenvalue (at most the block's
        size), default 20; ``0`` skips them (NaN). Deprecated name: ``lanczos_steps``. ``trace_matvecs`` is
        deprecated and ignored: the traces come from the same probes.
      probe_batch_size: probes multiplied together (vmapped); default one at a time.

    The probe statistics of all groups are one compiled program, compiled once per number of
    groups and probes whatever the partition; they are reduced on the host in float64.
    Cost: ``groups × (num_matvecs + 2 num_steps + 1)`` products with each distinct operator
    (each top eigenvalue: ``num_steps`` Lanczos steps, as many again for eigsh's rank check and
    one product for its residual; fewer for a block smaller than ``num_steps``)."""
    num_matvecs = renamed("block_summary", "probes", "num_matvecs", probes, num_matvecs, 16)
    num_steps = renamed("block_summary", "lanczos_steps", "num_steps", lanczos_steps, num_steps, 20)
    if trace_matvecs is not UNSET:
        warn_once(
            "block_summary: trace_matvecs= is deprecated and ignored; the traces now come from "
            "the num_matvecs probes on each group (Hutchinson, with its standard error)"
        )
    single = isinstance(op, LinearOperator)
    ops = (op,) if single else tuple(op)
    for other in ops:
        require_square(other, "block_summary")
        if other.layout != ops[0].layout:
            raise ValueError("block_summary: operators on shared probes need one layout")
    check_key(key)
    num_matvecs = positive_int(num_matvecs, "num_matvecs")
    if num_matvecs < 2:
        raise ValueError(
            f"block_summary needs num_matvecs >= 2 for a standard error, got {num_matvecs}"
        )
    masks = _partition(ops[0], groups, params)
    owners = np.sum([np.array(m) for m in masks.values()], axis=0)
    if np.any(owners != 1):
        raise ValueError("groups must partition the parameter leaves: every leaf in exactly one")
    layout = ops[0].layout
    names = tuple(masks)
    entry_group, rank, sizes = _group_index(layout, masks)
    fam = family(ops)
    program = _block_program(len(names), num_matvecs, probe_batch_size, fam.recipes)
    squares, quads = _driver.run(
        program, fam.atoms, key, jnp.asarray(entry_group), fam.coefficients
    )
    out = []
    for k, recipe_op in enumerate(ops):
        sq = np.asarray(squares[k], np.float64)  # (column j, probe, row i)
        quad = np.asarray(quads[k], np.float64)  # (group j, probe)
        if not (np.all(np.isfinite(sq)) and np.all(np.isfinite(quad))):
            raise FloatingPointError("block_summary: a matvec returned NaN or inf")
        root = np.sqrt(num_matvecs)
        top, residual = np.full(len(names), np.nan), np.full(len(names), np.nan)
        converged = np.zeros(len(names), bool)
        if num_steps:
            top, residual, converged = (
                column[:, 0]
                for column in _block_tops(
                    recipe_op, key, num_steps, entry_group, rank, np.asarray(sizes)
                )
            )
        out.append(
            BlockSummary(
                names,
                np.array(sizes),
                quad.mean(axis=1),
                quad.std(axis=1, ddof=1) / root,
                top,
                residual,
                sq.mean(axis=1).T,
                (sq.std(axis=1, ddof=1) / root).T,
                converged,
            )
        )
    return out[0] if single else tuple(out)


def _block_tops(op, key, num_steps, entry_group, rank, sizes, k=1, what="block_summary"):
    """The top ``k`` eigenvalues of every diagonal block (``entry_group``'s groups; at most the
    block's size), each with its residual and whether it is certified: one compiled program for
    all of them. Arrays ``(groups, k)``; NaN (and not converged) past a block's size."""
    group_k = np.minimum(k, sizes)
    steps = np.maximum(np.minimum(num_steps, sizes), group_k)
    # The rank check as eigsh's default: as many steps again, none for a block spanned already.
    checks = np.where(steps == sizes, 0, np.minimum(steps, sizes - 1))
    rows = bucket(int(steps.max()), op.size)
    check_rows = bucket(int(checks.max()), op.size) if checks.max() > 0 else 0
    check_basis_memory(op, rows + check_rows, what)
    tol = float(jnp.finfo(op.dtype).eps) ** 0.5
    size = min(max(8, 1 << (k - 1).bit_length()), rows)  # as eigsh: one program per bucket
    program = _block_top_program(len(sizes), rows, check_rows, size)
    top, residual, converged = _driver.run(
        program,
        (op,),
        key,
        jnp.asarray(tol, op.dtype),
        jnp.asarray(steps, jnp.int32),
        jnp.asarray(checks, jnp.int32),
        jnp.asarray(group_k, jnp.int32),
        jnp.asarray(entry_group),
        jnp.asarray(rank),
    )
    valid = np.arange(k)[None, :] < group_k[:, None]

    def columns(values, fill):  # (groups, size) -> (groups, k): size may be below k (small blocks)
        values = np.asarray(values)[:, :k]
        pad = np.full((len(group_k), k - values.shape[1]), fill, values.dtype)
        return np.where(valid, np.concatenate([values, pad], axis=1), fill)

    top = columns(np.asarray(top, np.float64), np.nan)
    if not np.all(np.isfinite(top[valid])):
        raise FloatingPointError(f"{what}: a top eigenvalue is NaN or inf")
    return top, columns(np.asarray(residual, np.float64), np.nan), columns(converged, False)


class BlockEigenvalues(NamedTuple):
    """The top eigenvalues of every diagonal block of a partition: per group ``g`` (``names``,
    ``sizes[g]`` parameters) ``eigenvalues[g]`` (descending), ``residual_norms[g]`` and
    ``converged[g]`` as :class:`~curvature.EigshResult` defines them; rows are NaN (not
    converged) past a block's size."""

    names: tuple[str, ...]
    sizes: np.ndarray
    eigenvalues: np.ndarray
    residual_norms: np.ndarray
    converged: np.ndarray


def block_eigenvalues(
    op: LinearOperator,
    groups: dict[str, Any] | Sequence | None = None,
    *,
    k: int = 1,
    key: jax.Array,
    num_steps: int = 20,
    params: PyTree = None,
) -> BlockEigenvalues:
    """The ``k`` largest eigenvalues of every diagonal block of ``groups`` (default
    :func:`layer_groups`; groups need not cover every leaf), each as :func:`curvature.eigsh`
    with ``which="LA"`` would give it for ``restrict(op, group)``: Lanczos of ``num_steps``
    steps (at most the block's size, at least ``k``), a rank check of as many steps again, and
    the residuals ``||A_gg v - lambda v||``.

    All blocks run in one compiled program (each block acts on full-length vectors masked to
    its entries), compiled once per number of groups whatever the partition, for every ``k`` up
    to a power of two (at least 8) and every ``num_steps`` in a size bucket. Cost: ``groups × (2 num_steps + k)`` full matvecs;
    memory: two bases of ``num_steps`` full-length vectors."""
    require_square(op, "block_eigenvalues")
    check_key(key)
    k = positive_int(k, "k")
    num_steps = positive_int(num_steps, "num_steps")
    masks = _partition(op, groups, params)
    entry_group, rank, sizes = _group_index(op.layout, masks)
    top, residual, converged = _block_tops(
        op, key, num_steps, entry_group, rank, sizes, k, "block_eigenvalues"
    )
    return BlockEigenvalues(tuple(masks), np.asarray(sizes), top, residual, converged)

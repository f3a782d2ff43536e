"""The Hessian by blocks: an operator restricted to a subset of the parameters, and summaries of
every block of a partition (per layer, by default).

* :func:`restrict` gives ``P_rows A P_colsᵀ`` for selectors of parameter leaves. A diagonal block
  (``cols=None``) is a :class:`~curvature.LinearOperator` like any other: every estimator works on
  it, so ``trace(restrict(R, layer))`` is a per-layer trace and
  ``spectral_density(restrict(H, block))`` a per-block density (Zhang et al. 2024, "Why
  Transformers Need Adam: A Hessian Perspective"). An off-diagonal block is a
  :class:`BlockOperator` (``m x k``) for ``@``, :func:`~curvature.dense` and
  :func:`~curvature.frobenius_norm_squared`. Either costs one full matvec a product.
* :func:`block_summary`: per group the trace (Hutch++), the top eigenvalue (Lanczos) and, per pair
  of groups, the squared Frobenius norm of the block with its standard error, from one probe
  matvec per group and probe (a probe on group ``j`` yields every block of column ``j`` at once).
* :func:`block_densities`: the spectral density (SLQ) of every diagonal block.
* :func:`layer_groups`: the default partition, one group per layer of the parameter pytree.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvature._driving import host_driven
from curvature.linear_operator import Layout, LinearOperator, apply_rows

__all__ = [
    "BlockOperator",
    "BlockSummary",
    "block_densities",
    "block_summary",
    "layer_groups",
    "restrict",
]

PyTree = Any
Selector = PyTree | Callable[[tuple, jax.Array], bool]


def _leaf_mask(op: LinearOperator, selector: Selector, params: PyTree, what: str) -> list[bool]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    if callable(selector):
        mask = [bool(selector(path, leaf)) for path, leaf in flat]
    else:
        try:
            chosen = jax.tree_util.tree_map(lambda _, s: bool(s), params, selector)
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


def _sub_layout(params: PyTree, mask: list[bool]) -> Layout:
    leaves, treedef = jax.tree_util.tree_flatten(params)
    kept = [leaf if keep else None for leaf, keep in zip(leaves, mask, strict=True)]
    return Layout.of(jax.tree_util.tree_unflatten(treedef, kept))


def _embed(v: jax.Array, ranges, size: int) -> jax.Array:
    full = jnp.zeros((size,), v.dtype)
    offset = 0
    for start, stop in ranges:
        full = full.at[start:stop].set(v[offset : offset + stop - start])
        offset += stop - start
    return full


def _extract(w: jax.Array, ranges) -> jax.Array:
    return jnp.concatenate([w[start:stop] for start, stop in ranges])


@dataclasses.dataclass(frozen=True)
class _Restricted:
    fn: Callable
    size: int  # the full operator's n
    rows: tuple[tuple[int, int], ...]
    cols: tuple[tuple[int, int], ...]
    name = "restricted"

    def __call__(self, operands, v):
        return _extract(self.fn(operands, _embed(v, self.cols, self.size)), self.rows)

    def prepare(self, operands):
        prepare = getattr(self.fn, "prepare", None)
        linear = prepare(operands) if prepare is not None else None
        if linear is None:
            return None
        return lambda v: _extract(linear(_embed(v, self.cols, self.size)), self.rows)

    @property
    def streamed(self) -> bool:
        return bool(getattr(self.fn, "streamed", False))

    def apply_rows(self, operands, rows):
        full = jax.vmap(lambda v: _embed(v, self.cols, self.size))(rows)
        hook = getattr(self.fn, "apply_rows", None)
        products = hook(operands, full) if hook else jax.vmap(lambda v: self.fn(operands, v))(full)
        return jax.vmap(lambda w: _extract(w, self.rows))(products)


class BlockOperator(LinearOperator):
    """An off-diagonal block ``P_rows A P_colsᵀ``: ``m x k``, not symmetric. ``op @ v`` takes a
    vector of the columns' parameters (``unravel_in`` / ``ravel_in``) and gives one of the rows'
    (``unravel`` / ``ravel``); only ``@``, :func:`~curvature.dense` and
    :func:`~curvature.frobenius_norm_squared` accept it."""

    def __init__(self, fn, operands, layout: Layout, in_layout: Layout):
        super().__init__(fn, operands, layout)
        self.in_layout = in_layout

    def tree_flatten(self):
        return (self.operands,), (self.fn, self.layout, self.in_layout)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(aux[0], children[0], aux[1], aux[2])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.layout.size, self.in_layout.size)

    def prepared(self) -> BlockOperator:
        out = LinearOperator.prepared(self)
        if out is self:
            return self
        return BlockOperator(out.fn, out.operands, self.layout, self.in_layout)

    def ravel_in(self, tree: PyTree) -> jax.Array:
        return self.in_layout.ravel(tree)

    def unravel_in(self, vector: jax.Array) -> PyTree:
        return self.in_layout.unravel(vector)

    def matvec(self, v: jax.Array) -> jax.Array:
        v = jnp.asarray(v)
        if v.shape != (self.shape[1],):
            raise ValueError(f"matvec expects a vector of shape ({self.shape[1]},), got {v.shape}")
        return _block_matvec(self, v)

    def __matmul__(self, x):
        x = jnp.asarray(x)
        if x.ndim == 1:
            return self.matvec(x)
        if x.ndim != 2 or x.shape[0] != self.shape[1]:
            raise ValueError(f"op @ x needs x of shape ({self.shape[1]},) or ({self.shape[1]}, k)")
        return _block_matmat(self, x)

    def _combine(self, other, sign):
        raise TypeError("off-diagonal blocks do not combine; restrict the combination instead")

    def __repr__(self):
        return f"BlockOperator(shape={self.shape}, dtype={self.dtype})"


jax.tree_util.register_pytree_node_class(BlockOperator)


@host_driven
@jax.jit
def _block_matvec(op, v):
    return op.apply(v)


@host_driven
@jax.jit
def _block_matmat(op, x):
    return op.prepared().apply_rows(x.T).T


def restrict(
    op: LinearOperator, rows: Selector, cols: Selector | None = None, *, params: PyTree = None
) -> LinearOperator:
    """The block ``P_rows A P_colsᵀ`` of ``op`` on a subset of the parameter leaves.

    Args:
      op: an operator built from parameters (:func:`~curvature.hessian`, ``gauss_newton``,
        ``empirical_fisher``, combinations such as ``H - G``).
      rows, cols: selectors: a pytree of bools shaped like the parameters (one per leaf) or a
        callable ``(path, leaf) -> bool``. ``cols=None`` is the diagonal block of ``rows``.
      params: the parameters, for selectors; by default the operator's own (found in its
        operands; pass them for combinations of operators built elsewhere).

    Returns a :class:`~curvature.LinearOperator` for a diagonal block (every estimator accepts
    it; ``ravel`` / ``unravel`` map its vectors to pytrees with ``None`` for the leaves left out)
    or a :class:`BlockOperator` for an off-diagonal one. A product costs one full matvec.
    """
    if isinstance(op, BlockOperator) or isinstance(op.fn, _Restricted):
        raise ValueError("restrict applies to a full operator, not to a block of one")
    params = _params_of(op) if params is None else params
    if Layout.of(params) != op.layout:
        raise ValueError("params do not match the operator's layout (shapes and dtypes of leaves)")
    row_mask = _leaf_mask(op, rows, params, "rows")
    col_mask = row_mask if cols is None else _leaf_mask(op, cols, params, "cols")
    return _restricted(op, params, row_mask, col_mask)


def _restricted(op, params, row_mask: list[bool], col_mask: list[bool]) -> LinearOperator:
    fn = _Restricted(op.fn, op.size, _ranges(op.layout, row_mask), _ranges(op.layout, col_mask))
    if row_mask == col_mask:
        return LinearOperator(fn, op.operands, _sub_layout(params, row_mask))
    return BlockOperator(
        fn, op.operands, _sub_layout(params, row_mask), _sub_layout(params, col_mask)
    )


def _params_of(op: LinearOperator) -> PyTree:
    def find(operands):
        if isinstance(operands, dict) and "params" in operands:
            return operands["params"]
        if isinstance(operands, tuple):  # a combination: ((c, operands), ...)
            for part in operands:
                found = find(part[1]) if isinstance(part, tuple) and len(part) == 2 else None
                if found is not None:
                    return found
        return None

    found = find(op.operands)
    if found is None:
        raise ValueError("this operator holds no parameters; pass params= to restrict")
    return found


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
    """Per group ``g`` (``names``): ``trace[g]`` ± ``trace_se[g]`` (Hutch++ on the diagonal
    block), ``top[g]`` with ``top_residual[g]`` (Lanczos); per pair: ``frobenius_sq[i, j]`` ±
    ``frobenius_sq_se[i, j]``, the squared Frobenius norm of block ``(i, j)``, from ``probes``
    Rademacher probes on group ``j``. Rows of a symmetric operator's summary add up:
    ``frobenius_sq.sum()`` estimates ``||A||_F^2``."""

    names: tuple[str, ...]
    sizes: np.ndarray
    trace: np.ndarray
    trace_se: np.ndarray
    top: np.ndarray
    top_residual: np.ndarray
    frobenius_sq: np.ndarray
    frobenius_sq_se: np.ndarray


@host_driven
@functools.partial(jax.jit, static_argnames="num_groups")
def _block_norms(op, z_full, group_of_entry, *, num_groups):
    # One full matvec per probe on group j's entries: the squared norm of every block (i, j).
    products = apply_rows(op.prepared(), z_full)  # (probes, n)
    per_group = jax.ops.segment_sum((products**2).T, group_of_entry, num_segments=num_groups)
    return per_group.T  # (probes, groups)


def _partition(op, groups, params) -> tuple[PyTree, dict[str, list[bool]]]:
    params = _params_of(op) if params is None else params
    if groups is None:
        groups = layer_groups(params)
    if not isinstance(groups, dict):
        groups = {f"group{i}": g for i, g in enumerate(groups)}
    masks = {name: _leaf_mask(op, sel, params, f"group {name!r}") for name, sel in groups.items()}
    return params, masks


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
    Zhang et al. (2024). Group ``g`` (in order) uses ``jax.random.split(key, len(groups))[g]``;
    a block smaller than ``num_steps`` gets as many steps as its size (then exact per probe).

    Cost: ``groups × num_probes × num_steps`` full matvecs."""
    from curvature.density import spectral_density

    params, masks = _partition(op, groups, params)
    keys = jax.random.split(key, len(masks))
    out = {}
    for k, (name, mask) in zip(keys, masks.items(), strict=True):
        block = _restricted(op, params, mask, mask)
        out[name] = spectral_density(
            block, num_probes=num_probes, num_steps=min(num_steps, block.size), key=k
        )
    return out


def block_summary(
    op: LinearOperator,
    groups: dict[str, Any] | Sequence | None = None,
    *,
    key: jax.Array,
    probes: int = 16,
    trace_matvecs: int = 30,
    lanczos_steps: int = 20,
    params: PyTree = None,
) -> BlockSummary:
    """Traces, top eigenvalues and Frobenius norms of every block of a partition of the
    parameters: ``groups`` maps names to selectors (default :func:`layer_groups`), and every
    parameter leaf must belong to exactly one group for the Frobenius table to add up.

    Cost: ``groups × (probes + trace_matvecs + lanczos_steps + 1)`` matvecs; ``lanczos_steps=0``
    skips the top eigenvalues (NaN)."""
    from curvature.krylov import eigsh
    from curvature.stochastic_trace import diagonal, rademacher, trace

    params, masks = _partition(op, groups, params)
    owners = np.sum([np.array(m) for m in masks.values()], axis=0)
    if np.any(owners != 1):
        raise ValueError("groups must partition the parameter leaves: every leaf in exactly one")
    names = tuple(masks)
    entry_group = np.zeros(op.size, np.int32)
    sizes = []
    for g, mask in enumerate(masks.values()):
        for start, stop in _ranges(op.layout, mask):
            entry_group[start:stop] = g
        sizes.append(sum(stop - start for start, stop in _ranges(op.layout, mask)))
    keys = jax.random.split(key, 3 * len(names))
    fro = np.zeros((len(names), len(names)))
    fro_se = np.zeros_like(fro)
    tr, tr_se, top, res = (np.zeros(len(names)) for _ in range(4))
    for j, name in enumerate(names):
        z = rademacher(keys[3 * j], (probes, op.size), op.dtype)
        z = z * jnp.asarray(entry_group == j, op.dtype)  # a probe on group j alone
        sq = _block_norms(op, z, jnp.asarray(entry_group), num_groups=len(names))
        sq = np.asarray(sq, np.float64)
        fro[:, j] = sq.mean(axis=0)
        fro_se[:, j] = sq.std(axis=0, ddof=1) / np.sqrt(probes)
        block = _restricted(op, params, masks[name], masks[name])
        if block.size > trace_matvecs:
            t = trace(block, num_matvecs=trace_matvecs, key=keys[3 * j + 1])
            tr[j], tr_se[j] = float(t.value), float(t.standard_error)
        else:  # a small block: exactly, from its n <= trace_matvecs unit vectors
            tr[j] = float(jnp.sum(diagonal(block, method="exact").diagonal))
        if lanczos_steps:
            e = eigsh(block, k=1, num_steps=min(lanczos_steps, block.size), key=keys[3 * j + 2])
            top[j], res[j] = float(e.eigenvalues[0]), float(e.residual_norms[0])
        else:  # not asked for
            top[j] = res[j] = np.nan
    return BlockSummary(names, np.array(sizes), tr, tr_se, top, res, fro, fro_se)

"""Diagonal preconditioners against the curvature: how well a diagonal (Adam's or RMSProp's second
moment, an empirical Fisher diagonal) tracks the exact one, and what dividing by it does to the
spectrum.

* :func:`compare_diagonals`: Pearson and Spearman correlation of two diagonals over the
  parameters, per layer and overall, with the exact zeros of the reference excluded and counted,
  and the log-log correlation over the entries where both are positive.
* :func:`preconditioned`: ``P^{-1/2} A P^{-1/2}`` for a positive diagonal ``P``, a
  :class:`~curvature.LinearOperator` that every estimator accepts. Its eigenvalues are those of
  ``P^{-1} A``, the curvature that a step ``-η P^{-1} g`` sees.
* :func:`conditioning` / :func:`compare_conditioning`: both ends of the spectrum (Lanczos) and an
  effective condition number, of an operator and of its preconditioned form.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvature._checks import is_traced, positive_int
from curvature._deprecations import UNSET, renamed, warn_once
from curvature.blocks import _leaf_mask, layer_groups
from curvature.linear_operator import Layout, LinearOperator, operator_type

__all__ = [
    "Conditioning",
    "ConditioningComparison",
    "DiagonalComparison",
    "DiagonalCorrelation",
    "Preconditioned",
    "compare_conditioning",
    "compare_diagonals",
    "conditioning",
    "preconditioned",
]

PyTree = Any

# --------------------------------------------------------------------------------------------
# Correlations of diagonals.


class DiagonalCorrelation(NamedTuple):
    """How well ``estimate`` tracks ``exact`` over a set of parameters.

    Entry ``i`` is an *exact zero* when ``exact[i] == 0`` exactly (e.g. a weight on a constant
    input pixel: its row and column of the Hessian vanish, whatever the data). Exact zeros are
    excluded from every correlation and counted: ``num_zeros`` of them, ``num_both_zero`` of
    which have ``estimate[i] == 0`` too. Left in, such pairs sit at one corner of a scatter and
    inflate a correlation (in logs without bound).

    Attributes:
      pearson: Pearson correlation of ``estimate`` and ``exact`` over the ``num_compared``
        entries with ``exact != 0`` (NaN below 2 entries or for a constant vector).
      spearman: Spearman's rank correlation over the same entries (Pearson of the ranks, ties
        given their average rank, as ``scipy.stats.spearmanr``).
      log_pearson: Pearson correlation of ``log estimate`` and ``log exact`` over the ``num_log``
        entries where both are > 0 (negative curvature has no logarithm; pass ``abs`` values to
        compare magnitudes).
      num_compared, num_zeros, num_both_zero, num_log: entry counts, as above.
    """

    pearson: float
    spearman: float
    log_pearson: float
    num_compared: int
    num_zeros: int
    num_both_zero: int
    num_log: int


class DiagonalComparison(NamedTuple):
    """:func:`compare_diagonals`: ``overall`` over all parameters and, per group (layer),
    ``groups[name]`` over that group's entries."""

    overall: DiagonalCorrelation
    groups: dict[str, DiagonalCorrelation]


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
    return float(np.sum(dx * dy) / denom) if denom > 0 else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks ``1 .. len(x)`` of the entries of ``x``, ties given the mean of their ranks."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    out = np.empty(len(x), np.float64)
    out[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # ranks first+1 .. first+count
    return out


def _correlation(estimate: np.ndarray, exact: np.ndarray) -> DiagonalCorrelation:
    zero = exact == 0
    keep = ~zero
    x, y = estimate[keep], exact[keep]
    positive = (x > 0) & (y > 0)
    return DiagonalCorrelation(
        pearson=_pearson(x, y),
        spearman=_pearson(_ranks(x), _ranks(y)),
        log_pearson=_pearson(np.log(x[positive]), np.log(y[positive])),
        num_compared=int(keep.sum()),
        num_zeros=int(zero.sum()),
        num_both_zero=int(np.sum(zero & (estimate == 0))),
        num_log=int(positive.sum()),
    )


def _host(tree: PyTree, what: str) -> list[np.ndarray]:
    leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree_util.tree_leaves(tree)]
    for leaf in leaves:
        if not np.all(np.isfinite(leaf)):
            raise ValueError(f"compare_diagonals: {what} has NaN or infinite entries")
    return leaves


def compare_diagonals(
    estimate: PyTree, exact: PyTree, *, groups: dict[str, Any] | None = None
) -> DiagonalComparison:
    """Correlations of a diagonal ``estimate`` with the ``exact`` one, overall and per group.

    Args:
      estimate: a parameter-shaped pytree (e.g. Adam's bias-corrected second moment) or a flat
        vector.
      exact: the reference, of the same structure and shapes as ``estimate`` (e.g.
        ``op.unravel(diagonal(op, method="exact").diagonal)``).
      groups: ``{name: selector}``. For pytrees a selector is a pytree of bools, one per leaf, or
        a callable ``(path, leaf) -> bool`` (as in :func:`~curvature.restrict`); the default is
        :func:`~curvature.layer_groups` of ``exact`` (one group per layer, a layer's weight and
        bias together). For flat vectors a selector is a boolean mask or an index array; the
        default is no groups.

    Returns a :class:`DiagonalComparison` of :class:`DiagonalCorrelation` (computed on the host
    in float64), whose documentation defines the exact zeros that are excluded and counted.
    """
    ex_leaves, treedef = jax.tree_util.tree_flatten(exact)
    est_leaves, est_treedef = jax.tree_util.tree_flatten(estimate)
    if est_treedef != treedef:
        raise ValueError(
            f"compare_diagonals: estimate's structure {est_treedef} differs from exact's {treedef}"
        )
    for a, b in zip(est_leaves, ex_leaves, strict=True):
        if np.shape(a) != np.shape(b):
            raise ValueError(
                f"compare_diagonals: a leaf of shape {np.shape(a)} against {np.shape(b)}"
            )
    est = np.concatenate([x.ravel() for x in _host(est_leaves, "estimate")])
    ex = np.concatenate([x.ravel() for x in _host(ex_leaves, "exact")])
    flat = treedef == jax.tree_util.tree_structure(0)
    if groups is None:
        groups = {} if flat else layer_groups(exact)
    sizes = [int(np.size(leaf)) for leaf in ex_leaves]
    per_group = {}
    for name, selector in groups.items():
        if flat:
            mask = np.zeros(len(ex), bool)
            mask[np.asarray(selector)] = True
        else:
            leaf_mask = _leaf_mask(selector, exact, f"group {name!r}")
            mask = np.repeat(np.asarray(leaf_mask, bool), sizes)
        per_group[name] = _correlation(est[mask], ex[mask])
    return DiagonalComparison(_correlation(est, ex), per_group)


# --------------------------------------------------------------------------------------------
# The preconditioned operator.


@operator_type
class Preconditioned(LinearOperator):
    """``S A S`` with ``S = diag(scale)``, ``scale = P^{-1/2}``: :func:`preconditioned`. A
    product is one product of ``inner``; the exact diagonal is ``scale^2 diag(A)`` when ``A``
    has a fast one."""

    inner: LinearOperator
    scale: jax.Array

    @property
    def layout(self) -> Layout:
        return self.inner.layout

    @property
    def streamed(self) -> bool:
        return self.inner.streamed

    @property
    def has_fast_diagonal(self) -> bool:
        return self.inner.has_fast_diagonal

    @property
    def name(self) -> str:
        return f"{self.inner.name} (preconditioned)"

    def apply(self, v):
        s = self.scale
        return s * self.inner.apply(s * v.astype(self.dtype))

    def apply_rows(self, rows):
        return self.inner.apply_rows(rows.astype(self.dtype) * self.scale) * self.scale

    def host_apply_rows(self, rows):
        if not self.streamed:
            return super().host_apply_rows(rows)
        scaled = _scaled(jnp.asarray(rows, self.dtype), self.scale)
        return _scaled(self.inner.host_apply_rows(scaled), self.scale)

    def prepared(self):
        # Inside compiled code the inner operator's linearisation; outside, its held form.
        return Preconditioned(self.inner.prepared(), self.scale)

    def exact_diagonal(self):
        # diag(S A S) = s^2 diag(A).
        return self.scale**2 * self.inner.exact_diagonal()

    def host_exact_diagonal(self):
        if not self.streamed:
            return super().host_exact_diagonal()
        return _scaled(_scaled(self.inner.host_exact_diagonal(), self.scale), self.scale)


@jax.jit
def _scaled(x, s):
    return x * s


def _flat(op: LinearOperator, x, what: str = "the diagonal") -> jax.Array:
    """A flat vector of length ``n`` as it is, a parameter-shaped pytree raveled; anything else
    an error that gives the expected length."""
    if isinstance(x, jax.Array | np.ndarray) and np.ndim(x) == 1 and np.size(x) == op.size:
        return jnp.asarray(x)
    try:
        return op.ravel(x)
    except (ValueError, TypeError) as error:
        given = (
            f"an array of shape {np.shape(x)}"
            if isinstance(x, jax.Array | np.ndarray)
            else f"a {type(x).__name__} that does not fit ({error})"
        )
        raise ValueError(
            f"{what} must be a flat vector of length n={op.size} (shape ({op.size},)) or a pytree "
            f"shaped like the parameters; got {given}"
        ) from None


def preconditioned(
    op: LinearOperator,
    preconditioner: PyTree | jax.Array = UNSET,
    /,
    *,
    diagonal: PyTree | jax.Array = UNSET,
) -> LinearOperator:
    """``P^{-1/2} A P^{-1/2}`` for the positive diagonal ``P = diag(preconditioner)``.

    Its eigenvalues are those of ``P^{-1} A``: the curvature along the eigenvectors that a
    preconditioned step ``-η P^{-1} g`` sees (for Adam ``P = sqrt(ν̂) + ε``, what its update
    divides by). Every estimator accepts it (``eigsh(preconditioned(H, p), k=5, key=key)``),
    inside compiled code too, and ``.prepared()`` keeps the work of ``A``'s own. A product
    costs one product with ``A``.

    Args:
      op: a symmetric operator (e.g. :func:`~curvature.hessian`).
      preconditioner: ``P``'s diagonal, a flat vector of length ``n`` or a pytree shaped like
        the parameters (anything else is refused, with the expected length ``n``); every entry
        finite and > 0 (checked when it is not traced). Its
        deprecated keyword name is ``diagonal=`` (``diagonal`` now always means an operator's
        own diagonal, as in :func:`conditioning`).

    Returns a :class:`Preconditioned` operator.
    """
    if not isinstance(op, LinearOperator) or op.shape[0] != op.shape[1]:
        raise TypeError(f"preconditioned needs a square LinearOperator, got {op!r}")
    preconditioner = renamed(
        "preconditioned", "diagonal", "preconditioner", diagonal, preconditioner, UNSET
    )
    if preconditioner is UNSET:
        raise TypeError("preconditioned(op, preconditioner): the diagonal P is missing")
    p = _flat(op, preconditioner, "preconditioned: the diagonal P").astype(op.dtype)
    if not is_traced(p):
        host = np.asarray(p)
        bad = ~(np.isfinite(host) & (host > 0))
        if bad.any():
            raise ValueError(
                f"preconditioned needs a finite, positive diagonal; {int(bad.sum())} of "
                f"{host.size} entries are not (add an ε, as Adam does)"
            )
    return Preconditioned(op, jax.lax.rsqrt(p))


# --------------------------------------------------------------------------------------------
# Both ends of the spectrum and a condition number.


class Conditioning(NamedTuple):
    """Both ends of a spectrum and an effective condition number.

    Attributes:
      eigenvalues, residual_norms, converged: ``eigsh(op, k=2 k, which="BE")``'s: the ``k``
        largest eigenvalues, descending, then the ``k`` smallest, descending (``top`` and
        ``bottom`` split them).
      mean: the mean eigenvalue over the non-trivial directions, ``tr A / m`` with ``m``
        (``num_nonzero``) the number of nonzero diagonal entries (exact: from the diagonal).
      condition: ``λmax / mean``, NaN when ``mean <= 0``. A Hessian is indefinite and, with
        constant inputs, singular, so ``λmax / λmin`` is infinite or undefined, and the smallest
        positive Ritz value is an interior eigenvalue that Lanczos has not converged. ``λmax /
        mean`` is defined, exact up to Lanczos' ``λmax``, and says what gradient descent at its
        largest stable step ``2 / λmax`` makes of an average direction (it moves by a fraction
        ``~ 2 mean / λmax`` per step); it is ``≥ 1`` and is 1 only for a multiple of the identity.
      num_matvecs: the Lanczos run's matvecs (the diagonal's not included).
    """

    eigenvalues: jax.Array
    residual_norms: jax.Array
    converged: jax.Array
    mean: float
    condition: float
    num_nonzero: int
    num_matvecs: int

    @property
    def top(self) -> jax.Array:
        """The ``k`` largest eigenvalues, descending."""
        return self.eigenvalues[: len(self.eigenvalues) // 2]

    @property
    def bottom(self) -> jax.Array:
        """The ``k`` smallest eigenvalues, ascending (the most negative first)."""
        return self.eigenvalues[len(self.eigenvalues) // 2 :][::-1]


class ConditioningComparison(NamedTuple):
    """:func:`compare_conditioning`: the operator's :class:`Conditioning` and its
    preconditioned form's; ``improvement`` is the ratio of their condition numbers."""

    original: Conditioning
    preconditioned: Conditioning

    @property
    def improvement(self) -> float:
        """``condition(A) / condition(P^{-1/2} A P^{-1/2})``: above 1 when ``P`` helped."""
        return self.original.condition / self.preconditioned.condition


def _conditioning(op, diag, *, k, num_steps, key) -> Conditioning:
    from curvature.krylov import eigsh

    result = eigsh(op, k=2 * k, which="BE", num_steps=num_steps, key=key)
    diag = np.asarray(diag, np.float64)
    m = int(np.sum(diag != 0))
    mean = float(diag.sum() / m) if m else float("nan")
    top = float(result.eigenvalues[0])
    condition = top / mean if mean > 0 else float("nan")
    return Conditioning(
        result.eigenvalues,
        result.residual_norms,
        result.converged,
        mean,
        condition,
        m,
        int(result.num_matvecs),
    )


def _exact_diagonal(op, diagonal):
    if diagonal is not None:
        return _flat(op, diagonal, "diagonal")
    from curvature.stochastic_trace import diagonal as diagonal_of

    return diagonal_of(op, method="exact").diagonal


def conditioning(
    op: LinearOperator,
    /,
    *,
    k: int = UNSET,
    num_steps: int | None = None,
    key: jax.Array,
    diagonal: PyTree | jax.Array | None = None,
) -> Conditioning:
    """The ``k`` largest and ``k`` smallest eigenvalues of ``op`` (one Lanczos run,
    ``which="BE"``, ``num_steps`` steps: :func:`~curvature.eigsh`'s default for ``2 k``) and the
    effective condition number ``λmax / mean eigenvalue`` (:class:`Conditioning` defines it).

    ``diagonal`` is ``op``'s exact diagonal (flat or a pytree) if you have it; otherwise it is
    computed, :func:`~curvature.diagonal` with ``method="exact"`` (``n`` matvecs for a Hessian:
    small networks). ``k`` is required (leaving it out warns and takes 3, its old default)."""
    k = positive_int(_k(k, "conditioning"), "k")
    diag = _exact_diagonal(op, diagonal)
    return _conditioning(op, diag, k=k, num_steps=num_steps, key=key)


def _k(k, where: str) -> int:
    if k is UNSET:
        warn_once(f"{where}: k will be required, as in eigsh; pass k=3 for the old default")
        return 3
    return k


def compare_conditioning(
    op: LinearOperator,
    preconditioner: PyTree | jax.Array,
    /,
    *,
    k: int = UNSET,
    num_steps: int | None = None,
    key: jax.Array,
    diagonal: PyTree | jax.Array | None = None,
) -> ConditioningComparison:
    """:func:`conditioning` of ``op`` and of ``preconditioned(op, preconditioner)``, with the same
    Lanczos start (``key``). The preconditioned diagonal is ``diag(A) / P`` exactly, so the exact
    ``diagonal`` of ``op`` (given, or computed once) serves both. Cost: two Lanczos runs,
    ``2 (num_steps + 2 k)`` matvecs, and the diagonal's. ``k`` is required (leaving it out warns
    and takes 3)."""
    k = positive_int(_k(k, "compare_conditioning"), "k")
    scaled = preconditioned(op, preconditioner)
    diag = jnp.asarray(_exact_diagonal(op, diagonal))
    s2 = scaled.scale**2
    # The original as P = I: the same operator type as the preconditioned one, so the two
    # Lanczos runs share one compiled program (the products by 1 are exact).
    identity = preconditioned(op, jnp.ones(op.size, op.dtype))
    return ConditioningComparison(
        _conditioning(identity, diag, k=k, num_steps=num_steps, key=key),
        _conditioning(scaled, diag * s2, k=k, num_steps=num_steps, key=key),
    )

"""``blocks``: the curvature by layer (layers from ``curvature.layer_groups``) of H, of its
Gauss-Newton part G and of the residual R = H - G: per layer the trace, per pair of layers the
squared Frobenius norm of the block, each with its standard error, in one compiled program."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

import curvature as cv
from experiments.figures import structure
from experiments.measurements import _estimators
from experiments.measurements.base import Context, Measurement, at_least
from experiments.record import Estimate
from experiments.table import Column

# R's products are differences of H's and G's, each exact to round-off only: a same-layer share
# below this cannot be told from zero (ReLU's same-layer R, measured at ~1e-9 in float32), so the
# error bar of the share is never smaller.
ROUND_OFF_SHARE = 1e-6


@dataclasses.dataclass(frozen=True)
class Blocks:
    """The curvature by layer: per operator (``hessian``, ``gauss_newton``, ``residual``) the
    per-layer traces and the table of squared block Frobenius norms ``[i][j]`` (layer i's rows,
    layer j's columns), each with standard errors."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    trace: dict[str, tuple[float, ...]]
    trace_se: dict[str, tuple[float, ...]]
    frobenius_sq: dict[str, tuple[tuple[float, ...], ...]]
    frobenius_sq_se: dict[str, tuple[tuple[float, ...], ...]]

    def same_layer_share(self, operator: str = "residual") -> Estimate:
        """The share of ``||A||_F^2`` in same-layer blocks (the diagonal of the table), with a
        delta-method standard error (blocks estimated independently)."""
        table = np.asarray(self.frobenius_sq[operator])
        se = np.asarray(self.frobenius_sq_se[operator])
        same, total = float(np.trace(table)), float(table.sum())
        if total <= 0:
            return Estimate(math.nan, math.nan)
        share = same / total
        # d share / d block: (1 - share) / total on the diagonal, -share / total elsewhere.
        grad = np.where(np.eye(len(table), dtype=bool), 1.0 - share, -share) / total
        error = float(np.sqrt(np.sum((grad * se) ** 2)))
        return Estimate(share, max(error, ROUND_OFF_SHARE))


def _layer_of_entry(params) -> tuple[tuple[str, ...], np.ndarray]:
    """The layers of ``curvature.layer_groups(params)`` and, per entry of the flat parameter
    vector (``ravel_pytree`` order), the index of its layer."""
    groups = cv.layer_groups(params)
    sizes = [leaf.size for leaf in jax.tree_util.tree_leaves(params)]
    owner = np.zeros(len(sizes), np.int32)
    for g, selector in enumerate(groups.values()):
        owner[np.asarray(jax.tree_util.tree_leaves(selector), bool)] = g
    return tuple(groups), np.repeat(owner, sizes)


def blocks(ctx: Context) -> Blocks:
    """The curvature by layer (layers from ``curvature.layer_groups``) of H, G and R = H − G:
    per layer the trace (Hutchinson) and per pair of layers the squared Frobenius norm of the
    block, each with its standard error. ``num_matvecs`` Rademacher probes on each layer's
    entries, each multiplied once by H and once by G (R's products are their difference): a
    probe on layer j gives block (i, j) as ``||(A z)_i||^2`` and layer j's trace as ``z^T A z``.
    Cost: layers x num_matvecs matvecs of H and of G, one compiled program."""
    s = ctx.settings
    H, G = ctx.hessian(), ctx.gauss_newton()
    names, layer_of_entry = _layer_of_entry(ctx.params)
    count, m = len(names), s.num_matvecs
    key = ctx.key_for("blocks")
    z = jnp.concatenate(
        [
            cv.rademacher(jax.random.fold_in(key, j), (m, H.size), H.dtype)
            * jnp.asarray(layer_of_entry == j, H.dtype)
            for j in range(count)
        ]
    )
    stats = _estimators.block_statistics(H, G, z, jnp.asarray(layer_of_entry), num_groups=count)
    trace, trace_se, fro, fro_se = {}, {}, {}, {}
    for name, (squares, quad) in stats.items():
        squares = np.asarray(squares, np.float64).reshape(count, m, count)  # (column j, probe, i)
        quad = np.asarray(quad, np.float64).reshape(count, m)
        if not (np.all(np.isfinite(squares)) and np.all(np.isfinite(quad))):
            raise FloatingPointError("blocks: a matvec returned NaN or inf")
        fro[name] = tuple(tuple(float(v) for v in row) for row in squares.mean(axis=1).T)
        fro_se[name] = tuple(
            tuple(float(v) for v in row) for row in (squares.std(axis=1, ddof=1) / np.sqrt(m)).T
        )
        trace[name] = tuple(float(v) for v in quad.mean(axis=1))
        trace_se[name] = tuple(float(v) for v in quad.std(axis=1, ddof=1) / np.sqrt(m))
    return Blocks(
        names=names,
        sizes=tuple(int(np.sum(layer_of_entry == j)) for j in range(count)),
        trace=trace,
        trace_se=trace_se,
        frobenius_sq=fro,
        frobenius_sq_se=fro_se,
    )


BLOCKS = Measurement(
    "blocks",
    blocks,
    defaults={"num_matvecs": 32},  # probes per layer
    check=at_least(2, "num_matvecs"),
    record_type=Blocks,
    columns=(
        Column(
            "R same-layer",
            lambda r: r.blocks.same_layer_share("residual") if r.blocks else None,
            rank=120,
            legend="R same-layer: the share of ‖R‖F² in same-layer blocks (blocks of ‖·‖F² from "
            "probes on each layer; the rest couples different layers; 0 up to round-off for "
            "piecewise-linear activations such as ReLU)",
        ),
    ),
    figures=(structure.BLOCKS,),
    renamed={"probes": "num_matvecs"},
)

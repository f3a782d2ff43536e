"""``blocks``: the curvature by layer (layers from ``curvature.layer_groups``) of H, of its
Gauss-Newton part G and of the residual R = H - G: per layer the trace, per pair of layers the
squared Frobenius norm of the block, each with its standard error, in one compiled program."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

import curvature as cv
from experiments.figures import structure
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

    def summary(self, operator: str = "residual") -> cv.BlockSummary:
        """The library's summary of one operator's table (no top eigenvalues: NaN)."""
        nan = np.full(len(self.names), np.nan)
        return cv.BlockSummary(
            names=self.names,
            sizes=np.asarray(self.sizes),
            trace=np.asarray(self.trace[operator]),
            trace_se=np.asarray(self.trace_se[operator]),
            top=nan,
            top_residual=nan,
            frobenius_sq=np.asarray(self.frobenius_sq[operator]),
            frobenius_sq_se=np.asarray(self.frobenius_sq_se[operator]),
        )

    def same_layer_share(self, operator: str = "residual") -> Estimate:
        """The share of ``||A||_F^2`` in same-layer blocks (the diagonal of the table), with a
        delta-method standard error (``cv.BlockSummary.same_group_share``), never below the
        float32 round-off of the share."""
        share, error = self.summary(operator).same_group_share()
        if math.isnan(share):
            return Estimate(math.nan, math.nan)
        return Estimate(share, max(error, ROUND_OFF_SHARE))


def blocks(ctx: Context) -> Blocks:
    """The curvature by layer (layers from ``curvature.layer_groups``) of H, G and R = H − G:
    per layer the trace (Hutchinson) and per pair of layers the squared Frobenius norm of the
    block, each with its standard error. ``num_matvecs`` Rademacher probes on each layer's
    entries, each multiplied once by H and once by G (R's products are their difference): a
    probe on layer j gives block (i, j) as ``||(A z)_i||^2`` and layer j's trace as ``z^T A z``.
    Cost: layers x num_matvecs matvecs of H and of G, one compiled program."""
    s = ctx.settings
    H, G = ctx.hessian(), ctx.gauss_newton()
    summaries = cv.block_summary(
        (H, G, H - G),
        cv.layer_groups(ctx.params),
        key=ctx.key_for("blocks"),
        num_matvecs=s.num_matvecs,
        num_steps=0,
    )
    trace, trace_se, fro, fro_se = {}, {}, {}, {}
    for name, summary in zip(("hessian", "gauss_newton", "residual"), summaries, strict=True):
        fro[name] = tuple(tuple(float(v) for v in row) for row in summary.frobenius_sq)
        fro_se[name] = tuple(tuple(float(v) for v in row) for row in summary.frobenius_sq_se)
        trace[name] = tuple(float(v) for v in summary.trace)
        trace_se[name] = tuple(float(v) for v in summary.trace_se)
    return Blocks(
        names=summaries[0].names,
        sizes=tuple(int(v) for v in summaries[0].sizes),
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

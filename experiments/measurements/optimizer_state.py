"""``optimizer_state``: Adam's or RMSProp's bias-corrected second moment ν against the Hessian
diagonal (estimated, or exact), over the parameters, overall and per layer."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

import curvature as cv
from experiments.measurements.base import Context, Measurement, at_least
from experiments.measurements.diagonal import hessian_diagonal
from experiments.optimizers import OPTIMIZERS
from experiments.table import Column


@dataclasses.dataclass(frozen=True)
class Correlation:
    pearson: float
    spearman: float
    num_parameters: int
    num_zeros: int  # exact zeros of the curvature diagonal, excluded from both correlations


@dataclasses.dataclass(frozen=True)
class OptimizerState:
    """Adam / RMSProp's bias-corrected second moment against the Hessian diagonal estimate."""

    second_moment: Correlation  # nu against diag(H)
    sqrt_second_moment: Correlation  # sqrt(nu), what the update divides by, against |diag(H)|
    per_layer: dict[str, Correlation]


def _correlation(a: np.ndarray, b: np.ndarray, zero: np.ndarray) -> Correlation:
    from scipy import stats  # scipy only when the measurement runs

    keep = ~zero
    if keep.sum() < 3:
        return Correlation(float("nan"), float("nan"), int(keep.sum()), int(zero.sum()))
    pearson = float(np.corrcoef(a[keep], b[keep])[0, 1])
    spearman = float(stats.spearmanr(a[keep], b[keep]).statistic)
    return Correlation(pearson, spearman, int(keep.sum()), int(zero.sum()))


def optimizer_state(ctx: Context) -> OptimizerState | None:
    """Adam / RMSProp's bias-corrected second moment ν against the Hessian diagonal: Pearson and
    Spearman over parameters (exact zeros of the diagonal excluded and counted), overall and per
    layer; and √ν, what the update divides by, against |diag H|."""
    s = ctx.settings
    if ctx.step == 0:
        return None  # no gradient seen yet: the bias-corrected moment is 0/0
    nu_tree = OPTIMIZERS.get(ctx.config.train.optimizer).second_moment(ctx.opt_state)
    diag, _, _ = hessian_diagonal(ctx, s.num_matvecs, s.exact)
    layout = cv.Layout.of(ctx.params)
    nu = np.asarray(layout.ravel(nu_tree))
    zero = diag == 0.0
    ctx.spectra["second_moment"] = nu
    per_layer = {}
    offset = 0
    paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(ctx.params)[0]
    ]
    for path, size in zip(paths, layout.sizes, strict=True):
        part = slice(offset, offset + size)
        per_layer[path] = _correlation(nu[part], diag[part], zero[part])
        offset += size
    return OptimizerState(
        _correlation(nu, diag, zero),
        _correlation(np.sqrt(nu), np.abs(diag), zero),
        per_layer,
    )


def _check(settings, info):
    optimizer = info.get("optimizer")
    if optimizer is not None and OPTIMIZERS.get(optimizer).second_moment is None:
        adaptive = [n for n, o in OPTIMIZERS.items() if o.second_moment is not None]
        return f"needs an optimizer with a second moment ({', '.join(adaptive)}), not {optimizer!r}"
    return at_least(2, "num_matvecs")(settings, info)


OPTIMIZER_STATE = Measurement(
    "optimizer_state",
    optimizer_state,
    defaults={"num_matvecs": 100, "exact": False},
    check=_check,
    record_type=OptimizerState,
    columns=(
        Column(
            "ρ(ν, diag H)",
            lambda r: r.optimizer_state.second_moment.spearman if r.optimizer_state else None,
            rank=180,
            legend="ρ(ν, diag H): Spearman correlation of the optimizer's second moment with "
            "the Hessian diagonal",
        ),
    ),
    spectra=True,
    renamed={"diagonal_matvecs": "num_matvecs"},
)

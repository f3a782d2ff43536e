"""The built-in diagnostic measurements: the Hessian ``diagonal``, the empirical ``fisher``,
the curvature by layer (``blocks``), the optimizer's second moment against the diagonal
(``optimizer_state``) and per-example ``gradient_noise``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import curvature as cv
from experiments import train
from experiments.measure import Context, register_measurement
from experiments.measurements import _at_least, _eigen, _estimate, _steps_check
from experiments.record import (
    Blocks,
    Correlation,
    Diagonal,
    Estimate,
    Fisher,
    GradientNoise,
    OptimizerState,
)


def _hessian_diagonal(ctx: Context, matvecs: int, exact: bool):
    """``(diagonal, per-entry SE, Estimate of its mean)``, once per measurement and settings."""

    def run():
        H = ctx.hessian()
        if exact:  # n matvecs with the unit vectors, never the n x n matrix
            diag = np.asarray(cv.diagonal(H, method="exact").diagonal)
            return diag, np.zeros(H.size), Estimate(float(diag.mean()), 0.0, H.size)
        # The diagonal and the trace on the same probes: the diagonal's mean is tr / n, its
        # error bar the trace's over n (the entries share probes, so they are correlated).
        out = cv.hutchinson(
            H, ("diagonal", "trace"), num_matvecs=matvecs, key=ctx.key_for("diagonal")
        )
        d, tr = out["diagonal"], out["trace"]
        mean = Estimate(float(tr.value) / H.size, float(tr.standard_error) / H.size, matvecs)
        return np.asarray(d.diagonal), np.asarray(d.standard_error), mean

    return ctx.cached(("diagonal", matvecs, exact), run)


@register_measurement(
    "diagonal", defaults={"matvecs": 100, "exact": False}, check=_at_least(2, "matvecs")
)
def _diagonal(ctx: Context) -> Diagonal:
    """The Hessian diagonal: Bekas et al.'s estimator with per-entry standard errors, or with
    ``exact=True`` the exact diagonal (``curvature.diagonal(H, method="exact")``: n matvecs;
    small networks)."""
    s = ctx.settings
    diag, se, mean = _hessian_diagonal(ctx, s.matvecs, s.exact)
    ctx.spectra.update(diagonal=diag, diagonal_standard_error=se)
    negative = float(np.mean(diag < -2 * se)) if not s.exact else float(np.mean(diag < 0))
    return Diagonal(mean, negative, bool(s.exact))


@register_measurement(
    "fisher",
    defaults={"k": 5, "lanczos_steps": 40, "trace_matvecs": 30},
    check=lambda s, info: _steps_check()(s, info) or _at_least(4, "trace_matvecs")(s, info),
)
def _fisher(ctx: Context) -> Fisher:
    """The empirical Fisher (``curvature.empirical_fisher``) on the measurement set: its top
    eigenvalues (Lanczos) and its trace (Hutch++)."""
    s = ctx.settings
    F = ctx.cached(
        "F",
        lambda: cv.empirical_fisher(
            ctx.loss, ctx.params, ctx.data, batch_size=ctx.batch_size, check=False
        ),
    )
    top = cv.eigsh(F, k=s.k, which="LA", num_steps=s.lanczos_steps, key=ctx.key_for("fisher"))
    trace = cv.trace(F, num_matvecs=s.trace_matvecs, key=ctx.key_for("fisher_trace"))
    return Fisher(_eigen(top), _estimate(trace))


@register_measurement("blocks", defaults={"probes": 32}, check=_at_least(2, "probes"))
def _blocks(ctx: Context) -> Blocks:
    """The curvature by layer (layers from ``curvature.layer_groups``) of H, G and R = H - G:
    per layer the trace (Hutchinson) and per pair of layers the squared Frobenius norm of the
    block, each with its standard error. ``probes`` Rademacher probes on each layer's entries,
    each multiplied once by H and once by G (R's products are their difference): a probe on
    layer j gives block (i, j) as ``||(A z)_i||^2`` and layer j's trace as ``z^T A z``.
    Cost: layers x probes matvecs of H and of G, one compiled program."""
    s = ctx.settings
    H, G = ctx.hessian(), ctx.gauss_newton()
    summaries = cv.block_summary(
        (H, G, H - G),
        cv.layer_groups(ctx.params),
        key=ctx.key_for("blocks"),
        num_matvecs=s.probes,
        num_steps=0,
    )
    trace, trace_se, fro, fro_se = {}, {}, {}, {}
    for name, summary in zip(("hessian", "gauss_newton", "residual"), summaries, strict=True):
        fro[name] = tuple(tuple(float(v) for v in row) for row in summary.frobenius_sq)
        fro_se[name] = tuple(tuple(float(v) for v in row) for row in summary.frobenius_sq_se)
        trace[name] = tuple(float(v) for v in summary.trace)
        trace_se[name] = tuple(float(v) for v in summary.trace_se)
    first = summaries[0]
    return Blocks(
        names=first.names,
        sizes=tuple(int(v) for v in first.sizes),
        trace=trace,
        trace_se=trace_se,
        frobenius_sq=fro,
        frobenius_sq_se=fro_se,
    )


def _correlation(a: np.ndarray, b: np.ndarray, zero: np.ndarray) -> Correlation:
    from scipy import stats

    keep = ~zero
    if keep.sum() < 3:
        return Correlation(float("nan"), float("nan"), int(keep.sum()), int(zero.sum()))
    pearson = float(np.corrcoef(a[keep], b[keep])[0, 1])
    spearman = float(stats.spearmanr(a[keep], b[keep]).statistic)
    return Correlation(pearson, spearman, int(keep.sum()), int(zero.sum()))


def _optimizer_state_check(settings, info):
    optimizer = info.get("optimizer")
    if optimizer is not None and train.OPTIMIZERS.get(optimizer).second_moment is None:
        adaptive = [n for n, o in train.OPTIMIZERS.items() if o.second_moment is not None]
        return f"needs an optimizer with a second moment ({', '.join(adaptive)}), not {optimizer!r}"
    return _at_least(2, "diagonal_matvecs")(settings, info)


@register_measurement(
    "optimizer_state",
    defaults={"diagonal_matvecs": 100, "exact": False},
    check=_optimizer_state_check,
)
def _optimizer_state(ctx: Context) -> OptimizerState | None:
    """Adam / RMSProp's bias-corrected second moment ν against the Hessian diagonal: Pearson and
    Spearman over parameters (exact zeros of the diagonal excluded and counted), overall and per
    layer; and √ν, what the update divides by, against |diag H|."""
    s = ctx.settings
    if ctx.step == 0:
        return None  # no gradient seen yet: the bias-corrected moment is 0/0
    nu_tree = train.OPTIMIZERS.get(ctx.config.train.optimizer).second_moment(ctx.opt_state)
    diag, _, _ = _hessian_diagonal(ctx, s.diagonal_matvecs, s.exact)
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


@register_measurement(
    "gradient_noise",
    defaults={"num_examples": 256, "chunk": 32},
    check=_at_least(2, "num_examples,chunk"),
)
def _gradient_noise(ctx: Context) -> GradientNoise:
    """Per-example gradient noise on the first ``num_examples`` of the measurement set:
    ``tr Σ`` (unbiased) and B_simple = tr Σ / |ḡ|² (McCandlish et al. 2018)."""
    s = ctx.settings
    m = min(s.num_examples, len(ctx.data["y"]))
    sums = _per_example_sums(
        ctx.params, jax.tree_util.tree_map(lambda v: v[:m], ctx.data), loss=ctx.loss, chunk=s.chunk
    )
    total, squares = (np.asarray(x, np.float64) for x in sums)
    mean = total / m
    mean_sq = float(mean @ mean)
    trace_cov = float((squares - m * mean_sq) / (m - 1))
    return GradientNoise(
        trace_cov, mean_sq, trace_cov / mean_sq if mean_sq > 0 else float("inf"), m
    )


@functools.partial(jax.jit, static_argnames=("loss", "chunk"))
def _per_example_sums(params, data, *, loss, chunk: int):
    """``(Σ g_i, Σ |g_i|²)`` over the examples of ``data``, ``chunk`` at a time (a scan)."""
    layout = cv.Layout.of(params)
    wide = jnp.promote_types(layout.dtype, jnp.float32)

    def body(carry, block):
        g = jax.vmap(layout.ravel)(cv.per_example_gradients(loss, params, block)).astype(wide)
        return (carry[0] + g.sum(0), carry[1] + jnp.sum(g * g)), None

    full, rest = divmod(len(data["y"]), chunk)
    carry = (jnp.zeros(layout.size, wide), jnp.zeros((), wide))
    if full:
        blocks = jax.tree_util.tree_map(
            lambda v: v[: full * chunk].reshape((full, chunk) + v.shape[1:]), data
        )
        carry, _ = jax.lax.scan(body, carry, blocks)
    if rest:
        carry, _ = body(carry, jax.tree_util.tree_map(lambda v: v[full * chunk :], data))
    return carry

"""``gradient_noise``: per-example gradient noise, tr Σ of the per-example gradients and
McCandlish et al.'s (2018) simple noise scale B_simple = tr Σ / |ḡ|²."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import curvature as cv
from experiments.measurements.base import Context, Measurement, at_least
from experiments.table import Column


@dataclasses.dataclass(frozen=True)
class GradientNoise:
    """Per-example gradient noise: ``tr Σ`` (covariance of per-example gradients) against the
    squared mean gradient; ``simple_noise_scale = tr Σ / |g|^2`` is McCandlish et al.'s B_simple."""

    trace_covariance: float
    gradient_norm_sq: float
    simple_noise_scale: float
    num_examples: int


def gradient_noise(ctx: Context) -> GradientNoise:
    """Per-example gradient noise on the first ``num_examples`` of the measurement set:
    ``tr Σ`` (unbiased) and B_simple = tr Σ / |ḡ|² (McCandlish et al. 2018)."""
    s = ctx.settings
    m = min(s.num_examples, len(ctx.data["y"]))
    sums = _per_example_sums(
        ctx.params,
        jax.tree_util.tree_map(lambda v: v[:m], ctx.data),
        loss=ctx.loss,
        batch_size=s.batch_size,
    )
    total, squares = (np.asarray(x, np.float64) for x in sums)
    mean = total / m
    mean_sq = float(mean @ mean)
    trace_cov = float((squares - m * mean_sq) / (m - 1))
    return GradientNoise(
        trace_cov, mean_sq, trace_cov / mean_sq if mean_sq > 0 else float("inf"), m
    )


@functools.partial(jax.jit, static_argnames=("loss", "batch_size"))
def _per_example_sums(params, data, *, loss, batch_size: int):
    """``(Σ g_i, Σ |g_i|²)`` over the examples of ``data``, ``batch_size`` at a time (a scan)."""
    layout = cv.Layout.of(params)
    wide = jnp.promote_types(layout.dtype, jnp.float32)

    def body(carry, block):
        g = jax.vmap(layout.ravel)(cv.per_example_gradients(loss, params, block)).astype(wide)
        return (carry[0] + g.sum(0), carry[1] + jnp.sum(g * g)), None

    full, rest = divmod(len(data["y"]), batch_size)
    carry = (jnp.zeros(layout.size, wide), jnp.zeros((), wide))
    if full:
        blocks = jax.tree_util.tree_map(
            lambda v: v[: full * batch_size].reshape((full, batch_size) + v.shape[1:]), data
        )
        carry, _ = jax.lax.scan(body, carry, blocks)
    if rest:
        carry, _ = body(carry, jax.tree_util.tree_map(lambda v: v[full * batch_size :], data))
    return carry


GRADIENT_NOISE = Measurement(
    "gradient_noise",
    gradient_noise,
    # batch_size: per-example gradients computed together (a scan over such batches).
    defaults={"num_examples": 256, "batch_size": 32},
    check=at_least(2, "num_examples,batch_size"),
    record_type=GradientNoise,
    columns=(
        Column(
            "B_simple",
            lambda r: r.gradient_noise.simple_noise_scale if r.gradient_noise else None,
            rank=170,
            legend="B_simple: tr Σ/|g|² of per-example gradients",
        ),
    ),
    renamed={"chunk": "batch_size"},
)

"""Private copies of four library estimators, to be replaced by the public shared-probe API
(issue 15: ``curvature.trace((H, G, H - G), ...)``, ``curvature.frobenius_norm_squared((H, G,
H - G), ...)``, ``curvature.diagonal(...)`` and a fast ``curvature.block_summary``).

They exist because the library cannot yet share probes between operators: the traces of H, G and
R = H - G on one Hutch++ sketch, their squared Frobenius norms on one set of probes, the diagonal
with the error bar of its mean, and the block statistics by layer in one compiled program. This
module is the only place where the experiments reach into the library's private helpers
(``curvature.operators.apply_rows``, ``curvature.stochastic_trace``'s Monte Carlo body);
``tests/workbench/test_imports.py`` lists them. Numbers are those of the library's estimators
with the same key (the same probes).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

import curvature as cv
from curvature.operators import apply_rows
from curvature.stochastic_trace import (
    block_size,
    hutch_plus_plus_sketch,
    monte_carlo,
    quadratic_forms,
)


@functools.partial(jax.jit, static_argnames="num_matvecs")
def shared_traces(H, G, key, *, num_matvecs):
    """Hutch++ traces of H, G and R = H - G that share one sketch (of H) and one set of probes.

    For a sketch basis Q fixed before the probes are drawn, Hutch++ is linear in the operator,
    so the three estimates satisfy tr R = tr H - tr G exactly and each is unbiased, with a
    standard error from its own probe samples. tr H is the number ``cv.trace(H, key=key)``
    gives (the same sketch and probes). Cost: ``num_matvecs`` products with H and two thirds
    as many with G, where three separate runs would take twice as many of each.
    """
    H, G = H.prepared(), G.prepared()
    n = H.size
    sketch = num_matvecs // 3
    block = block_size(n, H.dtype, num_matvecs, None)
    key_s, key_g = jax.random.split(key)
    q = hutch_plus_plus_sketch(H, key_s, sketch, block)  # the top of H's range
    exact_h, exact_g = (quadratic_forms(op, q, block) for op in (H, G))
    both = _Stacked(H, G)

    def samples(g, products):  # per probe: g^T H g, g^T G g, g^T R g
        hg, gg = products[:, :n], products[:, n:]
        return jnp.stack([jnp.sum(g * hg, 1), jnp.sum(g * gg, 1), jnp.sum(g * (hg - gg), 1)], 1)

    means, errors = monte_carlo(
        both, key_g, num_matvecs - 2 * sketch, samples, block, lambda g: g - (g @ q.T) @ q
    )
    exact = (exact_h, exact_g, exact_h - exact_g)
    return [(e + means[i], errors[i]) for i, e in enumerate(exact)]


@dataclasses.dataclass(frozen=True)
class _Stacked:
    """``v -> [H v, G v]``: two operators on shared probes, for the library's Monte Carlo body."""

    h: cv.LinearOperator
    g: cv.LinearOperator

    @property
    def shape(self):
        return (2 * self.h.size, self.h.size)

    @property
    def dtype(self):
        return self.h.dtype

    def apply(self, v):
        return jnp.concatenate([self.h.apply(v), self.g.apply(v)])

    def apply_rows(self, rows):
        return jnp.concatenate([self.h.apply_rows(rows), self.g.apply_rows(rows)], axis=1)

    streamed = False


@functools.partial(jax.jit, static_argnames="num_probes")
def shared_frobenius(H, G, key, *, num_probes):
    """``‖A‖F²`` and its standard error for A = H, G, R = H - G on the probes of
    ``cv.frobenius_norm_squared(op, key=key)`` (so the same numbers); R z = H z - G z reuses the
    two products instead of paying for both again."""
    H, G = H.prepared(), G.prepared()
    z = cv.rademacher(key, (num_probes, H.size), H.dtype)
    hz, gz = apply_rows(H, z), apply_rows(G, z)
    out = []
    for products in (hz, gz, hz - gz):
        sq = jnp.sum(products**2, axis=1)
        out.append((jnp.mean(sq), jnp.std(sq, ddof=1) / jnp.sqrt(num_probes)))
    return out


@functools.partial(jax.jit, static_argnames="num_matvecs")
def diagonal_and_mean(H, key, *, num_matvecs):
    """The probes and numbers of ``cv.diagonal(H, key=key)``, and the per-probe means
    z^T H z / n for the error bar of the diagonal's mean (its entries share probes, so they are
    correlated): ``(diagonal, its SE, mean, SE of the mean)``."""
    H = H.prepared()
    z = cv.rademacher(key, (num_matvecs, H.size), H.dtype)
    products = z * apply_rows(H, z)
    per_probe = jnp.mean(products, axis=1)
    root_m = jnp.sqrt(num_matvecs)
    return (
        jnp.mean(products, axis=0),
        jnp.std(products, axis=0, ddof=1) / root_m,
        jnp.mean(per_probe),
        jnp.std(per_probe, ddof=1) / root_m,
    )


@functools.partial(jax.jit, static_argnames="num_groups")
def block_statistics(H, G, z, layer_of_entry, *, num_groups):
    """Probes z (m, n), each on one layer's entries. One product with H and one with G per probe
    give every block of H, G and R = H - G in that probe's column: per operator the squared norm
    of each layer's part of A z, (m, layers), and the quadratic forms z^T A z, (m,)."""
    hz = apply_rows(H.prepared(), z)
    gz = apply_rows(G.prepared(), z)
    out = {}
    for name, az in (("hessian", hz), ("gauss_newton", gz), ("residual", hz - gz)):
        wide = az.astype(jnp.promote_types(az.dtype, jnp.float32))
        squares = jax.ops.segment_sum((wide**2).T, layer_of_entry, num_segments=num_groups).T
        out[name] = (squares, jnp.sum(z * wide, axis=1))
    return out

"""Data as a pytree of arrays with a leading example axis, cut into equal chunks plus a
remainder inside the compiled matvec."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from curvature._checks import num_examples, positive_int

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Batching:
    """Static chunking of ``num_examples`` into ``m`` chunks of ``batch_size`` plus a remainder.

    Chunks are cut inside the compiled matvec with ``dynamic_slice``: the data are stored once,
    never copied into a chunked layout.
    """

    num_examples: int
    batch_size: int
    strided: bool = False  # chunk i = examples i, i + m, ... (for data sharded over devices)

    @classmethod
    def of(cls, data: PyTree, batch_size: int | None) -> Batching:
        n = num_examples(data)
        if batch_size is not None:
            batch_size = positive_int(batch_size, "batch_size")
        return cls(n, n if batch_size is None else min(batch_size, n), _sharded(data))

    def first(self, data: PyTree) -> PyTree:
        return jax.tree_util.tree_map(lambda x: x[: self.batch_size], data)

    @property
    def single_chunk(self) -> bool:
        return self.batch_size == self.num_examples


def data_mean(f: Callable[[PyTree], PyTree], data: PyTree, batching: Batching) -> PyTree:
    """``sum_j (b_j / n) f(batch_j)``: the example-weighted mean of per-batch means.

    Full chunks are scanned (one compiled body whatever their number); a shorter last chunk is
    one more call with its own static shape.
    """
    n, b = batching.num_examples, batching.batch_size
    m, r = divmod(n, b)
    if m == 1 and r == 0:
        return f(data)
    total = None
    if m == 1:
        total = f(batching.first(data))
    elif m > 1:
        zeros = jax.tree_util.tree_map(
            lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(f, batching.first(data))
        )
        # Chunk i is examples i, i + m, i + 2m, ... of the first m * b: the data seen as
        # (b, m, ...), indexed along the second axis. Data sharded along the example axis stay
        # where they are (each device holds b / devices examples of every chunk); contiguous
        # chunks (dynamic_slice along the sharded axis) made XLA gather all data on every device.
        # On one device, contiguous chunks compile and run faster.
        head = jax.tree_util.tree_map(lambda x: x[: m * b].reshape(b, m, *x.shape[1:]), data)

        def body(acc, i):
            if batching.strided:
                batch = jax.tree_util.tree_map(
                    lambda x: jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False), head
                )
            else:
                batch = jax.tree_util.tree_map(
                    lambda x: jax.lax.dynamic_slice_in_dim(x, i * b, b), data
                )
            return jax.tree_util.tree_map(jnp.add, acc, f(batch)), None

        total, _ = jax.lax.scan(body, zeros, jnp.arange(m))
    total = jax.tree_util.tree_map(lambda t: t * (b / n), total)
    if r:
        rest = f(jax.tree_util.tree_map(lambda x: x[m * b :], data))
        total = jax.tree_util.tree_map(lambda t, y: t + y * (r / n), total, rest)
    return total


def _sharded(data: PyTree) -> bool:
    """Whether any data leaf is spread over several devices (then chunks are strided)."""
    for x in jax.tree_util.tree_leaves(data):
        sharding = getattr(x, "sharding", None)
        if sharding is not None and not isinstance(x, jax.core.Tracer):
            if len(sharding.device_set) > 1 and not sharding.is_fully_replicated:
                return True
    return False

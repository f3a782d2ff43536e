"""Products with the unit vectors, a block at a time from the host: the dense matrix
(:func:`curvature.dense`) and the exact diagonal of an operator without a fast one.

``n`` products are many: a block of ``B`` unit vectors is one compiled program (the operator
prepared once, the ``B`` products vmapped; for streamed data one pass over the data), reused
for every block (the block's first index is traced); between blocks the host reports progress
and honours Ctrl-C. Inside a transformation (an operator that is traced) the blocks run in one
compiled loop instead.
"""

from __future__ import annotations

import functools
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from curvature import _driver
from curvature._checks import is_traced
from curvature._memory import available_bytes

#: Above this many products a run warns first (with its estimated time once a block is timed).
LARGE = 20_000


def block_size(n: int, m: int, itemsize: int, requested: int | None) -> int:
    """Unit vectors a block: ``requested``, or 16 (the fastest of 4 to 64 for an MLP, a CNN
    and a transformer of 1.4k-3.5k parameters on CPU: vmapping more columns got slower), fewer when a block's vectors and products
    (``B (n + m)`` numbers, with room for the products' intermediates, counted as 8 times that)
    would take more than a quarter of the available memory."""
    if requested is not None:
        return max(1, min(int(requested), n))
    have = available_bytes()
    size = 16
    if have is not None:
        size = min(size, max(1, int(have // (4 * 8 * (n + m) * itemsize))))
    return max(1, min(size, n))


@functools.cache
def _block_program(n: int, block: int, diagonal: bool) -> _driver.Program:
    """Products with the unit vectors ``e_start .. e_{start + block - 1}`` (rows past ``n`` are
    zero): the ``(block, m)`` products, or with ``diagonal`` their entries ``e_j^T A e_j``."""

    def init(specs, start):
        return {
            "start": start,
            "out": jnp.zeros((block,) if diagonal else (block, specs[0].shape[0]), specs[0].dtype),
        }

    def units(state, i):
        return jax.nn.one_hot(state["start"] + jnp.arange(block), n, dtype=state["out"].dtype)

    def store(state, i, products):
        if diagonal:
            products = jnp.sum(units(state, i) * products, axis=1)
        return {**state, "out": products}

    body = _driver.Apply(units, store, mode="rows")
    name = "exact_diagonal" if diagonal else "dense"
    return _driver.Program(init, body, lambda state, specs, start: state["out"], name=name)


class Progress:
    """Progress of a long host loop on stderr: silent for runs under ``quiet_seconds`` (judged
    from the first block's time), then a line at most every 2 seconds."""

    def __init__(self, what: str, total: int, enabled: bool | None, quiet_seconds: float = 5.0):
        self.what, self.total, self.enabled = what, total, enabled
        self.quiet_seconds = quiet_seconds
        self.start = time.perf_counter()
        self.last = -np.inf

    def update(self, done: int) -> None:
        now = time.perf_counter()
        elapsed = now - self.start
        left = elapsed / max(done, 1) * (self.total - done)
        if self.enabled is None:
            self.enabled = elapsed + left > self.quiet_seconds
        if not self.enabled or (now - self.last < 2.0 and done < self.total):
            return
        self.last = now
        # On a terminal one line rewritten in place; in a log one line each.
        start, end = ("\r", "") if sys.stderr.isatty() else ("", "\n")
        sys.stderr.write(
            f"{start}{self.what}: {done:,}/{self.total:,} unit vectors "
            f"({100 * done / self.total:.0f}%), {elapsed:.0f} s, about {left:.0f} s left"
            + ("\n" if done >= self.total else end)
        )
        sys.stderr.flush()


def unit_products(op, *, diagonal: bool, block: int | None, progress: bool | None, what: str):
    """``A`` times every unit vector: the dense ``(m, n)`` matrix, or with ``diagonal`` the
    ``(n,)`` diagonal; blocks of unit vectors from the host (see the module docstring)."""
    m, n = op.shape
    block = block_size(n, m, op.dtype.itemsize, block)
    if is_traced(op):  # inside a transformation: one compiled loop over the blocks
        return _traced_products(op, n, block, diagonal)
    program = _block_program(n, block, diagonal)
    if n > LARGE:
        warnings.warn(
            f"{what} takes n = {n:,} products with the unit vectors, {block} at a time; "
            "progress is shown on stderr and Ctrl-C stops it between blocks",
            stacklevel=3,
        )
    out = np.zeros((n,) if diagonal else (n, m), np.dtype(op.dtype))
    bar = Progress(what, n, progress if n <= LARGE else (progress is not False))
    for start in range(0, n, block):
        values = _driver.run(program, (op,), jnp.asarray(start, jnp.int32))
        stop = min(start + block, n)
        out[start:stop] = np.asarray(values)[: stop - start]
        bar.update(stop)
    out = jnp.asarray(out)
    return out if diagonal else out.T


def _traced_products(op, n: int, block: int, diagonal: bool):
    program = _block_program(n, block, diagonal)
    starts = jnp.arange(0, n, block, dtype=jnp.int32)
    blocks = jax.lax.map(lambda start: _driver.inline(program, (op.prepared(),), start), starts)
    out = blocks.reshape((-1,) + blocks.shape[2:])[:n]
    return out if diagonal else out.T

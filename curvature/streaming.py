"""Data that do not fit in memory: operators whose matvec is a pass over batches from the host.

``hessian(loss, params, lambda: loader)`` (and :func:`~curvature.gauss_newton`,
:func:`~curvature.empirical_fisher`) take, instead of a pytree of arrays, a zero-argument function
that returns a fresh iterable of batches: pytrees of arrays with a leading example axis, the last
batch possibly shorter. Each matvec is one pass over the batches:

$$A v = \\sum_j \\frac{b_j}{N} A_j v, \\qquad N = \\sum_j b_j,$$

with $A_j$ the operator of batch ``j``'s mean loss, so the operator is exactly the one built from
all ``N`` examples in memory (tested in float64 with uneven batches).

How it runs. A batch's product is one compiled program (a linearisation at the parameters shared
by all vectors of the pass, vmapped over them), compiled once per batch shape: a loader with a
shorter last batch compiles two. The host loops over batches and dispatches these programs
asynchronously; a background thread reads the next batches (a numpy memmap slice is read from disk
there) and each batch is put on the device one batch ahead of use, so the accelerator does not
wait on the host. The estimators are the same programs with the same results
(:mod:`curvature._driver`): for a streamed operator their loops (Lanczos steps, probe blocks,
power iterations) run on the host and every step between two products is its own compiled
program; for in-memory data the whole estimator is one compiled program. A block of probes
(``probe_batch_size``) costs one pass over the data, so for streamed data larger blocks mean
fewer passes.

Not available for streamed operators: derivatives through the estimators (``jax.grad`` of
``eigsh``), use inside ``jax.jit`` / ``jax.vmap``, and vmapped SLQ probes
(``spectral_density(probe_batch_size=)``): they need the matvec traced, and a pass over a loader
cannot be traced. Each raises an error that says so.

The loader must yield the same examples on every pass (the operator is that of a fixed data
set), in any order. Every pass after the first is checked against it: the number of examples,
and a fingerprint of each batch (the sum and the sum of squares of each array, one reduction per
batch and one transfer of a few numbers per pass), so a loader that resamples, augments or
draws with replacement is refused with the first batch that differs; one that reshuffles the same
examples passes. A batch that is not a pytree of numeric arrays (``lambda: data`` over a dict
yields its keys), or whose product fails (a feature size that changes), is named by its index.
A loader blocked in its own code never holds up Ctrl-C or an error: the reading thread is a
daemon, joined for at most a quarter of a second.

* :func:`batches`: a loader over arrays that may be numpy memmaps (``np.load(path,
  mmap_mode="r")``): slices are read only when their batch is due.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from curvature._batching import Batching
from curvature._checks import check_real_vector, check_x64, positive_int
from curvature.linear_operator import LinearOperator, operator_type, static

__all__ = ["Streamed", "batches", "is_source"]

PyTree = Any


def is_source(data) -> bool:
    """Whether ``data`` is a loader function (streamed data) rather than a pytree of arrays."""
    if isinstance(data, Iterator):
        raise TypeError(
            "data is an iterator, which one pass would exhaust; pass a function that returns a "
            "fresh iterable of batches on every call, e.g. hessian(loss, params, lambda: "
            "make_loader())"
        )
    return callable(data) and not hasattr(data, "shape")


def batches(data: PyTree, batch_size: int) -> Callable[[], Iterator[PyTree]]:
    """A loader over a pytree of arrays, ``batch_size`` examples at a time (the last batch
    shorter): ``hessian(loss, params, batches({"x": np.load("x.npy", mmap_mode="r"), ...}, 1024))``.
    ``batch_size`` is a positive integer (numpy integers too).

    The arrays may be numpy memmaps: each batch is read from disk only when it is due, in the
    prefetch thread.
    """
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise ValueError("batches(data, ...): data has no arrays")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"batches(data, ...): every array needs the same leading (example) axis; got "
            f"leading sizes {sorted(str(s) for s in sizes)}"
        )
    (count,) = sizes
    batch_size = positive_int(batch_size, "batches(data, batch_size): batch_size")

    def loader():
        for start in range(0, count, batch_size):
            cut = slice(start, start + batch_size)
            yield jax.tree_util.tree_map(lambda x, cut=cut: x[cut], data)

    return loader


# --------------------------------------------------------------------------------------------
# Reading batches ahead of use.


def _on_host(batch: PyTree) -> PyTree:
    # A memmap slice is a view of the file: reading it is the slow part, done in the thread.
    return jax.tree_util.tree_map(lambda x: np.array(x) if isinstance(x, np.memmap) else x, batch)


_JOIN_TIMEOUT = 0.25  # seconds


def _read_ahead(iterator: Iterator, depth: int) -> Iterator[PyTree]:
    """The items of ``iterator`` read by a background thread, ``depth`` at most waiting. The
    thread runs the loader under the caller's x64 setting, stops (and closes the loader's
    iterator) when the consumer stops, and is joined before this generator ends, for at most
    ``_JOIN_TIMEOUT`` seconds: a loader blocked in its own code never holds up an error or a
    KeyboardInterrupt (the daemon thread ends when the loader returns, or with the process)."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    x64 = bool(jax.config.jax_enable_x64)  # thread-local: the loader sees the caller's

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            with jax.enable_x64(x64):
                for batch in iterator:
                    if not put(("batch", _on_host(batch))):
                        break
                else:
                    put(("end", None))
        except BaseException as error:  # re-raised in the consumer
            put(("error", error))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, daemon=True, name="curvature-prefetch")
    thread.start()
    try:
        while True:
            kind, item = items.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        # A thread between batches ends at its next put (within 0.05 s). One blocked in the
        # loader's own code (a stuck read, a sleep, an Event.wait) cannot be stopped from here:
        # it is a daemon, left to end on its own, so that Ctrl-C and errors propagate at once.
        thread.join(timeout=_JOIN_TIMEOUT)


def _iterate(source: Callable) -> Iterator:
    try:
        return iter(source())
    except TypeError as error:
        raise TypeError(
            "data: expected a zero-argument function that returns an iterable of batches "
            f"(hessian(loss, params, lambda: loader)); calling it failed: {error}"
        ) from error


def _as_arrays(batch: PyTree, index: int) -> PyTree:
    """A batch as device arrays, or an error saying what the loader yielded instead."""
    for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
        dtype = getattr(x, "dtype", None)
        if dtype is None and isinstance(x, bool | int | float):
            continue
        if dtype is None or getattr(dtype, "kind", None) in ("O", "U", "S", "V"):
            where = f" (leaf {jax.tree_util.keystr(path)})" if path else ""
            raise TypeError(
                f"data: batch {index} from the loader is not a pytree of numeric arrays: it "
                f"holds a {type(x).__name__}{where}, {x!r:.60}. A loader yields batches; "
                "`lambda: data` over a dict yields its keys: pass the arrays themselves for "
                "in-memory data, or `lambda: [data]` for a loader of one batch"
            )
    return jax.tree_util.tree_map(jnp.asarray, batch)


def device_batches(source: Callable, depth: int = 2) -> Iterator[PyTree]:
    """Batches as device arrays, each put on the device one batch before it is used."""
    ahead: collections.deque = collections.deque()
    for index, batch in enumerate(_read_ahead(_iterate(source), depth)):
        # In this thread: the x64 setting and the default device are the caller's.
        ahead.append(_as_arrays(batch, index))
        if len(ahead) > 1:
            yield ahead.popleft()
    while ahead:
        yield ahead.popleft()


def first_batch(source: Callable) -> PyTree:
    """The loader's first batch (for the builders' checks and tracing), read in this thread."""
    iterator = _iterate(source)
    try:
        batch = next(iterator)
    except StopIteration:
        raise ValueError("data: the loader yielded no batches") from None
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    return _as_arrays(_on_host(batch), 0)


# --------------------------------------------------------------------------------------------
# The operator.


@jax.jit
def _rows_step(acc, inner, rows, weight):
    # One linearisation at the parameters for all rows of the pass, then their tangent passes.
    linear = inner.prepared()
    return acc + weight * jax.vmap(linear.apply)(rows)


@jax.jit
def _diagonal_step(acc, inner, weight):
    return acc + weight * inner.exact_diagonal()


@jax.jit
def _mean(acc, count):
    return acc / count


_TRACED = (
    "a streamed operator (data from a loader) was used inside jax.jit, jax.vmap or a "
    "derivative: its matvec is a loop over batches on the host and cannot be traced. "
    "Call op @ v or the estimators directly (they drive the batches from the host); "
    "derivatives through estimators and vmapped SLQ probes need in-memory data."
)


@jax.jit
def _fingerprint(batch: PyTree) -> jax.Array:
    """``(2 * leaves,)``: the sum and the sum of squares of each numeric leaf of a batch, in
    float32 or wider. The same examples, in any order, give the same numbers; other examples
    almost surely do not. One reduction over the batch: nothing beside a matvec."""
    parts = []
    for x in jax.tree_util.tree_leaves(batch):
        if not (jnp.issubdtype(x.dtype, jnp.number) or x.dtype == jnp.bool_):
            continue
        if jnp.iscomplexobj(x):
            x = jnp.abs(x)
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        parts += [jnp.sum(x), jnp.sum(x * x)]
    return jnp.stack(parts) if parts else jnp.zeros((0,), jnp.float32)


# Fingerprints of one set of examples summed in another order (a reshuffled loader) agree to
# float32 round-off, about 1e-7 relative (1e-5 for sums of a million entries); resampling moves a
# sum of squares by about its coefficient of variation / sqrt(examples), 1e-3 for a million.
_FINGERPRINT_RTOL = 1e-4


def _same(a: np.ndarray, b: np.ndarray, count: int) -> bool:
    """Whether two fingerprints (sums and sums of squares, float64) agree: each sum within
    ``rtol sqrt(count * sum of squares)`` (its largest size), each sum of squares within
    ``rtol`` of itself."""
    sums, squares = (a[0::2], b[0::2]), (a[1::2], b[1::2])
    scale = np.maximum(squares[0], squares[1])
    return bool(
        np.all(np.abs(sums[0] - sums[1]) <= _FINGERPRINT_RTOL * np.sqrt(count * scale))
        and np.all(np.abs(squares[0] - squares[1]) <= _FINGERPRINT_RTOL * scale)
    )


class _Examples:
    """What the first full pass saw: its batch sizes and each batch's fingerprint
    (:func:`_fingerprint`), checked after every later pass. Every instance compares equal, so
    this record never makes two operators differ in structure."""

    __slots__ = ("count", "prints", "sizes")

    def __init__(self):
        self.count, self.sizes, self.prints = None, None, None

    def __eq__(self, other):
        return isinstance(other, _Examples)

    def __hash__(self):
        return hash(_Examples)

    def check(self, sizes: list[int], prints: np.ndarray) -> None:
        """Record the first pass; refuse a later one that saw other examples. The same examples
        in another order (a loader that reshuffles) pass: the operator is the same."""
        count = sum(sizes)
        if self.count is None:
            self.count, self.sizes, self.prints = count, sizes, prints
            return
        if count != self.count:
            raise ValueError(
                f"data: the loader yielded {count} examples in this pass and "
                f"{self.count} in the first: a streamed operator needs the same "
                "examples on every pass (no random subsampling or dropped batches)"
            )
        if prints.shape[1:] != self.prints.shape[1:]:
            raise ValueError(
                "data: the batches of this pass have other arrays than the first pass's "
                f"({prints.shape[1] // 2} numeric leaves against {self.prints.shape[1] // 2})"
            )
        if _same(prints.sum(axis=0), self.prints.sum(axis=0), count):
            return
        index = next(
            (
                i
                for i, (a, b, n, m) in enumerate(
                    zip(prints, self.prints, sizes, self.sizes, strict=False)
                )
                if n != m or not _same(a, b, n)
            ),
            min(len(sizes), len(self.sizes)),
        )
        raise ValueError(
            f"data: batch {index} from the loader holds other examples in this pass than in the "
            f"first (the sums of its arrays differ), with {count} examples in both passes: a "
            "streamed operator needs the same examples on every pass, in any order (no "
            "resampling, random augmentation or drawing with replacement; seed such a loader "
            "the same way on every call)"
        )


def _shapes(batch: PyTree) -> list:
    return [(jax.tree_util.keystr(p), np.shape(x)) for p, x in
            jax.tree_util.tree_flatten_with_path(batch)[0]]  # fmt: skip


@operator_type
class Streamed(LinearOperator):
    """An operator over streamed data: each product is one pass over the loader's batches,
    ``A v = sum_j (b_j / N) A_j v``, where ``A_j`` is ``inner`` on batch ``j``
    (:meth:`~curvature.builders.LossOperator.with_data`; ``inner`` is the template, built
    without data). Products run from the host only (:meth:`host_apply_rows`); inside compiled
    code they raise an error that says why."""

    inner: LinearOperator
    source: Callable[[], Iterable] = static()
    batch_size: int | None = static()
    prefetch: int = static(default=2)
    examples: _Examples = static(default_factory=lambda: _Examples())

    streamed: ClassVar[bool] = True

    @property
    def layout(self):
        return self.inner.layout

    @property
    def has_fast_diagonal(self) -> bool:
        return self.inner.has_fast_diagonal

    @property
    def name(self) -> str:
        return f"{self.inner.name} (streamed)"

    def apply(self, v):
        raise TypeError(_TRACED)

    def apply_rows(self, rows):
        raise TypeError(_TRACED)

    def exact_diagonal(self):
        raise TypeError(_TRACED)

    def host_apply_rows(self, rows):
        if isinstance(rows, jax.core.Tracer):
            raise TypeError(_TRACED)
        check_x64(self.layout)
        check_real_vector(rows, "the vector")
        rows = jnp.asarray(rows, self.dtype)
        zeros = jnp.zeros(rows.shape, self.dtype)
        return self._pass(lambda acc, inner, w: _rows_step(acc, inner, rows, w), zeros)

    def host_exact_diagonal(self):
        check_x64(self.layout)
        zeros = jnp.zeros((self.layout.size,), self.dtype)
        return self._pass(_diagonal_step, zeros)

    def _inner(self, batch, index: int):
        try:
            batching = Batching.of(batch, self.batch_size)
        except ValueError as error:
            raise ValueError(f"data: batch {index} from the loader: {error}") from error
        return self.inner.with_data(batch, batching), batching.num_examples

    def _pass(self, step, acc):
        sizes, prints, structure, first = [], [], None, None
        for index, batch in enumerate(device_batches(self.source, self.prefetch)):
            tree = jax.tree_util.tree_structure(batch)
            if structure is None:
                structure, first = tree, _shapes(batch)  # shapes only: no batch held
            elif tree != structure:
                raise ValueError(
                    f"data: batch {index} from the loader has structure {tree}; the first "
                    f"had {structure}"
                )
            inner, size = self._inner(batch, index)
            try:
                acc = step(acc, inner, jnp.asarray(size, self.dtype))
            except Exception as error:
                raise _batch_error(error, index, batch, first) from error
            prints.append(_fingerprint(batch))
            sizes.append(size)
        if not sizes:
            raise ValueError("data: the loader yielded no batches")
        # One transfer of a few numbers per batch, after the pass is dispatched.
        self.examples.check(sizes, np.asarray(jax.device_get(prints), np.float64))
        return _mean(acc, jnp.asarray(sum(sizes), self.dtype))


def _batch_error(error: Exception, index: int, batch: PyTree, first: list) -> Exception:
    """A type or value error in a batch's product (a shape the model does not take, say) as one
    that names the batch, and its shapes where they differ from the first batch's beyond the
    leading (example) axis. Other errors pass unchanged."""
    if not isinstance(error, TypeError | ValueError):
        return error
    changed = [
        f"{path or 'the batch'} {shape} (the first batch: {was})"
        for (path, shape), (_, was) in zip(_shapes(batch), first, strict=True)
        if shape[1:] != was[1:]
    ]
    hint = f"; its shapes differ from the first batch's: {', '.join(changed)}" if changed else ""
    kind = TypeError if isinstance(error, TypeError) else ValueError
    return kind(f"data: batch {index} from the loader failed{hint}: {error}")

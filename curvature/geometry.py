"""Directions in parameter space: loss landscapes along them and the gradient's share of the top
Hessian eigenspace.

* :func:`loss_landscape`: the loss along one or two directions,
  $L(\\theta + s d_1)$ or $L(\\theta + s d_1 + r d_2)$ on a grid of coefficients, as PyHessian plots it
  along the top Hessian eigenvectors (Yao et al. 2020) or along filter-normalised random
  directions (Li, Xu, Taylor, Studer & Goldstein 2018, "Visualizing the loss landscape of neural
  nets").
* :func:`random_directions`: Gaussian directions shaped like the parameters, normalised by filter
  or by layer (Li et al. 2018).
* :func:`gradient_overlap`: $\\|P_k g\\|^2 / \\|g\\|^2$, the share of the gradient in the span of
  the top-``k`` Hessian eigenvectors (Gur-Ari, Roberts & Dyer 2018, "Gradient descent happens in
  a tiny subspace").

Directions are pytrees shaped like the parameters or flat vectors of length ``n`` in the library's
flat order (:meth:`curvature.Layout.ravel`, the order of ``cv.hessian(...).layout``), so a column
of ``cv.eigsh(H, ...).eigenvectors`` is a direction as it is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvature import streaming
from curvature._batching import Batching, data_mean
from curvature._checks import check_key, check_scalar, positive_int
from curvature._closures import Closure, closure
from curvature.builders import _at_least_float32, _check_not_batches
from curvature.krylov import EigshResult, eigsh
from curvature.linear_operator import Layout, LinearOperator

__all__ = [
    "GradientOverlap",
    "Landscape",
    "gradient_overlap",
    "loss_landscape",
    "random_directions",
]

PyTree = Any

_NORMALIZE = (None, "filter", "layer")


# --------------------------------------------------------------------------------------------
# Directions.


def _check_normalize(normalize) -> None:
    if normalize not in _NORMALIZE:
        raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")


def _is_direction(d, layout: Layout) -> bool:
    """Whether ``d`` is one direction: a pytree with the parameters' structure and leaf shapes,
    or a flat vector of length ``n``."""
    leaves, treedef = jax.tree_util.tree_flatten(d)
    if treedef == layout.treedef and all(
        hasattr(x, "shape") and tuple(np.shape(x)) == s
        for x, s in zip(leaves, layout.shapes, strict=True)
    ):
        return True
    return hasattr(d, "shape") and tuple(np.shape(d)) == (layout.size,)


def _as_tree(d, layout: Layout, i: int) -> PyTree:
    """Direction ``i`` as a pytree shaped like the parameters (in their dtypes), or an error
    saying how it differs."""
    leaves, treedef = jax.tree_util.tree_flatten(d)
    if treedef == layout.treedef and len(leaves) == len(layout.shapes):
        for leaf, shape in zip(leaves, layout.shapes, strict=True):
            if tuple(np.shape(leaf)) != shape:
                raise ValueError(
                    f"direction {i}: a leaf of shape {np.shape(leaf)} where the parameters have "
                    f"{shape}"
                )
        leaves = [jnp.asarray(x, dt) for x, dt in zip(leaves, layout.dtypes, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, leaves)
    if hasattr(d, "shape") and np.ndim(d) == 1:
        if np.shape(d) != (layout.size,):
            raise ValueError(
                f"direction {i}: a flat vector of length {np.shape(d)[0]}, but the parameters "
                f"have n={layout.size} entries"
            )
        return layout.unravel(jnp.asarray(d))
    raise ValueError(
        f"direction {i}: expected a pytree shaped like the parameters ({layout.treedef}) or a "
        f"flat vector of length n={layout.size}, got {type(d).__name__} with structure "
        f"{treedef}"
    )


def _directions(directions, layout: Layout) -> tuple:
    """One direction or a sequence of one or two, as a tuple of pytrees. A value that is itself
    one direction (the parameters' structure and shapes, or a flat vector of length ``n``) is
    taken as one, before it is read as a sequence."""
    if _is_direction(directions, layout):
        items = [directions]
    elif isinstance(directions, list | tuple):
        items = list(directions)
    else:
        items = [directions]  # not a direction: _as_tree says why
    if not 1 <= len(items) <= 2:
        raise ValueError(
            f"directions: expected one direction or a sequence of one or two, got {len(items)}"
        )
    return tuple(_as_tree(d, layout, i) for i, d in enumerate(items))


def _norm(x, axes=None):
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return jnp.sqrt(jnp.sum(x * x, axis=axes, keepdims=axes is not None))


def _rescaled(d, p, scale_of):
    """``d`` times ``||p|| / ||d||`` over the slices ``scale_of`` sums over; zero where ``d``
    is zero there."""
    nd, np_ = scale_of(d), scale_of(p)
    factor = jnp.where(nd > 0, np_ / jnp.where(nd > 0, nd, 1), 0)
    return (d * factor).astype(d.dtype)


def _normalized(direction: PyTree, params: PyTree, normalize: str | None) -> PyTree:
    if normalize is None:
        return direction

    def leaf(d, p):
        if normalize == "layer":
            return _rescaled(d, p, _norm)
        if d.ndim <= 1:  # biases, norm scales: Li et al. leave them out of the direction
            return jnp.zeros_like(d)
        # A filter is a slice along the last (output) axis: a dense kernel (in, out)'s output
        # unit, a flax conv kernel (h, w, in, out)'s output channel.
        return _rescaled(d, p, lambda x: _norm(x, tuple(range(x.ndim - 1))))

    return jax.tree_util.tree_map(leaf, direction, params)


def random_directions(
    params: PyTree, key: jax.Array, *, num: int = 1, normalize: str | None = "filter"
) -> tuple:
    """``num`` Gaussian directions shaped like ``params``, normalised (Li et al. 2018).

    Direction ``i`` draws its leaf ``j`` with ``jax.random.fold_in(jax.random.split(key,
    num)[i], j)``, standard normal in the leaf's dtype, then is normalised as ``normalize``
    says (see :func:`loss_landscape`): ``"filter"`` (default, Li et al.'s recipe) rescales each
    filter of a kernel to the norm of the same filter of ``params`` and zeroes leaves with
    ``ndim <= 1`` (biases, norm scales); ``"layer"`` rescales each leaf to the norm of the
    ``params`` leaf; ``None`` leaves the Gaussian draws as they are.

    Returns a tuple of ``num`` pytrees (pass it, or one of them, as ``directions=``). Cost: no
    matvec; one Gaussian draw per parameter.
    """
    check_key(key)
    num = positive_int(num, "num")
    _check_normalize(normalize)
    layout = Layout.of(params)
    out = []
    for k in jax.random.split(key, num):
        leaves = [
            jax.random.normal(jax.random.fold_in(k, j), shape, dtype)
            for j, (shape, dtype) in enumerate(zip(layout.shapes, layout.dtypes, strict=True))
        ]
        d = jax.tree_util.tree_unflatten(layout.treedef, leaves)
        out.append(_normalized(d, params, normalize))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Loss landscapes.


class Landscape(NamedTuple):
    """The loss on a grid of coefficients along one or two directions.

    Attributes:
      coefficients: ``(s,)`` or ``(s, r)``: one numpy array per direction, the grid's axes.
      loss: ``(len(s),)`` or ``(len(s), len(r))`` numpy array: ``L(params + s_i d_1 [+ r_j
        d_2])``, the mean loss over the data.
      center: the loss at ``params`` (the grid's origin, whether or not the grid holds 0).
      directions: the directions used (after normalisation), a tuple of pytrees shaped like
        the parameters.
    """

    coefficients: tuple
    loss: np.ndarray
    center: float
    directions: tuple


def _grid(grid, count: int, dtype) -> tuple:
    """The grid's axes as 1-D finite numpy arrays: ``count`` of them."""

    def axis(values, what):
        a = np.asarray(values)
        if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.number):
            raise ValueError(
                f"grid{what}: expected a non-empty 1-D array of coefficients, got shape "
                f"{a.shape} of {a.dtype}"
            )
        if np.iscomplexobj(a) or not np.all(np.isfinite(a)):
            raise ValueError(f"grid{what}: coefficients must be finite real numbers")
        return a.astype(dtype)

    pair = isinstance(grid, list | tuple) and len(grid) == 2 and np.ndim(grid[0]) == 1
    if count == 1:
        if pair:
            raise ValueError(
                "grid: a pair of axes was given for one direction; pass one 1-D array of "
                "coefficients (or two directions)"
            )
        return (axis(grid, ""),)
    if pair:
        return (axis(grid[0], "[0]"), axis(grid[1], "[1]"))
    a = axis(grid, "")
    return (a, a)


@functools.partial(jax.jit, static_argnames=("batching", "points_per_step"))
def _landscape_values(loss: Closure, params, directions, points, data, batching, points_per_step):
    """The mean loss at ``params`` and at ``params + sum_k points[i, k] directions[k]`` for every
    row ``i``: one program, ``lax.map`` over the points (vmapped ``points_per_step`` at a time)."""
    fn = loss.bind()

    def mean_loss(p):
        return data_mean(lambda batch: _at_least_float32(fn(p, batch)), data, batching)

    def at(c):
        def moved(x, *ds):
            step = sum(c[k] * d.astype(c.dtype) for k, d in enumerate(ds))
            return (x.astype(c.dtype) + step).astype(x.dtype)

        return mean_loss(jax.tree_util.tree_map(moved, params, *directions))

    return mean_loss(params), jax.lax.map(at, points, batch_size=points_per_step)


def loss_landscape(
    loss: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    data: PyTree,
    *,
    directions,
    grid,
    normalize: str | None = None,
    batch_size: int | None = None,
    points_per_step: int | None = None,
) -> Landscape:
    """The loss along one or two directions: $L(\\theta + s d_1)$ for every ``s`` of ``grid``,
    or $L(\\theta + s d_1 + r d_2)$ for every pair ``(s, r)``.

    The 1-D and 2-D plots of PyHessian (Yao et al. 2020) along the top Hessian eigenvectors, and
    of Li et al. (2018) along filter-normalised random directions (:func:`random_directions`).

    Args:
      loss: ``loss(params, batch) -> scalar``, the *mean* loss over the examples of ``batch``
        (as :func:`curvature.hessian` takes it; a fresh lambda reuses the compiled program).
      params: the centre, a pytree of floating-point arrays.
      data: one batch pytree whose leading axis indexes examples, or a loader
        (``lambda: iterable of batches``, :func:`curvature.batches`): each batch is then one
        run of the same program (one compilation per batch shape) and the losses are weighted
        by the batches' sizes, so the result is the mean over all examples.
      directions: one direction or a sequence of one or two. Each is a pytree shaped like
        ``params`` or a flat vector of length ``n`` in the library's flat order
        (``Layout.of(params).ravel``, the order of ``cv.hessian(...).layout``), so
        ``cv.eigsh(H, ...).eigenvectors[:, i]`` is a direction as it is. A value that is one
        direction (the parameters' structure and leaf shapes, or shape ``(n,)``) is read as
        one before it is read as a sequence.
      grid: one direction: a 1-D array of coefficients ``s``. Two directions: a pair
        ``(s_values, r_values)`` of 1-D arrays, or one 1-D array used for both axes.
      normalize: ``None``: the directions as given. ``"filter"`` (Li et al. 2018): in each
        leaf with ``ndim >= 2`` (dense kernels ``(in, out)``, flax conv kernels ``(h, w, in,
        out)``), every filter, the slice ``[..., j]`` along the *last* axis (an output unit or
        channel), is rescaled to the Euclidean norm of the same slice of ``params``; leaves
        with ``ndim <= 1`` (biases, norm scales) are set to zero, as Li et al. do. ``"layer"``:
        every leaf is rescaled to the norm of the ``params`` leaf. A zero slice or leaf stays
        zero. (A PyTorch-layout kernel ``(out, in, ...)`` has its filters along the first axis:
        transpose, or normalise yourself and pass ``None``.)
      batch_size: examples per chunk of the data (of each batch, for a loader), scanned inside
        the program so that memory is that of one chunk's forward pass; the last, shorter
        chunk is weighted by its size, so the loss is the mean over all examples (exact when
        the chunks are equal, and up to round-off otherwise). ``None``: all data at once.
      points_per_step: grid points evaluated together (``jax.vmap``) in each step of the
        ``lax.map`` over the grid; ``None`` evaluates them one at a time. More is faster on an
        accelerator for small models, at that many times the memory of one forward pass.

    Returns a :class:`Landscape`. The loss is computed in float32, or in float64 when the
    parameters are float64; the grid's coefficients are in the parameters' flat dtype.

    Cost: ``(grid points + 1)`` forward passes over the data (the ``+ 1`` is the centre), no
    matvec. The whole grid is one compiled program (``lax.map`` over the points), compiled once
    for every parameter layout, data shape and number of grid points: new values of any of them
    with the same shapes reuse it.

    Examples:
      >>> import jax.numpy as jnp, numpy as np, curvature
      >>> loss = lambda w, batch: jnp.mean((batch["x"] @ w) ** 2)
      >>> data = {"x": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
      >>> land = curvature.loss_landscape(
      ...     loss, jnp.ones(2), data, directions=jnp.array([0.0, 1.0]), grid=np.array([-1.0, 0.0])
      ... )
      >>> land.loss, land.center  # (1 + 4 (1 + s)^2) / 2 at s = -1, 0
      (array([0.5, 2.5], dtype=float32), 2.5)
    """
    if not callable(loss):
        raise TypeError(
            f"loss_landscape(): loss must be a function loss(params, batch), got {loss!r}"
        )
    _check_normalize(normalize)
    layout = Layout.of(params)
    used = tuple(_normalized(d, params, normalize) for d in _directions(directions, layout))
    axes = _grid(grid, len(used), layout.dtype)
    mesh = np.meshgrid(*axes, indexing="ij")
    points = jnp.asarray(np.stack([m.ravel() for m in mesh], axis=1))
    if points_per_step is not None:
        points_per_step = min(positive_int(points_per_step, "points_per_step"), len(points))
        points_per_step = None if points_per_step == 1 else points_per_step
    _check_not_batches(data)
    if streaming.is_source(data):
        if batch_size is not None:
            positive_int(batch_size, "batch_size")
        first = streaming.first_batch(data)
        sources = streaming.device_batches(data)
    else:
        first = jax.tree_util.tree_map(jnp.asarray, data)
        sources = [first]
    check_scalar(loss, (params, first), "loss(params, batch)")
    fn = closure(loss, params, first, what="loss_landscape()")
    center = values = None
    total = 0
    for batch in sources:
        batching = Batching.of(batch, batch_size)
        c, v = _landscape_values(fn, params, used, points, batch, batching, points_per_step)
        w = batching.num_examples
        center = c * w if center is None else center + c * w
        values = v * w if values is None else values + v * w
        total += w
    if values is None:
        raise ValueError("data: the loader yielded no batches")
    shape = tuple(len(a) for a in axes)
    return Landscape(
        coefficients=axes,
        loss=np.asarray(values / total).reshape(shape),
        center=float(center / total),
        directions=used,
    )


# --------------------------------------------------------------------------------------------
# The gradient's share of the top eigenspace.


class GradientOverlap(NamedTuple):
    """The share of a gradient in the top-``k`` eigenspace of an operator.

    Attributes:
      overlap: $\\|P_k g\\|^2 / \\|g\\|^2$ (a float in ``[0, 1]``; NaN for a zero gradient).
      shares: ``(k,)`` numpy array, $(v_i^T g)^2 / \\|g\\|^2$ per eigenvector, largest eigenvalue
        first: ``np.cumsum(shares)[j - 1]`` is the overlap with the top ``j <= k``.
      eigenvalues: ``(k,)`` the Ritz values, descending.
      residual_norms: ``(k,)`` ``||A v_i - lambda_i v_i||``, from :func:`curvature.eigsh`.
      converged: ``(k,)`` eigsh's certificate per pair: read the overlap only with it.
      num_matvecs: the matvecs the eigenpairs took (0 more for the projection).
    """

    overlap: float
    shares: np.ndarray
    eigenvalues: np.ndarray
    residual_norms: np.ndarray
    converged: np.ndarray
    num_matvecs: int


def _check_result(result, op: LinearOperator, k, key, num_steps) -> EigshResult:
    if not isinstance(result, EigshResult):
        raise TypeError(f"result must be an EigshResult (from eigsh), got {type(result).__name__}")
    if key is not None or num_steps is not None:
        raise ValueError(
            "gradient_overlap(result=...) reuses a finished eigsh run: key and num_steps would "
            "be ignored, so leave them out"
        )
    size = int(np.shape(result.eigenvalues)[0])
    if k is not None and positive_int(k, "k") != size:
        raise ValueError(f"k={k} disagrees with result, which holds {size} eigenpairs")
    if np.shape(result.eigenvectors) != (op.size, size):
        raise ValueError(
            f"result's eigenvectors have shape {np.shape(result.eigenvectors)}, not "
            f"({op.size}, {size}): they are not the operator's"
        )
    values = np.asarray(result.eigenvalues)
    if np.any(np.diff(values) > 0):
        raise ValueError(
            "result's eigenvalues are not descending: it is not from eigsh(..., which='LA'), "
            f"the top-k eigenspace (got {values})"
        )
    return result


def gradient_overlap(
    op: LinearOperator,
    grad,
    /,
    *,
    k: int | None = None,
    key: jax.Array | None = None,
    num_steps: int | None = None,
    result: EigshResult | None = None,
) -> GradientOverlap:
    """The share of the gradient in the top-``k`` eigenspace, $\\|P_k g\\|^2 / \\|g\\|^2$ with
    $P_k = V_k V_k^T$ over the eigenvectors of the ``k`` largest (algebraic) eigenvalues: Gur-Ari,
    Roberts & Dyer (2018) find it near 1 for ``k`` the number of classes, early in training.

    Args:
      op: a symmetric operator, e.g. :func:`curvature.hessian`.
      grad: the gradient, a pytree shaped like the parameters (raveled with ``op.ravel``) or a
        flat vector of length ``n``.
      k: the size of the top eigenspace, passed to ``eigsh(op, k=k, key=key,
        num_steps=num_steps, which="LA")``; required without ``result``.
      key: eigsh's PRNG key; required without ``result``.
      num_steps: eigsh's Lanczos steps (default eigsh's, ``min(n, max(4 k, 40))``).
      result: a finished ``eigsh(op, which="LA", ...)`` run to reuse instead. Then ``key`` and
        ``num_steps`` must be left out (they would be ignored), and ``k`` left out or equal to
        the number of its pairs; its eigenvalues must be descending and its eigenvectors of
        length ``n``.

    Returns a :class:`GradientOverlap`: the overlap, the per-eigenvector shares, and eigsh's
    eigenvalues, residual norms, ``converged`` and ``num_matvecs``, which every reported overlap
    should carry. A zero gradient gives NaN overlap and shares (no direction to share). The
    eigenvectors are taken as orthonormal (eigsh returns them so); an unconverged pair still
    projects onto its Ritz vector.

    Cost: that of eigsh (``num_steps + k + check_steps`` matvecs), or nothing with ``result``;
    the projection is one ``(n, k)`` product.
    """
    if not isinstance(op, LinearOperator):
        raise TypeError(f"op must be a curvature LinearOperator, got {type(op).__name__}")
    if result is None:
        if k is None or key is None:
            raise ValueError("gradient_overlap: pass k and key (for eigsh), or result=")
        result = eigsh(op, k=k, key=key, num_steps=num_steps, which="LA")
    else:
        result = _check_result(result, op, k, key, num_steps)
    if hasattr(grad, "shape") and np.ndim(grad) == 1:
        if np.shape(grad) != (op.size,):
            raise ValueError(f"grad: a flat vector of length {np.shape(grad)[0]}, but n={op.size}")
        g = np.asarray(grad, np.float64)
    else:
        g = np.asarray(op.ravel(grad), np.float64)
    coefficients = np.asarray(result.eigenvectors, np.float64).T @ g
    norm2 = float(g @ g)
    shares = coefficients**2 / norm2 if norm2 > 0 else np.full_like(coefficients, np.nan)
    return GradientOverlap(
        overlap=float(np.sum(shares)),
        shares=shares,
        eigenvalues=np.asarray(result.eigenvalues),
        residual_norms=np.asarray(result.residual_norms),
        converged=np.asarray(result.converged),
        num_matvecs=int(result.num_matvecs),
    )

"""The empirical Fisher and per-example gradients.

* :func:`empirical_fisher`: $F = \\frac1N \\sum_i g_i g_i^T$ with $g_i = \\nabla \\ell_i$ the
  gradient of example $i$'s loss, as a matrix-free operator with the same normalisation as
  :func:`curvature.hessian` (chunks weighted by their sizes, exact for uneven chunks). A matvec
  never forms the $g_i$: $c_i = g_i^T v$ is one forward-mode product of the vector of
  per-example losses, and $\\sum_i c_i g_i$ its transpose, about two gradients in all.
* :func:`per_example_gradients`: the $g_i$ of one batch, stacked on a leading axis.

The *true* Fisher of a softmax classifier, $E_{y \\sim p_\\theta(\\cdot|x)}[\\nabla \\log p\\,
\\nabla \\log p^T]$, equals the Gauss-Newton matrix of the cross-entropy loss
(``gauss_newton(..., loss="cross_entropy")``): only the name differs (Martens 2014). The empirical
Fisher uses the observed labels instead and is a different matrix (Kunstner et al. 2019).

``curvature.diagonal(F, method="exact")`` computes the diagonal $\\frac1N \\sum_i g_i^2$ from
per-example gradients, in a few gradients' time rather than ``n`` matvecs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from curvature._batching import data_mean
from curvature._checks import check_scalar, check_x64, is_traced, num_examples
from curvature._closures import Closure
from curvature.builders import LossOperator, loss_operator
from curvature.linear_operator import LinearOperator, operator_type

__all__ = ["EmpiricalFisher", "empirical_fisher", "per_example_gradients"]

PyTree = Any


def _per_example_losses(loss: Callable, params: PyTree, batch: PyTree) -> jax.Array:
    """``(b,)``: ``loss`` on each example of ``batch`` alone (a batch of one)."""
    return jax.vmap(lambda ex: loss(params, jax.tree_util.tree_map(lambda x: x[None], ex)))(batch)


def per_example_gradients(loss: Callable, params: PyTree, batch: PyTree) -> PyTree:
    """The gradient of each example's loss: a pytree like ``params`` with a leading axis of the
    batch size. ``loss(params, batch)`` is the batch mean, as everywhere in this library, so the
    mean of the per-example gradients is the batch gradient.

    Checked first (by tracing, nothing computed): every leaf of ``batch`` has a leading example
    axis, and ``loss`` on a batch of one example returns a floating-point scalar (a vector of
    per-example losses is refused, with its shape)."""
    num_examples(batch)
    one = jax.tree_util.tree_map(lambda x: x[:1], batch)
    check_scalar(loss, (params, one), "per_example_gradients: loss(params, batch)")
    return _per_example_gradients(loss, params, batch)


def _per_example_gradients(loss: Callable, params: PyTree, batch: PyTree) -> PyTree:
    return jax.vmap(
        lambda ex: jax.grad(loss)(params, jax.tree_util.tree_map(lambda x: x[None], ex))
    )(batch)


@operator_type
class EmpiricalFisher(LossOperator):
    """The empirical Fisher of a batch-mean ``loss`` (a :class:`~curvature.Closure`):
    :func:`empirical_fisher`. Its exact diagonal comes from per-example gradients."""

    loss: Closure = None

    kind: ClassVar[str] = "empirical_fisher"
    has_fast_diagonal: ClassVar[bool] = True

    def chunk_product(self, v, batch):
        loss, tangent = self.loss.bind(), self.layout.unravel(v)
        losses, forward = jax.linearize(lambda p: _per_example_losses(loss, p, batch), self.params)
        (back,) = jax.linear_transpose(forward, self.params)(forward(tangent) / losses.shape[0])
        return self.layout.ravel(back)

    def linearize(self):
        loss = self.loss.bind()
        losses, forward = jax.linearize(
            lambda p: _per_example_losses(loss, p, self.data), self.params
        )
        transpose = jax.linear_transpose(forward, self.params)
        size = losses.shape[0]

        def fisher(v):
            (back,) = transpose(forward(self.layout.unravel(v)) / size)
            return self.layout.ravel(back)

        return fisher

    def prepared(self):
        # Outside compiled code nothing is held: a product is already a forward-mode product
        # and its transpose.
        return super().prepared() if is_traced(self) else self

    def exact_diagonal(self):
        check_x64(self.layout)
        loss = self.loss.bind()

        def chunk(batch):
            grads = _per_example_gradients(loss, self.params, batch)
            flat = jax.vmap(self.layout.ravel)(grads)
            return jnp.mean(flat**2, axis=0)

        return data_mean(chunk, self.data, self.batching)


def empirical_fisher(
    loss: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    data: PyTree,
    *,
    batch_size: int | None = None,
    check: bool = True,
) -> LinearOperator:
    """The empirical Fisher $F = \\frac1N \\sum_i \\nabla\\ell_i \\nabla\\ell_i^T$ over the
    ``N`` examples of ``data``, as a matrix-free operator.

    Args:
      loss: as for :func:`curvature.hessian`: the batch mean; example ``i``'s loss is ``loss``
        on a batch of that example alone.
      params: as for :func:`curvature.hessian`.
      data: as for :func:`curvature.hessian`.
      batch_size: as for :func:`curvature.hessian`.
      check: as for :func:`curvature.hessian`.

    Cost: one matvec is a forward-mode product of the per-example losses and its transpose, about
    two gradients on the whole data set; the per-example gradients are never formed (but
    ``diagonal(F, method="exact")`` forms them, a chunk at a time).

    Examples:
      >>> import jax.numpy as jnp, curvature
      >>> loss = lambda w, batch: jnp.mean(batch["x"] @ w)
      >>> data = {"x": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
      >>> curvature.dense(curvature.empirical_fisher(loss, jnp.ones(2), data))  # mean of x x^T
      Array([[0.5, 0. ],
             [0. , 2. ]], dtype=float32)
    """
    return loss_operator(
        EmpiricalFisher,
        loss,
        params,
        data,
        batch_size=batch_size,
        check=check,
        what="empirical_fisher()",
    )

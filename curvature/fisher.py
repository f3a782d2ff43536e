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

* :func:`monte_carlo_fisher`: the true Fisher estimated with targets sampled from the model's
  own predictive distribution, ``num_samples`` per example, $\\hat F = \\frac1N \\sum_i \\frac1S
  \\sum_s J_i^T r_{is} r_{is}^T J_i$ with $r_{is}$ the gradient of the output loss at the sampled
  target: an unbiased estimate of the Gauss-Newton matrix of cross-entropy or squared error, of
  rank at most ``N S``, as K-FAC's ``fisher="mc"`` and natural-gradient methods use it.

``curvature.diagonal(F, method="exact")`` computes the diagonal $\\frac1N \\sum_i g_i^2$ from
per-example gradients, in a few gradients' time rather than ``n`` matvecs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from curvature import streaming
from curvature._batching import Batching, data_mean
from curvature._checks import (
    check_key,
    check_scalar,
    check_x64,
    is_traced,
    num_examples,
    positive_int,
)
from curvature._closures import Closure, closure
from curvature._conv import needs_rewrite
from curvature.builders import LossOperator, _setup, loss_operator
from curvature.linear_operator import LinearOperator, operator_type, static

__all__ = [
    "EmpiricalFisher",
    "MonteCarloFisher",
    "empirical_fisher",
    "monte_carlo_fisher",
    "per_example_gradients",
]

_LIKELIHOODS = ("cross_entropy", "mse")

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


@operator_type
class MonteCarloFisher(LossOperator):
    """The Fisher with sampled targets: :func:`monte_carlo_fisher`. ``data`` holds the examples
    (``"batch"``) and their drawn samples (``"samples"``: class indices ``(N, S)`` for
    cross-entropy, the Gaussian noise ``(N, S, ...)`` for squared error), chunked together."""

    model: Closure = None
    likelihood: str = static(default="cross_entropy")

    kind: ClassVar[str] = "monte_carlo_fisher"

    def _cotangent(self, out, u, samples):
        """``(1/b) (1/S) sum_s r_s r_s^T u`` per example: ``r_s`` the output loss's gradient at
        sample ``s`` (softmax minus the sampled one-hot; minus the noise for squared error)."""
        if self.likelihood == "cross_entropy":
            probs = jax.nn.softmax(out, axis=-1)
            r = probs[:, None] - jax.nn.one_hot(samples, out.shape[-1], dtype=out.dtype)
        else:
            r = -samples.astype(out.dtype)
        axes = tuple(range(2, r.ndim))
        coef = jnp.sum(r * u[:, None], axis=axes, keepdims=True)  # (b, S, 1, ...)
        return jnp.mean(coef * r, axis=1) / out.shape[0]

    def _product(self, tangent, batch):
        model = self.model.bind()
        out, jvp = jax.linearize(lambda p: model(p, batch["batch"]), self.params)
        cotangent = self._cotangent(out, jvp(tangent), batch["samples"])
        (back,) = jax.linear_transpose(jvp, self.params)(cotangent)
        return back

    def chunk_product(self, v, batch):
        return self.layout.ravel(self._product(self.layout.unravel(v), batch))

    def linearize(self):
        model = self.model.bind()
        out, jvp = jax.linearize(lambda p: model(p, self.data["batch"]), self.params)
        transpose = jax.linear_transpose(jvp, self.params)

        def fisher(v):
            cotangent = self._cotangent(out, jvp(self.layout.unravel(v)), self.data["samples"])
            (back,) = transpose(cotangent)
            return self.layout.ravel(back)

        return fisher

    def prepared(self):
        # Outside compiled code nothing is held: a product is one linearisation and its
        # transpose, as for the empirical Fisher.
        return super().prepared() if is_traced(self) else self


@functools.partial(jax.jit, static_argnums=(4, 5))
def _draw(model: Closure, params, data, key, num_samples: int, likelihood: str):
    """Each example's ``num_samples`` targets from the model's predictive distribution, and
    whether its outputs are finite: one compiled program for every model of the same structure
    (a fresh lambda or new parameters of the same shapes do not recompile)."""
    out = model.bind()(params, data)
    if likelihood == "cross_entropy":
        shape = out.shape[:1] + (num_samples,)
        samples = jax.random.categorical(key, out[:, None, :], axis=-1, shape=shape)
    else:
        samples = jax.random.normal(key, (out.shape[0], num_samples) + out.shape[1:], out.dtype)
    return samples, jnp.all(jnp.isfinite(out))


def monte_carlo_fisher(
    model: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    data: PyTree,
    *,
    loss: str,
    num_samples: int,
    key: jax.Array,
    batch_size: int | None = None,
    check: bool = True,
) -> LinearOperator:
    """The Fisher information with targets drawn from the model's predictive distribution:
    $\\hat F = \\frac1N \\sum_i \\frac1S \\sum_s J_i^T r_{is} r_{is}^T J_i$.

    ``r_is`` is the gradient in the outputs of the output loss at a sampled target: for
    ``loss="cross_entropy"`` a class drawn from ``softmax(outputs_i)`` (``r = p - onehot``), for
    ``loss="mse"`` the target ``outputs_i + eps`` with ``eps ~ N(0, I)`` (the Gaussian likelihood
    of ``0.5 ||y - f||^2``; ``r = -eps``). Its expectation over the samples is the Gauss-Newton
    matrix :func:`curvature.gauss_newton` of the same loss, exactly (for these losses the GGN is
    the true Fisher); each draw is a positive semi-definite matrix of rank at most
    ``N * num_samples``, the estimate K-FAC's ``fisher="mc"`` and natural-gradient optimisers
    build on. The samples are drawn once, when the operator is built, so it is a fixed matrix:
    the same key gives the same operator.

    Args:
      model: ``model(params, batch) -> outputs`` with a leading batch axis (logits for
        cross-entropy).
      params: as for :func:`curvature.hessian`.
      data: a pytree of arrays with a leading example axis, in memory (the samples are drawn
        per example, once; a loader is refused). The targets in the data are not used.
      loss: ``"cross_entropy"`` or ``"mse"``: the likelihood whose Fisher this is.
      num_samples: targets drawn per example.
      key: PRNG key of the samples.
      batch_size: chunk the examples (and their samples), as for :func:`curvature.hessian`.
      check: check the parameters and outputs before any work.

    Returns a :class:`MonteCarloFisher`. Cost: one matvec is a linearisation, a JVP and its
    transpose (about a gradient and a half, as :func:`curvature.gauss_newton`), plus
    ``O(N * num_samples * outputs)``; building it is one forward pass over the data (the
    outputs of all examples are held at once to draw the samples). Memory: the samples,
    ``N * num_samples`` integers (cross-entropy) or ``N * num_samples * outputs`` numbers.
    """
    if loss not in _LIKELIHOODS:
        raise ValueError(
            f"monte_carlo_fisher: loss must name a likelihood to sample from, one of "
            f"{', '.join(_LIKELIHOODS)}; got {loss!r} (a loss function has no distribution)"
        )
    if not callable(model):
        raise TypeError(f"model must be a function model(params, batch), got {model!r}")
    check_key(key)
    num_samples = positive_int(num_samples, "num_samples")
    if streaming.is_source(data):
        raise ValueError(
            "monte_carlo_fisher draws each example's targets once, so it needs the data in "
            "memory (arrays), not a loader; pass arrays, or use gauss_newton, its expectation"
        )
    layout, _, data, first = _setup(params, data, batch_size, check)
    if check:
        check_scalar(lambda p, b: jnp.sum(model(p, b)), (params, first), "model(params, batch)")
    shape = jax.eval_shape(model, params, first).shape
    if loss == "cross_entropy" and len(shape) != 2:
        raise ValueError(
            f"monte_carlo_fisher(loss='cross_entropy') needs logits (batch, classes), got "
            f"outputs of shape {shape}"
        )
    model = closure(model, params, first, what="monte_carlo_fisher()")
    samples, finite = _draw(model, params, data, key, num_samples, loss)
    if check and not bool(finite):
        raise ValueError("monte_carlo_fisher: the model's outputs are not all finite")
    both = {"batch": data, "samples": samples}
    batching = Batching.of(both, batch_size)
    convs = needs_rewrite(model.bind(), params, first)
    return MonteCarloFisher(params, both, layout, batching, convs, model=model, likelihood=loss)

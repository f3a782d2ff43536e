"""Curvature operators of a loss: the Hessian and the generalised Gauss-Newton matrix.

* :func:`hessian`: the Hessian of the dataset-mean loss,
  $H v = \\partial_\\epsilon \\nabla L(\\theta + \\epsilon v)|_{\\epsilon=0}$ (forward-over-reverse).
* :func:`gauss_newton`: the generalised Gauss-Newton $G = \\sum_b w_b J_b^T H^{out}_b J_b$
  (Schraudolph 2002; Martens 2014).
* :func:`loss_operator`: the shared builder (checks, chunking, captured arrays) behind these and
  :func:`curvature.empirical_fisher`.

Normalisation: with ``n`` examples split into batches of sizes ``b_1, ..., b_m`` (the last one may be
shorter), the operator is $\\sum_j (b_j / n) \\nabla^2 \\ell_j$ where $\\ell_j$ is the user's loss on
batch ``j`` (a batch *mean*). This is exactly the Hessian of the mean loss over all ``n`` examples,
whatever ``batch_size`` is.

Convolutional models on the CPU backend get their matvec's convolutions in the layout XLA:CPU
runs fast also inside loops (:mod:`curvature._conv`; about 20x on a small CNN).

Compiled programs survive closures: the user's functions are kept in the operator's static part in
a form that compares by structure (code, globals and captured values), and the JAX arrays they
capture become operands (:mod:`curvature._closures`). Rebuilding an operator from a new but
equivalent ``lambda`` or ``functools.partial`` (inside a training loop, say) reuses every compiled
estimator.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from curvature import streaming
from curvature._batching import Batching, data_mean
from curvature._checks import (
    check_finite_params,
    check_finite_value,
    check_scalar,
    is_traced,
    positive_int,
)
from curvature._closures import Canonical, canonical, stable
from curvature._conv import CanonicalConvs, needs_rewrite
from curvature.linear_operator import Layout, LinearOperator
from curvature.losses import OutputLoss, output_loss

__all__ = ["gauss_newton", "hessian", "loss_operator"]

PyTree = Any


def _at_least_float32(x):
    # Sum chunk losses in float32 or wider: never in bfloat16, never downcast from float64.
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# --------------------------------------------------------------------------------------------
# Operators of a batch-mean loss(params, batch).


@dataclasses.dataclass(frozen=True)
class LossMatvec:
    """Base of the matvecs of a batch-mean ``loss(params, batch)``: the loss is kept as a
    :class:`~curvature._closures.Canonical`, its captured arrays in ``operands["captured"]``."""

    loss: Canonical
    layout: Layout
    batching: Batching

    def bound_loss(self, operands) -> Callable:
        return self.loss.bind(operands["captured"])


@dataclasses.dataclass(frozen=True)
class _HessianMatvec(LossMatvec):
    name = "hessian"

    def __call__(self, operands, v):
        params = operands["params"]
        tangent = self.layout.unravel(v)
        grad = jax.grad(self.bound_loss(operands))

        def hvp(batch):
            # Raveled per chunk, so chunks accumulate in the operator's dtype (>= float32).
            return self.layout.ravel(jax.jvp(lambda p: grad(p, batch), (params,), (tangent,))[1])

        return data_mean(hvp, operands["data"], self.batching)

    def prepare(self, operands):
        if not self.batching.single_chunk:
            return None
        params, data = operands["params"], operands["data"]
        grad = jax.grad(self.bound_loss(operands))
        _, tangent_of = jax.linearize(lambda p: grad(p, data), params)
        return lambda v: self.layout.ravel(tangent_of(self.layout.unravel(v)))

    def pulled(self, operands) -> LinearOperator | None:
        """Outside compiled code (see :meth:`LinearOperator.prepared`): the operator as the
        pullback of the gradient, ``H v = (v^T H)^T``, its residuals held as arrays."""
        if not self.batching.single_chunk:
            return None
        grad = jax.grad(self.bound_loss(operands))
        _, pullback = jax.vjp(lambda p: grad(p, operands["data"]), operands["params"])
        return LinearOperator(_PulledHessian(self.layout), pullback, self.layout)


@dataclasses.dataclass(frozen=True)
class _PulledHessian:
    layout: Layout
    name = "hessian (prepared)"

    def __call__(self, pullback, v):
        (out,) = pullback(self.layout.unravel(v))
        return self.layout.ravel(out)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _mean_loss(loss: Canonical, params, data, captured, batching):
    fn = loss.bind(captured)
    return data_mean(lambda batch: _at_least_float32(fn(params, batch)), data, batching)


def _setup(params, data, batch_size, check):
    """The layout, the chunking, the data as arrays and the first chunk; the parameters checked.
    For a loader (streamed data): no chunking (``None``), and its first batch."""
    layout = Layout.of(params)
    if check:
        check_finite_params(params)
    if streaming.is_source(data):
        if batch_size is not None:
            positive_int(batch_size, "batch_size")
        return layout, None, data, streaming.first_batch(data)
    batching = Batching.of(data, batch_size)
    data = jax.tree_util.tree_map(jnp.asarray, data)
    return layout, batching, data, batching.first(data)


def loss_operator(
    matvec_type: type[LossMatvec], loss, params, data, *, batch_size, check, what: str
) -> LinearOperator:
    """An operator ``matvec_type(loss, layout, batching)`` of a batch-mean ``loss``: the checks,
    the chunking and the captured arrays, shared by :func:`hessian` and
    :func:`curvature.empirical_fisher`. ``data`` may be a loader (:mod:`curvature.streaming`)."""
    if not callable(loss):
        raise TypeError(f"{what}: loss must be a function loss(params, batch), got {loss!r}")
    layout, batching, data, first = _setup(params, data, batch_size, check)
    if check:
        check_scalar(loss, (params, first), "loss(params, batch)")
    static, captured = stable(loss, (params, first), what)
    if check and not is_traced((first, captured)):
        chunks = batching or Batching.of(first, batch_size)
        value = _mean_loss(static, params, data if batching else first, captured, chunks)
        check_finite_value(value, "the mean loss" if batching else "the first batch's mean loss")
    convs = needs_rewrite(static.bind(captured), params, first)

    def build(chunks: Batching):
        matvec = matvec_type(static, layout, chunks)
        return CanonicalConvs(matvec) if convs else matvec

    return _operator(build, params, data, captured, layout, batching, batch_size, matvec_type)


def _operator(build, params, data, captured, layout, batching, batch_size, matvec_type):
    """In-memory data: the matvec over all data, chunked. A loader: a pass over its batches."""
    if batching is None:
        has_diagonal = hasattr(matvec_type, "exact_diagonal")
        fn = streaming.streamed(build, data, layout, batch_size, has_diagonal)
        return LinearOperator(fn, {"params": params, "captured": captured}, layout)
    operands = {"params": params, "data": data, "captured": captured}
    return LinearOperator(build(batching), operands, layout)


def hessian(
    loss: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    data: PyTree,
    *,
    batch_size: int | None = None,
    check: bool = True,
) -> LinearOperator:
    """The Hessian of the dataset-mean loss, as a matrix-free operator on flat vectors.

    Args:
      loss: ``loss(params, batch) -> scalar``, the *mean* loss over the examples of ``batch``. A
        fresh ``lambda`` or ``functools.partial`` on every call is fine: equivalent functions
        share compiled programs, and the JAX arrays they capture are passed as operands.
      params: a pytree of floating-point arrays; its raveled length is ``n`` and its dtype is the
        operator's (float32 params give a float32 operator; float64 under ``jax.enable_x64``).
      data: a pytree of arrays whose leading axis indexes the same examples in every leaf; or,
        for data that do not fit in memory, a zero-argument function returning a fresh iterable
        of such batches (``lambda: loader``; see :mod:`curvature.streaming`): each matvec is then
        a pass over the batches, weighted by their sizes, and ``check`` looks at the first batch.
      batch_size: examples per chunk (of each streamed batch, for a loader); chunks are scanned inside the compiled matvec and the last,
        shorter chunk is weighted by its size, so the operator is the Hessian of the mean over all
        examples whatever ``batch_size`` is. ``None`` uses all data at once.
      check: verify, once on the host, that the parameters and the loss are finite and that the
        loss is a scalar. Skipped automatically under tracing.

    Cost: one matvec is a forward-over-reverse product (``jax.jvp`` of ``jax.grad``), about two
    gradient evaluations on the whole data set.

    Example:
      >>> import jax.numpy as jnp, curvature
      >>> loss = lambda w, batch: jnp.mean((batch["x"] @ w) ** 2)
      >>> data = {"x": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
      >>> op = curvature.hessian(loss, jnp.ones(2), data)
      >>> curvature.dense(op)  # 2/2 * x^T x
      Array([[1., 0.],
             [0., 4.]], dtype=float32)
    """
    return loss_operator(
        _HessianMatvec, loss, params, data, batch_size=batch_size, check=check, what="hessian()"
    )


# --------------------------------------------------------------------------------------------
# Generalised Gauss-Newton.


@dataclasses.dataclass(frozen=True)
class _GaussNewtonMatvec:
    model: Canonical
    loss: Canonical  # of an OutputLoss
    layout: Layout
    batching: Batching
    name = "gauss_newton"

    def bound(self, operands) -> tuple[Callable, OutputLoss]:
        captured = operands["captured"]
        return self.model.bind(captured["model"]), self.loss.bind(captured["loss"])

    def __call__(self, operands, v):
        params = operands["params"]
        tangent = self.layout.unravel(v)
        model, loss = self.bound(operands)

        def ggn(batch):
            out, jvp = jax.linearize(lambda p: model(p, batch), params)
            (vjp_out,) = jax.linear_transpose(jvp, params)(loss.hvp(out, jvp(tangent), batch))
            return self.layout.ravel(vjp_out)

        return data_mean(ggn, operands["data"], self.batching)

    def exact_diagonal(self, operands):
        """``diag(G)`` from per-example Jacobians: ``diag(J_i^T H_i J_i)`` summed over the
        examples, with ``H_i`` the output loss's Hessian on example ``i`` (exact when the output
        loss is a mean of per-example terms, as the named losses are). Memory: a chunk's
        Jacobians, ``batch x outputs x n``."""
        params = operands["params"]
        model, loss = self.bound(operands)

        def chunk(batch):
            size = jax.tree_util.tree_leaves(batch)[0].shape[0]

            def one(example):
                ex = jax.tree_util.tree_map(lambda x: x[None], example)
                out = model(params, ex)
                jac = jax.jacrev(lambda p: model(p, ex).reshape(-1))(params)
                jac = jax.vmap(self.layout.ravel)(jac)  # (outputs, n)
                hess = jax.hessian(lambda o: loss.value(o.reshape(out.shape), ex))(out.reshape(-1))
                return jnp.sum(jac * (hess @ jac), axis=0)

            return jnp.sum(jax.vmap(one)(batch), axis=0) / size

        return data_mean(chunk, operands["data"], self.batching)

    def prepare(self, operands):
        if not self.batching.single_chunk:
            return None
        params, data = operands["params"], operands["data"]
        model, loss = self.bound(operands)
        out, jvp = jax.linearize(lambda p: model(p, data), params)
        transpose = jax.linear_transpose(jvp, params)

        def ggn(v):
            (vjp_out,) = transpose(loss.hvp(out, jvp(self.layout.unravel(v)), data))
            return self.layout.ravel(vjp_out)

        return ggn

    def pulled(self, operands) -> LinearOperator | None:
        """Outside compiled code: ``J^T`` as the model's pullback (residuals held as arrays),
        ``J`` as its transpose."""
        if not self.batching.single_chunk:
            return None
        params, data = operands["params"], operands["data"]
        model, _ = self.bound(operands)
        out, pullback = jax.vjp(lambda p: model(p, data), params)
        held = {
            "out": out,
            "pullback": pullback,
            "data": data,
            "loss": operands["captured"]["loss"],
        }
        return LinearOperator(_PulledGaussNewton(self.loss, self.layout), held, self.layout)


@dataclasses.dataclass(frozen=True)
class _PulledGaussNewton:
    loss: Canonical
    layout: Layout
    name = "gauss_newton (prepared)"

    def __call__(self, held, v):
        out, pullback = held["out"], held["pullback"]
        (jv,) = jax.linear_transpose(pullback, out)((self.layout.unravel(v),))
        (w,) = pullback(self.loss.bind(held["loss"]).hvp(out, jv, held["data"]))
        return self.layout.ravel(w)


@functools.partial(jax.jit, static_argnums=(0, 1, 5))
def _mean_output_loss(model: Canonical, loss: Canonical, params, data, captured, batching):
    model_fn, loss_fn = model.bind(captured["model"]), loss.bind(captured["loss"])

    def value(batch):
        return _at_least_float32(loss_fn.value(model_fn(params, batch), batch))

    return data_mean(value, data, batching)


def gauss_newton(
    model: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    data: PyTree,
    *,
    loss: str | Callable[[jax.Array, PyTree], jax.Array],
    targets: str | int | Callable[[PyTree], jax.Array] | None = None,
    batch_size: int | None = None,
    check: bool = True,
) -> LinearOperator:
    """The generalised Gauss-Newton matrix $G = J^T (\\partial^2 \\ell / \\partial f^2) J$.

    ``J`` is the Jacobian of ``model(params, batch) -> outputs`` in the parameters and the middle
    factor is the Hessian of the output loss in the outputs, so ``G`` is the Hessian of the loss
    with the model linearised at ``params``: ``H = G + R`` where ``R`` collects the model's own
    second derivatives (zero for a linear model). ``G`` is positive semi-definite when the output
    loss is convex (both named losses). For softmax cross-entropy ``G`` is also the true Fisher
    (expectation over the model's own label distribution): only the name differs.

    Args:
      model: ``model(params, batch) -> outputs`` with a leading batch axis.
      params, data, batch_size, check: as for :func:`hessian` (same normalisation: the operator
        is the GGN of the dataset-mean loss).
      loss: ``"mse"`` for ``0.5 * mean over examples of the squared error summed over outputs``;
        ``"cross_entropy"`` for softmax cross-entropy on logits ``(batch, classes)`` with integer
        labels ``(batch,)``. Or a function ``loss(outputs, batch) -> scalar`` (the batch mean),
        differentiated twice by JAX.
      targets: where a named loss finds its targets in a batch: a key (``"label"``), an index
        into a tuple batch, or a function ``batch -> targets``. ``None``: the second element of an
        ``(inputs, targets)`` pair, or the one key of ``y``/``label(s)``/``target(s)`` the
        batch has (see :mod:`curvature.losses`).

    Cost: one matvec is a linearisation, a JVP and its transpose: about a gradient and a half.
    """
    out_loss = output_loss(loss, targets)
    if not callable(model):
        raise TypeError(f"model must be a function model(params, batch), got {model!r}")
    layout, batching, data, first = _setup(params, data, batch_size, check)
    if check:
        check_scalar(
            lambda p, b: out_loss.value(model(p, b), b), (params, first), "the output loss"
        )
    model_static, model_arrays = stable(model, (params, first), "gauss_newton()")
    loss_static, loss_arrays, _ = canonical(out_loss)
    captured = {"model": model_arrays, "loss": loss_arrays}
    if check and not is_traced((first, captured)):
        chunks = batching or Batching.of(first, batch_size)
        value = _mean_output_loss(
            model_static, loss_static, params, data if batching else first, captured, chunks
        )
        check_finite_value(value, "the mean loss" if batching else "the first batch's mean loss")
    convs = needs_rewrite(model_static.bind(model_arrays), params, first)

    def build(chunks: Batching):
        matvec = _GaussNewtonMatvec(model_static, loss_static, layout, chunks)
        return CanonicalConvs(matvec) if convs else matvec

    return _operator(
        build, params, data, captured, layout, batching, batch_size, _GaussNewtonMatvec
    )

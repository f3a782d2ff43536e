"""Curvature operators of a loss: the Hessian and the generalised Gauss-Newton matrix.

* :func:`hessian`: the Hessian of the dataset-mean loss,
  $H v = \\partial_\\epsilon \\nabla L(\\theta + \\epsilon v)|_{\\epsilon=0}$ (forward-over-reverse).
* :func:`gauss_newton`: the generalised Gauss-Newton $G = \\sum_b w_b J_b^T H^{out}_b J_b$
  (Schraudolph 2002; Martens 2014).
* :class:`LossOperator`, :func:`loss_operator`: the operator types of a batch-mean loss and the
  shared builder (checks, chunking, captured arrays) behind these and
  :func:`curvature.empirical_fisher`.

Normalisation: with ``n`` examples split into batches of sizes ``b_1, ..., b_m`` (the last one may be
shorter), the operator is $\\sum_j (b_j / n) \\nabla^2 \\ell_j$ where $\\ell_j$ is the user's loss on
batch ``j`` (a batch *mean*). This is exactly the Hessian of the mean loss over all ``n`` examples,
whatever ``batch_size`` is.

Convolutional models on the CPU backend get their products' convolutions in the layout XLA:CPU
runs fast also inside loops (:mod:`curvature._conv`; about 20x on a small CNN).

Compiled programs survive closures: the user's functions are kept as :class:`~curvature.Closure`
fields, static parts compared by structure (code, globals and captured values) and the JAX arrays
they capture as leaves. Rebuilding an operator from a new but equivalent ``lambda`` or
``functools.partial`` (inside a training loop, say) reuses every compiled estimator.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from curvature import streaming
from curvature._batching import Batching, data_mean
from curvature._checks import (
    check_finite_params,
    check_finite_value,
    check_scalar,
    check_x64,
    is_traced,
    positive_int,
)
from curvature._closures import Closure, closure
from curvature._conv import needs_rewrite, rewritten_if
from curvature.linear_operator import (
    Layout,
    Linearized,
    LinearOperator,
    operator_type,
    static,
)
from curvature.losses import check_labels, output_loss

__all__ = ["GaussNewton", "Hessian", "LossOperator", "gauss_newton", "hessian", "loss_operator"]

PyTree = Any


def _at_least_float32(x):
    # Sum chunk losses in float32 or wider: never in bfloat16, never downcast from float64.
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# --------------------------------------------------------------------------------------------
# Operators of a batch-mean loss(params, batch).


@operator_type
class LossOperator(LinearOperator):
    """An operator of a batch-mean loss at ``params`` on ``data``: its products are the
    example-weighted mean of per-chunk products (``batching``). Subclasses give the product of
    one chunk (:meth:`chunk_product`) and its linearised form (:meth:`linearize`).

    ``data`` is ``None`` (and ``batching`` too) in the template a streamed operator builds its
    per-batch operators from (:meth:`with_data`)."""

    params: PyTree
    data: PyTree
    layout: Layout = static()
    batching: Batching | None = static()
    convs: bool = static()  # products with convolutions in XLA:CPU's fast layout

    kind: ClassVar[str] = "loss"

    @property
    def name(self) -> str:
        return self.kind

    def chunk_product(self, v: jax.Array, batch: PyTree) -> jax.Array:
        raise NotImplementedError

    def linearize(self) -> Callable[[jax.Array], jax.Array]:
        """The product at ``params`` on all data (one chunk), linearised once."""
        raise NotImplementedError

    def pulled(self) -> LinearOperator:
        """Outside compiled code: the operator with its linearisation held as arrays."""
        raise NotImplementedError

    def apply(self, v):
        check_x64(self.layout)

        def product(v):
            return data_mean(lambda batch: self.chunk_product(v, batch), self.data, self.batching)

        return rewritten_if(self.convs, product)(v.astype(self.dtype))

    def prepared(self) -> LinearOperator:
        check_x64(self.layout)
        if self.batching is None or not self.batching.single_chunk:
            return self  # chunked (or a streamed template): nothing to hold
        if is_traced(self):
            linear = rewritten_if(self.convs, self.linearize())
            return Linearized(linear, self.layout, f"{self.kind} (prepared)")
        return _pull(self)

    def with_data(self, data: PyTree, batching: Batching) -> LossOperator:
        """The same operator on other data (a streamed operator's batch)."""
        return dataclasses.replace(self, data=data, batching=batching)


@jax.jit
def _pull(op: LossOperator) -> LinearOperator:
    return op.pulled()


@operator_type
class Hessian(LossOperator):
    """The Hessian of a batch-mean ``loss`` (a :class:`~curvature.Closure`): :func:`hessian`."""

    loss: Closure = None

    kind: ClassVar[str] = "hessian"

    def chunk_product(self, v, batch):
        # Raveled per chunk, so chunks accumulate in the operator's dtype (>= float32).
        grad = jax.grad(self.loss.bind())
        tangent = self.layout.unravel(v)
        return self.layout.ravel(jax.jvp(lambda p: grad(p, batch), (self.params,), (tangent,))[1])

    def linearize(self):
        grad = jax.grad(self.loss.bind())
        _, tangent_of = jax.linearize(lambda p: grad(p, self.data), self.params)
        return lambda v: self.layout.ravel(tangent_of(self.layout.unravel(v)))

    def pulled(self):
        """``H v = (v^T H)^T``: the pullback of the gradient, its residuals held as arrays."""
        grad = jax.grad(self.loss.bind())
        _, pullback = jax.vjp(lambda p: grad(p, self.data), self.params)
        return _PulledHessian(pullback, self.layout, self.convs)


@operator_type
class _PulledHessian(LinearOperator):
    pullback: Any
    layout: Layout = static()
    convs: bool = static()

    @property
    def name(self) -> str:
        return "hessian (prepared)"

    def apply(self, v):
        def product(v):
            (out,) = self.pullback(self.layout.unravel(v))
            return self.layout.ravel(out)

        return rewritten_if(self.convs, product)(v.astype(self.dtype))


@functools.partial(jax.jit, static_argnums=(3,))
def _mean_loss(loss: Closure, params, data, batching):
    fn = loss.bind()
    return data_mean(lambda batch: _at_least_float32(fn(params, batch)), data, batching)


def _check_not_batches(data) -> None:
    """A list of batches (pytrees of one structure) passed as data would be taken for one pytree
    whose leaves are their arrays; say what to pass instead."""
    if not isinstance(data, list) or len(data) < 2:
        return
    trees = [jax.tree_util.tree_structure(x) for x in data]
    if all(not jax.tree_util.treedef_is_leaf(t) and t == trees[0] for t in trees):
        raise TypeError(
            f"data is a list of {len(data)} batches: pass a loader, `lambda: batches` (each "
            "product is then a pass over them), or their arrays concatenated into one pytree"
        )


def _setup(params, data, batch_size, check):
    """The layout, the chunking, the data as arrays and the first chunk; the parameters checked.
    For a loader (streamed data): no chunking (``None``), and its first batch."""
    layout = Layout.of(params)
    _check_not_batches(data)
    if check:
        check_finite_params(params)
    if streaming.is_source(data):
        if batch_size is not None:
            positive_int(batch_size, "batch_size")
        return layout, None, data, streaming.first_batch(data)
    batching = Batching.of(data, batch_size)
    data = jax.tree_util.tree_map(jnp.asarray, data)
    return layout, batching, data, batching.first(data)


def _finished(op: LossOperator, data, batch_size) -> LinearOperator:
    """In-memory data: the operator as built. A loader: a streamed operator whose products are
    passes over its batches, each batch's product by ``op`` on that batch."""
    if op.batching is None:
        return streaming.Streamed(op, data, batch_size)
    return op


def loss_operator(
    op_type: type[LossOperator], loss, params, data, *, batch_size, check, what: str
) -> LinearOperator:
    """An operator ``op_type`` of a batch-mean ``loss``: the checks, the chunking and the
    captured arrays, shared by :func:`hessian` and :func:`curvature.empirical_fisher`. ``data``
    may be a loader (:mod:`curvature.streaming`)."""
    if not callable(loss):
        raise TypeError(f"{what}: loss must be a function loss(params, batch), got {loss!r}")
    layout, batching, data, first = _setup(params, data, batch_size, check)
    if check:
        check_scalar(loss, (params, first), "loss(params, batch)")
    loss = closure(loss, params, first, what=what)
    if check and not is_traced((first, loss)):
        chunks = batching or Batching.of(first, batch_size)
        value = _mean_loss(loss, params, data if batching else first, chunks)
        check_finite_value(value, "the mean loss" if batching else "the first batch's mean loss")
    convs = needs_rewrite(loss.bind(), params, first)
    in_memory = data if batching is not None else None
    op = op_type(params, in_memory, layout, batching, convs, loss=loss)
    return _finished(op, data, batch_size)


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
      params: a pytree of floating-point arrays (for flax NNX, ``nnx.state(model, nnx.Param)``:
        batch statistics and other non-``Param`` variables are refused); its raveled length is
        ``n`` and its dtype is the operator's (float32 params give a float32 operator; float64 under ``jax.enable_x64``).
      data: a pytree of arrays whose leading axis indexes the same examples in every leaf; or,
        for data that do not fit in memory, a zero-argument function returning a fresh iterable
        of such batches (``lambda: loader``; see :mod:`curvature.streaming`): each matvec is then
        a pass over the batches, weighted by their sizes, and ``check`` looks at the first batch.
      batch_size: examples per chunk (of each streamed batch, for a loader); chunks are scanned
        inside the compiled matvec and the last, shorter chunk is weighted by its size, so the
        operator is the Hessian of the mean over all examples whatever ``batch_size`` is.
        ``None`` uses all data at once.
      check: verify, once on the host, that the parameters and the loss are finite and that the
        loss is a floating-point JAX scalar (a Python number is a constant: refused). Skipped
        automatically under tracing. Always checked: ``data`` is not a list of batches (pass a
        loader), and for a loader, that every batch is a pytree of numeric arrays.

    Returns a :class:`Hessian` (a :class:`~curvature.LinearOperator`), or a
    :class:`~curvature.streaming.Streamed` one for a loader.

    Cost: one matvec is a forward-over-reverse product (``jax.jvp`` of ``jax.grad``), about two
    gradient evaluations on the whole data set.

    Examples:
      >>> import jax.numpy as jnp, curvature
      >>> loss = lambda w, batch: jnp.mean((batch["x"] @ w) ** 2)
      >>> data = {"x": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
      >>> op = curvature.hessian(loss, jnp.ones(2), data)
      >>> curvature.dense(op)  # 2/2 * x^T x
      Array([[1., 0.],
             [0., 4.]], dtype=float32)
    """
    return loss_operator(
        Hessian, loss, params, data, batch_size=batch_size, check=check, what="hessian()"
    )


# --------------------------------------------------------------------------------------------
# Generalised Gauss-Newton.


@operator_type
class GaussNewton(LossOperator):
    """The generalised Gauss-Newton matrix of ``model`` and an output ``loss`` (both
    :class:`~curvature.Closure`; the loss of an :class:`~curvature.losses.OutputLoss`):
    :func:`gauss_newton`. Its exact diagonal comes from per-example Jacobians."""

    model: Closure = None
    loss: Closure = None

    kind: ClassVar[str] = "gauss_newton"
    has_fast_diagonal: ClassVar[bool] = True

    def chunk_product(self, v, batch):
        model, loss = self.model.bind(), self.loss.bind()
        tangent = self.layout.unravel(v)
        out, jvp = jax.linearize(lambda p: model(p, batch), self.params)
        (vjp_out,) = jax.linear_transpose(jvp, self.params)(loss.hvp(out, jvp(tangent), batch))
        return self.layout.ravel(vjp_out)

    def linearize(self):
        model, loss = self.model.bind(), self.loss.bind()
        out, jvp = jax.linearize(lambda p: model(p, self.data), self.params)
        transpose = jax.linear_transpose(jvp, self.params)

        def ggn(v):
            (vjp_out,) = transpose(loss.hvp(out, jvp(self.layout.unravel(v)), self.data))
            return self.layout.ravel(vjp_out)

        return ggn

    def pulled(self):
        """``J^T`` as the model's pullback (residuals held as arrays), ``J`` as its transpose."""
        model = self.model.bind()
        out, pullback = jax.vjp(lambda p: model(p, self.data), self.params)
        return _PulledGaussNewton(out, pullback, self.data, self.loss, self.layout, self.convs)

    def exact_diagonal(self):
        """``diag(G)`` from per-example Jacobians: ``diag(J_i^T H_i J_i)`` summed over the
        examples, with ``H_i`` the output loss's Hessian on example ``i`` (exact when the output
        loss is a mean of per-example terms, as the named losses are). Memory: a chunk's
        Jacobians, ``batch x outputs x n``."""
        check_x64(self.layout)
        params = self.params
        model, loss = self.model.bind(), self.loss.bind()

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

        return data_mean(chunk, self.data, self.batching)


@operator_type
class _PulledGaussNewton(LinearOperator):
    out: jax.Array
    pullback: Any
    data: PyTree
    loss: Closure
    layout: Layout = static()
    convs: bool = static()

    @property
    def name(self) -> str:
        return "gauss_newton (prepared)"

    def apply(self, v):
        def product(v):
            (jv,) = jax.linear_transpose(self.pullback, self.out)((self.layout.unravel(v),))
            (w,) = self.pullback(self.loss.bind().hvp(self.out, jv, self.data))
            return self.layout.ravel(w)

        return rewritten_if(self.convs, product)(v.astype(self.dtype))


@functools.partial(jax.jit, static_argnums=(4,))
def _mean_output_loss(model: Closure, loss: Closure, params, data, batching):
    model_fn, loss_fn = model.bind(), loss.bind()

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
      params: as for :func:`hessian`.
      data: as for :func:`hessian` (same normalisation: the operator is the GGN of the
        dataset-mean loss).
      batch_size: as for :func:`hessian`.
      check: as for :func:`hessian`. For ``"cross_entropy"``, ``check`` also refuses a
        label outside ``0 .. classes - 1`` (all labels in memory; a loader's first batch).
      loss: ``"mse"`` for ``0.5 * mean over examples of the squared error summed over outputs``;
        ``"cross_entropy"`` for softmax cross-entropy on logits ``(batch, classes)`` with integer
        labels ``(batch,)``. Or a function ``loss(outputs, batch) -> scalar`` (the batch mean),
        differentiated twice by JAX.
      targets: where a named loss finds its targets in a batch: a key (``"label"``), an index
        into a tuple batch, or a function ``batch -> targets``. ``None``: the second element of an
        ``(inputs, targets)`` pair, or the one key of ``y``/``label(s)``/``target(s)`` the
        batch has (see :mod:`curvature.losses`).

    Returns a :class:`GaussNewton` (or a streamed operator for a loader).

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
        if not is_traced(params):  # all labels in memory; a loader's first batch
            labels_of = first if batching is None else data
            check_labels(out_loss, jax.eval_shape(model, params, first), labels_of)
    model = closure(model, params, first, what="gauss_newton()")
    out_loss = closure(out_loss)
    if check and not is_traced((first, model, out_loss)):
        chunks = batching or Batching.of(first, batch_size)
        value = _mean_output_loss(model, out_loss, params, data if batching else first, chunks)
        check_finite_value(value, "the mean loss" if batching else "the first batch's mean loss")
    convs = needs_rewrite(model.bind(), params, first)
    in_memory = data if batching is not None else None
    op = GaussNewton(params, in_memory, layout, batching, convs, model=model, loss=out_loss)
    return _finished(op, data, batch_size)

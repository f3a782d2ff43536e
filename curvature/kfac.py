"""K-FAC: the Gauss-Newton matrix approximated layer by layer by Kronecker products.

For a dense layer ``s = a @ W + b`` applied to every example, the Gauss-Newton block of its
weights is ``(1/N) sum_i (a_i a_i^T) ⊗ (J_i^T Λ_i J_i)``, with ``J_i`` the Jacobian of example
``i``'s outputs in ``s`` and ``Λ_i`` the output loss's Hessian. K-FAC (Martens & Grosse 2015)
replaces the mean of Kronecker products by the Kronecker product of the means,

$$G_{\\ell\\ell} \\approx A \\otimes B, \\quad A = \\frac1N \\sum_i \\bar a_i \\bar a_i^T, \\quad
B = \\frac1N \\sum_i J_i^T \\Lambda_i J_i,$$

(``ā = [a, 1]`` with a bias, whose block then shares the factors), and drops every block
between layers. For one example it is the Gauss-Newton block exactly.

* :func:`kfac`: the approximation as an operator, :class:`KFAC`; ``op.factors`` holds each
  layer's ``A`` and ``B``. ``fisher="exact"`` uses ``Λ_i`` itself (through its square root:
  one backward pass per output), ``"mc"`` targets sampled from the model (one backward pass per
  sample, the Fisher that :func:`curvature.monte_carlo_fisher` estimates), ``"empirical"`` the
  labels' gradients (one backward pass; :func:`curvature.empirical_fisher`'s blocks).
* :func:`ekfac`: K-FAC's eigenbases with eigenvalues refitted to the per-example gradients
  (George et al. 2018): the diagonal in the Kronecker eigenbasis that is closest to the
  Gauss-Newton block in Frobenius norm.
* :class:`KroneckerEigen`: an operator diagonal in per-layer Kronecker eigenbases. K-FAC's
  damped inverse ``(A ⊗ B + λ I)^{-1}``, any damped power, and EK-FAC are of this kind:
  :func:`curvature.inverse` of a K-FAC is exact.

Dense layers are found in the model's computation (:class:`DenseLayer`; ``x @ W + b`` in plain
JAX, ``nnx.Linear``, linen ``Dense``), whatever the model's form. A layer applied at several
positions per example (tokens of a sequence) is treated the way Eschenhagen et al. (2023) call
"expand": the positions count as examples in ``A`` (``A`` is the mean over examples and
positions, ``B`` the mean over examples of the sum over positions). Parameters in no dense layer
(normalisation scales, embeddings, convolutions, tied weights) get their exact Gauss-Newton
diagonal.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvature import _layers, streaming
from curvature._batching import Batching, data_mean
from curvature._checks import check_key, check_scalar, is_traced, positive_int
from curvature._closures import Closure, closure
from curvature._layers import DenseLayer
from curvature.builders import _setup
from curvature.fisher import _draw
from curvature.linear_operator import Layout, LinearOperator, operator_type, static
from curvature.losses import check_labels, output_loss

__all__ = ["DenseLayer", "KFAC", "KroneckerEigen", "KroneckerFactors", "ekfac", "kfac"]

PyTree = Any
_FISHERS = ("exact", "mc", "empirical")
_HIGHEST = jax.lax.Precision.HIGHEST


class KroneckerFactors(NamedTuple):
    """One layer's factors: its block is ``A ⊗ B`` on the weights ``[W; b]`` (``fan_in (+1) x
    fan_out``, the bias as the last row), raveled row by row.

    Attributes:
      A: ``(fan_in (+1), fan_in (+1))``: the mean of ``ā ā^T`` over examples (and positions).
      B: ``(fan_out, fan_out)``: the mean over examples of ``J^T Λ J`` in the pre-activations.
    """

    A: jax.Array
    B: jax.Array


# --------------------------------------------------------------------------------------------
# Operators with one dense block per layer.


class _PerLayer(LinearOperator):
    """Shared by the operators whose blocks are dense layers plus a diagonal on the rest."""

    layout: Layout
    layers: tuple
    rest_leaves: tuple

    has_fast_diagonal: ClassVar[bool] = True

    def _parts(self, v):
        splits = np.cumsum(self.layout.sizes)[:-1].tolist()
        return list(jnp.split(v, splits)) if splits else [v]

    def _weights(self, layer: DenseLayer, parts):
        kernel = parts[layer.kernel]
        if layer.transposed:
            kernel = kernel.reshape(layer.fan_out, layer.fan_in).T
        else:
            kernel = kernel.reshape(layer.fan_in, layer.fan_out)
        if layer.bias is None:
            return kernel
        return jnp.concatenate([kernel, parts[layer.bias][None]], axis=0)

    def _put(self, layer: DenseLayer, weights, parts) -> None:
        kernel = weights[: layer.fan_in]
        parts[layer.kernel] = (kernel.T if layer.transposed else kernel).reshape(-1)
        if layer.bias is not None:
            parts[layer.bias] = weights[layer.fan_in]

    def _rest(self, parts):
        if not self.rest_leaves:
            return jnp.zeros((0,), self.dtype)
        return jnp.concatenate([parts[i] for i in self.rest_leaves])

    def _put_rest(self, values, parts) -> None:
        offset = 0
        for i in self.rest_leaves:
            size = self.layout.sizes[i]
            parts[i] = values[offset : offset + size]
            offset += size

    def _map(self, v, per_layer: Callable, rest: Callable):
        parts = self._parts(v.astype(self.dtype))
        out = list(parts)
        for index, layer in enumerate(self.layers):
            self._put(layer, per_layer(index, self._weights(layer, parts)), out)
        self._put_rest(rest(self._rest(parts)), out)
        return jnp.concatenate(out)


@operator_type
class KFAC(_PerLayer):
    """The K-FAC approximation of a Gauss-Newton matrix (:func:`kfac`): one Kronecker block
    per dense layer, zero between layers, and the exact diagonal on the parameters in no dense
    layer. A product costs ``sum over layers of rows * fan_out * (rows + fan_out)``
    multiply-adds, no pass over the data."""

    kronecker: tuple
    diagonal: jax.Array
    layout: Layout = static()
    layers: tuple = static()
    rest_leaves: tuple = static()
    fisher: str = static(default="exact")

    @property
    def unmatched(self) -> tuple[int, ...]:
        """Leaf indices of the parameters in no dense layer (they get the exact diagonal)."""
        return self.rest_leaves

    @property
    def name(self) -> str:
        return f"kfac ({self.fisher}, {len(self.layers)} layers)"

    @property
    def factors(self) -> dict[str, KroneckerFactors]:
        """``{layer name: KroneckerFactors(A, B)}``, in the order the model uses the layers."""
        return {layer.name: f for layer, f in zip(self.layers, self.kronecker, strict=True)}

    def apply(self, v):
        def block(index, w):
            f = self.kronecker[index]
            return jnp.matmul(jnp.matmul(f.A, w), f.B)

        return self._map(v, block, lambda r: self.diagonal * r)

    def exact_diagonal(self):
        zeros = jnp.zeros((self.layout.size,), self.dtype)

        def block(index, _):
            f = self.kronecker[index]
            return jnp.outer(jnp.diagonal(f.A), jnp.diagonal(f.B))

        return self._map(zeros, block, lambda _: self.diagonal)

    def eigen(self) -> KroneckerEigen:
        """The same operator in its eigenbasis: per layer ``A = Q_A diag(a) Q_A^T``, ``B =
        Q_B diag(b) Q_B^T`` and the eigenvalues ``a_i b_j`` of ``A ⊗ B``."""
        bases, values = [], []
        for f in self.kronecker:
            a, qa = jnp.linalg.eigh(_symmetric(f.A))
            b, qb = jnp.linalg.eigh(_symmetric(f.B))
            bases.append((qa, qb))
            values.append(jnp.outer(a, b))
        return KroneckerEigen(
            tuple(bases),
            tuple(values),
            self.diagonal,
            self.layout,
            self.layers,
            self.rest_leaves,
            f"kfac ({self.fisher})",
        )

    def damped_power(self, damping, power: float) -> KroneckerEigen:
        """``(A + damping I)^power`` exactly, through the factors' eigendecompositions (their
        cost, ``O(rows^3 + fan_out^3)`` per layer, once)."""
        return self.eigen().damped_power(damping, power)

    def eigenvalues(self) -> jax.Array:
        """All ``n`` eigenvalues, exactly (:meth:`KroneckerEigen.eigenvalues` of :meth:`eigen`):
        ``jnp.sum(jnp.log(op.eigenvalues() + λ))`` is the exact ``log det(K + λI)`` a Laplace
        approximation needs."""
        return self.eigen().eigenvalues()


@operator_type
class KroneckerEigen(_PerLayer):
    """An operator diagonal in a Kronecker eigenbasis per dense layer: block ``l`` is
    ``(Q_A ⊗ Q_B) diag(vec values_l) (Q_A ⊗ Q_B)^T``, the rest a diagonal. K-FAC's damped
    inverses and powers (:meth:`KFAC.damped_power`, :func:`curvature.inverse`) and EK-FAC
    (:func:`ekfac`) are of this kind. A product costs twice a :class:`KFAC` product."""

    bases: tuple
    values: tuple
    diagonal: jax.Array
    layout: Layout = static()
    layers: tuple = static()
    rest_leaves: tuple = static()
    label: str = static(default="kronecker eigenbasis")

    @property
    def name(self) -> str:
        return self.label

    def apply(self, v):
        def block(index, w):
            qa, qb = self.bases[index]
            inner = jnp.matmul(jnp.matmul(qa.T, w), qb) * self.values[index]
            return jnp.matmul(jnp.matmul(qa, inner), qb.T)

        return self._map(v, block, lambda r: self.diagonal * r)

    def exact_diagonal(self):
        zeros = jnp.zeros((self.layout.size,), self.dtype)

        def block(index, _):
            qa, qb = self.bases[index]
            return (qa**2) @ self.values[index] @ (qb**2).T

        return self._map(zeros, block, lambda _: self.diagonal)

    def eigenvalues(self) -> jax.Array:
        """All ``n`` eigenvalues, unsorted: each layer's ``values`` and the diagonal."""
        return jnp.concatenate([v.reshape(-1) for v in self.values] + [self.diagonal])

    def damped_power(self, damping, power: float) -> KroneckerEigen:
        def f(x):
            return (x + damping) ** power

        return KroneckerEigen(
            self.bases,
            tuple(f(x) for x in self.values),
            f(self.diagonal),
            self.layout,
            self.layers,
            self.rest_leaves,
            f"a damped power of {self.label}",  # no values: a new damping compiles nothing
        )


def _symmetric(m):
    return 0.5 * (m + m.T)


# --------------------------------------------------------------------------------------------
# The statistics: per layer A and B (or EK-FAC's eigenvalues), and the rest's diagonal.


class _Spec(NamedTuple):
    """What one construction computes (static): the layers, the leaves in none, the Fisher."""

    layers: tuple
    rest_leaves: tuple
    fisher: str
    num_samples: int
    likelihood: str  # the named loss MC targets are drawn from ("" otherwise)


def _cotangents(out_loss, fisher: str, out, example, samples):
    """``(K, *out.shape)`` cotangents ``u_k`` and weights ``σ_k`` with ``sum_k σ_k u_k u_k^T``
    the example's ``Λ`` (exact), its Monte Carlo estimate, or the gradient's outer product."""
    size = out.size
    if fisher == "empirical":
        grad = jax.grad(lambda o: out_loss.value(o, example))(out)
        return grad[None], jnp.ones((1,), out.dtype)
    if fisher == "mc":
        count = samples.shape[0]
        if out_loss.fn == "cross_entropy":
            probs = jax.nn.softmax(out[0], axis=-1)
            r = probs[None] - jax.nn.one_hot(samples, out.shape[-1], dtype=out.dtype)
        else:
            r = -samples.astype(out.dtype)
        return r[:, None], jnp.full((count,), 1.0 / count, out.dtype)
    if out_loss.fn == "cross_entropy":
        probs = jax.nn.softmax(out[0], axis=-1)
        root = jnp.sqrt(probs)
        columns = jnp.diag(root) - probs[:, None] * root[None, :]  # U U^T = diag(p) - p p^T
        return columns.T[:, None], jnp.ones((size,), out.dtype)
    if out_loss.fn == "mse":
        eye = jnp.eye(size, dtype=out.dtype).reshape((size, *out.shape))
        return eye, jnp.ones((size,), out.dtype)
    flat = out.reshape(-1)
    hess = jax.hessian(lambda o: out_loss.value(o.reshape(out.shape), example))(flat)
    values, vectors = jnp.linalg.eigh(_symmetric(hess))
    return vectors.T.reshape((size, *out.shape)), values


def _chunk_statistics(model, out_loss, params, chunk, spec: _Spec, bases):
    """The chunk's mean statistics: ``(A's, B's, rest diagonal)``, or with ``bases`` EK-FAC's
    eigenvalues and the rest diagonal."""
    batch, samples = chunk["batch"], chunk.get("samples")
    leaves = jax.tree_util.tree_leaves(params)
    one = jax.tree_util.tree_map(lambda x: x[:1], batch)
    closed = _layers.trace(model, params, one)
    layers, rest = _layers.find_dense_layers(closed, params)
    if layers != spec.layers or rest != spec.rest_leaves:  # the same trace as at build time
        raise RuntimeError("kfac: the model's layers changed between build and evaluation")

    def example(ex, smp):
        ex1 = jax.tree_util.tree_map(lambda x: x[None], ex)
        batch_leaves = jax.tree_util.tree_leaves(ex1)
        zeros = [jnp.zeros(layer.shape, leaves[layer.kernel].dtype) for layer in layers]

        def f(deltas, rest_values):
            full = list(leaves)
            for i, value in zip(rest, rest_values, strict=True):
                full[i] = value
            outs, inputs = _layers.opened(closed, layers, full, batch_leaves, deltas)
            return outs[0], inputs

        out, pullback, inputs = jax.vjp(f, zeros, [leaves[i] for i in rest], has_aux=True)
        cotangents, weights = _cotangents(out_loss, spec.fisher, out, ex1, smp)
        grads, rest_grads = jax.vmap(pullback)(cotangents.astype(out.dtype))
        rest_sq = [jnp.einsum("k,k...->...", weights, g**2) for g in rest_grads]
        return inputs, grads, rest_sq, weights

    smp = samples if samples is not None else jnp.zeros((_count(batch), 0))
    inputs, grads, rest_sq, weights = jax.vmap(example)(batch, smp)
    n = weights.shape[0]
    rest_diag = (
        jnp.concatenate([jnp.mean(x, axis=0).reshape(-1) for x in rest_sq])
        if rest
        else jnp.zeros((0,), weights.dtype)
    )
    first, second = [], []
    for index, layer in enumerate(layers):
        a = inputs[index].reshape(n, layer.positions, layer.fan_in)
        if layer.bias is not None:
            a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)
        g = grads[index].reshape(n, weights.shape[1], layer.positions, layer.fan_out)
        if bases is None:
            # Plain matmuls over all rows: XLA ran the three-operand einsum as a transpose of
            # every cotangent first, twice as slow (benchmarks/bench_kfac.py).
            rows = a.reshape(-1, a.shape[-1])
            first.append(jnp.matmul(rows.T, rows, precision=_HIGHEST) / (n * layer.positions))
            weighted = (g * weights[:, :, None, None]).reshape(-1, layer.fan_out)
            flat = g.reshape(-1, layer.fan_out)
            second.append(jnp.matmul(weighted.T, flat, precision=_HIGHEST) / n)
        else:
            qa, qb = bases[index]
            a = jnp.einsum("npi,ij->npj", a, qa, precision=_HIGHEST)
            g = jnp.einsum("nkpi,ij->nkpj", g, qb, precision=_HIGHEST)
            if layer.positions == 1:
                value = jnp.einsum("ni,nkj,nk->ij", a[:, 0] ** 2, g[:, :, 0] ** 2, weights)
            else:
                per = jnp.einsum("npi,nkpj->nkij", a, g, precision=_HIGHEST)
                value = jnp.einsum("nkij,nk->ij", per**2, weights)
            first.append(value / n)
    return tuple(first), tuple(second), rest_diag


def _count(batch) -> int:
    return jax.tree_util.tree_leaves(batch)[0].shape[0]


@functools.partial(jax.jit, static_argnums=(4, 5))
def _statistics(model: Closure, out_loss: Closure, params, data, batching, spec, bases=None):
    model_fn, loss_fn = model.bind(), out_loss.bind()

    def chunk(c):
        return _chunk_statistics(model_fn, loss_fn, params, c, spec, bases)

    return data_mean(chunk, data, batching)


@jax.jit
def _accumulate(total, stats, weight):
    if total is None:
        return jax.tree_util.tree_map(lambda s: s * weight, stats)
    return jax.tree_util.tree_map(lambda t, s: t + s * weight, total, stats)


# --------------------------------------------------------------------------------------------
# The builders.


def _build(model, params, data, *, loss, targets, batch_size, fisher, num_samples, key, check,
           what):  # fmt: skip
    if fisher not in _FISHERS:
        raise ValueError(f"{what}: fisher must be one of {', '.join(_FISHERS)}; got {fisher!r}")
    if not callable(model):
        raise TypeError(f"{what}: model must be a function model(params, batch), got {model!r}")
    out_loss = output_loss(loss, targets)
    if fisher == "mc":
        if out_loss.fn not in ("cross_entropy", "mse"):
            raise ValueError(
                f"{what}: fisher='mc' samples targets from the likelihood of a named loss "
                f"(cross_entropy or mse); a loss function has no distribution to sample"
            )
        if key is None:
            raise ValueError(f"{what}: fisher='mc' draws targets: pass key=jax.random.key(...)")
        check_key(key)
        num_samples = positive_int(num_samples, "num_samples")
    layout, batching, data, first = _setup(params, data, batch_size, check)
    out_shape = jax.eval_shape(model, params, first)
    if not isinstance(out_shape, jax.ShapeDtypeStruct):
        raise TypeError(
            f"{what}: model(params, batch) must return one array of outputs; it returned "
            f"{jax.tree_util.tree_structure(out_shape)}"
        )
    if check:
        reads_targets = fisher == "empirical" or callable(out_loss.fn)
        if reads_targets:
            check_scalar(
                lambda p, b: out_loss.value(model(p, b), b), (params, first), "the output loss"
            )
            if not is_traced(params):
                check_labels(out_loss, out_shape, first if batching is None else data)
        else:
            check_scalar(lambda p, b: jnp.sum(model(p, b)), (params, first), "model(params, batch)")
    if out_loss.fn == "cross_entropy" and len(out_shape.shape) != 2:
        raise ValueError(
            f"{what}(loss='cross_entropy') needs logits (batch, classes), got outputs of shape "
            f"{out_shape.shape}"
        )
    one = jax.tree_util.tree_map(lambda x: x[:1], first)
    closed = _layers.trace(model, params, one)
    layers, rest = _layers.find_dense_layers(closed, params)
    if not layers:
        warnings.warn(
            f"{what}: no dense layer (x @ W + b with W a parameter used once) was found in the "
            "model; the approximation is the exact Gauss-Newton diagonal of every parameter",
            stacklevel=3,
        )
    model = closure(model, params, first, what=f"{what}()")
    likelihood = out_loss.fn if isinstance(out_loss.fn, str) else ""
    spec = _Spec(layers, rest, fisher, num_samples if fisher == "mc" else 0, likelihood)
    return layout, batching, data, model, closure(out_loss), spec


def _samples(model, params, batch, key, spec: _Spec):
    samples, finite = _draw(model, params, batch, key, spec.num_samples, spec.likelihood)
    if not is_traced(finite) and not bool(finite):
        raise ValueError("kfac(fisher='mc'): the model's outputs are not all finite")
    return samples


def _run(model, out_loss, params, data, batching, spec: _Spec, key, batch_size, bases=None):
    """The statistics over in-memory data (one compiled program) or a loader (a host loop of
    one compiled program per batch shape, each batch weighted by its size; the Monte Carlo
    targets of batch ``j`` drawn with ``fold_in(key, j)``)."""
    if batching is not None:
        chunks = {"batch": data}
        if spec.fisher == "mc":
            chunks["samples"] = _samples(model, params, data, key, spec)
        return _statistics(model, out_loss, params, chunks, batching, spec, bases)
    total, count = None, 0
    for index, batch in enumerate(streaming.device_batches(data)):
        chunks = {"batch": batch}
        if spec.fisher == "mc":
            chunks["samples"] = _samples(model, params, batch, jax.random.fold_in(key, index), spec)
        chunking = Batching.of(chunks, batch_size)
        stats = _statistics(model, out_loss, params, chunks, chunking, spec, bases)
        total = _accumulate(total, stats, float(chunking.num_examples))
        count += chunking.num_examples
    if total is None:
        raise ValueError("data: the loader yielded no batches")
    return _accumulate(None, total, 1.0 / count)


def _operator(stats, layout, spec: _Spec) -> KFAC:
    first, second, rest = stats
    dtype = layout.dtype
    kronecker = tuple(
        KroneckerFactors(_symmetric(a).astype(dtype), _symmetric(b).astype(dtype))
        for a, b in zip(first, second, strict=True)
    )
    return KFAC(kronecker, rest.astype(dtype), layout, spec.layers, spec.rest_leaves, spec.fisher)


def kfac(
    model: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    data: PyTree,
    *,
    loss: str | Callable[[jax.Array, PyTree], jax.Array],
    targets: str | int | Callable[[PyTree], jax.Array] | None = None,
    batch_size: int | None = None,
    fisher: str = "exact",
    num_samples: int = 1,
    key: jax.Array | None = None,
    check: bool = True,
) -> KFAC:
    """The K-FAC approximation of the Gauss-Newton matrix of ``model`` and ``loss``, as an
    operator: one Kronecker-factored block per dense layer, no blocks between layers.

    Per dense layer found in the model (:class:`DenseLayer`: ``x @ W + b`` with ``W`` a 2-D
    parameter used nowhere else, ``b`` optional), the block on ``[W; b]`` is ``A ⊗ B`` with
    ``A`` the mean of ``ā ā^T`` (``ā`` the layer's input with a 1 appended for the bias) and
    ``B`` the mean of ``J^T Λ J`` over examples (``J`` the outputs' Jacobian in the layer's
    pre-activation, ``Λ`` the output loss's Hessian in the outputs: the conventions of
    :func:`curvature.gauss_newton`, so that for one example the block equals the Gauss-Newton
    block exactly). Parameters in no dense layer get their exact Gauss-Newton diagonal (of the
    same Fisher: exact, sampled or empirical).

    Args:
      model: ``model(params, batch) -> outputs`` (one array, a leading example axis), as for
        :func:`curvature.gauss_newton`; each example's outputs depend on that example only.
      params: as for :func:`curvature.hessian`.
      data: as for :func:`curvature.hessian`; a loader (``lambda: batches``) is one pass.
      loss: ``"cross_entropy"``, ``"mse"`` or a function ``loss(outputs, batch)`` (the batch
        mean), as for :func:`curvature.gauss_newton`.
      targets: where the labels are, as for :func:`curvature.gauss_newton`; read only by
        ``fisher="empirical"`` and by a loss function.
      batch_size: examples per chunk of the construction (memory, not the result).
      fisher: ``"exact"``: ``Λ`` itself, factored as ``sum_k σ_k u_k u_k^T`` (softmax: ``diag(√p)
        - p √p^T``; squared error: the identity; a loss function: its eigendecomposition), one
        backward pass per output; ``"mc"``: ``Λ`` replaced by ``r r^T`` averaged over
        ``num_samples`` targets drawn from the model's predictive distribution
        (:func:`curvature.monte_carlo_fisher`'s samples for the same ``key``); ``"empirical"``:
        by the gradient's outer product at the labels (the blocks of
        :func:`curvature.empirical_fisher`).
      num_samples: targets drawn per example for ``fisher="mc"``.
      key: PRNG key of the samples (``fisher="mc"`` only).
      check: check the parameters, the outputs and (when read) the labels first.

    Returns a :class:`KFAC`: ``op.factors`` (``{layer: KroneckerFactors(A, B)}``),
    ``op.layers``, ``op.eigen()``, and exact damped inverses and powers
    (:func:`curvature.inverse`, :meth:`KFAC.damped_power`).

    Cost: building it is one forward pass per example and ``K`` backward passes (``K`` = the
    number of outputs for ``"exact"``, ``num_samples`` for ``"mc"``, 1 for ``"empirical"``),
    vmapped over examples, plus ``O(N (fan_in^2 + K fan_out^2))`` per layer for the factors;
    memory per chunk: its layer inputs and ``K`` pre-activation gradients per example. A product
    costs ``sum over layers of rows fan_out (rows + fan_out)`` multiply-adds (no data). The
    factors are accumulated at full float32 precision (``Precision.HIGHEST``, also on GPUs
    whose default is TF32).

    Examples:
      >>> import jax, jax.numpy as jnp, curvature
      >>> params = {"dense": {"w": jnp.ones((3, 2)) / 3, "b": jnp.zeros(2)}}
      >>> model = lambda p, batch: batch["x"] @ p["dense"]["w"] + p["dense"]["b"]
      >>> data = {"x": jnp.eye(3)[:2], "y": jnp.array([0, 1])}
      >>> op = curvature.kfac(model, params, data, loss="cross_entropy")
      >>> op.layers[0].name, op.factors["dense"].A.shape, op.factors["dense"].B.shape
      ('dense', (4, 4), (2, 2))
      >>> A, B = op.factors["dense"]  # A: the mean of [x, 1] [x, 1]^T over the two examples
      >>> [float(a) for a in A[3]], round(float(B[0, 0]), 6)  # B: the mean of p (1 - p), p = 1/2
      ([0.5, 0.5, 0.0, 1.0], 0.25)
    """
    layout, batching, data, model, out_loss, spec = _build(
        model, params, data, loss=loss, targets=targets, batch_size=batch_size, fisher=fisher,
        num_samples=num_samples, key=key, check=check, what="kfac",
    )  # fmt: skip
    stats = _run(model, out_loss, params, data, batching, spec, key, batch_size)
    return _operator(stats, layout, spec)


def ekfac(
    model: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    data: PyTree,
    *,
    loss: str | Callable[[jax.Array, PyTree], jax.Array],
    targets: str | int | Callable[[PyTree], jax.Array] | None = None,
    batch_size: int | None = None,
    fisher: str = "exact",
    num_samples: int = 1,
    key: jax.Array | None = None,
    check: bool = True,
) -> KroneckerEigen:
    """Eigenvalue-corrected K-FAC (George et al. 2018): K-FAC's per-layer Kronecker eigenbases
    ``Q_A ⊗ Q_B`` with the eigenvalues refitted, ``s_ij = mean over examples of sum_k σ_k
    ((Q_A^T G_k Q_B)_ij)^2`` for the per-example weight gradients ``G_k = sum_p ā_p g_kp^T``:
    the operator diagonal in that basis closest in Frobenius norm to the Gauss-Newton block
    (of the same Fisher). Arguments as for :func:`kfac`.

    Returns a :class:`KroneckerEigen` (damped inverses and powers exact). Cost: :func:`kfac`'s
    construction twice (a second pass computes the eigenvalues in the first's bases; the Monte
    Carlo targets are the same in both), plus each factor's eigendecomposition.
    """
    layout, batching, data, model, out_loss, spec = _build(
        model, params, data, loss=loss, targets=targets, batch_size=batch_size, fisher=fisher,
        num_samples=num_samples, key=key, check=check, what="ekfac",
    )  # fmt: skip
    stats = _run(model, out_loss, params, data, batching, spec, key, batch_size)
    eigen = _operator(stats, layout, spec).eigen()
    values, _, _ = _run(model, out_loss, params, data, batching, spec, key, batch_size,
                        bases=eigen.bases)  # fmt: skip
    return KroneckerEigen(
        eigen.bases,
        tuple(v.astype(layout.dtype) for v in values),
        eigen.diagonal,
        layout,
        spec.layers,
        spec.rest_leaves,
        f"ekfac ({fisher}, {len(spec.layers)} layers)",
    )

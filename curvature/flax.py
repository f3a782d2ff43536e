"""Curvature operators of flax models: NNX modules, and linen ``apply`` with its variables.

``import curvature.flax`` (flax is imported here, never by ``import curvature``)::

    import curvature, curvature.flax as cvf

    # flax NNX: functions of the module
    H = cvf.hessian(lambda m, batch: loss(m(batch["x"]), batch["y"]), model, data)
    G = cvf.gauss_newton(lambda m, batch: m(batch["x"]), model, data, loss="cross_entropy")
    F = cvf.empirical_fisher(loss_fn, model, data)
    curvature.eigsh(H, k=5, num_steps=40, key=jax.random.key(0))

    # flax linen: functions of the variables {"params": ..., "batch_stats": ...}
    H = cvf.hessian(lambda v, b: xent(net.apply(v, b["x"], train=False), b["y"]), variables, data)

Only the parameters are differentiated (``nnx.Param`` state; linen's ``variables["params"]``): the
operator acts on their flat vector and ``op.unravel`` gives a pytree shaped like them
(:func:`parameters`). The rest of the state (batch statistics, RNG keys and counts, caches) is
carried unchanged as operands of the compiled programs.

Evaluation mode by default: an NNX module is used through a copy switched to evaluation mode
(``BatchNorm`` uses its running averages, ``Dropout`` is off); ``train=True`` keeps the module's
own mode. Linen modes are arguments of ``apply``, chosen by the loss function.

A loss whose value depends on how examples are grouped into batches (batch statistics in
training mode, dropout) has no dataset Hessian that chunking can compute: the operators here
would change with ``batch_size`` and mean nothing. The builders detect it (the loss of the first
examples computed at once and as two halves differ) and refuse it with the reason and the fix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import curvature
from curvature import streaming
from curvature._checks import is_traced, num_examples
from curvature._closures import stable
from curvature.linear_operator import LinearOperator
from curvature.losses import output_loss

__all__ = [
    "empirical_fisher",
    "gauss_newton",
    "hessian",
    "kfac",
    "monte_carlo_fisher",
    "parameters",
]

PyTree = Any

# How many examples the grouping check compares (at once against as two halves).
_GROUPING_EXAMPLES = 64


def _evaluation_copy(model: nnx.Module) -> nnx.Module:
    copy = nnx.clone(model)
    if hasattr(copy, "eval"):
        copy.eval()
    else:  # older flax
        copy.set_attributes(deterministic=True, use_running_average=True, raise_if_not_found=False)
    return copy


def _split(target, train: bool):
    """``(params, rest, kind)``: the differentiated parameters and the carried state."""
    if isinstance(target, nnx.Module):
        module = target if train else _evaluation_copy(target)
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        return params, (graphdef, rest), "nnx"
    if isinstance(target, Mapping) and "params" in target:
        rest = {k: v for k, v in target.items() if k != "params"}
        return target["params"], rest, "linen"
    raise TypeError(
        "curvature.flax builds operators from a flax NNX module (nnx.Module) or linen variables "
        f"(a mapping with a 'params' collection); got {type(target).__name__}. For a plain "
        "parameter pytree use curvature.hessian / curvature.gauss_newton."
    )


def _nnx_call(graphdef, rest, fn, params, batch):
    return fn(nnx.merge(graphdef, params, rest, copy=True), batch)


def _linen_call(rest, fn, params, batch):
    return fn({**rest, "params": params}, batch)


def _bind(fn: Callable, state, kind: str) -> Callable:
    """``fn(model_or_variables, batch)`` as ``f(params, batch)``: a ``functools.partial`` of a
    module-level function, so equal models give equal functions (shared compiled programs)."""
    if kind == "nnx":
        graphdef, rest = state
        return functools.partial(_nnx_call, graphdef, rest, fn)
    return functools.partial(_linen_call, state, fn)


def parameters(target, *, train: bool = False) -> PyTree:
    """The pytree the operators here differentiate: an NNX module's ``nnx.Param`` state or linen
    ``variables["params"]``. Its structure is that of ``op.unravel(v)`` and of selectors for
    :func:`curvature.restrict`."""
    return _split(target, train)[0]


@functools.partial(jax.jit, static_argnums=0)
def _grouped_losses(static, captured, params, data):
    loss = static.bind(captured)
    half = jax.tree_util.tree_leaves(data)[0].shape[0] // 2
    first = jax.tree_util.tree_map(lambda x: x[:half], data)
    second = jax.tree_util.tree_map(lambda x: x[half : 2 * half], data)
    whole = jax.tree_util.tree_map(lambda x: x[: 2 * half], data)
    return loss(params, whole), 0.5 * (loss(params, first) + loss(params, second))


def _check_grouping(loss: Callable, params, data, *, what: str, train: bool) -> None:
    if streaming.is_source(data):  # streamed data: the check runs on the first batch
        data = streaming.first_batch(data)
    if is_traced((params, data)):
        return
    count = min(num_examples(data), _GROUPING_EXAMPLES)
    if count < 2:
        return
    sample = jax.tree_util.tree_map(lambda x: jnp.asarray(x[:count]), data)
    static, captured = stable(loss, (params, sample), what)
    whole, halves = (float(x) for x in _grouped_losses(static, captured, params, sample))
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    tol = 1e-4 if np.finfo(dtype).bits <= 32 else 1e-9
    if abs(whole - halves) <= tol * max(abs(whole), abs(halves), 1e-30):
        return
    mode = (
        "the module is in training mode (train=True)"
        if train
        else "the loss function sets training mode itself"
    )
    raise ValueError(
        f"{what}: the loss depends on how examples are grouped into batches: on the first "
        f"{2 * (count // 2)} examples at once it is {whole:.8g}, as the mean of two halves "
        f"{halves:.8g}. Batch statistics (BatchNorm in training mode) or dropout make each "
        f"example's loss depend on the others, so the operator would change with batch_size and "
        f"is not the Hessian of a dataset loss; here {mode}. Use evaluation mode (train=False, "
        "the default for NNX modules; train=False / deterministic=True in a linen apply)."
    )


def _prepare(fn, target, train):
    params, state, kind = _split(target, train)
    return params, _bind(fn, state, kind)


def _output_loss_value(model, out_loss, params, batch):
    return out_loss.value(model(params, batch), batch)


def _loss_operator(builder, name, loss, model, data, *, batch_size, train, check):
    params, bound = _prepare(loss, model, train)
    if check:
        _check_grouping(bound, params, data, what=f"curvature.flax.{name}", train=train)
    return builder(bound, params, data, batch_size=batch_size, check=check)


def hessian(
    loss: Callable[[Any, PyTree], jax.Array],
    model,
    data: PyTree,
    *,
    batch_size: int | None = None,
    train: bool = False,
    check: bool = True,
) -> LinearOperator:
    """The Hessian of the dataset-mean loss in a flax model's parameters.

    Args:
      loss: ``loss(module, batch) -> scalar`` for an NNX module, ``loss(variables, batch)`` for
        linen variables: the mean loss over the examples of ``batch``.
      model: an ``nnx.Module`` or linen ``variables`` (a mapping with ``"params"``).
      data: as for :func:`curvature.hessian`.
      batch_size: as for :func:`curvature.hessian`.
      check: as for :func:`curvature.hessian`; also, a loss that depends on how examples are
        grouped is refused (see the module docstring).
      train: use an NNX module in its own (training) mode instead of an evaluation copy.
    """
    return _loss_operator(
        curvature.hessian,
        "hessian",
        loss,
        model,
        data,
        batch_size=batch_size,
        train=train,
        check=check,
    )


def empirical_fisher(
    loss: Callable[[Any, PyTree], jax.Array],
    model,
    data: PyTree,
    *,
    batch_size: int | None = None,
    train: bool = False,
    check: bool = True,
) -> LinearOperator:
    """The empirical Fisher (:func:`curvature.empirical_fisher`) of a flax model; arguments as
    for :func:`hessian`."""
    return _loss_operator(
        curvature.empirical_fisher,
        "empirical_fisher",
        loss,
        model,
        data,
        batch_size=batch_size,
        train=train,
        check=check,
    )


def gauss_newton(
    apply: Callable[[Any, PyTree], jax.Array],
    model,
    data: PyTree,
    *,
    loss: str | Callable[[jax.Array, PyTree], jax.Array],
    targets=None,
    batch_size: int | None = None,
    train: bool = False,
    check: bool = True,
) -> LinearOperator:
    """The generalised Gauss-Newton matrix (:func:`curvature.gauss_newton`) of a flax model.

    Args:
      apply: ``apply(module, batch) -> outputs`` for an NNX module, ``apply(variables, batch)``
        for linen variables.
      model: as for :func:`hessian`.
      data: as for :func:`hessian`.
      loss: the output loss, as for :func:`curvature.gauss_newton`.
      targets: as for :func:`curvature.gauss_newton`.
      batch_size: as for :func:`hessian`.
      train: as for :func:`hessian`.
      check: as for :func:`hessian`.
    """
    params, bound = _prepare(apply, model, train)
    op = curvature.gauss_newton(
        bound, params, data, loss=loss, targets=targets, batch_size=batch_size, check=check
    )
    if check:
        out_loss = output_loss(loss, targets)
        _check_grouping(
            functools.partial(_output_loss_value, bound, out_loss),
            params,
            data,
            what="curvature.flax.gauss_newton",
            train=train,
        )
    return op


def kfac(
    apply: Callable[[Any, PyTree], jax.Array],
    model,
    data: PyTree,
    *,
    loss: str | Callable[[jax.Array, PyTree], jax.Array],
    targets=None,
    batch_size: int | None = None,
    fisher: str = "exact",
    num_samples: int = 1,
    key: jax.Array | None = None,
    train: bool = False,
    check: bool = True,
) -> LinearOperator:
    """K-FAC (:func:`curvature.kfac`) of a flax model: ``nnx.Linear`` and linen ``Dense``
    layers (any ``x @ kernel + bias`` in the computation) get Kronecker blocks, the other
    parameters their exact Gauss-Newton diagonal.

    Args:
      apply: as for :func:`gauss_newton`.
      model: as for :func:`hessian`.
      data: as for :func:`hessian`.
      loss: as for :func:`curvature.kfac`.
      targets: as for :func:`curvature.kfac`.
      batch_size: as for :func:`curvature.kfac`.
      fisher: as for :func:`curvature.kfac`.
      num_samples: as for :func:`curvature.kfac`.
      key: as for :func:`curvature.kfac`.
      train: as for :func:`hessian`.
      check: as for :func:`hessian`.
    """
    params, bound = _prepare(apply, model, train)
    return curvature.kfac(
        bound, params, data, loss=loss, targets=targets, batch_size=batch_size, fisher=fisher,
        num_samples=num_samples, key=key, check=check,
    )  # fmt: skip


def monte_carlo_fisher(
    apply: Callable[[Any, PyTree], jax.Array],
    model,
    data: PyTree,
    *,
    loss: str,
    num_samples: int,
    key: jax.Array,
    batch_size: int | None = None,
    train: bool = False,
    check: bool = True,
) -> LinearOperator:
    """The Monte Carlo Fisher (:func:`curvature.monte_carlo_fisher`) of a flax model.

    Args:
      apply: as for :func:`gauss_newton`.
      model: as for :func:`hessian`.
      data: as for :func:`curvature.monte_carlo_fisher`.
      loss: as for :func:`curvature.monte_carlo_fisher`.
      num_samples: as for :func:`curvature.monte_carlo_fisher`.
      key: as for :func:`curvature.monte_carlo_fisher`.
      batch_size: as for :func:`hessian`.
      train: as for :func:`hessian`.
      check: as for :func:`hessian`.
    """
    params, bound = _prepare(apply, model, train)
    return curvature.monte_carlo_fisher(
        bound, params, data, loss=loss, num_samples=num_samples, key=key,
        batch_size=batch_size, check=check,
    )  # fmt: skip

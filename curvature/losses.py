"""Output losses for the Gauss-Newton matrix: each one's value and its Hessian-vector product in
the outputs, with its targets read from the batch in a way the caller states.

``gauss_newton(model, params, data, loss="cross_entropy", targets="label")`` reads the labels
from ``batch["label"]``; ``targets`` may be a key, a position in a tuple batch, or a function
``batch -> targets``. Without ``targets`` a named loss takes the second element of an
``(inputs, targets)`` pair, or the one of the keys ``y``, ``label``, ``labels``, ``target``,
``targets`` that the batch has (an error if it has several or none).

``"cross_entropy"``: softmax cross-entropy on logits ``(batch, ..., classes)`` with integer labels
``(batch, ...)`` (per example, or per token of a sequence), the mean over every position.
``"mse"``: half the squared error summed over each example's outputs, the mean over examples.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["NAMED", "OutputLoss", "check_labels", "targets_reader"]

TARGET_KEYS = ("y", "label", "labels", "target", "targets")


def _guess_targets(batch):
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[1]
    if isinstance(batch, Mapping):
        found = [k for k in TARGET_KEYS if k in batch]
        if len(found) == 1:
            return batch[found[0]]
        if len(found) > 1:
            raise ValueError(
                f"the batch has several target keys {found}: say which with targets=<key>"
            )
    raise TypeError(
        "a named output loss needs targets: pass targets=<key, index or function batch -> "
        f"targets>, or batches as (inputs, targets) pairs or mappings with one of the keys "
        f"{TARGET_KEYS}; or pass loss as a function loss(outputs, batch)"
    )


@dataclasses.dataclass(frozen=True)
class _Key:
    key: Any

    def __call__(self, batch):
        try:
            return batch[self.key]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"targets={self.key!r}: the batch has no such entry") from None


def targets_reader(targets) -> Callable:
    """A function ``batch -> targets`` from ``None`` (the guess above), a key, an index or a
    function."""
    if targets is None:
        return _guess_targets
    if callable(targets):
        return targets
    if isinstance(targets, str | int):
        return _Key(targets)
    raise TypeError(
        f"targets must be a key, an index or a function batch -> targets; got {targets!r}"
    )


def _mse_targets(out, y):
    # Shape checks run at trace time (static shapes), so they hold with check=False too.
    if y.shape != out.shape:
        raise ValueError(
            f"mse: targets of shape {y.shape} do not match outputs of shape {out.shape}"
        )


def _mse_value(out, y):
    _mse_targets(out, y)
    return 0.5 * jnp.mean(jnp.sum(((out - y) ** 2).reshape(out.shape[0], -1), axis=1))


def _mse_hvp(out, u, y):
    _mse_targets(out, y)
    return u / out.shape[0]


def _ce_labels(out, y):
    if out.ndim < 2 or y.shape != out.shape[:-1] or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(
            "cross_entropy needs logits of shape (batch, ..., classes) and integer labels of "
            f"shape (batch, ...), the logits' shape without its last axis; got logits {out.shape} "
            f"and labels {y.shape} of dtype {y.dtype}"
        )


def _positions(out) -> int:
    # Every position of every example: batch x sequence (x ...), all axes but the classes.
    return math.prod(out.shape[:-1])


def _ce_value(out, y):
    """The mean softmax cross-entropy over every position: logits ``(batch, ..., classes)``,
    labels ``(batch, ...)``. For sequences of equal length the mean over tokens is the mean over
    examples of the per-example means, so chunking by examples (batches weighted by their sizes)
    stays exact."""
    _ce_labels(out, y)
    logz = jax.nn.logsumexp(out, axis=-1)
    return jnp.mean(logz - jnp.take_along_axis(out, y[..., None], axis=-1)[..., 0])


def _ce_hvp(out, u, y):
    """``(diag p - p pᵀ) u / P`` at every position (``P`` positions, ``p`` the softmax): the
    Hessian of :func:`_ce_value` in the logits, block diagonal over positions."""
    _ce_labels(out, y)
    p = jax.nn.softmax(out, axis=-1)
    return (p * u - p * jnp.sum(p * u, axis=-1, keepdims=True)) / _positions(out)


NAMED = {"mse": (_mse_value, _mse_hvp), "cross_entropy": (_ce_value, _ce_hvp)}


@dataclasses.dataclass(frozen=True)
class OutputLoss:
    """An output loss: a name with its targets reader, or a function ``l(outputs, batch)``.
    Its value and its Hessian-vector product in the outputs."""

    fn: Callable | str
    targets: Callable | None = None

    def value(self, out, batch):
        if isinstance(self.fn, str):
            return NAMED[self.fn][0](out, self.targets(batch))
        return self.fn(out, batch)

    def hvp(self, out, u, batch):
        if isinstance(self.fn, str):
            return NAMED[self.fn][1](out, u, self.targets(batch))
        grad = jax.grad(self.fn)
        return jax.jvp(lambda o: grad(o, batch), (out,), (u,))[1]


def check_labels(out_loss: OutputLoss, outputs, batch) -> None:
    """Cross-entropy labels must be class indices ``0 .. classes - 1``: an out-of-range label
    (-1 for "unlabelled", say) indexes another class or none without an error inside compiled
    code. Checked on concrete labels, once, on the host (``outputs``: the model's outputs or
    their ``jax.ShapeDtypeStruct``); traced ones are skipped."""
    if out_loss.fn != "cross_entropy":
        return
    labels = out_loss.targets(batch)
    if isinstance(labels, jax.core.Tracer):
        return
    classes = outputs.shape[-1]
    host = np.asarray(labels)
    bad = np.flatnonzero((host < 0) | (host >= classes))
    if bad.size:
        first = np.unravel_index(bad[0], host.shape)
        where = f"example {first[0]}" + (
            f", position {', '.join(str(int(i)) for i in first[1:])}" if host.ndim > 1 else ""
        )
        raise ValueError(
            f"cross_entropy: {bad.size} label(s) outside 0 .. {classes - 1} (the model's "
            f"{classes} classes), the first {host[first]} at {where}: labels are class "
            "indices; drop unlabelled examples (or give them a class) before building the operator"
        )


def output_loss(loss, targets=None) -> OutputLoss:
    """``loss`` (a name in :data:`NAMED` with its ``targets``, or ``loss(outputs, batch)``) as an
    :class:`OutputLoss`, with a clear error for anything else."""
    if isinstance(loss, str):
        if loss not in NAMED:
            raise ValueError(
                f"unknown output loss {loss!r}; use one of {sorted(NAMED)} or a function"
            )
        return OutputLoss(loss, targets_reader(targets))
    if callable(loss):
        if targets is not None:
            raise ValueError(
                "targets= applies to the named losses; a loss function loss(outputs, batch) reads "
                "its own targets from the batch"
            )
        return OutputLoss(loss)
    raise TypeError(f"loss must be a name or a function loss(outputs, batch), got {loss!r}")

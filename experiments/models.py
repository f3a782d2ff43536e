"""Flax NNX models (an MLP and a small CNN) with the activation chosen by name, and the pure
functions of their parameters that the curvature library and the optimizer see.

Activation names: ``relu``, ``leaky_relu[:slope]``, ``elu[:alpha]``, ``gelu`` (exact, erf),
``gelu_tanh`` (the tanh approximation), ``silu``, ``softplus[:beta]`` with
``softplus_beta(x) = softplus(beta x) / beta`` (tends to ReLU as beta grows), ``tanh``, ``identity``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.errors import ConfigError

ACTIVATIONS = (
    "relu",
    "leaky_relu",
    "elu",
    "gelu",
    "gelu_tanh",
    "silu",
    "softplus",
    "tanh",
    "identity",
)
_DEFAULT_PARAM = {"leaky_relu": 0.01, "elu": 1.0, "softplus": 1.0}


def parse_activation(name: str) -> tuple[str, float | None]:
    """``"softplus:5"`` -> ``("softplus", 5.0)``; raises ``ValueError`` naming what is wrong."""
    base, _, arg = str(name).partition(":")
    if base not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    if arg and base not in _DEFAULT_PARAM:
        raise ValueError(f"activation {base!r} takes no parameter, got {name!r}")
    if not arg:
        return base, _DEFAULT_PARAM.get(base)
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"activation {name!r}: parameter {arg!r} is not a number") from None
    if base == "softplus" and not value > 0:
        raise ValueError(f"activation {name!r}: softplus beta must be positive")
    return base, value


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    base, p = parse_activation(name)
    if base == "relu":
        return jax.nn.relu
    if base == "leaky_relu":
        return functools.partial(jax.nn.leaky_relu, negative_slope=p)
    if base == "elu":
        return functools.partial(jax.nn.elu, alpha=p)
    if base == "gelu":
        return functools.partial(jax.nn.gelu, approximate=False)
    if base == "gelu_tanh":
        return functools.partial(jax.nn.gelu, approximate=True)
    if base == "silu":
        return jax.nn.silu
    if base == "softplus":
        return lambda x: jax.nn.softplus(p * x) / p
    if base == "tanh":
        return jnp.tanh
    return lambda x: x


class MLP(nnx.Module):
    """``depth`` hidden layers of ``width`` units, then a linear read-out."""

    def __init__(self, in_features, width, depth, out_features, activation, *, rngs: nnx.Rngs):
        sizes = [in_features] + [width] * depth
        self.hidden = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        self.readout = nnx.Linear(sizes[-1], out_features, rngs=rngs)
        self.activation = activation

    def __call__(self, x):
        act = activation_fn(self.activation)
        x = x.reshape(x.shape[0], -1)
        for layer in self.hidden:
            x = act(layer(x))
        return self.readout(x)


class CNN(nnx.Module):
    """3x3 convolutions (``channels``), global average pooling, a linear read-out."""

    def __init__(self, in_channels, channels, out_features, activation, *, rngs: nnx.Rngs):
        sizes = [in_channels, *channels]
        self.convs = nnx.List(
            [
                nnx.Conv(a, b, kernel_size=(3, 3), padding="SAME", rngs=rngs)
                for a, b in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )
        self.readout = nnx.Linear(sizes[-1], out_features, rngs=rngs)
        self.activation = activation

    def __call__(self, x):
        act = activation_fn(self.activation)
        if x.ndim == 3:
            x = x[..., None]
        for conv in self.convs:
            x = act(conv(x))
        return self.readout(jnp.mean(x, axis=(1, 2)))


def build(model_cfg, activation: str, input_shape, num_classes, seed: int):
    """The model, split into a static definition and its parameters (an ``nnx.State``).

    The initialisation depends only on ``seed`` and the architecture, never on the activation,
    so networks that differ only in their activation start from identical parameters.
    """
    rngs = nnx.Rngs(params=seed)
    if model_cfg.kind == "mlp":
        features = 1
        for d in input_shape:
            features *= d
        model = MLP(features, model_cfg.width, model_cfg.depth, num_classes, activation, rngs=rngs)
    elif model_cfg.kind == "cnn":
        if len(input_shape) not in (2, 3):
            raise ConfigError(
                f"config key model.kind='cnn' needs image inputs (H, W[, C]); got {input_shape}; "
                "set data.image_shape"
            )
        in_channels = input_shape[2] if len(input_shape) == 3 else 1
        model = CNN(in_channels, tuple(model_cfg.channels), num_classes, activation, rngs=rngs)
    else:
        raise ValueError(
            f"config key model.kind: unknown model {model_cfg.kind!r}; use 'mlp' or 'cnn'"
        )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


@functools.cache
def pure_functions(graphdef, rest_treedef, loss_name: str):
    """``apply(params, x)``, ``model(params, batch)``, ``loss(params, batch)`` for one architecture.

    Cached per (architecture, activation, loss), so every seed of a sweep shares the same function
    objects and therefore every compiled program (curvature operators key their caches on them).
    The models have no dropout or batch statistics: the evaluation view is the training view.
    """
    rest = jax.tree_util.tree_unflatten(rest_treedef, [])

    def apply(params, x):
        return nnx.merge(graphdef, params, rest, copy=True)(x)

    def model(params, batch):
        return apply(params, batch["x"])

    if loss_name == "cross_entropy":

        def loss(params, batch):
            logits = model(params, batch)
            logz = jax.nn.logsumexp(logits, axis=-1)
            return jnp.mean(logz - jnp.take_along_axis(logits, batch["y"][:, None], axis=-1)[:, 0])

    elif loss_name == "mse":

        def loss(params, batch):
            out = model(params, batch)
            target = jax.nn.one_hot(batch["y"], out.shape[-1], dtype=out.dtype)
            return 0.5 * jnp.mean(jnp.sum((out - target) ** 2, axis=-1))

    else:
        raise ValueError(
            f"config key train.loss: unknown loss {loss_name!r}; use 'cross_entropy' or 'mse'"
        )
    return apply, model, loss


def output_loss(loss_name: str):
    """The output loss for ``curvature.gauss_newton``: a name it knows, or MSE on one-hot labels."""
    if loss_name == "cross_entropy":
        return "cross_entropy"
    return _mse_one_hot


def _mse_one_hot(out, batch):
    target = jax.nn.one_hot(batch["y"], out.shape[-1], dtype=out.dtype)
    return 0.5 * jnp.mean(jnp.sum((out - target) ** 2, axis=-1))

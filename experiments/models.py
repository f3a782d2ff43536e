"""Flax NNX models, activations and losses, each in its registry, and the pure functions of the
parameters that the optimizer and the curvature library see.

One compiled program serves every activation of a sweep: a model holds the sweep's activations
and picks one with ``lax.switch`` on an integer that travels with the data, as the per-example
column ``batch["activation"]`` (a column, so that the curvature library's chunking slices it like
any other field). Members that differ only in their activation therefore share the trainer and
every curvature program, and compile once.

Activation names: ``relu``, ``leaky_relu[:slope]``, ``elu[:alpha]``, ``gelu`` (exact, erf),
``gelu_tanh`` (the tanh approximation), ``silu``, ``softplus[:beta]`` with
``softplus_beta(x) = softplus(beta x) / beta`` (tends to ReLU as beta grows), ``tanh``, ``identity``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from experiments.errors import ConfigError, require
from experiments.registry import Registry

# --------------------------------------------------------------------------------------------
# Activations.


@dataclasses.dataclass(frozen=True)
class Activation:
    """``make(parameter) -> fn``; ``default`` is the parameter when the name gives none (``None``:
    the activation takes no parameter); ``positive``: the parameter must be > 0."""

    make: Callable[[float | None], Callable[[jax.Array], jax.Array]]
    default: float | None = None
    positive: bool = False


ACTIVATIONS: Registry[Activation] = Registry("activation", "activations")
"""Activations by name (the config's ``activations``); a name may carry a parameter after a
colon (``softplus:5``, ``leaky_relu:0.1``)."""
ACTIVATIONS.register("relu", Activation(lambda _: jax.nn.relu))
ACTIVATIONS.register(
    "leaky_relu",
    Activation(lambda p: functools.partial(jax.nn.leaky_relu, negative_slope=p), 0.01),
)
ACTIVATIONS.register("elu", Activation(lambda p: functools.partial(jax.nn.elu, alpha=p), 1.0))
ACTIVATIONS.register(
    "gelu", Activation(lambda _: functools.partial(jax.nn.gelu, approximate=False))
)
ACTIVATIONS.register(
    "gelu_tanh", Activation(lambda _: functools.partial(jax.nn.gelu, approximate=True))
)
ACTIVATIONS.register("silu", Activation(lambda _: jax.nn.silu))
ACTIVATIONS.register(
    "softplus", Activation(lambda p: lambda x: jax.nn.softplus(p * x) / p, 1.0, positive=True)
)
ACTIVATIONS.register("tanh", Activation(lambda _: jnp.tanh))
ACTIVATIONS.register("identity", Activation(lambda _: lambda x: x))


def parse_activation(name: str) -> tuple[str, float | None]:
    """``"softplus:5"`` -> ``("softplus", 5.0)``; raises ``ValueError`` naming what is wrong."""
    base, _, arg = str(name).partition(":")
    if base not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    entry = ACTIVATIONS.get(base)
    if arg and entry.default is None:
        raise ValueError(f"activation {base!r} takes no parameter, got {name!r}")
    if not arg:
        return base, entry.default
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"activation {name!r}: parameter {arg!r} is not a number") from None
    if entry.positive and not value > 0:
        raise ValueError(f"activation {name!r}: {base} beta must be positive")
    return base, value


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    base, parameter = parse_activation(name)
    return ACTIVATIONS.get(base).make(parameter)


def _switch(names: tuple[str, ...], index, forward: Callable):
    """``forward(activation_fn)`` for the activation ``names[index]``.

    One switch around the whole forward pass, not one per layer: each branch is a plain network
    that XLA fuses as usual (a switch per layer blocks fusion: 60 ms against 51 ms for a 60-matvec
    Hutch++ on the main job's network)."""
    if len(names) == 1:
        return forward(activation_fn(names[0]))
    branches = [functools.partial(forward, activation_fn(n)) for n in names]
    return jax.lax.switch(index, [lambda f=f: f() for f in branches])


# --------------------------------------------------------------------------------------------
# Models.


class MLP(nnx.Module):
    """``depth`` hidden layers of ``width`` units, then a linear read-out."""

    def __init__(self, in_features, width, depth, out_features, activations, *, rngs: nnx.Rngs):
        sizes = [in_features] + [width] * depth
        self.hidden = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        self.readout = nnx.Linear(sizes[-1], out_features, rngs=rngs)
        self.activations = tuple(activations)

    def __call__(self, x, activation=0):
        return _switch(self.activations, activation, lambda act: self._forward(x, act))

    def _forward(self, x, act):
        x = x.reshape(x.shape[0], -1)
        for layer in self.hidden:
            x = act(layer(x))
        return self.readout(x)


class CNN(nnx.Module):
    """3x3 convolutions (``channels``), global average pooling, a linear read-out."""

    def __init__(self, in_channels, channels, out_features, activations, *, rngs: nnx.Rngs):
        sizes = [in_channels, *channels]
        self.convs = nnx.List(
            [
                nnx.Conv(a, b, kernel_size=(3, 3), padding="SAME", rngs=rngs)
                for a, b in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )
        self.readout = nnx.Linear(sizes[-1], out_features, rngs=rngs)
        self.activations = tuple(activations)

    def __call__(self, x, activation=0):
        return _switch(self.activations, activation, lambda act: self._forward(x, act))

    def _forward(self, x, act):
        if x.ndim == 3:
            x = x[..., None]
        for conv in self.convs:
            x = act(conv(x))
        return self.readout(jnp.mean(x, axis=(1, 2)))


def _mlp(cfg, activations, input_shape, num_classes, rngs):
    features = 1
    for d in input_shape:
        features *= d
    return MLP(features, cfg.width, cfg.depth, num_classes, activations, rngs=rngs)


def _cnn(cfg, activations, input_shape, num_classes, rngs):
    if len(input_shape) not in (2, 3):
        raise ConfigError(
            f"config key model.kind='cnn' needs image inputs (H, W[, C]); got {input_shape}; "
            "set data.image_shape"
        )
    in_channels = input_shape[2] if len(input_shape) == 3 else 1
    return CNN(in_channels, tuple(cfg.channels), num_classes, activations, rngs=rngs)


# ``builder(model_cfg, activations, input_shape, num_classes, rngs) -> nnx.Module`` whose call is
# ``module(x, activation_index)``.
MODELS: Registry[Callable] = Registry("model", "model.kind")
"""Model builders by name (``model.kind``): ``build(model_cfg, activations, input_shape,
num_classes, rngs) -> nnx.Module``."""
MODELS.register("mlp", _mlp)
MODELS.register("cnn", _cnn)


def section() -> ml_collections.ConfigDict:
    """The config section ``model``, at its defaults."""
    s = ml_collections.ConfigDict()
    s.kind = "mlp"  # mlp | cnn (MODELS)
    s.width = 32
    s.depth = 2
    s.channels = (8, 16)  # cnn
    return s


def check(config) -> None:
    """Raise :class:`ConfigError` for the first bad activation name (``activations``) or key of
    ``model``."""
    require(len(config.activations) > 0, "activations", "empty")
    for name in config.activations:
        try:
            parse_activation(name)
        except ValueError as err:
            raise ConfigError(f"config key activations: {err}") from None
    require(len(set(config.activations)) == len(config.activations), "activations", "duplicates")
    MODELS.get(config.model.kind)
    require(
        config.model.width >= 1 and config.model.depth >= 1, "model.width/depth", "must be >= 1"
    )


def build(model_cfg, activations, input_shape, num_classes, seed: int):
    """The model, split into a static definition and its parameters (an ``nnx.State``).

    The initialisation depends only on ``seed`` and the architecture, never on the activation,
    so networks that differ only in their activation start from identical parameters.
    """
    module = MODELS.get(model_cfg.kind)(
        model_cfg, tuple(activations), input_shape, num_classes, nnx.Rngs(params=seed)
    )
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return graphdef, params, rest


# --------------------------------------------------------------------------------------------
# Losses.


def _cross_entropy(out, batch):
    logz = jax.nn.logsumexp(out, axis=-1)
    return jnp.mean(logz - jnp.take_along_axis(out, batch["y"][:, None], axis=-1)[:, 0])


def _mse_one_hot(out, batch):
    target = jax.nn.one_hot(batch["y"], out.shape[-1], dtype=out.dtype)
    return 0.5 * jnp.mean(jnp.sum((out - target) ** 2, axis=-1))


@dataclasses.dataclass(frozen=True)
class Loss:
    """``value(outputs, batch)``: the mean loss over the batch; ``gauss_newton``: what
    ``curvature.gauss_newton`` takes as its ``loss`` (a name it knows, or the function)."""

    value: Callable
    gauss_newton: str | Callable


LOSSES: Registry[Loss] = Registry("loss", "train.loss")
"""Training losses by name (``train.loss``), each with the output loss its Gauss-Newton
operator uses."""
LOSSES.register("cross_entropy", Loss(_cross_entropy, "cross_entropy"))
LOSSES.register("mse", Loss(_mse_one_hot, _mse_one_hot))  # on one-hot labels


# --------------------------------------------------------------------------------------------
# Pure functions.


def pure_functions(graphdef, rest_treedef, loss_name: str):
    """``model(params, batch)`` and ``loss(params, batch)`` for one architecture and loss.

    ``batch`` holds ``x``, ``y`` and the ``activation`` column (see the module docstring). Fresh
    closures on every call, and yet every member of a sweep with this architecture shares every
    compiled program: curvature's operators and the trainer compare functions by structure (the
    same code over an equal graphdef and loss). The models have no dropout or batch statistics:
    the evaluation view is the training view.
    """
    rest = jax.tree_util.tree_unflatten(rest_treedef, [])
    output_loss = LOSSES.get(loss_name).value

    def model(params, batch):
        module = nnx.merge(graphdef, params, rest, copy=True)
        return module(batch["x"], batch["activation"][0])

    def loss(params, batch):
        return output_loss(model(params, batch), batch)

    return model, loss


def with_activation(batch: dict, index: int) -> dict:
    """``batch`` with its ``activation`` column: ``index`` for every example."""
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    return {**batch, "activation": jnp.full((n,), index, jnp.int32)}

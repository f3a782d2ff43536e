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
import math
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

    def _normalise(self, index, x):
        return x

    def _forward(self, x, act):
        if x.ndim == 3:
            x = x[..., None]
        for i, conv in enumerate(self.convs):
            x = act(self._normalise(i, conv(x)))
        return self.readout(jnp.mean(x, axis=(1, 2)))


class LayerNormCNN(CNN):
    """:class:`CNN` with a LayerNorm over the channels of every pixel (scale and bias per
    channel) after each convolution, before its activation: ``model.norm="layer"``. The norms
    are the blocks ``norms/<i>``, apart from the convolutions' ``convs/<i>``; the convolutions and
    the read-out start from the same parameters as the plain CNN's (the norms draw nothing)."""

    def __init__(self, in_channels, channels, out_features, activations, *, rngs: nnx.Rngs):
        super().__init__(in_channels, channels, out_features, activations, rngs=rngs)
        self.norms = nnx.List([nnx.LayerNorm(c, rngs=rngs) for c in channels])

    def _normalise(self, index, x):
        return self.norms[index](x)


def _scaled(init, factor: float):
    def scaled(key, shape, dtype=jnp.float32):
        return init(key, shape, dtype) * jnp.asarray(factor, dtype)

    return scaled


_EMBEDDING_INIT = nnx.initializers.normal(stddev=0.02)


class TransformerLayer(nnx.Module):
    """Causal self-attention and an MLP, each a residual branch with a LayerNorm (``norm1``,
    ``norm2``) before it (pre-norm) or after the residual sum (post-norm). The attention's
    ``query``, ``key``, ``value`` and ``output`` are four ``nnx.Linear`` (``width x width``, each
    with its bias), so that each is a parameter block of its own; the MLP is ``mlp_in`` (``width
    x mlp_ratio width``) and ``mlp_out``."""

    def __init__(self, width, heads, hidden, pre_norm, residual_scale, *, rngs: nnx.Rngs):
        out_init = _scaled(nnx.initializers.lecun_normal(), residual_scale)
        self.query = nnx.Linear(width, width, rngs=rngs)
        self.key = nnx.Linear(width, width, rngs=rngs)
        self.value = nnx.Linear(width, width, rngs=rngs)
        self.output = nnx.Linear(width, width, kernel_init=out_init, rngs=rngs)
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.mlp_in = nnx.Linear(width, hidden, rngs=rngs)
        self.mlp_out = nnx.Linear(hidden, width, kernel_init=out_init, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.heads = heads
        self.pre_norm = pre_norm

    def attention(self, h):
        """Causal multi-head self-attention of ``h`` ``(batch, T, width)``: ``O(T^2 width)`` an
        example."""
        b, t, width = h.shape
        split = (b, t, self.heads, width // self.heads)
        q, k, v = (f(h).reshape(split) for f in (self.query, self.key, self.value))
        scores = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(jnp.asarray(split[-1], h.dtype))
        causal = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        mixed = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)
        return self.output(mixed.reshape(b, t, width))

    def __call__(self, h, act):
        def mlp(z):
            return self.mlp_out(act(self.mlp_in(z)))

        if self.pre_norm:
            h = h + self.attention(self.norm1(h))
            return h + mlp(self.norm2(h))
        h = self.norm1(h + self.attention(h))
        return self.norm2(h + mlp(h))


class Transformer(nnx.Module):
    """A decoder-only (GPT-style) transformer on token ids ``(batch, T)``.

    Token embedding ``embed`` plus a learned position embedding ``position`` (``context``
    positions, ``T <= context``), ``depth`` :class:`TransformerLayer` s (``layers/<i>/...``), a
    final LayerNorm ``norm`` and an untied linear ``head`` to ``vocab`` logits: ``(batch, T,
    vocab)`` for ``readout="all"``, the last position's ``(batch, vocab)`` for ``"last"``.
    Every named sub-module is one parameter block of ``curvature.layer_groups``.

    Initialisation (from the seed alone): embeddings normal with std 0.02, linear layers flax's
    default (LeCun normal, zero bias), the residual branches' last layers (``output``,
    ``mlp_out``) scaled by ``1 / sqrt(2 depth)`` as in GPT-2, LayerNorms at scale 1, bias 0.
    Cost of a forward pass: about ``depth T width (12 width + 2 T)`` multiply-adds an example
    (mlp_ratio 4), plus the head's ``T width vocab`` (``width vocab`` for ``"last"``).
    """

    def __init__(
        self,
        vocab,
        context,
        width,
        depth,
        heads,
        mlp_ratio,
        pre_norm,
        readout,
        activations,
        *,
        rngs: nnx.Rngs,
    ):
        self.embed = nnx.Embed(vocab, width, embedding_init=_EMBEDDING_INIT, rngs=rngs)
        self.position = nnx.Embed(context, width, embedding_init=_EMBEDDING_INIT, rngs=rngs)
        scale = 1.0 / math.sqrt(2 * depth)
        self.layers = nnx.List(
            [
                TransformerLayer(width, heads, mlp_ratio * width, pre_norm, scale, rngs=rngs)
                for _ in range(depth)
            ]
        )
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, vocab, rngs=rngs)
        self.context = context
        self.readout = readout
        self.activations = tuple(activations)

    def __call__(self, x, activation=0):
        return _switch(self.activations, activation, lambda act: self._forward(x, act))

    def _forward(self, x, act):
        if x.ndim != 2 or x.shape[1] > self.context:
            raise ValueError(
                f"the transformer takes token ids of shape (batch, T) with T <= its context "
                f"{self.context}; got inputs of shape {x.shape}"
            )
        # The workbench passes int32 ids; ids in a float array (a user's) are cast, exactly for
        # any vocabulary below 2**24.
        tokens = x.astype(jnp.int32)
        h = self.embed(tokens) + self.position(jnp.arange(x.shape[1]))[None]
        for layer in self.layers:
            h = layer(h, act)
        if self.readout == "last":
            h = h[:, -1]
        return self.head(self.norm(h))


TRANSFORMER_READOUTS = ("all", "last")


def _transformer(cfg, activations, input_shape, num_classes, rngs):
    if len(input_shape) != 1:
        raise ConfigError(
            f"config key model.kind='transformer' needs token sequences (T,); got inputs of shape "
            f"{tuple(input_shape)}"
        )
    length = input_shape[0]
    context = cfg.get("context", 0) or length
    require(
        context >= length,
        "model.context",
        f"{context} is shorter than the data's sequences (T = {length}); set it >= {length} "
        "or to 0 (the data's T)",
    )
    heads = cfg.get("heads", 4)
    require(
        heads >= 1 and cfg.width % heads == 0,
        "model.width/model.heads",
        f"width {cfg.width} is not a multiple of heads {heads}",
    )
    readout = cfg.get("readout", "all")
    # "auto" is decided from the data where the workbench builds the model (resolved); built
    # without data, the model gives every position's logits.
    readout = "all" if readout == "auto" else readout
    require(
        readout in TRANSFORMER_READOUTS,
        "model.readout",
        f"{readout!r} is not one of auto, {', '.join(TRANSFORMER_READOUTS)}",
    )
    return Transformer(
        num_classes,
        context,
        cfg.width,
        cfg.depth,
        heads,
        cfg.get("mlp_ratio", 4),
        bool(cfg.get("pre_norm", True)),
        readout,
        activations,
        rngs=rngs,
    )


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
    norm = cfg.get("norm", "none")
    require(norm in CNN_NORMS, "model.norm", f"{norm!r} is not one of {', '.join(CNN_NORMS)}")
    kind = LayerNormCNN if norm == "layer" else CNN
    return kind(in_channels, tuple(cfg.channels), num_classes, activations, rngs=rngs)


CNN_NORMS = ("none", "layer")
"""``model.norm`` of the CNN. No ``"batch"``: the workbench keeps no batch statistics (a model's
non-parameter state must be empty, see :func:`pure_functions`)."""


# ``builder(model_cfg, activations, input_shape, num_classes, rngs) -> nnx.Module`` whose call is
# ``module(x, activation_index)``.
MODELS: Registry[Callable] = Registry("model", "model.kind")
"""Model builders by name (``model.kind``): ``build(model_cfg, activations, input_shape,
num_classes, rngs) -> nnx.Module``."""
MODELS.register("mlp", _mlp)
MODELS.register("cnn", _cnn)
MODELS.register("transformer", _transformer)


def section() -> ml_collections.ConfigDict:
    """The config section ``model``, at its defaults."""
    s = ml_collections.ConfigDict()
    s.kind = "mlp"  # mlp | cnn | transformer (MODELS)
    s.width = 32  # mlp, transformer
    s.depth = 2  # mlp, transformer (layers)
    s.channels = (8, 16)  # cnn
    s.norm = "none"  # cnn: none | layer (a LayerNorm over channels after each convolution)
    s.heads = 4  # transformer: attention heads, dividing width
    s.mlp_ratio = 4  # transformer: the MLP's hidden units per unit of width
    s.context = 0  # transformer: positions of the position embedding; 0: the data's T
    s.pre_norm = True  # transformer: LayerNorm before each residual branch (False: after)
    # transformer: logits at every position (all) or the last one (last); auto: last for data
    # with one label per sequence (modular_addition), all for a label per token (characters)
    s.readout = "auto"
    return s


def check(config) -> None:
    """Raise :class:`ConfigError` for the first bad activation name (``activations``) or key of
    ``model``. Checks that need the data (the transformer's ``context`` against its ``T``) are
    the builder's."""
    require(len(config.activations) > 0, "activations", "empty")
    for name in config.activations:
        try:
            parse_activation(name)
        except ValueError as err:
            raise ConfigError(f"config key activations: {err}") from None
    require(len(set(config.activations)) == len(config.activations), "activations", "duplicates")
    model = config.model
    MODELS.get(model.kind)
    require(model.width >= 1 and model.depth >= 1, "model.width/depth", "must be >= 1")
    norm = model.get("norm", "none")
    require(norm in CNN_NORMS, "model.norm", f"{norm!r} is not one of {', '.join(CNN_NORMS)}")
    if model.kind != "transformer":
        return
    heads, ratio, context = (
        model.get("heads", 4),
        model.get("mlp_ratio", 4),
        model.get("context", 0),
    )
    require(
        isinstance(heads, int) and heads >= 1, "model.heads", f"{heads!r} is not an integer >= 1"
    )
    require(
        model.width % heads == 0,
        "model.width/model.heads",
        f"width {model.width} is not a multiple of heads {heads}",
    )
    require(
        isinstance(ratio, int) and ratio >= 1,
        "model.mlp_ratio",
        f"{ratio!r} is not an integer >= 1",
    )
    require(
        isinstance(context, int) and context >= 0,
        "model.context",
        f"{context!r} is not an integer >= 0",
    )
    require(
        isinstance(model.get("pre_norm", True), bool), "model.pre_norm", "must be True or False"
    )
    readout = model.get("readout", "all")
    require(
        readout in (*TRANSFORMER_READOUTS, "auto"),
        "model.readout",
        f"{readout!r} is not one of auto, {', '.join(TRANSFORMER_READOUTS)}",
    )


def resolved(model_cfg, label_ndim: int):
    """``model_cfg`` with ``readout="auto"`` decided by the labels: ``"last"`` for one label per
    sequence (``label_ndim == 1``), ``"all"`` for one per position; a copy, the same object when
    there is nothing to decide."""
    if model_cfg.get("readout", "all") != "auto":
        return model_cfg
    out = ml_collections.ConfigDict(model_cfg.to_dict())
    out.readout = "last" if label_ndim == 1 else "all"
    return out


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


def _label_shape(out, batch, loss: str):
    y = batch["y"]
    if y.shape != out.shape[:-1]:
        raise ValueError(
            f"train.loss={loss!r}: labels of shape {y.shape} do not match outputs of shape "
            f"{out.shape} (labels: the outputs' shape without the classes); per-sequence labels "
            "(batch,) need the transformer's model.readout='last'"
        )
    return y


def _cross_entropy(out, batch):
    """The mean over every position: logits ``(batch, [T,] classes)``, labels ``(batch, [T])``."""
    y = _label_shape(out, batch, "cross_entropy")
    logz = jax.nn.logsumexp(out, axis=-1)
    return jnp.mean(logz - jnp.take_along_axis(out, y[..., None], axis=-1)[..., 0])


def _mse_one_hot(out, batch):
    """Half the squared distance to the one-hot label, the mean over every position."""
    y = _label_shape(out, batch, "mse")
    target = jax.nn.one_hot(y, out.shape[-1], dtype=out.dtype)
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

"""The GPT-style transformer and the CNN with LayerNorm of the model registry: their parameter
blocks, the transformer's Hessian blocks against the dense float64 Hessian (ReLU and GELU, one
compiled program for both), causality, the read-outs and the config errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
from flax import nnx  # noqa: E402
from helpers import dense_hessian  # noqa: E402

import curvature as cv  # noqa: E402
from experiments import config as config_lib  # noqa: E402
from experiments import models  # noqa: E402
from experiments.errors import ConfigError  # noqa: E402

T, VOCAB, BATCH = 4, 7, 3
ACTIVATIONS = ("relu", "gelu")
NAMES = ["embed", "position", "norm", "head"] + [
    f"layers/0/{n}"
    for n in ("query", "key", "value", "output", "norm1", "norm2", "mlp_in", "mlp_out")
]


def transformer_cfg(**keys):
    cfg = models.section()
    cfg.kind, cfg.width, cfg.heads, cfg.depth = "transformer", 8, 2, 1
    cfg.update(keys)
    return cfg


@functools.cache
def transformer(activations=ACTIVATIONS, **keys):
    """``(model, loss, params)`` in float64 (as the workbench casts them); call under x64."""
    graphdef, params, rest = models.build(transformer_cfg(**keys), activations, (T,), VOCAB, 0)
    model, loss = models.pure_functions(
        graphdef, jax.tree_util.tree_structure(rest), "cross_entropy"
    )
    return model, loss, jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)


def batch(activation=0, x=None):
    key = jax.random.key(1)
    if x is None:
        x = jax.random.randint(key, (BATCH, T), 0, VOCAB, jnp.int32)
    y = jax.random.randint(jax.random.fold_in(key, 1), (BATCH, T), 0, VOCAB, jnp.int32)
    return models.with_activation({"x": x, "y": y}, activation)


def leaves_of(params, selector):
    """The leaves a selector pytree picks, in pytree order."""
    keep = jax.tree_util.tree_leaves(selector)
    return [x for x, k in zip(jax.tree_util.tree_leaves(params), keep, strict=True) if k]


def test_one_parameter_block_per_named_module(x64):
    _, _, params = transformer()
    assert sorted(cv.layer_groups(params)) == sorted(NAMES)
    cfg = transformer_cfg(depth=2)
    _, deep, _ = models.build(cfg, ("relu",), (T,), VOCAB, 0)
    groups = cv.layer_groups(deep)
    assert len(groups) == 4 + 2 * 8 and "layers/1/mlp_out" in groups
    # Each attention projection and MLP layer is a weight and its bias; a norm a scale and bias.
    for name in ("query", "output", "mlp_in", "norm1"):
        assert len(leaves_of(deep, groups[f"layers/1/{name}"])) == 2
    # Parameters from the seed alone, not the activations; GPT-2's residual scaling.
    _, alone, _ = models.build(cfg, ("tanh",), (T,), VOCAB, 0)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, deep, alone))
    assert float(jnp.std(deep["embed"]["embedding"][...])) == pytest.approx(0.02, rel=0.3)
    kernel = deep["layers"][0]["mlp_out"]["kernel"][...]  # lecun: std 1/sqrt(32), then / 2
    assert float(jnp.std(kernel)) == pytest.approx(1 / np.sqrt(32) / 2, rel=0.2)


@pytest.mark.parametrize("activation", [0, 1], ids=ACTIVATIONS)
def test_hessian_blocks_equal_the_dense_hessians_blocks(x64, activation):
    _, loss, params = transformer()
    data = batch(activation)
    groups = cv.layer_groups(params)
    chosen = ["layers/0/query", "layers/0/value", "layers/0/mlp_in", "layers/0/norm1"]
    dense = np.asarray(dense_hessian(loss, params, data))  # jax.hessian of the raveled loss
    sizes = [x.size for x in jax.tree_util.tree_leaves(params)]
    starts = np.cumsum([0] + sizes)

    def index(group):
        mask = jax.tree_util.tree_leaves(groups[group])
        return np.concatenate([np.arange(starts[i], starts[i + 1]) for i in np.flatnonzero(mask)])

    H = cv.hessian(loss, params, data)
    for group in chosen:
        r = index(group)
        got = np.asarray(cv.dense(cv.restrict(H, groups[group])))
        want = dense[np.ix_(r, r)]
        assert np.linalg.norm(want) > 1e-6, group
        assert np.linalg.norm(got - want) <= 1e-8 * np.linalg.norm(want), group
    rows, cols = index("layers/0/query"), index("layers/0/mlp_in")
    off = cv.restrict(H, groups["layers/0/query"], groups["layers/0/mlp_in"])
    got, want = np.asarray(cv.dense(off)), dense[np.ix_(rows, cols)]
    assert got.shape == (72, 8 * 32 + 32) and np.linalg.norm(want) > 1e-6
    assert np.linalg.norm(got - want) <= 1e-8 * np.linalg.norm(want)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_causal_and_the_last_readout_is_the_last_position(x64, pre_norm):
    model, _, params = transformer(pre_norm=pre_norm)
    model = jax.jit(model)  # one program for the forward passes below
    data = batch(1)
    logits = model(params, data)
    assert logits.shape == (BATCH, T, VOCAB)
    for t in range(T):
        changed = data["x"].at[:, t].set((data["x"][:, t] + 1) % VOCAB)
        other = model(params, {**data, "x": changed})
        assert np.array_equal(other[:, :t], logits[:, :t]), t  # earlier positions: bit for bit
        assert np.max(np.abs(other[:, t:] - logits[:, t:])) > 1e-4, t
    last, _, last_params = transformer(pre_norm=pre_norm, readout="last")
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, params, last_params))
    assert np.allclose(last(params, data), logits[:, -1], rtol=1e-12, atol=1e-14)
    # Token ids in the run's float dtype (the workbench casts x) give the same logits; a wider
    # context embeds more positions and uses the first T.
    assert np.array_equal(model(params, {**data, "x": data["x"].astype(jnp.float64)}), logits)
    # The shared program's GELU branch is the GELU network's own.
    alone, _, _ = transformer(("gelu",), pre_norm=pre_norm)
    assert np.allclose(alone(params, {**data, "activation": 0 * data["activation"]}), logits)


def test_config_errors_name_their_keys():
    def build(**keys):
        models.build(transformer_cfg(**keys), ("relu",), (T,), VOCAB, 0)

    with pytest.raises(ConfigError, match=r"model.width/model.heads: width 8 .* heads 3"):
        build(heads=3)
    with pytest.raises(ConfigError, match=r"model.context: 3 is shorter .*T = 4"):
        build(context=3)
    with pytest.raises(ConfigError, match=r"model.readout: 'first' is not one of auto, all, last"):
        build(readout="first")
    with pytest.raises(ConfigError, match=r"model.kind='transformer' needs token sequences"):
        models.build(transformer_cfg(), ("relu",), (T, 2), VOCAB, 0)
    graphdef, params, _ = models.build(transformer_cfg(context=6), ("relu",), (T,), VOCAB, 0)
    assert params["position"]["embedding"].shape == (6, 8)
    # check() refuses the same before any data is read.
    for key, value, match in (
        ("heads", 3, "model.width/model.heads"),
        ("readout", "first", "model.readout"),
        ("mlp_ratio", 0, "model.mlp_ratio"),
        ("context", -1, "model.context"),
    ):
        config = config_lib.base_config()
        config.model.kind = "transformer"
        setattr(config.model, key, value)
        with pytest.raises(ConfigError, match=match):
            models.check(config)
    config = config_lib.base_config()
    config.model.norm = "batch"
    with pytest.raises(ConfigError, match="model.norm: 'batch' is not one of none, layer"):
        models.check(config)


class OldCNN(nnx.Module):
    """The CNN as it was before ``model.norm``: the reference for ``norm="none"``."""

    def __init__(self, in_channels, channels, out_features, *, rngs):
        sizes = [in_channels, *channels]
        self.convs = nnx.List(
            [
                nnx.Conv(a, b, kernel_size=(3, 3), padding="SAME", rngs=rngs)
                for a, b in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )
        self.readout = nnx.Linear(sizes[-1], out_features, rngs=rngs)

    def __call__(self, x):
        x = x[..., None]
        for conv in self.convs:
            x = jnp.tanh(conv(x))
        return self.readout(jnp.mean(x, axis=(1, 2)))


def test_cnn_norms_are_blocks_of_their_own_and_none_is_the_old_cnn():
    cfg = models.section()
    cfg.kind, cfg.channels = "cnn", (3, 4)
    x = jax.random.normal(jax.random.key(2), (2, 5, 5))
    _, plain, rest = models.build(cfg, ("tanh",), (5, 5), 3, 0)
    old = OldCNN(1, (3, 4), 3, rngs=nnx.Rngs(params=0))
    old_params = nnx.state(old, nnx.Param)
    assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(old_params)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, plain, old_params))
    graphdef = models.build(cfg, ("tanh",), (5, 5), 3, 0)[0]
    model, _ = models.pure_functions(graphdef, jax.tree_util.tree_structure(rest), "mse")
    assert np.array_equal(model(plain, models.with_activation({"x": x}, 0)), old(x))

    cfg.norm = "layer"
    graphdef, normed, rest = models.build(cfg, ("tanh",), (5, 5), 3, 0)
    groups = cv.layer_groups(normed)
    assert list(groups) == ["convs/0", "convs/1", "norms/0", "norms/1", "readout"]
    assert [x.shape for x in leaves_of(normed, groups["norms/1"])] == [(4,), (4,)]
    plain_groups = cv.layer_groups(plain)
    for name in ("convs/0", "convs/1", "readout"):  # the same initial convolutions and read-out
        got, want = leaves_of(normed, groups[name]), leaves_of(plain, plain_groups[name])
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    model, _ = models.pure_functions(graphdef, jax.tree_util.tree_structure(rest), "mse")
    batch_ = models.with_activation({"x": x}, 0)
    out = model(normed, batch_)
    assert not np.allclose(out, old(x), atol=1e-3)
    # A LayerNorm after the first convolution undoes a scaling of it (up to its epsilon).
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, a: 3.0 * a if jax.tree_util.keystr(path).startswith("['convs'][0]") else a,
        normed,
    )
    assert np.allclose(model(scaled, batch_), out, rtol=1e-4, atol=1e-5)


def test_the_workbench_losses_average_over_every_token():
    logits = jax.random.normal(jax.random.key(3), (BATCH, T, VOCAB))
    y = jax.random.randint(jax.random.key(4), (BATCH, T), 0, VOCAB)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tokens = -np.take_along_axis(np.asarray(logp), np.asarray(y)[..., None], -1)
    ce, mse = (models.LOSSES.get(n).value for n in ("cross_entropy", "mse"))
    assert float(ce(logits, {"y": y})) == pytest.approx(float(np.mean(tokens)), rel=1e-6)
    # Per example, the mean of its per-token losses; then the mean over examples: the same.
    per_example = [float(ce(logits[i : i + 1], {"y": y[i : i + 1]})) for i in range(BATCH)]
    assert float(ce(logits, {"y": y})) == pytest.approx(np.mean(per_example), rel=1e-6)
    sq = np.sum((np.asarray(logits) - np.eye(VOCAB)[np.asarray(y)]) ** 2, axis=-1)
    assert float(mse(logits, {"y": y})) == pytest.approx(0.5 * float(np.mean(sq)), rel=1e-6)
    for loss in (ce, mse):
        with pytest.raises(
            ValueError, match=r"labels of shape \(3,\) .* outputs of shape \(3, 4, 7"
        ):
            loss(logits, {"y": y[:, -1]})

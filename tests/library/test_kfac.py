"""K-FAC and EK-FAC against dense float64 Gauss-Newton blocks and against factors built by hand
from per-example layer inputs and Jacobians, on small ReLU and tanh MLPs."""

import importlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_problem

import curvature as cv

kfac_module = importlib.import_module("curvature.kfac")  # the function cv.kfac shadows the name

CASES = [(a, loss) for a in ("relu", "tanh") for loss in ("mse", "cross_entropy")]


def first(data, count):
    return jax.tree_util.tree_map(lambda x: x[:count], data)


def block_indices(op, layer) -> np.ndarray:
    """The flat indices of a layer's ``[W; b]``, raveled row by row (the factors' order)."""
    offsets = np.concatenate([[0], np.cumsum(op.layout.sizes)])
    kernel = offsets[layer.kernel] + np.arange(layer.fan_in * layer.fan_out)
    if layer.transposed:
        kernel = kernel.reshape(layer.fan_out, layer.fan_in).T
    rows = [kernel.reshape(layer.fan_in, layer.fan_out)]
    if layer.bias is not None:
        rows.append(offsets[layer.bias] + np.arange(layer.fan_out)[None])
    return np.concatenate(rows).reshape(-1)


def blocks_of(op, matrix):
    return [np.asarray(matrix)[np.ix_(i, i)] for i in (block_indices(op, lay) for lay in op.layers)]


def off_blocks(op, matrix):
    """``matrix`` with every layer's diagonal block zeroed."""
    out = np.array(matrix, np.float64)
    for layer in op.layers:
        i = block_indices(op, layer)
        out[np.ix_(i, i)] = 0.0
    return out


def hand_factors(activation, params, data, output_loss):
    """Per layer ``A = mean ā ā^T`` and ``B = mean J^T Λ J`` from each example's layer inputs,
    its Jacobian in the pre-activations and its output loss's Hessian, written out for the MLP
    of ``helpers`` (``x @ w + b`` per layer)."""
    act = {"relu": jax.nn.relu, "tanh": jnp.tanh}[activation]

    def forward(deltas, x):
        inputs, h = [], x
        for i, layer in enumerate(params):
            inputs.append(h)
            s = h @ layer["w"] + layer["b"] + deltas[i]
            h = act(s) if i < len(params) - 1 else s
        return h, inputs

    deltas = [jnp.zeros(layer["b"].shape) for layer in params]

    @jax.jit
    @jax.vmap
    def per_example(example):
        example = jax.tree_util.tree_map(lambda x: x[None], example)
        out, inputs = forward(deltas, example["x"])
        jac = jax.jacobian(lambda d: forward(d, example["x"])[0].reshape(-1))(deltas)
        lam = jax.hessian(lambda o: output_loss(o.reshape(out.shape), example))(out.reshape(-1))
        a = [jnp.concatenate([h[0], jnp.ones(1)]) for h in inputs]
        b = [j.reshape(out.size, -1).T @ lam @ j.reshape(out.size, -1) for j in jac]
        return [jnp.outer(x, x) for x in a], b

    A, B = per_example(data)
    return [np.asarray(x).mean(0) for x in A], [np.asarray(x).mean(0) for x in B]


@pytest.mark.parametrize("activation,loss_name", CASES)
def test_one_example_gives_the_gauss_newton_blocks_and_nothing_between_layers(
    x64, activation, loss_name
):
    params, data, model, _, _ = make_problem(activation, loss_name)
    one = first(data, 1)
    op = cv.kfac(model, params, one, loss=loss_name)
    assert [lay.name for lay in op.layers] == ["0", "1", "2"] and op.unmatched == ()
    K = np.asarray(cv.dense(op))
    G = np.asarray(cv.dense(cv.gauss_newton(model, params, one, loss=loss_name)))
    for got, want in zip(blocks_of(op, K), blocks_of(op, G), strict=True):
        assert np.allclose(got, want, rtol=1e-10, atol=1e-13)
    assert np.abs(off_blocks(op, K)).max() == 0.0
    assert np.abs(off_blocks(op, G)).max() > 1e-3  # G has blocks between layers; K-FAC drops them
    assert np.allclose(np.asarray(op.host_exact_diagonal()), np.diag(K), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "activation,loss_name,batch_size",
    [("tanh", "cross_entropy", None), ("relu", "mse", 5), ("tanh", "function", 5)],
)
def test_many_examples_give_the_kronecker_product_of_the_mean_factors(
    x64, activation, loss_name, batch_size
):
    params, data, model, _, output_loss = make_problem(
        activation, "mse" if loss_name == "mse" else "cross_entropy"
    )
    loss = output_loss if loss_name == "function" else loss_name  # a loss function: eigh of Λ
    op = cv.kfac(model, params, data, loss=loss, batch_size=batch_size)  # 13 examples: 5, 5, 3
    A, B = hand_factors(activation, params, data, output_loss)
    K = np.asarray(cv.dense(op))
    for index, (name, factors) in enumerate(op.factors.items()):
        assert name == str(index)
        assert np.allclose(np.asarray(factors.A), A[index], rtol=1e-10, atol=1e-13)
        assert np.allclose(np.asarray(factors.B), B[index], rtol=1e-10, atol=1e-13)
        want = np.kron(A[index], B[index])
        assert np.allclose(blocks_of(op, K)[index], want, rtol=1e-10, atol=1e-13)


def test_flax_nnx_linen_and_plain_jax_give_the_same_operator(x64):
    from flax import linen, nnx

    import curvature.flax as cvf

    params, data, model, _, _ = make_problem("tanh", "cross_entropy")
    plain = cv.kfac(model, params, data, loss="cross_entropy")

    class NNX(nnx.Module):
        def __init__(self):
            rngs = nnx.Rngs(0)
            self.layers = nnx.List(
                [nnx.Linear(a, b, rngs=rngs, param_dtype=jnp.float64) for a, b in
                 ((4, 6), (6, 5), (5, 3))]
            )  # fmt: skip

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = jnp.tanh(layer(x))
            return self.layers[-1](x)

    net = NNX()
    for layer, p in zip(net.layers, params, strict=True):
        layer.kernel[...], layer.bias[...] = p["w"], p["b"]
    from_nnx = cvf.kfac(lambda m, b: m(b["x"]), net, data, loss="cross_entropy")

    class Linen(linen.Module):
        @linen.compact
        def __call__(self, x):
            for width in (6, 5):
                x = jnp.tanh(linen.Dense(width, param_dtype=jnp.float64)(x))
            return linen.Dense(3, param_dtype=jnp.float64)(x)

    variables = {
        "params": {f"Dense_{i}": {"kernel": p["w"], "bias": p["b"]} for i, p in enumerate(params)}
    }
    from_linen = cvf.kfac(
        lambda v, b: Linen().apply(v, b["x"]), variables, data, loss="cross_entropy"
    )
    assert list(from_linen.factors) == ["Dense_0", "Dense_1", "Dense_2"]
    assert [lay.name for lay in from_nnx.layers] == ["layers/0", "layers/1", "layers/2"]
    for other in (from_nnx, from_linen):
        for mine, theirs in zip(plain.factors.values(), other.factors.values(), strict=True):
            assert np.allclose(np.asarray(mine.A), np.asarray(theirs.A), rtol=1e-12, atol=1e-14)
            assert np.allclose(np.asarray(mine.B), np.asarray(theirs.B), rtol=1e-12, atol=1e-14)
        want = np.linalg.eigvalsh(np.asarray(cv.dense(plain)))
        got = np.linalg.eigvalsh(np.asarray(cv.dense(other)))
        assert np.allclose(got, want, rtol=1e-10, atol=1e-13)


def test_empirical_and_monte_carlo_blocks_match_their_full_operators(x64):
    params, data, model, loss, _ = make_problem("relu", "cross_entropy")
    one = first(data, 1)
    emp = cv.kfac(model, params, one, loss="cross_entropy", fisher="empirical")
    want = np.asarray(cv.dense(cv.empirical_fisher(loss, params, one)))
    for got, ref in zip(blocks_of(emp, cv.dense(emp)), blocks_of(emp, want), strict=True):
        assert np.allclose(got, ref, rtol=1e-10, atol=1e-13)
    key = jax.random.key(3)
    mc = cv.kfac(model, params, one, loss="cross_entropy", fisher="mc", num_samples=5, key=key)
    full = cv.monte_carlo_fisher(model, params, one, loss="cross_entropy", num_samples=5, key=key)
    ref = blocks_of(mc, cv.dense(full))
    for got, want in zip(blocks_of(mc, cv.dense(mc)), ref, strict=True):
        assert np.allclose(got, want, rtol=1e-10, atol=1e-13)


def test_monte_carlo_factors_are_unbiased_and_converge_as_samples_grow(x64):
    params, data, model, _, _ = make_problem("tanh", "cross_entropy")
    exact = cv.kfac(model, params, data, loss="cross_entropy").factors["1"].B

    def sampled(num_samples, seed):
        op = cv.kfac(
            model, params, data, loss="cross_entropy", fisher="mc", num_samples=num_samples,
            key=jax.random.key(seed),
        )  # fmt: skip
        return np.asarray(op.factors["1"].B)

    draws = np.stack([sampled(8, seed) for seed in range(40)])
    mean, se = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(len(draws))
    z = np.abs(mean - exact) / np.maximum(se, 1e-12)
    assert z.max() < 4.5, z.max()  # 25 entries: unbiased within its own error
    assert (np.abs(1.1 * mean - exact) / np.maximum(se, 1e-12)).max() > 4.5  # a 10% bias fails

    def error(num_samples):
        return np.mean([np.linalg.norm(sampled(num_samples, 100 + s) - exact) for s in range(6)])

    ratio = error(64) / error(4)
    assert 0.12 < ratio < 0.45, ratio  # 1 / sqrt(16) = 0.25


def test_parameters_in_no_dense_layer_get_their_exact_gauss_newton_diagonal(x64):
    params, data, _, _, _ = make_problem("tanh", "cross_entropy")
    tied = 0.9 * jnp.eye(6) + 0.05
    extra = {"mlp": params, "scale": jnp.linspace(0.5, 1.5, 6), "tied": tied}

    def model(p, batch):
        mlp, t = p["mlp"], p["tied"]
        h = jnp.tanh(batch["x"] @ mlp[0]["w"] + mlp[0]["b"]) * p["scale"]  # elementwise
        h = jnp.tanh(jnp.tanh(h @ t) @ t)  # one kernel used twice
        h = jnp.tanh(h @ mlp[1]["w"] + mlp[1]["b"] + mlp[1]["b"])  # a bias used twice
        return h @ mlp[2]["w"] + mlp[2]["b"]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = cv.kfac(model, extra, data, loss="cross_entropy")
    assert [(lay.name, lay.bias is None) for lay in op.layers] == [
        ("mlp/0", False),
        ("mlp/1", True),
        ("mlp/2", False),
    ]
    G = np.asarray(cv.dense(cv.gauss_newton(model, extra, data, loss="cross_entropy")))
    K = np.asarray(cv.dense(op))
    offsets = np.concatenate([[0], np.cumsum(op.layout.sizes)])
    rest = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in op.unmatched])
    assert len(rest) == 6 + 36 + 5  # scale, tied and mlp/1's bias
    assert np.allclose(np.diag(K)[rest], np.diag(G)[rest], rtol=1e-10, atol=1e-13)
    assert np.abs(np.diag(G)[rest]).max() > 1e-4
    sub = K[np.ix_(rest, rest)]
    assert np.abs(sub - np.diag(np.diag(sub))).max() == 0.0


def test_a_layer_applied_at_every_position_counts_positions_as_examples_in_A(x64):
    key = jax.random.key(0)
    params = {
        "w": jax.random.normal(key, (3, 4), jnp.float64),
        "b": jnp.full(4, 0.1),
        "out": jax.random.normal(jax.random.fold_in(key, 1), (4, 2), jnp.float64),
    }
    x = jax.random.normal(jax.random.fold_in(key, 2), (5, 7, 3), jnp.float64)  # 7 tokens
    data = {"x": x, "y": jnp.arange(5) % 2}

    def model(p, batch):
        h = jnp.tanh(batch["x"] @ p["w"] + p["b"])  # (batch, tokens, 4)
        return jnp.mean(h, axis=1) @ p["out"]

    op = cv.kfac(model, params, data, loss="cross_entropy")
    first_layer, last = op.layers
    assert (first_layer.positions, last.positions) == (7, 1)
    a = np.concatenate([np.asarray(x), np.ones((5, 7, 1))], axis=-1).reshape(35, 4)
    assert np.allclose(np.asarray(op.factors[first_layer.name].A), a.T @ a / 35, rtol=1e-12)

    def per_token(deltas, xi):
        h = jnp.tanh(xi @ params["w"] + params["b"] + deltas)
        return jnp.mean(h, axis=0) @ params["out"]

    B = 0.0
    for i in range(5):
        out = per_token(jnp.zeros((7, 4)), x[i])
        j = jax.jacobian(per_token)(jnp.zeros((7, 4)), x[i]).reshape(2, 7, 4)
        p = jax.nn.softmax(out)
        lam = jnp.diag(p) - jnp.outer(p, p)
        B = B + np.einsum("ctj,cd,dtk->jk", j, lam, j) / 5  # summed over tokens
    assert np.allclose(np.asarray(op.factors[first_layer.name].B), B, rtol=1e-10, atol=1e-13)


def test_exact_inverses_powers_and_the_eigenvalue_corrected_variant(x64):
    params, data, model, _, _ = make_problem("tanh", "cross_entropy")
    op = cv.kfac(model, params, data, loss="cross_entropy", batch_size=5)
    K = np.asarray(cv.dense(op))
    eye = np.eye(len(K))
    assert np.allclose(np.asarray(cv.dense(op.eigen())), K, rtol=1e-10, atol=1e-13)
    inv = cv.inverse(op, damping=0.05)
    assert isinstance(inv, cv.KroneckerEigen)
    assert np.allclose(np.asarray(cv.dense(inv)), np.linalg.inv(K + 0.05 * eye), rtol=1e-9)
    root = np.asarray(cv.dense(op.damped_power(0.05, -0.5)))
    assert np.allclose(root @ root, np.linalg.inv(K + 0.05 * eye), rtol=1e-9)
    assert np.allclose(np.asarray(inv.host_exact_diagonal()), np.diag(cv.dense(inv)), rtol=1e-10)
    want = np.linalg.eigvalsh(K)
    assert np.allclose(np.sort(np.asarray(op.eigenvalues())), want, rtol=1e-9, atol=1e-13)
    # EK-FAC: K-FAC's eigenbasis, eigenvalues the diagonal of the Gauss-Newton block in it.
    ek = cv.ekfac(model, params, data, loss="cross_entropy")
    G = np.asarray(cv.dense(cv.gauss_newton(model, params, data, loss="cross_entropy")))
    E = np.asarray(cv.dense(ek))
    for index, ((qa, qb), block, kblock, eblock) in enumerate(
        zip(ek.bases, blocks_of(op, G), blocks_of(op, K), blocks_of(op, E), strict=True)
    ):
        q = np.kron(np.asarray(qa), np.asarray(qb))
        want = np.diag(q.T @ block @ q).reshape(ek.values[index].shape)
        assert np.allclose(np.asarray(ek.values[index]), want, rtol=1e-9, atol=1e-13)
        assert np.linalg.norm(eblock - block) <= np.linalg.norm(kblock - block) * (1 + 1e-12)
    one = first(data, 1)
    single = cv.ekfac(model, params, one, loss="cross_entropy")
    want = cv.dense(cv.kfac(model, params, one, loss="cross_entropy"))
    assert np.allclose(np.asarray(cv.dense(single)), np.asarray(want), rtol=1e-8, atol=1e-12)


def test_a_loader_gives_the_in_memory_operator_and_builds_compile_once(x64):
    params, data, model, _, _ = make_problem("relu", "mse")

    def build(p):  # a fresh lambda on every call, as in a training loop
        return cv.kfac(lambda q, b: model(q, b), p, data, loss="mse")

    op = build(params)
    streamed = cv.kfac(model, params, cv.batches(data, 4), loss="mse")  # 4, 4, 4, 1
    assert np.allclose(np.asarray(cv.dense(streamed)), np.asarray(cv.dense(op)), rtol=1e-10)
    size = kfac_module._statistics._cache_size()
    moved = jax.tree_util.tree_map(lambda x: x * 1.1, params)
    again = build(moved)
    assert kfac_module._statistics._cache_size() == size
    assert not np.allclose(np.asarray(cv.dense(again)), np.asarray(cv.dense(op)))


def test_bad_arguments_are_refused_with_the_reason(x64):
    params, data, model, _, output_loss = make_problem("relu", "cross_entropy")
    with pytest.raises(ValueError, match="fisher must be one of exact, mc, empirical"):
        cv.kfac(model, params, data, loss="cross_entropy", fisher="true")
    with pytest.raises(ValueError, match="pass key="):
        cv.kfac(model, params, data, loss="cross_entropy", fisher="mc")
    with pytest.raises(ValueError, match="no distribution to sample"):
        cv.kfac(model, params, data, loss=output_loss, fisher="mc", key=jax.random.key(0))
    with pytest.raises(TypeError, match="must return one array"):
        cv.kfac(lambda p, b: (model(p, b),), params, data, loss="cross_entropy")
    with pytest.warns(UserWarning, match="no dense layer"):
        op = cv.kfac(lambda p, b: b["x"][:, :3] * p[2]["b"], params, data, loss="cross_entropy")
    assert op.layers == () and len(op.unmatched) == 6

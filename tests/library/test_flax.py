"""curvature.flax: operators of NNX modules and linen variables with state, against dense float64
references, and the refusal of losses that depend on how examples are grouped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

flax = pytest.importorskip("flax")
from flax import linen, nnx  # noqa: E402

import curvature as cv  # noqa: E402
import curvature.flax as cvf  # noqa: E402
from curvature import _driver  # noqa: E402


class Net(nnx.Module):
    """Linear -> BatchNorm -> tanh -> Dropout -> Linear: parameters, batch statistics and an RNG
    stream, the state that broke ``nnx.state(model)``."""

    def __init__(self, rngs, dtype=jnp.float64):
        self.l1 = nnx.Linear(3, 5, rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.bn = nnx.BatchNorm(5, rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.l2 = nnx.Linear(5, 3, rngs=rngs, param_dtype=dtype, dtype=dtype)

    def __call__(self, x):
        return self.l2(self.drop(jnp.tanh(self.bn(self.l1(x)))))


def xent(logits, y):
    return jnp.mean(
        jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0]
    )


def loss_fn(module, batch):
    return xent(module(batch["x"]), batch["y"])


def make_data(n=21, dtype=jnp.float64):
    key = jax.random.key(4)
    x = jax.random.normal(key, (n, 3), dtype)
    return {"x": x, "y": jax.random.randint(jax.random.fold_in(key, 1), (n,), 0, 3)}


def trained_net():
    net = Net(nnx.Rngs(0, dropout=1))
    # Running statistics away from their initial values, so evaluation mode is visible.
    net.bn.mean[...] = jnp.linspace(-0.5, 0.5, 5, dtype=net.bn.mean.dtype)
    net.bn.var[...] = jnp.linspace(0.5, 2.0, 5, dtype=net.bn.var.dtype)
    return net


def dense_reference(net, data, fn):
    """``jax.hessian`` of ``fn(eval-mode module, data)`` in the flat nnx.Param vector."""
    copy = nnx.clone(net)
    copy.eval()
    graphdef, params, rest = nnx.split(copy, nnx.Param, ...)
    flat, unravel = ravel_pytree(params)
    return jax.jit(jax.hessian(lambda f: fn(nnx.merge(graphdef, unravel(f), rest), data)))(flat)


def test_nnx_hessian_gauss_newton_and_fisher_match_dense(x64):
    net, data = trained_net(), make_data()
    expected = dense_reference(net, data, loss_fn)
    for batch_size in (None, 5):
        h = cvf.hessian(loss_fn, net, data, batch_size=batch_size)
        np.testing.assert_allclose(cv.dense(h), expected, rtol=1e-10, atol=1e-12)
    # G = J^T H_out J from the dense Jacobian of the eval-mode outputs.
    copy = nnx.clone(net)
    copy.eval()
    graphdef, params, rest = nnx.split(copy, nnx.Param, ...)
    flat, unravel = ravel_pytree(params)
    outputs = lambda f: nnx.merge(graphdef, unravel(f), rest)(data["x"])  # noqa: E731
    jac = jax.jit(jax.jacobian(lambda f: outputs(f).reshape(-1)))(flat)
    h_out = jax.hessian(lambda o: xent(o.reshape(-1, 3), data["y"]))(outputs(flat).reshape(-1))
    g = cvf.gauss_newton(lambda m, b: m(b["x"]), net, data, loss="cross_entropy", batch_size=8)
    np.testing.assert_allclose(cv.dense(g), jac.T @ h_out @ jac, rtol=1e-10, atol=1e-12)
    # The empirical Fisher: the mean of per-example gradient outer products.
    grads = jax.jit(
        jax.vmap(
            jax.grad(lambda f, x, y: xent(outputs_of(graphdef, rest, unravel, f, x), y[None])),
            in_axes=(None, 0, 0),
        )
    )(flat, data["x"], data["y"])
    f = cvf.empirical_fisher(loss_fn, net, data)
    np.testing.assert_allclose(cv.dense(f), grads.T @ grads / 21, rtol=1e-10, atol=1e-12)
    # The caller's module is untouched (still in training mode) and its parameters are the
    # operator's layout.
    assert net.bn.use_running_average is False
    assert h.size == flat.size
    params_tree = cvf.parameters(net)
    np.testing.assert_array_equal(h.ravel(params_tree), flat)


def outputs_of(graphdef, rest, unravel, flat, x):
    return nnx.merge(graphdef, unravel(flat), rest)(x[None])


# flax's BatchNorm keeps float32 running statistics and updates them from float64 activations.
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")
def test_training_mode_batch_statistics_and_dropout_are_refused(x64):
    net, data = trained_net(), make_data()
    with pytest.raises(ValueError, match="depends on how examples are grouped.*training mode"):
        cvf.hessian(loss_fn, net, data, train=True)
    # Dropout alone (no batch statistics) makes the loss random: refused as well.
    net.bn.eval()
    net.drop.train()
    with pytest.raises(ValueError, match="depends on how examples are grouped"):
        cvf.gauss_newton(lambda m, b: m(b["x"]), net, data, loss="cross_entropy", train=True)


class LinenNet(linen.Module):
    @linen.compact
    def __call__(self, x, train: bool):
        x = linen.Dense(5, param_dtype=jnp.float64)(x)
        x = linen.BatchNorm(use_running_average=not train, param_dtype=jnp.float64)(x)
        return linen.Dense(3, param_dtype=jnp.float64)(jnp.tanh(x))


def test_linen_variables_differentiate_params_and_carry_batch_stats(x64):
    data = make_data()
    net = LinenNet()
    variables = net.init(jax.random.key(0), data["x"], train=False)
    variables = {
        "params": variables["params"],
        "batch_stats": jax.tree_util.tree_map(lambda s: s + 0.3, variables["batch_stats"]),
    }

    def loss(v, batch):
        return xent(net.apply(v, batch["x"], train=False), batch["y"])

    flat, unravel = ravel_pytree(variables["params"])
    # The float32 batch statistics as arguments of a compiled reference, as the operator has
    # them: closed over as constants, XLA folds their float32 rsqrt another way (2.8e-8 apart).
    expected = jax.jit(
        jax.hessian(lambda f, stats: loss({"params": unravel(f), "batch_stats": stats}, data))
    )(flat, variables["batch_stats"])
    h = cvf.hessian(loss, variables, data, batch_size=4)
    np.testing.assert_allclose(cv.dense(h), expected, rtol=1e-10, atol=1e-12)

    def training_loss(v, batch):
        out, _ = net.apply(v, batch["x"], train=True, mutable=["batch_stats"])
        return xent(out, batch["y"])

    with pytest.raises(ValueError, match="loss function sets training mode itself"):
        cvf.hessian(training_loss, variables, data)


def test_rebuilding_from_the_same_module_reuses_compiled_programs():
    net, data = Net(nnx.Rngs(0, dropout=1), jnp.float32), make_data(dtype=jnp.float32)
    key = jax.random.key(0)

    def top():  # a fresh lambda on every call, wrapping the same loss
        op = cvf.hessian(lambda m, b: loss_fn(m, b), net, data)
        return cv.eigsh(op, k=1, num_steps=6, key=key).eigenvalues[0]

    first = top()
    before = _driver._run_compiled._cache_size()
    # A training step changes the parameters in place.
    nnx.update(net, jax.tree_util.tree_map(lambda p: p * 0.9, nnx.state(net, nnx.Param)))
    second = top()
    assert _driver._run_compiled._cache_size() == before
    assert abs(float(second - first)) > 1e-4 * abs(float(first))  # new parameters, new numbers


def test_not_a_flax_model_is_a_clear_error():
    with pytest.raises(TypeError, match="NNX module .* or linen variables"):
        cvf.hessian(loss_fn, {"w": jnp.ones(3)}, make_data(dtype=jnp.float32))


def test_a_new_but_equal_linen_module_reuses_compiled_programs(x64):
    # curvature.gauss_newton on linen's apply: the module is captured, compared by its equality.
    data = make_data()
    variables = LinenNet().init(jax.random.key(1), data["x"], train=False)
    sizes = []
    for _ in range(3):
        net = LinenNet()  # equal to the last one, not the same object
        op = cv.gauss_newton(
            lambda v, b, net=net: net.apply(v, b["x"], train=False),
            variables,
            data,
            loss="cross_entropy",
        )
        cv.eigsh(op, k=1, num_steps=5, key=jax.random.key(0))
        sizes.append(_driver._run_compiled._cache_size())
    assert sizes[0] == sizes[1] == sizes[2]


def test_flax_builders_on_a_loader_equal_in_memory_with_checks(x64):
    # Streamed data with check=True: the grouping check runs on the first batch, and the
    # operators equal their in-memory twins (the Gauss-Newton one used to fail here, reading an
    # attribute its streamed form did not have).
    net, data = trained_net(), make_data(n=21)
    loader = cv.batches(jax.tree_util.tree_map(np.asarray, data), 8)  # 8, 8 and 5 examples

    def apply(module, batch):
        return module(batch["x"])

    pairs = [
        (
            cvf.hessian(loss_fn, net, loader, check=True),
            cvf.hessian(loss_fn, net, data),
        ),
        (
            cvf.gauss_newton(apply, net, loader, loss="cross_entropy", targets="y", check=True),
            cvf.gauss_newton(apply, net, data, loss="cross_entropy", targets="y"),
        ),
    ]
    for streamed, in_memory in pairs:
        assert streamed.streamed and not in_memory.streamed
        np.testing.assert_allclose(cv.dense(streamed), cv.dense(in_memory), rtol=1e-10, atol=1e-12)
    g_st, g_mem = pairs[1]
    np.testing.assert_allclose(
        cv.diagonal(g_st, method="exact").diagonal,
        cv.diagonal(g_mem, method="exact").diagonal,
        rtol=1e-10,
        atol=1e-14,
    )


def test_state_with_batch_statistics_is_refused_for_plain_builders(x64):
    # nnx.state(model) holds BatchNorm's running statistics beside the parameters: a plain
    # builder differentiated them too (a larger, wrong operator) and said nothing.
    net, data = trained_net(), make_data()
    with pytest.raises(
        TypeError,
        match=r"\['bn'\]\['mean'\] is a flax nnx.BatchStat.*nnx.state\(model, nnx.Param\)",
    ):
        cv.hessian(lambda state, batch: 0.0, nnx.state(net), data)
    assert cv.Layout.of(nnx.state(net, nnx.Param)).size == 48  # the parameters alone pass

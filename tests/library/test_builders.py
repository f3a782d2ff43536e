"""Hessian and Gauss-Newton operators against dense float64 references: every chunking, both
losses, ReLU and tanh, exact weighting of uneven batches, targets and dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import dense_hessian, make_problem, rel_err
from jax.flatten_util import ravel_pytree

import curvature as cv

CASES = [(a, lo) for a in ("relu", "tanh") for lo in ("mse", "cross_entropy")]


@pytest.mark.parametrize("activation,loss_name", CASES)
@pytest.mark.parametrize("batch_size", [None, 5, 13, 1])
def test_hvp_matches_dense_hessian_float64(x64, activation, loss_name, batch_size):
    params, data, _, loss, _ = make_problem(activation, loss_name)
    op = cv.hessian(loss, params, data, batch_size=batch_size)
    h = dense_hessian(loss, params, data)
    assert op.shape == h.shape and op.dtype == jnp.float64
    assert jnp.allclose(op.ravel(params), ravel_pytree(params)[0])
    for i in range(3):
        v = jax.random.normal(jax.random.key(i), (op.size,))
        assert rel_err(op @ v, h @ v) < 1e-10
    assert rel_err(cv.dense(op), h) < 1e-10


@pytest.mark.parametrize("activation,loss_name", CASES)
def test_hvp_float32_close_to_float64_reference(activation, loss_name):
    with jax.enable_x64(True):
        params64, data64, _, loss, _ = make_problem(activation, loss_name)
        h = np.asarray(dense_hessian(loss, params64, data64))
        params32, data32 = jax.tree_util.tree_map(
            lambda x: (
                np.asarray(x, np.float32) if x.dtype == np.float64 else np.asarray(x, np.int32)
            ),
            (params64, data64),
        )
    op = cv.hessian(loss, params32, data32, batch_size=5)
    assert op.dtype == jnp.float32
    for i in range(3):
        v = np.asarray(jax.random.normal(jax.random.key(i), (op.size,)), np.float32)
        out = np.asarray(op @ v, np.float64)
        assert (op @ v).dtype == jnp.float32
        ref = h @ v.astype(np.float64)
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5


def test_batch_weighting_is_exact_for_uneven_batches(x64):
    # An unweighted mean of batch means would weight the 3-example remainder like a full batch.
    params, data, _, loss, _ = make_problem("tanh", "mse", num_examples=13)
    h = dense_hessian(loss, params, data)
    for batch_size in (2, 4, 5, 6, 10, 12):
        assert rel_err(cv.dense(cv.hessian(loss, params, data, batch_size=batch_size)), h) < 1e-10


def dense_ggn(model, output_loss, params, data):
    flat, unravel = ravel_pytree(params)

    @jax.jit
    def ggn(flat):
        out = model(unravel(flat), data)
        jac = jax.jacobian(lambda w: model(unravel(w), data).ravel())(flat)  # (B*C, n)
        h_out = jax.hessian(lambda o: output_loss(o.reshape(out.shape), data))(out.ravel())
        return jac.T @ h_out @ jac

    return ggn(flat)


@pytest.mark.parametrize("activation,loss_name", CASES)
@pytest.mark.parametrize("batch_size", [None, 5])
def test_gauss_newton_matches_dense_jacobians(x64, activation, loss_name, batch_size):
    params, data, model, loss, output_loss = make_problem(activation, loss_name)
    ref = dense_ggn(model, output_loss, params, data)
    named = cv.dense(cv.gauss_newton(model, params, data, loss=loss_name, batch_size=batch_size))
    custom = cv.dense(cv.gauss_newton(model, params, data, loss=output_loss, batch_size=batch_size))
    assert rel_err(named, ref) < 1e-10
    assert rel_err(custom, ref) < 1e-10
    eig = np.linalg.eigvalsh(np.asarray(named))
    assert eig.min() > -1e-10 * eig.max()  # positive semi-definite
    # The GGN genuinely differs from the Hessian for a nonlinear network.
    assert rel_err(named, dense_hessian(loss, params, data)) > 1e-3


def test_gauss_newton_equals_hessian_for_linear_model_with_mse(x64):
    params, data, _, _, _ = make_problem("tanh", "mse")
    lin = params[0]

    def model(p, batch):
        return batch["x"] @ p["w"] + p["b"]

    def loss(p, batch):
        return 0.5 * jnp.mean(jnp.sum((model(p, batch) - batch["x"][:, :1]) ** 2, -1))

    data = {"x": data["x"], "y": data["x"][:, :1]}
    lin = {"w": jnp.ones((4, 1)), "b": jnp.zeros(1)}
    g = cv.dense(cv.gauss_newton(model, lin, data, loss="mse", batch_size=5))
    h = cv.dense(cv.hessian(loss, lin, data, batch_size=5))
    assert rel_err(g, h) < 1e-12


def test_residual_diagonal_vanishes_for_relu_only(x64):
    # The model's own second derivatives within a layer vanish for ReLU (piecewise linear in each
    # layer's weights), so R = H - G has a zero diagonal and tr R = 0; tanh adds same-layer terms.
    for activation, expect_zero in (("relu", True), ("tanh", False)):
        params, data, model, loss, _ = make_problem(activation, "cross_entropy")
        h = cv.hessian(loss, params, data)
        g = cv.gauss_newton(model, params, data, loss="cross_entropy")
        r = cv.dense(h - g)
        assert rel_err(r, cv.dense(h) - cv.dense(g)) < 1e-12
        diag_share = float(jnp.abs(jnp.diag(r)).max() / jnp.abs(r).max())
        assert (diag_share < 1e-12) == expect_zero, (activation, diag_share)
        assert rel_err(cv.dense(2.0 * h), 2.0 * cv.dense(h)) < 1e-14
        assert float(jnp.abs(cv.dense(-h + h)).max()) <= 1e-12 * float(jnp.abs(cv.dense(h)).max())


def test_hessian_accepts_tuple_data_and_pytree_batches(x64):
    params, data, _, loss, _ = make_problem("relu", "mse")

    def tuple_loss(p, batch):
        x, y = batch
        return loss(p, {"x": x, "y": y})

    a = cv.dense(cv.hessian(tuple_loss, params, (data["x"], data["y"]), batch_size=4))
    b = cv.dense(cv.hessian(loss, params, data, batch_size=4))
    assert rel_err(a, b) < 1e-12


def test_named_losses_read_the_targets_they_are_told(x64):
    params, data, model, _, _ = make_problem("tanh", "cross_entropy")
    reference = cv.dense(cv.gauss_newton(model, params, data, loss="cross_entropy"))
    renamed = {"inputs": data["x"], "class": data["y"]}
    net = lambda p, b: model(p, {"x": b["inputs"]})  # noqa: E731
    for targets in ("class", lambda b: b["class"]):
        op = cv.gauss_newton(net, params, renamed, loss="cross_entropy", targets=targets)
        np.testing.assert_allclose(cv.dense(op), reference, rtol=1e-12, atol=1e-14)
    pairs = (data["x"], data["y"])
    op = cv.gauss_newton(
        lambda p, b: model(p, {"x": b[0]}), params, pairs, loss="cross_entropy", targets=1
    )
    np.testing.assert_allclose(cv.dense(op), reference, rtol=1e-12, atol=1e-14)


def test_batch_size_larger_than_data_and_bad_values(x64):
    params, data, _, loss, _ = make_problem("tanh", "mse")
    h = dense_hessian(loss, params, data)
    assert rel_err(cv.dense(cv.hessian(loss, params, data, batch_size=100)), h) < 1e-10
    assert rel_err(cv.dense(cv.hessian(loss, params, data, batch_size=np.int64(4))), h) < 1e-10
    for bad in (0, -3, 2.5, 20.0):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            cv.hessian(loss, params, data, batch_size=bad)


def test_low_precision_parameters_run_the_algorithms_in_float32():
    # bfloat16 parameters: the model runs in bfloat16, Krylov vectors, eigh and QR in float32.
    diag = jnp.arange(1.0, 21.0)

    def loss(w, batch):
        return 0.5 * jnp.sum(diag.astype(w.dtype) * w * w) + 0.0 * jnp.sum(batch)

    w = jnp.ones(20, jnp.bfloat16)
    op = cv.hessian(loss, w, jnp.zeros((3, 1)))
    assert op.dtype == jnp.float32
    key = jax.random.key(0)
    assert float(cv.eigsh(op, k=1, num_steps=20, key=key).eigenvalues[0]) == pytest.approx(
        20.0, rel=1e-2
    )
    # Hutchinson with Rademacher probes is exact on a diagonal operator, up to bf16 rounding.
    assert float(cv.trace(op, num_matvecs=4, key=key, method="hutchinson").value) == pytest.approx(
        210.0, rel=1e-2
    )
    hpp = cv.trace(op, num_matvecs=30, key=key)
    assert abs(float(hpp.value) - 210.0) <= 4 * float(hpp.standard_error)
    res = cv.power_iteration(op, k=1, key=key, max_steps=2000)
    assert float(res.eigenvalues[0]) == pytest.approx(20.0, rel=1e-2)
    # Mixed float32 / bfloat16 leaves: chunks accumulate in float32.
    mixed = {"a": jnp.ones(3, jnp.float32), "b": jnp.ones(2, jnp.bfloat16)}
    mop = cv.hessian(
        lambda p, b: (
            jnp.sum(p["a"] ** 2) + jnp.sum(p["b"].astype(jnp.float32) ** 2) + 0 * jnp.sum(b)
        ),
        mixed,
        jnp.zeros((5, 1)),
        batch_size=2,
    )
    assert mop.dtype == jnp.float32
    assert np.allclose(cv.dense(mop), 2 * np.eye(5))

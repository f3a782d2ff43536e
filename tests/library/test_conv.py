"""Convolutional models: exact Hessians, and convolutions kept in XLA:CPU's fast layout inside
the compiled loops (curvature/_conv.py)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.flatten_util import ravel_pytree

import curvature as cv
from curvature import _conv

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU-backend rewrite")


def cnn(layout):
    """A two-conv net on 6x6 images in ``layout`` (``NHWC`` or ``NCHW``), and its data."""
    key = jax.random.key(0)
    k = jax.random.split(key, 4)
    params = {
        "c1": jax.random.normal(k[0], (3, 3, 1, 3)) / 3,
        "c2": jax.random.normal(k[1], (3, 3, 3, 4)) / 5,
        "d": jax.random.normal(k[2], (4, 3)) / 2,
    }
    x = jax.random.normal(k[3], (10, 6, 6, 1))
    if layout == "NCHW":
        x = jnp.transpose(x, (0, 3, 1, 2))
    dims = (layout, "HWIO", layout)
    spatial = (1, 2) if layout == "NHWC" else (2, 3)

    def model(p, batch):
        h = jnp.tanh(
            lax.conv_general_dilated(batch["x"], p["c1"], (1, 1), "SAME", dimension_numbers=dims)
        )
        h = jax.nn.relu(
            lax.conv_general_dilated(h, p["c2"], (2, 2), "VALID", dimension_numbers=dims)
        )
        return h.mean(axis=spatial) @ p["d"]

    def loss(p, batch):
        out = model(p, batch)
        return jnp.mean(jax.nn.logsumexp(out, -1) - out[jnp.arange(out.shape[0]), batch["y"]])

    data = {"x": x, "y": jnp.arange(10) % 3}
    return params, data, model, loss


def test_conv_net_operators_match_dense_with_the_rewrite(x64):
    # NHWC here, NCHW in the layout test below.
    params, data, model, loss = cnn("NHWC")
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
    data = {"x": data["x"].astype(jnp.float64), "y": data["y"]}
    flat, unravel = ravel_pytree(params)
    expected = jax.jit(jax.hessian(lambda f: loss(unravel(f), data)))(flat)
    dense = {}
    for batch_size in (None, 4):
        op = cv.hessian(loss, params, data, batch_size=batch_size)
        assert op.convs  # products through the rewrite
        dense[batch_size] = cv.dense(op)
        np.testing.assert_allclose(dense[batch_size], expected, rtol=1e-10, atol=1e-12)
    top = cv.eigsh(op, k=2, num_steps=20, key=jax.random.key(0)).eigenvalues
    np.testing.assert_allclose(top, np.linalg.eigvalsh(expected)[::-1][:2], rtol=1e-8)
    g = cv.gauss_newton(model, params, data, loss="cross_entropy")
    assert g.convs and g.name == "gauss_newton"
    jac = jax.jit(jax.jacobian(lambda f: model(unravel(f), data).reshape(-1)))(flat)
    out = model(params, data)
    h_out = jax.jit(  # one program, not op by op
        jax.hessian(
            lambda o: jnp.mean(
                jax.nn.logsumexp(o.reshape(out.shape), -1)
                - o.reshape(out.shape)[jnp.arange(10), data["y"]]
            )
        )
    )(out.reshape(-1))
    dense["g"] = cv.dense(g)
    np.testing.assert_allclose(dense["g"], jac.T @ h_out @ jac, rtol=1e-10, atol=1e-12)
    # Prepared outside jit (the pullback held as arrays), its convolutions rewritten too.
    for full, want in ((cv.hessian(loss, params, data), dense[None]), (g, dense["g"])):
        prepared = full.prepared()
        assert prepared.convs and "prepared" in prepared.name
        np.testing.assert_allclose(cv.dense(prepared), want, rtol=1e-10, atol=1e-12)


def conv_labels(compiled) -> set[str]:
    """The dim_labels of the convolutions in an optimised HLO module."""
    return set(re.findall(r"convolution\(.*?dim_labels=([\w>-]+)", compiled.as_text()))


def loop_and_standalone_labels(op):
    key = jax.random.key(0)
    loop = jax.jit(lambda o, k: cv.lanczos(o, num_steps=4, key=k)).lower(op, key).compile()
    alone = jax.jit(lambda o, v: o.apply(v)).lower(op, jnp.ones(op.size)).compile()
    return conv_labels(loop), conv_labels(alone)


def test_convolutions_inside_the_lanczos_loop_take_their_standalone_layouts():
    # XLA:CPU puts a standalone matvec's convolutions into its fast layout (b01f_01io->b01f)
    # but leaves those inside a while loop as they are. With the rewrite the loop's convolutions
    # are the standalone ones (a strided convolution's input gradient, with a reversed window,
    # stays in its own layout in both); without it, the loop keeps slow layouts.
    params, data, _, loss = cnn("NCHW")
    op = cv.hessian(loss, params, data)
    loop, alone = loop_and_standalone_labels(op)
    assert "b01f_01io->b01f" in loop and loop <= alone, (loop, alone)
    _conv.enabled = False
    try:
        plain = cv.hessian(loss, params, data)
    finally:
        _conv.enabled = True
    assert not plain.convs
    plain_loop, plain_alone = loop_and_standalone_labels(plain)
    assert plain_alone == alone and plain_loop - alone, (plain_loop, alone)
    v = jax.random.normal(jax.random.key(1), (op.size,))
    np.testing.assert_allclose(op @ v, plain @ v, rtol=1e-5, atol=1e-6)


def test_models_without_convolutions_are_not_wrapped():
    loss = lambda w, b: jnp.mean((b["x"] @ w) ** 2)  # noqa: E731
    op = cv.hessian(loss, jnp.ones(3), {"x": jnp.ones((4, 3))})
    assert not op.convs

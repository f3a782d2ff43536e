"""The named cross-entropy on sequences: logits ``(batch, T, classes)`` with labels ``(batch, T)``,
the mean over every token. Its Gauss-Newton matrix against ``Jᵀ H_L J`` from ``jax.jacobian`` and
``jax.hessian`` of the mean token cross-entropy written out independently, float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvature as cv

B, T, V, D = 5, 3, 4, 3  # examples, positions, vocabulary (= classes), hidden units


def _tanh_model(p, batch):
    # Positions interact through the running sum, so G couples them.
    onehot = jax.nn.one_hot(batch["x"], V, dtype=p["w1"].dtype)
    hidden = jnp.tanh(jnp.cumsum(onehot @ p["w1"], axis=1) + p["b1"])
    return hidden @ p["w2"] + p["b2"]


def _linear_model(p, batch):
    onehot = jax.nn.one_hot(batch["x"], V, dtype=p["w"].dtype)
    return jnp.cumsum(onehot, axis=1) @ p["w"] + p["b"]


def _token_cross_entropy(logits, labels):
    """Written out: minus the log-probability of each token's label, averaged over B T tokens."""
    logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    picked = jnp.sum(logp * jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype), -1)
    return -jnp.sum(picked) / (labels.shape[0] * labels.shape[1])


def _problem(kind):
    key = jax.random.key(3)
    ks = jax.random.split(key, 6)
    if kind == "tanh":
        params = {
            "w1": jax.random.normal(ks[0], (V, D)),
            "b1": 0.1 * jax.random.normal(ks[1], (D,)),
            "w2": jax.random.normal(ks[2], (D, V)),
            "b2": 0.1 * jax.random.normal(ks[3], (V,)),
        }
        model = _tanh_model
    else:
        params = {"w": jax.random.normal(ks[0], (V, V)), "b": jax.random.normal(ks[1], (V,))}
        model = _linear_model
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    data = {
        "x": jax.random.randint(ks[4], (B, T), 0, V),
        "y": jax.random.randint(ks[5], (B, T), 0, V),
    }
    return params, data, model


def _reference_gauss_newton(model, params, data):
    flat, unravel = ravel_pytree(params)
    out = model(params, data)
    jac = jax.jacobian(lambda w: model(unravel(w), data))(flat).reshape(out.size, flat.size)
    h_out = jax.hessian(lambda o: _token_cross_entropy(o.reshape(out.shape), data["y"]))(
        out.reshape(-1)
    )
    return np.asarray(jac.T @ h_out @ jac)


@pytest.mark.parametrize("kind", ["tanh", "linear"])
def test_gauss_newton_is_jt_hl_j_of_the_mean_token_cross_entropy(x64, kind):
    params, data, model = _problem(kind)
    want = _reference_gauss_newton(model, params, data)
    assert np.linalg.norm(want) > 1e-2  # a reference that is not zero
    # Chunks of 2, 2 and 1 examples: equal-length sequences make the token mean the mean over
    # examples of per-example means, so batches weighted by their sizes stay exact.
    G = cv.gauss_newton(model, params, data, loss="cross_entropy", batch_size=2)
    assert np.allclose(np.asarray(cv.dense(G)), want, rtol=1e-10, atol=1e-13)
    if kind == "linear":
        # The Hessian of the mean token loss equals G for a model linear in its parameters.
        loss = lambda p, batch: _token_cross_entropy(model(p, batch), batch["y"])  # noqa: E731
        H = np.asarray(cv.dense(cv.hessian(loss, params, data, batch_size=2)))
        assert np.allclose(H, want, rtol=1e-10, atol=1e-13)


def test_a_per_token_product_divides_by_the_number_of_tokens(x64):
    # (diag p - p pᵀ) u / (B T) at each position, none across positions.
    from curvature.losses import NAMED

    value, hvp = NAMED["cross_entropy"]
    logits = jax.random.normal(jax.random.key(0), (B, T, V), jnp.float64)
    labels = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    u = jax.random.normal(jax.random.key(2), (B, T, V), jnp.float64)
    assert float(value(logits, labels)) == pytest.approx(
        float(_token_cross_entropy(logits, labels)), rel=1e-13
    )
    p = jax.nn.softmax(logits, axis=-1)
    want = (p * u - p * jnp.sum(p * u, -1, keepdims=True)) / (B * T)
    assert np.allclose(hvp(logits, u, labels), want, rtol=1e-12, atol=1e-15)


def test_shape_errors_and_label_checks(x64):
    params, data, model = _problem("linear")
    with pytest.raises(ValueError, match=r"logits \(5, 3, 4\) and labels \(5,\)"):
        cv.gauss_newton(model, params, {**data, "y": data["y"][:, 0]}, loss="cross_entropy")
    with pytest.raises(ValueError, match=r"logits \(5, 3, 4\) and labels \(5, 2\)"):
        cv.gauss_newton(model, params, {**data, "y": data["y"][:, :2]}, loss="cross_entropy")
    with pytest.raises(ValueError, match="integer labels"):
        cv.gauss_newton(model, params, {**data, "y": 1.0 * data["y"]}, loss="cross_entropy")
    # Labels outside the classes, found at their example and position.
    bad = data["y"].at[2, 1].set(V)
    with pytest.raises(ValueError, match=f"1 label.*the first {V} at example 2, position 1"):
        cv.gauss_newton(model, params, {**data, "y": bad}, loss="cross_entropy")
    # K-FAC has no sequence cross-entropy: it says so, naming the outputs' shape.
    with pytest.raises(ValueError, match=r"needs logits \(batch, classes\).*\(5, 3, 4\)"):
        cv.kfac(model, params, data, loss="cross_entropy")

"""The empirical Fisher, per-example gradients and exact diagonals, against dense float64
references on small ReLU and tanh MLPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_problem
from jax.flatten_util import ravel_pytree

import curvature as cv
from curvature import _driver, fisher

CASES = [(a, loss) for a in ("relu", "tanh") for loss in ("mse", "cross_entropy")]


def per_example_matrix(loss, params, data):
    """``(N, n)``: each example's gradient, by differentiating the vector of per-example losses."""
    flat, unravel = ravel_pytree(params)
    n_examples = len(data["x"])

    def losses(w):
        return jnp.stack(
            [
                loss(unravel(w), jax.tree_util.tree_map(lambda x, i=i: x[i : i + 1], data))
                for i in range(n_examples)
            ]
        )

    return np.asarray(jax.jacobian(losses)(flat), np.float64)


@pytest.mark.parametrize("activation,loss_name", CASES)
@pytest.mark.parametrize("batch_size", [None, 5])
def test_empirical_fisher_is_the_mean_outer_product_of_per_example_gradients(
    x64, activation, loss_name, batch_size
):
    params, data, _, loss, _ = make_problem(activation, loss_name)
    g = per_example_matrix(loss, params, data)
    want = g.T @ g / len(g)
    F = cv.empirical_fisher(loss, params, data, batch_size=batch_size)  # 13 examples: 5, 5, 3
    assert np.allclose(np.asarray(cv.dense(F)), want, rtol=1e-10, atol=1e-12)
    exact = cv.diagonal(F, method="exact")
    assert np.allclose(np.asarray(exact.diagonal), np.diag(want), rtol=1e-10, atol=1e-12)
    assert int(exact.num_matvecs) == 0 and float(jnp.max(exact.standard_error)) == 0.0
    per = cv.per_example_gradients(loss, params, data)
    assert np.allclose(np.asarray(jax.vmap(F.ravel)(per)), g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation,loss_name", CASES)
@pytest.mark.parametrize("batch_size", [None, 5])
def test_exact_gauss_newton_diagonal_from_per_example_jacobians(
    x64, activation, loss_name, batch_size
):
    params, data, model, _, output_loss = make_problem(activation, loss_name)
    named = loss_name if activation == "relu" else output_loss  # named and callable losses
    G = cv.gauss_newton(model, params, data, loss=named, batch_size=batch_size)
    want = np.diag(np.asarray(cv.dense(G), np.float64))
    got = cv.diagonal(G, method="exact")
    assert np.allclose(np.asarray(got.diagonal), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_exact_diagonal_of_any_operator_from_unit_vectors(x64, activation):
    params, data, model, loss, _ = make_problem(activation, "cross_entropy")
    H = cv.hessian(loss, params, data, batch_size=5)
    R = H - cv.gauss_newton(model, params, data, loss="cross_entropy")
    for op in (H, R):
        want = np.diag(np.asarray(cv.dense(op), np.float64))
        for block in (None, 7):  # 7 does not divide n: the last block runs past the end
            got = cv.diagonal(op, method="exact", probe_batch_size=block)
            assert np.allclose(np.asarray(got.diagonal), want, rtol=1e-10, atol=1e-12)
            assert int(got.num_matvecs) == op.size
    # A ReLU network's residual has an exactly zero diagonal; a tanh network's does not.
    diag_r = np.asarray(cv.diagonal(R, method="exact").diagonal)
    if activation == "relu":
        assert np.max(np.abs(diag_r)) < 1e-12
    else:
        assert np.max(np.abs(diag_r)) > 1e-3


def test_the_true_fisher_of_cross_entropy_is_the_gauss_newton_matrix(x64):
    # E_{y ~ p(.|x)} [grad log p(y|x) grad log p(y|x)^T], averaged over x, against G.
    params, data, model, _, _ = make_problem("tanh", "cross_entropy")
    flat, unravel = ravel_pytree(params)
    logits = model(params, data)
    probs = np.asarray(jax.nn.softmax(logits), np.float64)

    def log_probs(w):
        return jax.nn.log_softmax(model(unravel(w), data))  # (N, C)

    jac = np.asarray(jax.jacobian(log_probs)(flat), np.float64)  # (N, C, n)
    true_fisher = np.einsum("ic,ick,icl->kl", probs, jac, jac) / len(probs)
    G = np.asarray(cv.dense(cv.gauss_newton(model, params, data, loss="cross_entropy")))
    assert np.allclose(true_fisher, G, rtol=1e-9, atol=1e-12)
    # ... and the empirical Fisher (observed labels) is a different matrix.
    F = np.asarray(cv.dense(cv.empirical_fisher(lambda p, b: _ce(model(p, b), b), params, data)))
    assert np.linalg.norm(F - G) > 0.1 * np.linalg.norm(G)


def _ce(out, batch):
    logz = jax.nn.logsumexp(out, axis=-1)
    return jnp.mean(logz - jnp.take_along_axis(out, batch["y"][:, None], axis=-1)[:, 0])


def test_empirical_fisher_estimators_and_no_recompilation(key):
    from curvature import fisher  # noqa: F401  (the module is importable on its own)

    params, data, _, loss, _ = make_problem("relu", "mse", dtype=jnp.float32)
    F = cv.empirical_fisher(loss, params, data)
    top = cv.eigsh(F, k=2, num_steps=20, key=key)
    dense = np.linalg.eigvalsh(np.asarray(cv.dense(F), np.float64))[::-1]
    assert np.allclose(top.eigenvalues, dense[:2], rtol=1e-4)
    assert np.min(dense) > -1e-5  # positive semi-definite
    before = _driver._run_compiled._cache_size()
    moved = jax.tree_util.tree_map(lambda x: x * 1.01, params)
    cv.eigsh(cv.empirical_fisher(loss, moved, data), k=2, num_steps=20, key=key)
    assert _driver._run_compiled._cache_size() == before


def test_bad_diagonal_arguments():
    op = cv.from_matrix(jnp.eye(3))
    with pytest.raises(ValueError, match="needs num_matvecs and key"):
        cv.diagonal(op)
    with pytest.raises(ValueError, match="method must be 'bekas' or 'exact'"):
        cv.diagonal(op, method="hutch", num_matvecs=4, key=jax.random.key(0))
    assert np.allclose(cv.diagonal(op, method="exact").diagonal, 1.0)


def _sampled_outer_products(F, params, model):
    """``(1/N)(1/S) sum_i sum_s g_is g_is^T`` from per-example Jacobians and the operator's
    own samples: ``g_is = J_i^T r_is``, ``r_is`` the output loss's gradient at sample ``s``."""
    data, samples = F.data["batch"], F.data["samples"]
    flat, unravel = ravel_pytree(params)
    total = np.zeros((flat.size, flat.size))

    def output(f, example):
        return model(unravel(f), example)[0]

    for i in range(samples.shape[0]):
        example = jax.tree_util.tree_map(lambda x, i=i: x[i : i + 1], data)
        out = np.asarray(model(params, example))[0]
        jac = np.asarray(jax.jacobian(output)(flat, example))
        for s in range(samples.shape[1]):
            if F.likelihood == "cross_entropy":
                p = np.exp(out - out.max())
                r = p / p.sum() - np.eye(out.size)[int(samples[i, s])]
            else:
                r = -np.asarray(samples[i, s])
            g = jac.T @ r
            total += np.outer(g, g)
    return total / samples.shape[0] / samples.shape[1]


@pytest.mark.parametrize("likelihood", ["cross_entropy", "mse"])
def test_monte_carlo_fisher_is_the_mean_outer_product_of_sampled_gradients(x64, key, likelihood):
    params, data, model, _, _ = make_problem("tanh", likelihood)
    F = cv.monte_carlo_fisher(model, params, data, loss=likelihood, num_samples=3, key=key)
    want = _sampled_outer_products(F, params, model)
    assert np.allclose(np.asarray(cv.dense(F)), want, atol=1e-12 * np.abs(want).max())
    # Chunked (13 examples: 5, 5, 3): the same operator, samples and all.
    chunked = cv.monte_carlo_fisher(
        model, params, data, loss=likelihood, num_samples=3, key=key, batch_size=5
    )
    assert np.allclose(np.asarray(cv.dense(chunked)), want, atol=1e-12 * np.abs(want).max())

    # Built again along training (a fresh lambda, moved parameters): the samples are drawn by
    # the same compiled program.
    def build(p):
        fresh = lambda p, b: model(p, b)  # noqa: E731  (a new function object each call)
        return cv.monte_carlo_fisher(fresh, p, data, loss=likelihood, num_samples=3, key=key)

    build(params)
    before = fisher._draw._cache_size()
    build(jax.tree_util.tree_map(lambda p: 0.9 * p, params))
    assert fisher._draw._cache_size() == before


def test_monte_carlo_fisher_tends_to_the_gauss_newton_matrix(x64, key):
    """Unbiased: the mean over keys is G within its own standard error, entry by entry; and the
    error of one draw falls as 1/sqrt(num_samples)."""
    params, data, model, _, _ = make_problem("tanh", "cross_entropy")
    g = np.asarray(cv.dense(cv.gauss_newton(model, params, data, loss="cross_entropy")))

    def draw(num_samples, seed):
        F = cv.monte_carlo_fisher(
            model, params, data, loss="cross_entropy", num_samples=num_samples, key=seed
        )
        return np.asarray(cv.dense(F))

    draws = np.stack([draw(2, jax.random.key(s)) for s in range(48)])
    mean, se = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(len(draws))
    varies = se > 1e-12 * np.abs(g).max()  # entries that are exactly zero in every draw: skip
    z = np.abs(mean - g)[varies] / se[varies]
    assert np.mean(z < 3) > 0.97 and np.median(z) < 1.0, (np.mean(z < 3), np.median(z))
    assert np.allclose(mean[~varies], g[~varies], atol=1e-12 * np.abs(g).max())

    def error(num_samples):
        keys = [jax.random.key(100 + s) for s in range(6)]
        return np.mean([np.linalg.norm(draw(num_samples, k) - g) for k in keys])

    ratio = error(64) / error(4)
    assert 0.15 < ratio < 0.4, ratio  # 1/4 expected


def test_monte_carlo_fisher_refuses_what_has_no_distribution(key):
    params, data, model, loss, output_loss = make_problem("tanh", "cross_entropy")
    with pytest.raises(ValueError, match="must name a likelihood"):
        cv.monte_carlo_fisher(model, params, data, loss=output_loss, num_samples=1, key=key)
    with pytest.raises(ValueError, match="needs the data in memory"):
        cv.monte_carlo_fisher(model, params, lambda: [data], loss="mse", num_samples=1, key=key)
    with pytest.raises(ValueError, match="num_samples"):
        cv.monte_carlo_fisher(model, params, data, loss="mse", num_samples=0, key=key)

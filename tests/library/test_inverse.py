"""Damped inverses against dense float64 solves: by conjugate gradient for a Gauss-Newton
operator, exactly for a dense matrix; estimators on an inverse; a solve's residual reported."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_problem

import curvature as cv
import curvature.optim


@pytest.fixture(scope="module")
def ggn():
    with jax.enable_x64(True):
        params, data, model, _, _ = make_problem("tanh", "cross_entropy")
        G = cv.gauss_newton(model, params, data, loss="cross_entropy")
        yield G, np.asarray(cv.dense(G), np.float64)


def test_cg_inverse_against_the_dense_solve(x64, ggn, key):
    G, g = ggn
    n, damping = G.size, 0.05
    inv = cv.inverse(G, damping=damping, max_steps=n, tol=1e-12)
    assert isinstance(inv, cv.CGInverse) and inv.shape == G.shape
    want = np.linalg.inv(g + damping * np.eye(n))
    got = np.asarray(cv.dense(inv))
    assert np.allclose(got, want, rtol=1e-7, atol=1e-7 * np.abs(want).max())
    # An estimator on the inverse: its top eigenvalue is 1 / (lambda_min(G) + damping).
    top = cv.eigsh(inv, k=1, num_steps=30, key=key)
    lowest = np.linalg.eigvalsh(g)[0]
    assert float(top.eigenvalues[0]) == pytest.approx(1 / (lowest + damping), rel=1e-6)


def test_a_solve_reports_its_residual_and_why_it_stopped(x64, ggn, key):
    G, g = ggn
    b = jax.random.normal(key, (G.size,))
    damping = 0.05
    full = cv.inverse(G, damping=damping, max_steps=G.size, tol=1e-10).solve(b)
    assert bool(full.converged) and cv.optim.STOP_REASONS[int(full.stop_reason)] == "converged"
    short = cv.inverse(G, damping=damping, max_steps=3).solve(b)
    assert not bool(short.converged) and int(short.num_steps) == 3
    assert cv.optim.STOP_REASONS[int(short.stop_reason)] == "max_steps"
    actual = np.linalg.norm(np.asarray(b) - (g + damping * np.eye(G.size)) @ np.asarray(short.x))
    assert float(short.residual_norm) == pytest.approx(actual, rel=1e-6)
    assert actual > 1e-3 * np.linalg.norm(np.asarray(b))  # three steps are not a solve


def test_a_dense_matrix_is_inverted_exactly(x64):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    a = a @ a.T
    inv = cv.inverse(cv.from_matrix(a), damping=0.5)
    assert isinstance(inv, cv.Matrix)  # no CG: the eigendecomposition, once
    assert np.allclose(np.asarray(cv.dense(inv)), np.linalg.inv(a + 0.5 * np.eye(6)), atol=1e-12)


def test_what_an_inverse_refuses(ggn):
    G, _ = ggn
    with pytest.raises(ValueError, match="damping must be a number >= 0"):
        cv.inverse(cv.from_matrix(jnp.eye(3)), damping=-1.0)
    with pytest.raises(TypeError, match="needs a LinearOperator"):
        cv.inverse(np.eye(3), damping=1.0)
    params, data, model, _, _ = make_problem("tanh", "cross_entropy")
    streamed = cv.gauss_newton(model, params, lambda: [data], loss="cross_entropy")
    with pytest.raises(ValueError, match="conjugate_gradient"):
        cv.inverse(streamed, damping=1.0)


def test_a_diagonal_operator_and_its_exact_damped_powers(x64):
    params, _, _, _, _ = make_problem("relu", "mse")
    values = jax.tree_util.tree_map(lambda x: jnp.abs(x) + 0.1, params)
    op = cv.from_diagonal(values, name="abs")
    flat = op.ravel(values)
    assert op.name == "abs" and op.layout == cv.Layout.of(params)
    assert np.allclose(np.asarray(cv.dense(op)), np.diag(flat), rtol=0, atol=0)
    inv = cv.inverse(op, damping=0.5)
    assert isinstance(inv, cv.Diagonal)
    assert np.allclose(np.asarray(inv.values), 1 / (np.asarray(flat) + 0.5), rtol=1e-14)
    same = cv.from_diagonal(flat, like=params)  # a flat vector on the parameters' layout
    assert same.layout == op.layout and np.array_equal(np.asarray(same.values), np.asarray(flat))
    with pytest.raises(ValueError, match="has 3 entries; the layout has 83"):
        cv.from_diagonal(jnp.ones(3), like=params)


def test_low_rank_plus_diagonal_keeps_the_top_and_the_diagonal_and_inverts_exactly(x64, ggn, key):
    G, dense = ggn
    approx = cv.low_rank_plus_diagonal(G, k=4, key=key, num_steps=60)
    values, vectors = np.linalg.eigh(dense)
    top, basis = values[-4:], vectors[:, -4:]
    kept = (basis * top) @ basis.T
    correction = np.maximum(np.diag(dense) - np.diag(kept), 0.0)
    want = kept + np.diag(correction)
    got = np.asarray(cv.dense(approx))
    assert np.allclose(got, want, rtol=1e-7, atol=1e-9)
    assert np.allclose(np.diag(got), np.diag(dense), rtol=1e-7, atol=1e-9)  # nothing clipped
    inv = cv.inverse(approx, damping=0.1)
    assert isinstance(inv, cv.LowRankPlusDiagonal)
    eye = np.eye(len(dense))
    assert np.allclose(np.asarray(cv.dense(inv)), np.linalg.inv(got + 0.1 * eye), rtol=1e-8)
    assert approx.damped_power(0.1, -0.5) is None  # no closed form: compare(damping=) refuses

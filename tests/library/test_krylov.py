"""Lanczos and eigsh against dense float64 eigendecompositions (ReLU, tanh): exactness, both
ends, honest convergence, breakdowns, scale invariance and eigenvalue derivatives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_eigs_close, hessian_problem, make_problem
from jax.flatten_util import ravel_pytree

import curvature as cv


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_lanczos_exactness_full_basis(x64, key, activation):
    op, h = hessian_problem(activation)
    run = cv.lanczos(op, num_steps=op.size, key=key)
    q = np.asarray(run.basis)
    assert np.abs(q @ q.T - np.eye(op.size)).max() < 1e-10
    t = np.asarray(cv.tridiagonal(run))
    assert np.abs(q @ h @ q.T - t).max() < 1e-10 * np.abs(h).max()
    assert np.allclose(np.linalg.eigvalsh(t), np.linalg.eigvalsh(h), atol=1e-10 * np.abs(h).max())


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_eigsh_both_ends_match_eigh(x64, key, activation):
    op, h = hessian_problem(activation)
    evals, evecs = np.linalg.eigh(h)
    scale = np.abs(evals).max()
    top = cv.eigsh(op, k=5, which="LA", num_steps=op.size, key=key)
    bottom = cv.eigsh(op, k=5, which="SA", num_steps=op.size, key=key)
    assert_eigs_close(top.eigenvalues, evals[::-1][:5], scale, 1e-8)
    assert_eigs_close(bottom.eigenvalues, evals[:5], scale, 1e-8)
    for res, want_idx in ((top, np.arange(op.size - 1, op.size - 6, -1)), (bottom, np.arange(5))):
        v = np.asarray(res.eigenvectors)
        assert v.shape == (op.size, 5)
        # Residual norms are honest: recompute them with the dense matrix.
        recomputed = np.linalg.norm(h @ v - v * np.asarray(res.eigenvalues), axis=0)
        assert np.allclose(res.residual_norms, recomputed, atol=1e-10 * scale)
        assert bool(res.converged.all())
        assert int(res.num_matvecs) == op.size + 5
        for j, i in enumerate(want_idx):
            gap = np.min(np.abs(np.delete(evals, i) - evals[i]))
            if gap > 1e-4 * scale:  # angles are only defined for simple eigenvalues
                sin = np.sqrt(max(0.0, 1 - float(v[:, j] @ evecs[:, i]) ** 2))
                assert sin < 1e-6, (j, sin)
    both = cv.eigsh(op, k=6, which="BE", num_steps=op.size, key=key)
    assert_eigs_close(
        both.eigenvalues, np.concatenate([evals[::-1][:3], evals[:3][::-1]]), scale, 1e-8
    )


def test_eigsh_largest_magnitude(x64, key):
    matrix = np.diag(np.concatenate([[-10.0, 7.0, -6.5], np.linspace(-3, 3, 40)]))
    res = cv.eigsh(cv.from_matrix(jnp.asarray(matrix)), k=3, which="LM", num_steps=43, key=key)
    assert np.allclose(res.eigenvalues, [-10.0, 7.0, -6.5], atol=1e-10)


def test_eigsh_partial_krylov_reports_honest_convergence(x64, key):
    # With fewer steps than n, each Ritz value lies within its residual norm of an eigenvalue
    # (Weyl / Kahan bound), whatever the flag says; the top ones converge.
    op, h = hessian_problem("tanh")
    evals = np.linalg.eigvalsh(h)
    res = cv.eigsh(op, k=8, num_steps=30, key=key)
    for theta, r in zip(np.asarray(res.eigenvalues), np.asarray(res.residual_norms), strict=True):
        assert np.min(np.abs(evals - theta)) <= r * (1 + 1e-8) + 1e-12
    assert bool(res.converged[0])
    assert_eigs_close(res.eigenvalues[:1], evals[-1:], np.abs(evals).max(), 1e-8)
    # The flag is exactly "residual <= tol * largest Ritz magnitude of the same run".
    tol = float(jnp.finfo(jnp.float64).eps) ** 0.5
    run = cv.lanczos(op, num_steps=30, key=key)
    scale = np.abs(np.linalg.eigvalsh(np.asarray(cv.tridiagonal(run)))).max()
    assert np.array_equal(np.asarray(res.converged), np.asarray(res.residual_norms) <= tol * scale)
    assert not bool(res.converged.all())  # 30 steps cannot resolve the 8th eigenvalue of 83


def test_lanczos_breakdown_on_few_distinct_eigenvalues(x64, key):
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(30, 30)))
    eigenvalues = np.repeat([1.0, 2.0, 5.0], 10)
    op = cv.from_matrix(jnp.asarray(q @ np.diag(eigenvalues) @ q.T))
    run = cv.lanczos(op, num_steps=12, key=key)
    assert int(run.num_restarts) >= 3
    basis = np.asarray(run.basis)
    assert np.all(np.isfinite(basis))
    assert np.abs(basis @ basis.T - np.eye(12)).max() < 1e-10
    a = np.asarray(op.matrix)
    assert np.abs(basis @ a @ basis.T - np.asarray(cv.tridiagonal(run))).max() < 1e-10
    res = cv.eigsh(op, k=3, which="BE", num_steps=12, key=key)
    assert np.allclose(res.eigenvalues, [5.0, 5.0, 1.0], atol=1e-10)
    assert bool(res.converged.all())


def test_lanczos_without_reorthogonalization_runs(x64, key):
    op, h = hessian_problem("tanh")
    run = cv.lanczos(op, num_steps=20, key=key, reorthogonalize=False)
    top = np.linalg.eigvalsh(np.asarray(cv.tridiagonal(run)))[-1]
    assert abs(top - np.linalg.eigvalsh(h)[-1]) < 1e-6 * abs(top)


@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_eigsh_does_not_depend_on_the_operator_scale(scale):
    # float32: squares of 1e-20 underflow, squares of 1e20 overflow.
    eigs = np.linspace(-0.5, 1.0, 40)
    op = cv.from_matrix(jnp.diag(jnp.asarray(eigs, jnp.float32)) * jnp.float32(scale))
    r = cv.eigsh(op, k=2, key=jax.random.key(0))
    np.testing.assert_allclose(np.asarray(r.eigenvalues) / scale, eigs[::-1][:2], rtol=1e-5)
    assert np.all(r.converged)
    relative = np.asarray(r.residual_norms) / scale
    assert np.all(relative > 0) and np.all(relative < 1e-5)  # computed, not underflowed to 0
    bottom = cv.eigsh(op, k=1, which="SA", key=jax.random.key(1)).eigenvalues[0] / scale
    assert bottom == pytest.approx(-0.5, rel=1e-5)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_eigenvalue_gradients_match_the_dense_ones(x64, activation):
    # num_steps = n (the default for n <= 40) used to give NaN: the Lanczos run broke down.
    params, data, _, loss, _ = make_problem(
        activation, "cross_entropy", num_examples=9, sizes=(3, 4, 4, 2)
    )
    flat, unravel = ravel_pytree(params)

    def dense_top(f):
        return jnp.linalg.eigvalsh(jax.hessian(lambda g: loss(unravel(g), data))(f))[-1]

    def top(f):
        op = cv.hessian(loss, unravel(f), data)
        return cv.eigsh(op, k=1, num_steps=op.size, key=jax.random.key(0)).eigenvalues[0]

    assert top(flat) == pytest.approx(float(jax.jit(dense_top)(flat)), rel=1e-10)
    expected = jax.jit(jax.grad(dense_top))(flat)
    got = jax.grad(top)(flat)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-9 * np.abs(expected).max())
    # Forward mode too.
    direction = jax.random.normal(jax.random.key(2), flat.shape, flat.dtype)
    _, tangent = jax.jvp(top, (flat,), (direction,))
    assert tangent == pytest.approx(float(expected @ direction), rel=1e-7)

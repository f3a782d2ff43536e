"""Deflated power iteration against dense eigenvalues: the top pairs, honest non-convergence, and
only true eigenpairs flagged as converged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import hessian_problem

import curvature as cv


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_power_iteration_top3(x64, key, activation):
    op, h = hessian_problem(activation)
    evals = np.linalg.eigvalsh(h)
    by_magnitude = evals[np.argsort(-np.abs(evals))][:3]
    res = cv.power_iteration(op, k=3, key=key, max_steps=20000, tol=1e-9)
    assert bool(res.converged.all()), res.num_iters
    assert np.all(np.asarray(res.num_iters) > 1)
    assert int(res.num_matvecs) == int(np.sum(res.num_iters)) + 3
    assert np.allclose(res.eigenvalues, by_magnitude, rtol=1e-6, atol=0)
    v = np.asarray(res.eigenvectors)
    recomputed = np.linalg.norm(h @ v - v * np.asarray(res.eigenvalues), axis=0)
    assert np.allclose(res.residual_norms, recomputed, atol=1e-10 * np.abs(evals).max())


def test_power_iteration_reports_nonconvergence(x64, key):
    # Two eigenvalues of equal magnitude: the vector never converges, so the residual stays large.
    op = cv.from_matrix(jnp.diag(jnp.array([3.0, -3.0, 1.0, 0.5])))
    res = cv.power_iteration(op, k=1, key=key, max_steps=50, tol=1e-10)
    assert not bool(res.converged[0]) and int(res.num_iters[0]) == 50


def flagged_pairs_are_eigenpairs(r, eigs):
    tol = np.sqrt(np.finfo(np.float32).eps)
    for value, residual, ok in zip(r.eigenvalues, r.residual_norms, r.converged, strict=True):
        assert bool(ok) == bool(residual <= tol * abs(value))
        if ok:
            assert np.min(np.abs(eigs - value)) <= 1e-5, (value, eigs)


def test_power_iteration_flags_only_true_eigenpairs():
    # 2 and -2 have equal magnitude: the first iterate cannot converge and deflation removes a
    # wrong direction (before the fix, a "converged" 1.89 came out). With k >= 2 the final
    # Rayleigh-Ritz step resolves +-2; with k = 1 the pair is unconverged.
    eigs = np.array([2.0, -2.0, 1.0, 0.1, 0.0])
    op = cv.from_matrix(jnp.diag(jnp.asarray(eigs)))
    r = cv.power_iteration(op, k=3, key=jax.random.key(0), max_steps=300)
    flagged_pairs_are_eigenpairs(r, eigs)
    np.testing.assert_allclose(np.sort(np.asarray(r.eigenvalues)), [-2.0, 1.0, 2.0], atol=1e-5)
    assert np.all(r.converged)
    one = cv.power_iteration(op, k=1, key=jax.random.key(0), max_steps=300)
    assert not one.converged[0] and one.num_iters[0] == 300
    # Ordinary spectra: every pair converges and is one of A's.
    eigs = np.array([3.0, -2.0, 1.0, 0.1, 0.0])
    r = cv.power_iteration(
        cv.from_matrix(jnp.diag(jnp.asarray(eigs))), k=3, key=jax.random.key(0), max_steps=2000
    )
    flagged_pairs_are_eigenpairs(r, eigs)
    assert np.all(r.converged)

"""Honest results at the edges: deflation after an unconverged pair, operators of tiny or huge
scale, and derivatives of eigenvalues."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_problem
from jax.flatten_util import ravel_pytree

import curvature as cv


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

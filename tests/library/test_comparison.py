"""Subspace overlap: the mean squared cosine of the principal angles, against cases whose
angles are known and against the dense Hessian's eigenvectors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_problem

import curvature as cv


def test_overlap_of_known_subspaces(x64):
    n = 12
    e = np.eye(n)
    rng = np.random.default_rng(0)
    u = e[:, :3]
    assert float(cv.subspace_overlap(u, u)) == pytest.approx(1.0, abs=1e-14)
    # Another basis of the same subspace (not orthonormal): still 1.
    mix = u @ rng.normal(size=(3, 3))
    assert float(cv.subspace_overlap(u, mix)) == pytest.approx(1.0, abs=1e-12)
    assert float(cv.subspace_overlap(u, e[:, 3:6])) == pytest.approx(0.0, abs=1e-14)
    # Principal angles 0, 0 and t: mean squared cosine (2 + cos^2 t) / 3.
    t = 0.7
    v = np.stack([e[:, 0], e[:, 1], np.cos(t) * e[:, 2] + np.sin(t) * e[:, 5]], axis=1)
    assert float(cv.subspace_overlap(u, v)) == pytest.approx((2 + np.cos(t) ** 2) / 3, rel=1e-12)
    # A smaller subspace inside a larger one: 1; of different sizes, normalised by the smaller.
    assert float(cv.subspace_overlap(e[:, :1], u)) == pytest.approx(1.0, abs=1e-14)
    assert float(cv.subspace_overlap(u, e[:, 2:8])) == pytest.approx(1 / 3, abs=1e-14)
    # Random k-dimensional subspaces of R^n: k / n on average.
    draws = [
        float(cv.subspace_overlap(rng.normal(size=(n, 3)), rng.normal(size=(n, 3))))
        for _ in range(400)
    ]
    assert np.mean(draws) == pytest.approx(3 / n, abs=0.03)
    with pytest.raises(ValueError, match="same n"):
        cv.subspace_overlap(u, np.ones((5, 2)))
    with pytest.raises(ValueError, match="1 <= k <= n"):
        cv.subspace_overlap(u, np.ones((n, 0)))


def test_overlap_of_eigsh_with_the_dense_top_eigenvectors(x64, key):
    params, data, _, loss, _ = make_problem("tanh", "cross_entropy")
    H = cv.hessian(loss, params, data)
    top = cv.eigsh(H, k=3, key=key)
    assert bool(top.converged.all())
    _, vectors = np.linalg.eigh(np.asarray(cv.dense(H), np.float64))
    overlap = cv.subspace_overlap(top.eigenvectors, jnp.asarray(vectors[:, -3:]))
    assert float(overlap) == pytest.approx(1.0, abs=1e-8)
    # The next three eigenvectors are orthogonal to the top three.
    assert float(cv.subspace_overlap(top.eigenvectors, vectors[:, -6:-3])) < 1e-8
    assert jax.numpy.ndim(overlap) == 0


def test_compare_against_dense_algebra(x64, key):
    """The Gauss-Newton part against the Hessian: the eigenspace overlap of the dense top
    eigenvectors, the relative Frobenius error within its stated error; an operator against
    itself: overlap 1, error 0."""
    params, data, model, loss, _ = make_problem("tanh", "cross_entropy")
    H = cv.hessian(loss, params, data)
    G = cv.gauss_newton(model, params, data, loss="cross_entropy")
    h, g = (np.asarray(cv.dense(op), np.float64) for op in (H, G))
    same = cv.compare(G, G, k=3, key=key)
    assert same.overlap == pytest.approx(1.0, abs=1e-8)
    assert same.relative_error == 0.0 and same.relative_error_se == 0.0
    result = cv.compare(H, G, k=3, key=key, num_matvecs=64, num_steps=40)
    assert bool(result.exact_top.converged.all() and result.approx_top.converged.all())
    top_h, top_g = np.linalg.eigh(h)[1][:, -3:], np.linalg.eigh(g)[1][:, -3:]
    want = float(np.sum((top_h.T @ top_g) ** 2) / 3)
    assert result.overlap == pytest.approx(want, abs=1e-6)
    assert 0.05 < want < 0.999  # a case where the answer is neither 0 nor 1
    exact_error = np.linalg.norm(h - g) / np.linalg.norm(h)
    assert abs(result.relative_error - exact_error) <= 4 * result.relative_error_se
    assert 0 < result.relative_error_se < 0.5 * exact_error
    np.testing.assert_allclose(result.approx_top.eigenvalues, np.linalg.eigvalsh(g)[::-1][:3])
    with pytest.raises(ValueError, match="different shapes"):
        cv.compare(H, cv.from_matrix(jnp.eye(3)), k=1, key=key)


def test_damped_conditioning_and_several_approximations_on_shared_runs(x64, key):
    """The condition number of G + λI preconditioned by K-FAC against dense algebra; a tuple of
    approximations gives each the numbers of its own call (one exact eigsh, shared probes);
    an approximation without an exact inverse root: NaN in a tuple, an error alone."""
    params, data, model, loss, _ = make_problem("tanh", "cross_entropy")
    G = cv.gauss_newton(model, params, data, loss="cross_entropy")
    K = cv.kfac(model, params, data, loss="cross_entropy")
    F = cv.empirical_fisher(loss, params, data)
    lam = 1e-2
    got, fisher = cv.compare(G, (K, F), k=3, key=key, num_steps=83, damping=lam)
    g, k = np.asarray(cv.dense(G)), np.asarray(cv.dense(K))
    eye = np.eye(len(g))
    w, v = np.linalg.eigh(k + lam * eye)
    root = (v / np.sqrt(w)) @ v.T
    ends = np.linalg.eigvalsh(root @ (g + lam * eye) @ root)
    alone = np.linalg.eigvalsh(g + lam * eye)
    assert got.condition == pytest.approx(ends[-1] / ends[0], rel=1e-6)
    assert got.reference_condition == pytest.approx(alone[-1] / alone[0], rel=1e-6)
    assert bool(np.all(got.preconditioned_ends.converged))
    assert np.isnan(fisher.condition) and fisher.preconditioned_ends is None  # F: no root
    own = cv.compare(G, F, k=3, key=key, num_steps=83)
    assert fisher.overlap == pytest.approx(own.overlap, abs=1e-12)
    assert fisher.relative_error == pytest.approx(own.relative_error, rel=1e-12)
    assert fisher.relative_error_se == pytest.approx(own.relative_error_se, rel=1e-12)
    with pytest.raises(ValueError, match="no exact inverse square root"):
        cv.compare(G, F, k=3, key=key, damping=lam)

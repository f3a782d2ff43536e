"""Lanczos and eigsh against dense float64 eigendecompositions (ReLU, tanh): exactness, both
ends, honest convergence, breakdowns, scale invariance and eigenvalue derivatives."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_eigs_close, hessian_problem, make_problem
from jax.flatten_util import ravel_pytree

import curvature as cv
from curvature import _driver


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


def _diagonal_operator(values, dtype=jnp.float32):
    d = jnp.asarray(values, dtype)
    return cv.from_function(lambda v: d * v, jnp.zeros_like(d))


def test_eigsh_never_reports_a_missed_eigenvalue_as_converged():
    # The main job's case (tanh, seed 0, step 50): the Hessian's spectrum, whose bottom is
    # -0.08916, -0.08221, -0.07985, -0.07928. Sixty Lanczos steps often converge to -0.07928
    # before -0.07985 has appeared: a small residual, the wrong rank.
    path = Path(__file__).parent / "data" / "main_job_spectrum.npy"
    spectrum = np.load(path).astype(np.float64)
    op = _diagonal_operator(spectrum)
    truth = np.concatenate([spectrum[::-1][:5], spectrum[:5][::-1]])  # "BE": top, then bottom
    tol = 1e-4  # float32 runs of a spectrum whose largest eigenvalue is 0.97

    def wrong_ones(check_steps):
        wrong = []
        for seed in range(16, 28):
            out = cv.eigsh(
                op,
                k=10,
                which="BE",
                num_steps=60,
                key=jax.random.key(seed),
                check_steps=check_steps,
            )
            values, converged = np.asarray(out.eigenvalues, np.float64), np.asarray(out.converged)
            if np.any(converged & (np.abs(values - truth) > tol)):
                wrong.append(seed)
            assert int(out.num_matvecs) == 60 + 10 + (60 if check_steps is None else check_steps)
        return wrong

    # Without the rank check, some runs call a wrong value converged (the test's case is hard)...
    assert len(wrong_ones(0)) >= 2
    # ... with it (the default), none: converged means "the i-th eigenvalue".
    assert wrong_ones(None) == []


def test_eigsh_flags_a_top_eigenvalue_its_start_vector_missed(x64):
    # The top eigenvector is made orthogonal to eigsh's start vector (drawn from the first half
    # of split(key)): Lanczos never sees 1.0 and converges to 0.999, a residual at round-off and
    # the wrong rank. The rank check's own start finds 1.0 and flags the pair.
    n, key = 200, jax.random.key(0)
    start = np.asarray(jax.random.normal(jax.random.split(key)[0], (n,), jnp.float64))
    rng = np.random.default_rng(1)
    top = rng.normal(size=n)
    top -= (top @ start) / (start @ start) * start
    q, _ = np.linalg.qr(np.column_stack([top, rng.normal(size=(n, n - 1))]))
    spectrum = np.concatenate([[1.0, 0.999], np.linspace(-0.5, 0.5, n - 2)])
    op = cv.from_matrix(jnp.asarray(q @ np.diag(spectrum) @ q.T))
    unchecked = cv.eigsh(op, k=1, num_steps=25, key=key, check_steps=0)
    # The premise: without the check the miss is reported as converged.
    assert abs(float(unchecked.eigenvalues[0]) - 0.999) < 1e-10
    assert bool(unchecked.converged[0]) and float(unchecked.residual_norms[0]) < 1e-9
    checked = cv.eigsh(op, k=1, num_steps=25, key=key)
    np.testing.assert_allclose(checked.eigenvalues, unchecked.eigenvalues, rtol=1e-12)
    assert not bool(checked.converged[0])
    # Enough steps from a start that sees it find 1.0, certified.
    other = cv.eigsh(op, k=2, num_steps=40, key=jax.random.key(1))
    np.testing.assert_allclose(other.eigenvalues, [1.0, 0.999], atol=1e-10)
    assert bool(other.converged.all())


def test_eigsh_compiles_once_for_every_k_which_and_steps_in_a_bucket():
    ends = [-2.0, -1.8, -1.6, -1.4, 1.5, 1.7, 1.9, 2.1]
    reference = np.sort(np.concatenate([ends, np.linspace(-0.5, 0.5, 292)]))
    op = _diagonal_operator(reference)
    key = jax.random.key(0)
    cv.eigsh(op, k=3, which="LA", num_steps=36, key=key)
    before = _driver._run_compiled._cache_size()
    for k, which, num_steps in [(4, "SA", 40), (2, "BE", 33), (3, "LM", 38), (1, "LA", 31)]:
        out = cv.eigsh(op, k=k, which=which, num_steps=num_steps, key=key)
        want = {
            "LA": reference[::-1][:k],
            "SA": reference[:k],
            "LM": reference[np.argsort(-np.abs(reference))][:k],
            "BE": np.concatenate([reference[::-1][: (k + 1) // 2], reference[: k // 2][::-1]]),
        }[which]
        assert out.eigenvalues.shape == (k,)
        np.testing.assert_allclose(np.asarray(out.eigenvalues), want, atol=2e-4)
        assert int(out.num_matvecs) == num_steps + k + num_steps
    assert _driver._run_compiled._cache_size() == before
    # lanczos and spectral_density too: num_steps within a bucket reuse the program.
    cv.lanczos(op, num_steps=33, key=key)
    cv.spectral_density(op, num_probes=2, num_steps=33, key=key)
    middle = _driver._run_compiled._cache_size()
    for steps in (31, 36, 40):
        run = cv.lanczos(op, num_steps=steps, key=key)
        assert run.alphas.shape == (steps,) and run.basis.shape == (steps, 300)
        density = cv.spectral_density(op, num_probes=2, num_steps=steps, key=key)
        assert density.nodes.shape == (2, steps)
        np.testing.assert_allclose(np.asarray(density.weights).sum(axis=1), 1.0, rtol=1e-5)
    assert _driver._run_compiled._cache_size() == middle

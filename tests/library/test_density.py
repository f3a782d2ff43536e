"""Stochastic Lanczos quadrature against the dense spectrum: the probes' trace, exact moments
with full steps, a density that integrates to one, and negative mass without exact zeros."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import dense_hessian, make_problem

import curvature as cv


@pytest.fixture(scope="module")
def problem():
    with jax.enable_x64(True):
        params, data, _, loss, _ = make_problem("tanh", "cross_entropy")
        op = cv.hessian(loss, params, data)
        yield op, np.asarray(dense_hessian(loss, params, data))


def test_slq_trace_equals_hutchinson_with_same_probes(x64, problem, key):
    op, _ = problem
    slq = cv.spectral_density(op, num_probes=6, num_steps=20, key=key)
    hutch = cv.trace(op, num_matvecs=6, key=key, method="hutchinson")
    result = slq.trace()
    # The estimate type of cv.trace, with the products it took.
    assert isinstance(result, cv.TraceResult) and isinstance(slq.mass_below(), cv.TraceResult)
    assert result.num_matvecs == 6 * 20 == slq.mass_below().num_matvecs
    assert result.value == pytest.approx(float(hutch.value), rel=1e-10)
    assert result.standard_error == pytest.approx(float(hutch.standard_error), rel=1e-8)
    assert np.allclose(np.asarray(slq.weights).sum(1), 1.0, atol=1e-12)


def test_slq_full_steps_reproduces_moments_and_mass(x64, problem, key):
    op, h = problem
    num_probes, n = 4, op.size
    slq = cv.spectral_density(op, num_probes=num_probes, num_steps=n, key=key)
    z = np.asarray(cv.rademacher(key, (num_probes, n), jnp.float64))
    evals, evecs = np.linalg.eigh(h)
    for power in range(8):
        exact = np.mean(np.einsum("pi,ij,pj->p", z, np.linalg.matrix_power(h, power), z)) / n
        got = slq.moment(power).value
        assert got == pytest.approx(exact, rel=1e-8, abs=1e-12 * np.abs(evals).max() ** power)
    # With a full basis the quadrature is the probe's exact spectral measure.
    # (The threshold sits below the exact zero eigenvalues of softmax's shift invariance.)
    overlaps = (z @ evecs) ** 2 / n
    threshold = -1e-6 * np.abs(evals).max()
    mass = slq.mass_below(threshold).value
    assert mass == pytest.approx(np.mean(overlaps[:, evals < threshold].sum(1)), abs=1e-8)
    assert 0 < mass < 1  # a tanh network's Hessian is indefinite


def test_density_integrates_to_one(x64, problem, key):
    op, _ = problem
    slq = cv.spectral_density(op, num_probes=3, num_steps=25, key=key)
    nodes = np.asarray(slq.nodes)
    for sigma in (0.01, 0.1 * np.ptp(nodes)):
        grid, values = slq.density(sigma=sigma, num_points=4000)
        assert np.trapezoid(values, grid) == pytest.approx(1.0, abs=1e-4)
        assert np.all(values >= 0)
    grid, values = slq.density(np.linspace(-1, 1, 11), sigma=0.5)
    assert grid.shape == values.shape == (11,)
    with pytest.raises(ValueError, match="sigma"):
        slq.density(sigma=0.0)


def test_negative_mass_ignores_exact_zero_eigenvalues(key):
    # A positive semi-definite operator with a large null space (like dead ReLUs): no negative
    # mass by default, however the round-off signs of the zero node fall.
    q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(60, 60)))
    psd = q @ np.diag(np.concatenate([np.zeros(40), np.linspace(1, 5, 20)])) @ q.T
    slq = cv.spectral_density(
        cv.from_matrix(jnp.asarray((psd + psd.T) / 2, jnp.float32)),
        num_probes=4,
        num_steps=30,
        key=key,
    )
    assert slq.mass_below()[0] == 0.0
    # With negative eigenvalues it counts them (a quarter of the spectrum here).
    shifted = q @ np.diag(np.concatenate([np.zeros(30), -np.ones(15), np.linspace(1, 5, 15)])) @ q.T
    slq = cv.spectral_density(
        cv.from_matrix(jnp.asarray((shifted + shifted.T) / 2, jnp.float32)),
        num_probes=8,
        num_steps=30,
        key=key,
    )
    mass, error, _ = slq.mass_below()
    assert abs(mass - 0.25) <= 4 * error + 1e-6


def test_trace_function_and_logdet_against_the_dense_gauss_newton(x64, key):
    """tr f(A) by SLQ: exact per probe with a full basis; log det(G + damping I) of a
    positive semi-definite Gauss-Newton matrix within its stated error over seeds; an
    indefinite Hessian is refused with the damping that would lift it."""
    params, data, model, loss, _ = make_problem("tanh", "cross_entropy")
    G = cv.gauss_newton(model, params, data, loss="cross_entropy")
    g = np.asarray(cv.dense(G), np.float64)
    n, damping = G.size, 0.1
    evals, evecs = np.linalg.eigh(g + damping * np.eye(n))
    log_g = evecs @ np.diag(np.log(evals)) @ evecs.T
    # A full basis: each probe's quadrature is exact, so the estimate is Hutchinson's on the
    # same probes, z^T log(G + damping I) z averaged.
    full = cv.trace_function(G, np.log, num_probes=4, num_steps=n, key=key, shift=damping)
    z = np.asarray(cv.rademacher(key, (4, n), jnp.float64))
    per_probe = np.einsum("pi,ij,pj->p", z, log_g, z)
    assert full.value == pytest.approx(per_probe.mean(), rel=1e-9)
    assert full.standard_error == pytest.approx(per_probe.std(ddof=1) / 2, rel=1e-7)
    assert full.num_matvecs == 4 * n
    # The shift is free: logdet is trace_function(log) with the damping as shift.
    same = cv.logdet(G, num_probes=4, num_steps=n, key=key, damping=damping)
    assert same.value == full.value and same.standard_error == full.standard_error
    # 20 of 83 steps: unbiased within the stated error bar over seeds (the quadrature error is
    # far below it), and the stated error is the actual spread.
    exact = np.sum(np.log(evals))
    runs = [
        cv.logdet(G, num_probes=8, num_steps=20, key=jax.random.key(s), damping=damping)
        for s in range(16)
    ]
    values = np.array([r.value for r in runs])
    errors = np.array([r.standard_error for r in runs])
    assert np.mean(np.abs(values - exact) <= 3 * errors) >= 0.85
    rms = np.sqrt(np.mean(errors**2))
    bias_z = abs(values.mean() - exact) / (rms / np.sqrt(len(runs)))
    assert bias_z < 4, bias_z
    assert 0.6 < np.std(values, ddof=1) / rms < 1.5
    # An indefinite Hessian has no logarithm: refused, naming the damping that would lift it.
    H = cv.hessian(loss, params, data)
    with pytest.raises(ValueError, match="not positive definite.*use a damping above"):
        cv.logdet(H, num_probes=2, num_steps=20, key=key)
    with pytest.raises(ValueError, match="f must map an array of Ritz values"):
        cv.trace_function(G, np.sum, num_probes=2, num_steps=5, key=key)

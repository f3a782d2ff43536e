"""Diagonal preconditioners against the curvature: correlations of diagonals with exact zeros
excluded and counted, and the preconditioned operator P^-1/2 H P^-1/2 against dense algebra."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import dense_hessian, make_problem

import curvature as cv


@pytest.fixture(scope="module")
def problem():
    """tanh MLP 4-6-5-3 (n = 83, float64) whose first input is constantly 0: the 6 weights on it
    have an exact zero row and column of H (and of G and F); with its dense Hessian."""
    with jax.enable_x64(True):
        params, data, model, loss, output_loss = make_problem("tanh", "cross_entropy")
        data = {"x": data["x"].at[:, 0].set(0.0), "y": data["y"]}
        dense = np.asarray(dense_hessian(loss, params, data))
    return params, data, model, loss, output_loss, dense


def _brute_ranks(x):
    """Average ranks the slow way: 1 + (# smaller) + (# equal - 1) / 2."""
    x = np.asarray(x)
    return np.array([1 + np.sum(x < v) + (np.sum(x == v) - 1) / 2 for v in x])


def _reference(estimate, exact):
    keep = exact != 0
    x, y = estimate[keep], exact[keep]
    pos = (x > 0) & (y > 0)
    return (
        np.corrcoef(x, y)[0, 1],
        np.corrcoef(_brute_ranks(x), _brute_ranks(y))[0, 1],
        np.corrcoef(np.log(x[pos]), np.log(y[pos]))[0, 1],
        int(keep.sum()),
        int((~keep).sum()),
        int(np.sum(~keep & (estimate == 0))),
    )


def _check(c: cv.DiagonalCorrelation, estimate, exact):
    pearson, spearman, log_pearson, compared, zeros, both = _reference(estimate, exact)
    assert c.pearson == pytest.approx(pearson, rel=1e-12)
    assert c.spearman == pytest.approx(spearman, rel=1e-12)
    assert c.log_pearson == pytest.approx(log_pearson, rel=1e-12)
    assert (c.num_compared, c.num_zeros, c.num_both_zero) == (compared, zeros, both)
    assert c.num_log == int(np.sum((estimate > 0) & (exact > 0)))


def test_correlations_of_diagonals_against_numpy_per_layer_with_exact_zeros(x64, problem):
    params, data, _, loss, _, dense = problem
    H = cv.hessian(loss, params, data)
    exact = np.diag(dense)
    # The empirical Fisher diagonal by hand (mean squared per-example gradient), rounded so that
    # it has ties, as the estimate.
    per = jax.vmap(lambda x, y: H.ravel(jax.grad(loss)(params, {"x": x[None], "y": y[None]})))(
        data["x"], data["y"]
    )
    estimate = np.round(np.asarray(jnp.mean(per**2, axis=0)), 3)
    assert len(np.unique(estimate)) < len(estimate) - 5  # ties to average
    zero = exact == 0
    assert zero.sum() == 6 and np.all(estimate[zero] == 0)  # the weights on the constant input

    out = cv.compare_diagonals(H.unravel(estimate), H.unravel(exact))
    _check(out.overall, estimate, exact)
    assert out.overall.num_zeros == out.overall.num_both_zero == 6
    # Left in, the zeros make a log-log correlation of anything look good; out, it is honest.
    assert out.overall.num_log == H.size - 6 - int(np.sum(exact < 0))
    # One group per layer (weight and bias), in order: the zeros all in the first.
    assert list(out.groups) == ["0", "1", "2"]
    start = 0
    for name, size in zip(out.groups, (24 + 6, 30 + 5, 15 + 3), strict=True):
        part = slice(start, start + size)
        _check(out.groups[name], estimate[part], exact[part])
        start += size
    assert [g.num_zeros for g in out.groups.values()] == [6, 0, 0]

    # Flat vectors: the same numbers; groups as masks or index arrays.
    flat = cv.compare_diagonals(
        estimate, exact, groups={"first": np.arange(30), "rest": np.arange(H.size) >= 30}
    )
    assert flat.overall == out.overall
    assert flat.groups["first"] == out.groups["0"]
    _check(flat.groups["rest"], estimate[30:], exact[30:])
    assert cv.compare_diagonals(estimate, exact).groups == {}
    # Selectors as in restrict: a callable on (path, leaf).
    kernels = cv.compare_diagonals(
        H.unravel(estimate), H.unravel(exact), groups={"w": lambda path, leaf: leaf.ndim == 2}
    )
    # Leaves in pytree order: each layer's bias "b", then its weight "w".
    w = np.concatenate(
        [np.zeros(6), np.ones(24), np.zeros(5), np.ones(30), np.zeros(3), np.ones(15)]
    )
    _check(kernels.groups["w"], estimate[w == 1], exact[w == 1])


def test_compare_diagonals_rejects_mismatches_and_reports_degenerate_cases():
    with pytest.raises(ValueError, match="structure"):
        cv.compare_diagonals({"a": np.ones(3)}, {"b": np.ones(3)})
    with pytest.raises(ValueError, match="shape"):
        cv.compare_diagonals({"a": np.ones(3)}, {"a": np.ones(4)})
    with pytest.raises(ValueError, match="NaN"):
        cv.compare_diagonals(np.array([1.0, np.nan, 2.0]), np.ones(3))
    # All zero: nothing to correlate, every entry counted.
    c = cv.compare_diagonals(np.zeros(4), np.zeros(4)).overall
    assert np.isnan(c.pearson) and np.isnan(c.spearman) and np.isnan(c.log_pearson)
    assert (c.num_compared, c.num_zeros, c.num_both_zero, c.num_log) == (0, 4, 4, 0)
    # A monotone but nonlinear relation: Spearman 1, Pearson below.
    x = np.linspace(0.1, 3.0, 20)
    c = cv.compare_diagonals(x**4, x).overall
    assert c.spearman == pytest.approx(1.0) and c.pearson < 0.95
    assert c.log_pearson == pytest.approx(1.0)


def test_preconditioned_operator_against_dense_and_its_spectrum_against_eigh(x64, key, problem):
    params, data, model, loss, output_loss, dense = problem
    H = cv.hessian(loss, params, data)
    n = H.size
    p = np.asarray(jax.random.uniform(jax.random.fold_in(key, 1), (n,), minval=0.05, maxval=3.0))
    want = dense / np.sqrt(np.outer(p, p))
    S = cv.preconditioned(H, p)
    assert S.shape == (n, n) and S.layout == H.layout
    np.testing.assert_allclose(cv.dense(S), want, atol=1e-10)  # compiled, prepared inside
    v = np.asarray(jax.random.normal(jax.random.fold_in(key, 2), (n,)))
    np.testing.assert_allclose(S @ v, want @ v, atol=1e-10)
    np.testing.assert_allclose(S.prepared() @ v, want @ v, atol=1e-10)  # held pullback
    # A parameter-shaped pytree as P gives the same operator.
    np.testing.assert_allclose(cv.preconditioned(H, H.unravel(p)) @ v, want @ v, atol=1e-10)
    # The estimators accept it (eigsh below), and a preconditioned G keeps G's fast exact diagonal.
    G = cv.gauss_newton(model, params, data, loss=output_loss)
    g_diag = np.asarray(cv.diagonal(G, method="exact").diagonal)
    np.testing.assert_allclose(
        cv.diagonal(cv.preconditioned(G, p), method="exact").diagonal, g_diag / p, rtol=1e-10
    )

    # Both ends, the mean eigenvalue and the condition number, raw and preconditioned.
    out = cv.compare_conditioning(H, p, k=3, num_steps=n, key=key)
    diag = np.diag(dense)
    for got, matrix in ((out.original, dense), (out.preconditioned, want)):
        eig = np.linalg.eigvalsh(matrix)
        np.testing.assert_allclose(got.top, eig[::-1][:3], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(got.bottom, eig[:3], rtol=1e-8, atol=1e-10)
        assert got.num_nonzero == n - 6  # the constant input's weights
        assert got.mean == pytest.approx(np.trace(matrix) / (n - 6), rel=1e-10)
        assert got.condition == pytest.approx(eig[-1] / got.mean, rel=1e-8)
        assert got.num_matvecs == n + 6
    assert out.improvement == pytest.approx(out.original.condition / out.preconditioned.condition)
    # The exact diagonal given as a pytree: the same numbers.
    alone = cv.conditioning(S, k=3, num_steps=n, key=key, diagonal=H.unravel(diag / p))
    assert alone.mean == pytest.approx(out.preconditioned.mean, rel=1e-12)
    np.testing.assert_allclose(alone.eigenvalues, out.preconditioned.eigenvalues, rtol=1e-12)
    # Without it, from unit vectors: Jacobi scaling by |diag H| makes every nonzero diagonal
    # entry ±1, so the mean eigenvalue is the mean of those signs.
    jacobi = np.where(diag != 0, np.abs(diag), 1.0)
    J = cv.conditioning(cv.preconditioned(H, jacobi), k=3, num_steps=n, key=key)
    assert J.mean == pytest.approx(np.mean(np.sign(diag[diag != 0])), rel=1e-10)


def test_preconditioned_inside_jit_and_rejects_a_bad_diagonal(x64, key, problem):
    params, data, _, loss, _, dense = problem
    H = cv.hessian(loss, params, data)
    p = jnp.linspace(0.5, 2.0, H.size)
    v = jnp.cos(jnp.arange(H.size))
    # Built from traced operands (no host check) and prepared inside the compiled program.
    got = jax.jit(lambda H, p, v: cv.preconditioned(H, p).prepared().apply(v))(H, p, v)
    np.testing.assert_allclose(got, dense / np.sqrt(np.outer(p, p)) @ v, atol=1e-10)
    for bad in (jnp.zeros(H.size), -p, p.at[3].set(jnp.nan)):
        with pytest.raises(ValueError, match="positive"):
            cv.preconditioned(H, bad)
    with pytest.raises(ValueError):
        cv.preconditioned(H, jnp.ones(H.size + 1))

"""Trace, diagonal and Frobenius estimators against exact values, judged by their own standard
errors over many seeds; several operators on shared probes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import dense_hessian, make_problem

import curvature as cv

SEEDS = 100


@pytest.fixture(scope="module")
def problem():
    with jax.enable_x64(True):
        params, data, _, loss, _ = make_problem("tanh", "cross_entropy")
        op = cv.hessian(loss, params, data)
        yield op, np.asarray(dense_hessian(loss, params, data))


def coverage(estimates, errors, exact):
    """Share of runs within 3 standard errors, the bias in units of its standard error, and the
    spread of the estimates over seeds divided by the RMS of the stated standard errors (about 1
    for an honest error bar: both a too-small and a too-large error bar fail)."""
    estimates, errors = np.asarray(estimates), np.asarray(errors)
    within = np.abs(estimates - exact) <= 3 * errors + 1e-12 * np.abs(exact).max()
    rms_error = np.sqrt(np.mean(errors**2, 0)) + 1e-300
    bias_z = np.abs(estimates.mean(0) - exact) / (rms_error / np.sqrt(len(estimates)))
    spread = np.std(estimates, axis=0, ddof=1) / rms_error
    return within.mean(), bias_z, spread


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_within_stated_error(x64, problem, method):
    op, h = problem
    runs = [
        cv.trace(op, num_matvecs=30, key=jax.random.key(s), method=method) for s in range(SEEDS)
    ]
    share, bias_z, spread = coverage(
        [r.value for r in runs], [r.standard_error for r in runs], np.trace(h)
    )
    assert share >= 0.9, share
    assert bias_z < 4, bias_z  # an estimator biased by a few standard errors fails here
    assert 0.75 < spread < 1.33, spread  # the stated error is the actual error
    assert all(int(r.num_matvecs) == 30 for r in runs)


def test_hutchpp_beats_hutchinson_on_decaying_spectrum(x64):
    n = 200
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(n, n)))
    matrix = q @ np.diag(np.arange(1, n + 1, dtype=float) ** -2.0) @ q.T
    op, exact = cv.from_matrix(jnp.asarray(matrix)), np.trace(matrix)

    def rms(method):
        est = [
            cv.trace(op, num_matvecs=60, key=jax.random.key(s), method=method).value
            for s in range(40)
        ]
        return float(np.sqrt(np.mean((np.asarray(est) - exact) ** 2)))

    hutchinson, hutchpp = rms("hutchinson"), rms("hutch++")
    assert hutchinson >= 10 * hutchpp, (hutchinson, hutchpp)


def test_diagonal_within_stated_error(x64, problem):
    op, h = problem
    runs = [cv.diagonal(op, num_matvecs=30, key=jax.random.key(s)) for s in range(SEEDS // 2)]
    share, bias_z, spread = coverage(
        [r.diagonal for r in runs], [r.standard_error for r in runs], np.diag(h)
    )
    assert 0.8 < np.median(spread) < 1.25, np.median(spread)
    assert share >= 0.9, share
    assert np.mean(bias_z < 4) >= 0.95
    assert runs[0].diagonal.shape == (op.size,)


def test_frobenius_within_stated_error(x64, problem):
    op, h = problem
    runs = [
        cv.frobenius_norm_squared(op, num_matvecs=20, key=jax.random.key(s)) for s in range(SEEDS)
    ]
    share, bias_z, spread = coverage(
        [r.value for r in runs], [r.standard_error for r in runs], np.sum(h**2)
    )
    assert share >= 0.9 and bias_z < 4 and 0.75 < spread < 1.33, (share, bias_z, spread)


def shared_problem(activation="tanh"):
    params, data, model, loss, _ = make_problem(activation, "cross_entropy")
    H = cv.hessian(loss, params, data)
    G = cv.gauss_newton(model, params, data, loss="cross_entropy")
    return H, G


def same(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("probe_batch_size", [None, 7, 64])
def test_shared_probes_give_each_operator_its_own_numbers(x64, key, probe_batch_size):
    # With the same key, an operator's estimate among others is exactly its estimate alone
    # (Hutch++: the first operator's, whose sketch the others share). Probes one at a time (the
    # default), in blocks of 7 (a shorter last block) and all in one block; the other
    # estimators share the Monte Carlo body, checked with the default blocks.
    H, G = shared_problem()
    R = H - G
    kw = dict(key=key, probe_batch_size=probe_batch_size)
    estimators = [(cv.trace, dict(num_matvecs=30, method="hutchinson"))]
    if probe_batch_size is None:
        estimators += [
            (cv.frobenius_norm_squared, dict(num_matvecs=12)),
            (cv.diagonal, dict(num_matvecs=12)),
        ]
    for estimator, options in estimators:
        together = estimator((H, G, R), **options, **kw)
        for op, result in zip((H, G, R), together, strict=True):
            assert same(result, estimator(op, **options, **kw)), estimator.__name__
    if probe_batch_size is not None:
        return
    together = cv.trace((H, G, R), num_matvecs=30, **kw)
    assert same(together[0], cv.trace(H, num_matvecs=30, **kw))
    # Several statistics on one set of probes: the same numbers as each alone.
    both = cv.hutchinson((H, R), ("diagonal", "trace"), num_matvecs=12, **kw)
    for op, d, t in zip((H, R), both["diagonal"], both["trace"], strict=True):
        assert same(d, cv.diagonal(op, num_matvecs=12, **kw))
        assert same(t, cv.trace(op, num_matvecs=12, method="hutchinson", **kw))


def test_shared_probes_are_linear_and_honest(x64, key):
    H, G = shared_problem()
    h, g = (np.asarray(cv.dense(op), np.float64) for op in (H, G))
    # Hutchinson on shared probes: tr H - tr G is tr(H - G), to round-off.
    tr_h, tr_g, tr_r = cv.trace((H, G, H - G), num_matvecs=20, key=key, method="hutchinson")
    assert float(tr_h.value - tr_g.value) == pytest.approx(float(tr_r.value), abs=1e-12)
    # Hutch++ with H's sketch: every estimate unbiased within its own error, over seeds.
    runs = [cv.trace((H, G, H - G), num_matvecs=30, key=jax.random.key(s)) for s in range(60)]
    for k, exact in enumerate((np.trace(h), np.trace(g), np.trace(h - g))):
        share, bias_z, spread = coverage(
            [r[k].value for r in runs], [r[k].standard_error for r in runs], exact
        )
        assert share >= 0.85 and bias_z < 4 and 0.7 < spread < 1.4, (k, share, bias_z, spread)
    # The mean of the diagonal is tr / n exactly, from the same probes.
    out = cv.hutchinson(H, ("diagonal", "trace"), num_matvecs=16, key=key)
    assert float(jnp.sum(out["diagonal"].diagonal)) == pytest.approx(
        float(out["trace"].value), rel=1e-12
    )
    with pytest.raises(ValueError, match="statistics must be distinct names among"):
        cv.hutchinson(H, ("trace", "variance"), num_matvecs=4, key=key)
    with pytest.raises(ValueError, match="operators on shared probes need one layout"):
        cv.trace((H, cv.from_matrix(jnp.eye(3))), num_matvecs=4, key=key)


def test_shared_products_multiply_each_operator_once(x64, key):
    # Streamed operators count their passes over the data: (H, G, H - G) costs the passes of H
    # and G alone, the residual's products being their difference.
    params, data, model, loss, _ = make_problem("relu", "cross_entropy")
    passes = {"H": 0, "G": 0}

    def loader(name):
        def batches():
            passes[name] += 1
            yield data

        return batches

    H = cv.hessian(loss, params, loader("H"))
    G = cv.gauss_newton(model, params, loader("G"), loss="cross_entropy")
    passes.update(H=0, G=0)
    cv.frobenius_norm_squared((H, G, H - G), num_matvecs=6, key=key)
    assert passes == {"H": 6, "G": 6}
    passes.update(H=0, G=0)
    out = cv.trace((H, G, H - G), num_matvecs=12, key=key)  # Hutch++: H sketches alone
    assert passes == {"H": 12, "G": 8}
    assert [int(r.num_matvecs) for r in out] == [12, 8, 8]  # what each one's products were
    passes.update(H=0, G=0)
    cv.frobenius_norm_squared((H, G, H - G), num_matvecs=6, key=key, probe_batch_size=3)
    assert passes == {"H": 2, "G": 2}  # a block of probes is one pass
    in_memory = cv.frobenius_norm_squared(
        (
            cv.hessian(loss, params, data),
            cv.gauss_newton(model, params, data, loss="cross_entropy"),
        ),
        num_matvecs=6,
        key=key,
    )
    streamed = cv.frobenius_norm_squared((H, G), num_matvecs=6, key=key)
    for a, b in zip(in_memory, streamed, strict=True):
        np.testing.assert_allclose(b.value, a.value, rtol=1e-10)

"""Blocks of H, G and R = H - G against the dense float64 Hessian's blocks, ReLU and tanh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_problem

import curvature as cv
from curvature import _driver


def operators(activation):
    params, data, model, loss, _ = make_problem(activation, "cross_entropy")
    H = cv.hessian(loss, params, data, batch_size=5)
    G = cv.gauss_newton(model, params, data, loss="cross_entropy")
    return params, {"H": H, "G": G, "R": H - G}


def index_of(params, mask):
    """Flat indices of the leaves ``mask`` selects."""
    sizes = [x.size for x in jax.tree_util.tree_leaves(params)]
    starts = np.cumsum([0] + sizes)
    if not isinstance(mask, list) or not all(isinstance(m, bool) for m in mask):
        mask = jax.tree_util.tree_leaves(mask)  # a selector pytree
    return np.concatenate(
        [np.arange(starts[i], starts[i + 1]) for i, keep in enumerate(mask) if keep]
    )


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_every_block_equals_the_dense_submatrix(x64, activation):
    params, ops = operators(activation)
    groups = cv.layer_groups(params)
    assert list(groups) == ["0", "1", "2"]  # three layers, weight and bias each
    # Every block of H, G and R for ReLU; for tanh, R's same-layer diagonals below (the blocks
    # are the same code).
    R = np.asarray(cv.dense(ops["R"]), np.float64)
    for name, op in ops.items() if activation == "relu" else []:
        full = R if name == "R" else np.asarray(cv.dense(op), np.float64)
        total = 0.0
        for rows in groups.values():
            r = index_of(params, rows)
            block = np.asarray(cv.dense(cv.restrict(op, rows)))
            assert np.allclose(block, full[np.ix_(r, r)], atol=1e-12), name
            total += np.trace(block)
            for cols in groups.values() if name == "R" else ():  # off-diagonal: R's suffice
                c = index_of(params, cols)
                if cols != rows:
                    off = cv.restrict(op, rows, cols)
                    assert off.shape == (len(r), len(c))
                    assert np.allclose(np.asarray(cv.dense(off)), full[np.ix_(r, c)], atol=1e-12)
        # Per-layer traces add up to the total.
        assert total == pytest.approx(np.trace(full), rel=1e-10, abs=1e-12)
    # ReLU: the residual's same-layer blocks have a zero diagonal (so a zero trace) while its
    # cross-layer blocks do not vanish; tanh adds same-layer terms in the hidden layers. The
    # read-out layer enters linearly: a zero diagonal for both.
    for name, rows in groups.items():
        r = index_of(params, rows)
        same = np.max(np.abs(np.diag(R[np.ix_(r, r)])))
        assert (same < 1e-12) == (activation == "relu" or name == "2"), (name, same)
    r0, r1 = index_of(params, groups["0"]), index_of(params, groups["1"])
    assert np.max(np.abs(R[np.ix_(r0, r1)])) > 1e-3  # cross-layer curvature, for ReLU too


def test_selectors_estimators_and_vectors_on_a_block(x64, key):
    params, ops = operators("tanh")
    H = ops["H"]
    full = np.asarray(cv.dense(H), np.float64)
    by_callable = cv.restrict(H, lambda path, leaf: path[0].idx == 1)  # layer 1: w and b
    by_tree = cv.restrict(
        H, [{"b": False, "w": False}, {"b": True, "w": True}, {"b": False, "w": False}]
    )
    r = index_of(params, [False, False, True, True, False, False])
    sub = full[np.ix_(r, r)]
    assert np.allclose(np.asarray(cv.dense(by_callable)), sub) and np.allclose(
        np.asarray(cv.dense(by_tree)), sub
    )
    top = cv.eigsh(by_callable, k=2, num_steps=by_callable.size, key=key)
    assert np.allclose(top.eigenvalues, np.linalg.eigvalsh(sub)[::-1][:2], rtol=1e-8)
    tr = cv.trace(by_callable, num_matvecs=30, key=key)
    assert abs(float(tr.value) - np.trace(sub)) < 4 * float(tr.standard_error) + 1e-10
    assert np.allclose(cv.diagonal(by_callable, method="exact").diagonal, np.diag(sub))
    density = cv.spectral_density(by_callable, num_probes=2, num_steps=10, key=key)
    assert density.nodes.shape == (2, 10)
    # Vectors of the block map to pytrees with None for the leaves left out.
    tree = by_callable.unravel(jnp.arange(by_callable.size, dtype=jnp.float64))
    assert tree[0] == {"b": None, "w": None} and tree[1]["w"].shape == params[1]["w"].shape
    assert np.array_equal(by_callable.ravel(tree), np.arange(by_callable.size))
    # An off-diagonal block: Frobenius norm only, and a clear error elsewhere.
    layers = list(cv.layer_groups(params).values())
    rows, cols = layers[0], layers[1]
    off = cv.restrict(H, rows, cols)
    want = full[np.ix_(index_of(params, rows), index_of(params, cols))]
    fro = cv.frobenius_norm_squared(off, num_matvecs=200, key=key)
    assert abs(float(fro.value) - np.sum(want**2)) < 4 * float(fro.standard_error)
    with pytest.raises(
        ValueError, match="eigsh needs a square, symmetric operator; this is an off-diagonal block"
    ):
        cv.eigsh(off, k=1, key=key)
    with pytest.raises(ValueError, match="rows selects no parameter leaf"):
        cv.restrict(H, lambda path, leaf: False)
    with pytest.raises(
        ValueError, match="a selector is a pytree of bools shaped like the parameters"
    ):
        cv.restrict(H, [True, False])


def test_block_summary_against_dense_blocks(x64, key):
    params, ops = operators("relu")
    R = ops["R"]
    full = np.asarray(cv.dense(R), np.float64)
    summary = cv.block_summary(R, key=key, num_matvecs=64, num_steps=20)
    groups = cv.layer_groups(params)
    assert summary.names == ("0", "1", "2")
    for i, rows in enumerate(groups.values()):
        r = index_of(params, rows)
        assert summary.sizes[i] == len(r)
        block = full[np.ix_(r, r)]
        # A ReLU network's same-layer residual has a zero diagonal: a zero trace, within error.
        assert abs(summary.trace[i] - np.trace(block)) <= 4 * summary.trace_se[i] + 1e-10
        assert summary.top[i] == pytest.approx(np.linalg.eigvalsh(block)[-1], rel=1e-6, abs=1e-9)
        for j, cols in enumerate(groups.values()):
            want = np.sum(full[np.ix_(r, index_of(params, cols))] ** 2)
            got, se = summary.frobenius_sq[i, j], summary.frobenius_sq_se[i, j]
            assert abs(got - want) <= 4 * se + 1e-12, (i, j, got, want, se)
    # The table adds up to the whole squared norm, within the combined error.
    total_se = np.sqrt(np.sum(summary.frobenius_sq_se**2))
    assert abs(summary.frobenius_sq.sum() - np.sum(full**2)) <= 4 * total_se


def test_block_densities_are_the_dense_blocks_spectra(x64, key):
    # With as many Lanczos steps as the block has rows, SLQ is exact per probe: each block's
    # density has the probes' trace (Hutchinson's with the same key) and nodes in its spectrum.
    params, ops = operators("tanh")
    H = ops["H"]
    full = np.asarray(cv.dense(H), np.float64)
    groups = cv.layer_groups(params)
    densities = cv.block_densities(H, key=key, num_probes=6, num_steps=100)
    keys = jax.random.split(key, len(groups))
    assert tuple(densities) == tuple(groups)
    for k, (name, rows) in zip(keys, groups.items(), strict=True):
        r = index_of(params, rows)
        eigs = np.linalg.eigvalsh(full[np.ix_(r, r)])
        d = densities[name]
        hutch = cv.trace(cv.restrict(H, rows), num_matvecs=6, key=k, method="hutchinson")
        np.testing.assert_allclose(d.trace()[0], hutch.value, rtol=1e-8)
        nodes = np.asarray(d.nodes)[np.asarray(d.weights) > 1e-12]
        assert nodes.min() >= eigs[0] - 1e-8 and nodes.max() <= eigs[-1] + 1e-8
        assert np.isclose(nodes.max(), eigs[-1], rtol=1e-6)  # the extremes are found exactly


def test_every_group_runs_in_one_program_compiled_once_whatever_the_partition(x64, key):
    # Two partitions of the parameters into three groups (per layer; weights apart from biases),
    # for the summary's top eigenvalues and the block densities: after the first, nothing
    # compiles; every group's numbers are those of its block on its own.
    params, ops = operators("tanh")
    H = ops["H"]
    full = np.asarray(cv.dense(H), np.float64)
    by_layer = cv.layer_groups(params)
    cv.block_summary(H, by_layer, key=key, num_matvecs=4, num_steps=12)
    cv.block_densities(H, by_layer, key=key, num_probes=2, num_steps=12)
    before = _driver._run_compiled._cache_size()
    others = {
        "weights": lambda path, leaf: leaf.ndim == 2 and leaf.shape[0] < 5,
        "biases": lambda path, leaf: leaf.ndim == 1,
        "rest": lambda path, leaf: leaf.ndim == 2 and leaf.shape[0] >= 5,
    }
    summary = cv.block_summary(H, others, key=key, num_matvecs=4, num_steps=12)
    densities = cv.block_densities(H, others, key=key, num_probes=2, num_steps=12)
    assert _driver._run_compiled._cache_size() == before
    keys = jax.random.split(key, 3)
    for g, (name, selector) in enumerate(others.items()):
        block = cv.restrict(H, selector)
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        r = index_of(params, [bool(selector(path, leaf)) for path, leaf in flat])
        top = np.linalg.eigvalsh(full[np.ix_(r, r)])[-1]
        alone = cv.eigsh(block, k=1, num_steps=min(12, block.size), key=_top_key(key, g))
        np.testing.assert_allclose(summary.top[g], alone.eigenvalues[0], rtol=1e-10)
        assert summary.converged[g] == bool(alone.converged[0])
        if summary.converged[g]:
            assert summary.top[g] == pytest.approx(top, rel=1e-6)
        steps = min(12, block.size)
        solo = cv.spectral_density(block, num_probes=2, num_steps=steps, key=keys[g])
        np.testing.assert_allclose(densities[name].nodes, solo.nodes, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(densities[name].weights, solo.weights, rtol=1e-9, atol=1e-12)


def _top_key(key, g):
    return jax.random.fold_in(jax.random.fold_in(key, 0x70B), g)


def test_blocks_of_parameters_of_mixed_dtypes(x64, key):
    # float32 weights beside float64 biases: the operator (and every block) computes in float64,
    # and the Lanczos estimators run on a block that holds float32 leaves only.
    params, data, _, loss, _ = make_problem("tanh", "mse")
    mixed = [{"b": layer["b"], "w": layer["w"].astype(jnp.float32)} for layer in params]
    H = cv.hessian(loss, mixed, data)
    weights = cv.restrict(H, lambda path, leaf: leaf.dtype == jnp.float32)
    assert weights.dtype == H.dtype == jnp.float64
    dense = np.asarray(cv.dense(weights))
    top = cv.eigsh(weights, k=2, num_steps=weights.size, key=key)
    np.testing.assert_allclose(top.eigenvalues, np.linalg.eigvalsh(dense)[::-1][:2], rtol=1e-6)
    assert (
        cv.spectral_density(weights, num_probes=2, num_steps=10, key=key).nodes.dtype == jnp.float64
    )
    cv.power_iteration(weights, k=1, key=key, max_steps=20)


def test_same_group_share_against_dense_blocks(x64, key):
    """The share of ||R||_F^2 in same-layer blocks: 0 for ReLU (R lives in cross-layer blocks),
    the dense share within the stated error for tanh."""
    for activation in ("relu", "tanh"):
        params, ops = operators(activation)
        full = np.asarray(cv.dense(ops["R"]), np.float64)
        summary = cv.block_summary(ops["R"], key=key, num_matvecs=64, num_steps=0)
        share, se = summary.same_group_share()
        same = sum(
            np.sum(full[np.ix_(r, r)] ** 2)
            for r in (index_of(params, g) for g in cv.layer_groups(params).values())
        )
        want = same / np.sum(full**2)
        if activation == "relu":
            assert want < 1e-20 and abs(share) < 1e-12, (want, share)
        else:
            assert 0.05 < want < 0.95 and se > 0
            assert abs(share - want) <= 4 * se, (share, want, se)


def test_block_eigenvalues_are_each_blocks_top_eigenvalues(x64, key):
    # Top 3 of every layer's block of a ReLU network's H: the dense blocks' eigenvalues, the
    # Ritz pairs eigsh finds on the first block alone (same key). The top 2 of the layers in
    # another order run the same compiled program.
    params, ops = operators("relu")
    H = ops["H"]
    full = np.asarray(cv.dense(H), np.float64)
    groups = cv.layer_groups(params)
    result = cv.block_eigenvalues(H, key=key, k=3, num_steps=40)
    assert result.names == tuple(groups)
    before = _driver._run_compiled._cache_size()
    reordered = dict(reversed(groups.items()))
    again = cv.block_eigenvalues(H, reordered, key=key, k=2, num_steps=40)
    assert _driver._run_compiled._cache_size() == before
    for g, rows in enumerate(groups.values()):
        r = index_of(params, rows)
        want = np.linalg.eigvalsh(full[np.ix_(r, r)])[::-1][:3]
        assert result.sizes[g] == len(r)
        assert np.all(result.converged[g])
        np.testing.assert_allclose(result.eigenvalues[g], want, rtol=1e-6, atol=1e-9)
        assert np.all(result.residual_norms[g] <= 1e-6 * max(1.0, abs(want[0])))
        if g == 0:
            block = cv.restrict(H, rows)
            alone = cv.eigsh(block, k=3, num_steps=min(40, block.size), key=_top_key(key, g))
            np.testing.assert_allclose(result.eigenvalues[g], alone.eigenvalues, rtol=1e-9)
        back = len(groups) - 1 - g
        np.testing.assert_allclose(again.eigenvalues[back], want[:2], rtol=1e-6, atol=1e-9)


def test_block_eigenvalues_of_a_block_smaller_than_k(x64, key):
    # The last layer's bias has 3 entries: k = 5 gives its 3 eigenvalues and two NaN, unconverged.
    params, ops = operators("tanh")
    H = ops["H"]
    leaves = jax.tree_util.tree_leaves(params)
    mask = [leaf.shape == (3,) for leaf in leaves]
    assert sum(mask) == 1
    small = {"bias": lambda path, leaf: leaf.shape == (3,)}
    result = cv.block_eigenvalues(H, small, key=key, k=5, num_steps=10)
    r = index_of(params, mask)
    want = np.linalg.eigvalsh(np.asarray(cv.dense(H), np.float64)[np.ix_(r, r)])[::-1]
    np.testing.assert_allclose(result.eigenvalues[0, : len(r)], want, rtol=1e-6, atol=1e-9)
    assert np.all(np.isnan(result.eigenvalues[0, len(r) :]))
    assert not np.any(result.converged[0, len(r) :])

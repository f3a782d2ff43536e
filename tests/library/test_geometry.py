"""Loss landscapes, gradient overlap and Jensen-Shannon distances against direct float64
references on a small ReLU and tanh MLP (31 parameters)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import dense_hessian, make_problem

import curvature as cv
from curvature import density as density_module
from curvature import geometry

SIZES = (3, 4, 3)  # 3*4 + 4 + 4*3 + 3 = 31 parameters


def problem(activation, dtype=jnp.float64):
    with jax.enable_x64(True):
        return make_problem(activation, "cross_entropy", sizes=SIZES, dtype=dtype)


def direct_losses(loss, params, data, directions, points):
    """The loss at ``params + sum_k c_k d_k`` for every row ``c`` of ``points``, one call each."""
    out = []
    for c in points:
        moved = jax.tree_util.tree_map(
            lambda x, *ds, c=c: x + sum(ck * d for ck, d in zip(c, ds, strict=True)),
            params,
            *directions,
        )
        out.append(float(loss(moved, data)))
    return np.array(out)


# --------------------------------------------------------------------------------------------
# Landscapes.


def test_one_direction_an_eigenvector_matches_the_direct_losses(x64, key):
    params, data, _, loss, _ = problem("relu")
    H = cv.hessian(loss, params, data)
    top = cv.eigsh(H, k=1, key=key)
    v = top.eigenvectors[:, 0]  # a flat vector in the library's order, plugged in as it is
    s = np.linspace(-2.0, 3.0, 7)
    # Chunks of 5, 5 and 3 examples: the mean over all examples, weighted by chunk size.
    land = cv.loss_landscape(loss, params, data, directions=v, grid=s, batch_size=5)
    want = direct_losses(loss, params, data, [H.unravel(v)], s[:, None])
    assert land.loss.shape == (7,) and land.loss.dtype == np.float64
    np.testing.assert_allclose(land.loss, want, rtol=1e-12)
    assert land.center == pytest.approx(float(loss(params, data)), rel=1e-12)
    np.testing.assert_array_equal(land.coefficients[0], s)
    assert len(land.directions) == 1
    np.testing.assert_array_equal(H.ravel(land.directions[0]), v)
    # Along the top eigenvector the second difference at the centre is the eigenvalue.
    h = 1e-3
    curve = cv.loss_landscape(loss, params, data, directions=[v], grid=np.array([-h, 0.0, h]))
    second = (curve.loss[0] - 2 * curve.loss[1] + curve.loss[2]) / h**2
    assert second == pytest.approx(float(top.eigenvalues[0]), rel=1e-4)


def test_two_directions_with_axes_of_different_lengths(x64, key):
    params, data, _, loss, _ = problem("tanh")
    d1, d2 = cv.random_directions(params, key, num=2, normalize="layer")
    s, r = np.linspace(-1, 1, 3), np.array([-0.5, 0.0, 0.25, 1.0])
    land = cv.loss_landscape(
        loss, params, data, directions=(d1, d2), grid=(s, r), batch_size=4, points_per_step=5
    )
    assert land.loss.shape == (3, 4)  # rows follow s, columns r
    points = np.stack(np.meshgrid(s, r, indexing="ij"), -1).reshape(-1, 2)
    want = direct_losses(loss, params, data, [d1, d2], points).reshape(3, 4)
    np.testing.assert_allclose(land.loss, want, rtol=1e-12)
    # One array for both axes.
    square = cv.loss_landscape(loss, params, data, directions=[d1, d2], grid=s)
    assert square.loss.shape == (3, 3)
    # r = 0 and r = 1 are on both grids.
    np.testing.assert_allclose(square.loss[:, 1:], want[:, [1, 3]], rtol=1e-12)


def _filter_reference(d, p):
    """Li et al.'s filter normalisation in numpy: columns along the last axis rescaled."""
    d, p = np.asarray(d, np.float64), np.asarray(p, np.float64)
    if d.ndim <= 1:
        return np.zeros_like(d)
    axes = tuple(range(d.ndim - 1))
    return d * np.sqrt(np.sum(p**2, axis=axes) / np.sum(d**2, axis=axes))


def test_filter_and_layer_normalisation(x64, key):
    params, data, _, loss, _ = problem("tanh")
    # A conv-shaped kernel (h, w, in, out) too: its filters are the output channels.
    tree = {"conv": jax.random.normal(key, (2, 2, 3, 4)), "scale": jnp.ones(4), "dense": params}
    (d,) = cv.random_directions(tree, jax.random.fold_in(key, 1))
    raw = cv.random_directions(tree, jax.random.fold_in(key, 1), normalize=None)[0]
    for got, r, p in zip(*(jax.tree_util.tree_leaves(t) for t in (d, raw, tree)), strict=True):
        np.testing.assert_allclose(got, _filter_reference(r, p), rtol=1e-12)
    # Filter norms equal the parameters' filter norms; biases and scales are zero.
    conv = np.asarray(d["conv"])
    np.testing.assert_allclose(
        np.linalg.norm(conv.reshape(-1, 4), axis=0),
        np.linalg.norm(np.asarray(tree["conv"]).reshape(-1, 4), axis=0),
        rtol=1e-12,
    )
    assert not np.any(np.asarray(d["scale"])) and not np.any(np.asarray(d["dense"][0]["b"]))
    # loss_landscape normalises what it is given: a scaled copy gives the same direction.
    scaled = jax.tree_util.tree_map(lambda x: 7.0 * x, raw["dense"])
    land = cv.loss_landscape(
        loss, params, data, directions=scaled, grid=np.linspace(-1, 1, 3), normalize="filter"
    )
    for got, want in zip(
        jax.tree_util.tree_leaves(land.directions[0]),
        jax.tree_util.tree_leaves(d["dense"]),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    # Layer: every leaf has the parameters' leaf norm, biases included.
    (layer,) = cv.random_directions(params, key, normalize="layer")
    leaves = zip(jax.tree_util.tree_leaves(layer), jax.tree_util.tree_leaves(params), strict=True)
    for got, p in leaves:
        assert np.linalg.norm(got) == pytest.approx(np.linalg.norm(p), rel=1e-12)
    # A zero direction stays zero (no NaN).
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    for mode in ("filter", "layer"):
        land = cv.loss_landscape(
            loss, params, data, directions=zero, grid=np.array([1.0]), normalize=mode
        )
        assert land.loss[0] == pytest.approx(land.center, rel=1e-14)


def test_same_shapes_never_recompile(key):
    params, data, _, loss, _ = problem("tanh", jnp.float32)
    (d,) = cv.random_directions(params, key)
    moved = jax.tree_util.tree_map(lambda x: x + 0.1, params)
    other = jax.tree_util.tree_map(lambda x: 2 * x, d)
    new_data = {"x": data["x"] + 1.0, "y": data["y"]}
    runs = [(params, data, d, np.linspace(-1, 1, 5)), (moved, new_data, other, np.arange(5.0))]
    sizes, results = [], []
    for p, batch, direction, grid in runs:
        land = cv.loss_landscape(  # a fresh lambda each time, of the same structure
            lambda p, b: loss(p, b), p, batch, directions=direction, grid=grid
        )
        sizes.append(geometry._landscape_values._cache_size())
        results.append(land.loss)
    assert sizes[1] == sizes[0]
    assert results[0].dtype == np.float32  # float32 parameters: a float32 landscape
    assert not np.allclose(results[0], results[1])


def test_a_loader_gives_the_in_memory_landscape(x64, key):
    params, data, _, loss, _ = problem("relu")
    (d,) = cv.random_directions(params, key)
    s = np.linspace(-1, 1, 4)
    whole = cv.loss_landscape(loss, params, data, directions=d, grid=s)
    streamed = cv.loss_landscape(loss, params, cv.batches(data, 5), directions=d, grid=s)
    np.testing.assert_allclose(streamed.loss, whole.loss, rtol=1e-12)
    assert streamed.center == pytest.approx(whole.center, rel=1e-12)


def test_bad_inputs_are_named(x64, key):
    params, data, _, loss, _ = problem("relu")
    (d,) = cv.random_directions(params, key)
    grid = np.linspace(-1, 1, 3)
    with pytest.raises(ValueError, match="normalize must be one of"):
        cv.loss_landscape(loss, params, data, directions=d, grid=grid, normalize="filters")
    with pytest.raises(ValueError, match="flat vector of length 30.*n=31"):
        cv.loss_landscape(loss, params, data, directions=jnp.ones(30), grid=grid)
    bad = jax.tree_util.tree_map(lambda x: x[:1], d)
    with pytest.raises(ValueError, match="leaf of shape"):
        cv.loss_landscape(loss, params, data, directions=[bad], grid=grid)
    with pytest.raises(ValueError, match="one or two, got 3"):
        cv.loss_landscape(loss, params, data, directions=[d, d, d], grid=grid)
    with pytest.raises(ValueError, match="pair of axes was given for one direction"):
        cv.loss_landscape(loss, params, data, directions=d, grid=(grid, grid))
    with pytest.raises(ValueError, match="non-empty 1-D array"):
        cv.loss_landscape(loss, params, data, directions=d, grid=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="finite"):
        cv.loss_landscape(loss, params, data, directions=d, grid=np.array([0.0, np.nan]))
    with pytest.raises(TypeError, match="loss must be a function"):
        cv.loss_landscape(None, params, data, directions=d, grid=grid)
    with pytest.raises(ValueError, match="num must be a positive integer"):
        cv.random_directions(params, key, num=0)


# --------------------------------------------------------------------------------------------
# Gradient overlap.


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_gradient_overlap_against_the_dense_eigendecomposition(x64, key, activation):
    params, data, _, loss, _ = problem(activation)
    H = cv.hessian(loss, params, data)
    dense = np.asarray(dense_hessian(loss, params, data), np.float64)
    values, vectors = np.linalg.eigh(dense)
    values, vectors = values[::-1], vectors[:, ::-1]
    grad = jax.grad(loss)(params, data)
    g = np.asarray(H.ravel(grad), np.float64)
    k = 3
    assert values[k - 1] - values[k] > 1e-3 * values[0]  # a gap: the top-3 space is defined
    want_shares = (vectors[:, :k].T @ g) ** 2 / (g @ g)
    got = cv.gradient_overlap(H, grad, k=k, key=key, num_steps=H.size)
    assert got.converged.all()
    np.testing.assert_allclose(got.eigenvalues, values[:k], rtol=1e-8)
    np.testing.assert_allclose(got.shares, want_shares, rtol=1e-6, atol=1e-12)
    assert got.overlap == pytest.approx(want_shares.sum(), rel=1e-8)
    # What a wrong projection gives is far from it: k - 1 vectors, or a non-squared norm.
    assert abs(want_shares[:-1].sum() - got.overlap) > 1e-4
    norm_ratio = np.linalg.norm(vectors[:, :k].T @ g) / np.linalg.norm(g)
    assert abs(norm_ratio - got.overlap) > 1e-3
    assert got.num_matvecs > 0
    # The flat gradient and a precomputed result give exactly the same numbers.
    result = cv.eigsh(H, k=k, key=key, num_steps=H.size, which="LA")
    reused = cv.gradient_overlap(H, g, result=result)
    for a, b in zip(reused, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_gradient_overlap_edge_cases(x64, key):
    params, data, _, loss, _ = problem("tanh")
    H = cv.hessian(loss, params, data)
    result = cv.eigsh(H, k=2, key=key, num_steps=H.size)
    zero = cv.gradient_overlap(H, jnp.zeros(H.size), result=result)
    assert np.isnan(zero.overlap) and np.isnan(zero.shares).all()
    g = jnp.ones(H.size)
    assert cv.gradient_overlap(H, g, k=2, result=result).overlap == pytest.approx(
        cv.gradient_overlap(H, g, result=result).overlap
    )
    with pytest.raises(ValueError, match="k=3 disagrees with result"):
        cv.gradient_overlap(H, g, k=3, result=result)
    with pytest.raises(ValueError, match="key and num_steps would be ignored"):
        cv.gradient_overlap(H, g, key=key, result=result)
    with pytest.raises(ValueError, match="not descending"):
        cv.gradient_overlap(H, g, result=cv.eigsh(H, k=2, key=key, which="SA", num_steps=H.size))
    with pytest.raises(ValueError, match="pass k and key"):
        cv.gradient_overlap(H, g, k=2)
    with pytest.raises(ValueError, match="length 30, but n=31"):
        cv.gradient_overlap(H, jnp.ones(30), result=result)


# --------------------------------------------------------------------------------------------
# Jensen-Shannon distances.


def single(node, probes=1):
    """A density of ``probes`` identical probes, all its weight on one node."""
    return cv.SpectralDensity(
        jnp.full((probes, 1), node, jnp.float64), jnp.ones((probes, 1)), jnp.asarray(1)
    )


def random_density(rng, probes, center):
    nodes = center + rng.normal(size=(probes, 6))
    weights = rng.dirichlet(np.ones(6), size=probes)
    return cv.SpectralDensity(jnp.asarray(nodes), jnp.asarray(weights), jnp.asarray(50))


def test_jensen_shannon_limits_and_symmetry(x64):
    rng = np.random.default_rng(1)
    a, b = random_density(rng, 8, 0.0), random_density(rng, 8, 1.0)
    far = random_density(rng, 8, 30.0)  # sigma (1% of the spread) is about 0.35: disjoint
    js = cv.jensen_shannon({"a": a, "a again": a, "b": b, "far": far}, num_bootstrap=50)
    assert js.names == ("a", "a again", "b", "far")
    assert js.distance[0, 1] == 0.0 and np.all(np.diag(js.distance) == 0)
    np.testing.assert_array_equal(js.distance, js.distance.T)
    np.testing.assert_array_equal(js.standard_error, js.standard_error.T)
    np.testing.assert_allclose(js.distance[:3, 3], 1.0, atol=1e-6)
    assert 0.05 < js.distance[0, 2] < 0.95 and js.standard_error[0, 2] > 0
    upper = js.distance[np.triu_indices(4, 1)]
    assert js.mean == pytest.approx(upper.mean()) and js.mean_standard_error > 0
    assert js.sigma == pytest.approx(0.01 * (np.max(far.nodes) - np.min(a.nodes)))
    # A sequence is named by position; the same numbers.
    again = cv.jensen_shannon([a, a, b, far], num_bootstrap=50)
    assert again.names == (0, 1, 2, 3)
    np.testing.assert_array_equal(again.distance, js.distance)


def test_jensen_shannon_of_two_gaussians_by_numerical_integration(x64):
    from scipy import integrate

    sigma, d = 0.5, 0.8

    def gauss(x, mu):
        return np.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))

    def integrand(x):
        p, q = gauss(x, 0.0), gauss(x, d)
        m = 0.5 * (p + q)
        return 0.5 * (p * np.log2(p / m) + q * np.log2(q / m))

    divergence, _ = integrate.quad(integrand, -12, 12 + d, epsabs=1e-13, epsrel=1e-12)
    js = cv.jensen_shannon([single(0.0), single(d)], sigma=sigma, num_bootstrap=20)
    assert js.distance[0, 1] == pytest.approx(np.sqrt(divergence), abs=1e-6)
    # The default grid's 5-sigma margins leave out 6e-7 of the mass; a wider grid, none.
    wide = np.linspace(-15 * sigma, d + 15 * sigma, 4001)
    exact = cv.jensen_shannon([single(0.0), single(d)], sigma=sigma, grid=wide, num_bootstrap=2)
    assert exact.distance[0, 1] == pytest.approx(np.sqrt(divergence), abs=1e-10)
    # A single probe, or identical probes: nothing to resample, no error.
    assert js.standard_error[0, 1] < 1e-14 and js.mean_standard_error < 1e-14
    same = cv.jensen_shannon([single(0.0, 5), single(d, 5)], sigma=sigma, num_bootstrap=20)
    assert same.distance[0, 1] == pytest.approx(js.distance[0, 1], abs=1e-12)
    assert same.standard_error[0, 1] < 1e-14  # round-off of the resampled means
    # The per-probe smoothing averages to SpectralDensity.density on the same grid.
    rng = np.random.default_rng(0)
    density = random_density(rng, 3, 0.0)
    grid = np.linspace(-4, 4, 50)
    rows = density_module._per_probe(density, grid, 0.3)
    np.testing.assert_allclose(rows.mean(0), density.density(grid, sigma=0.3)[1], rtol=1e-12)


def test_jensen_shannon_bootstrap_error_shrinks_with_probes(x64):
    errors = []
    for probes in (4, 64):
        rng = np.random.default_rng(probes)
        pair = [random_density(rng, probes, 0.0), random_density(rng, probes, 0.5)]
        errors.append(cv.jensen_shannon(pair, sigma=0.3, num_bootstrap=100).standard_error[0, 1])
    assert errors[1] < 0.5 * errors[0]  # about 1/sqrt(16) = 0.25 expected


def test_jensen_shannon_bad_inputs(x64):
    with pytest.raises(ValueError, match="at least two densities"):
        cv.jensen_shannon([single(0.0)])
    with pytest.raises(TypeError, match="not a SpectralDensity"):
        cv.jensen_shannon({"a": single(0.0), "b": np.ones(3)})
    with pytest.raises(ValueError, match="sigma .* must be positive"):
        cv.jensen_shannon([single(0.0), single(1.0)], sigma=0.0)
    with pytest.raises(ValueError, match="uniformly spaced"):
        cv.jensen_shannon([single(0.0), single(1.0)], grid=np.array([0.0, 1.0, 3.0]))


# --------------------------------------------------------------------------------------------
# Plotting.


@pytest.fixture
def axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


def test_plot_landscape_draws_the_computed_numbers(axes):
    from curvature.plotting import plot_landscape

    s = np.linspace(-1, 1, 5)
    one = cv.Landscape((s,), np.array([3.0, 1.5, 1.0, 1.2, 2.0]), 1.0, ())
    line, centre = plot_landscape(axes, one, label="top eigenvector", log=True)
    np.testing.assert_array_equal(line.get_xdata(), s)
    np.testing.assert_array_equal(line.get_ydata(), one.loss)
    assert list(centre.get_xdata()) == [0.0] and list(centre.get_ydata()) == [1.0]
    assert axes.get_yscale() == "log" and axes.get_xlabel() == "s (direction 1)"
    axes.clear()
    r = np.linspace(-2, 2, 4)
    loss = 1.0 + s[:, None] ** 2 + 0.5 * r[None, :] ** 2
    two = cv.Landscape((s, r), loss, 1.0, ())
    filled, lines, centre, bar = plot_landscape(axes, two, levels=7)
    assert filled.levels[0] <= loss.min() and filled.levels[-1] >= loss.max()
    assert len(filled.levels) <= 9 and bar is not None
    np.testing.assert_array_equal(lines.levels, filled.levels)
    assert axes.get_xlim() == (s.min(), s.max()) and axes.get_ylim() == (r.min(), r.max())
    assert axes.get_ylabel() == "r (direction 2)"


def test_plot_block_densities_overlays_every_block(axes, x64):
    from curvature.plotting import plot_block_densities

    densities = {"layer 0": single(0.0, 2), "layer 1": single(3.0, 2)}
    grid, values = plot_block_densities(axes, densities, floor=1e-6)
    assert list(values) == ["layer 0", "layer 1"]
    lines = axes.get_lines()
    assert [line.get_label() for line in lines] == ["layer 0", "layer 1"]
    for line, (name, d) in zip(lines, densities.items(), strict=True):
        want = d.density(grid, sigma=0.03)[1]  # the default sigma: 1% of the spread 3
        np.testing.assert_allclose(values[name], want, rtol=1e-12)
        np.testing.assert_allclose(line.get_ydata(), np.maximum(want, 1e-6))
    assert lines[0].get_linestyle() != lines[1].get_linestyle()
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["layer 0", "layer 1"]
    with pytest.raises(KeyError, match="not among the densities"):
        plot_block_densities(axes, densities, names=["layer 2"])


def test_jensen_shannon_on_each_densitys_own_scale(x64):
    # A density and the same one scaled by 40: far apart on a shared scale, identical in shape.
    rng = np.random.default_rng(3)
    a = random_density(rng, 6, 5.0)
    scaled = cv.SpectralDensity(40.0 * a.nodes, a.weights, a.dimension)
    b = random_density(rng, 6, -2.0)
    shared = cv.jensen_shannon({"a": a, "scaled": scaled, "b": b}, num_bootstrap=20)
    own = cv.jensen_shannon({"a": a, "scaled": scaled, "b": b}, num_bootstrap=20, scale="own")
    assert shared.scale == "shared" and own.scale == "own"
    assert shared.distance[0, 1] > 0.9
    assert own.distance[0, 1] == pytest.approx(0.0, abs=1e-6)  # sqrt of round-off
    # On its own scale each density is the original divided by its largest |node|.
    by_hand = [
        cv.SpectralDensity(d.nodes / np.abs(np.asarray(d.nodes)).max(), d.weights, d.dimension)
        for d in (a, b)
    ]
    direct = cv.jensen_shannon(by_hand, num_bootstrap=20)
    assert own.distance[0, 2] == pytest.approx(direct.distance[0, 1], rel=1e-9)
    with pytest.raises(ValueError, match="scale must be"):
        cv.jensen_shannon([a, b], scale="mine")


def test_a_quadratic_landscape_is_exact_in_one_and_two_directions(x64):
    # L(θ) = mean_i ½ (θ − c_i)ᵀ A (θ − c_i) over two leaves: along θ + s d1 + r d2 it is
    # L(θ) + s g·d1 + r g·d2 + ½ (s² d1ᵀAd1 + 2 s r d1ᵀAd2 + r² d2ᵀAd2) exactly.
    rng = np.random.default_rng(7)
    n = 7
    m = rng.normal(size=(n, n))
    A = jnp.asarray(m @ m.T - 2.0 * np.eye(n))  # indefinite: a saddle as well as a bowl
    params = {"w": jnp.asarray(rng.normal(size=(3,))), "v": jnp.asarray(rng.normal(size=(2, 2)))}
    layout = cv.Layout.of(params)
    data = {"c": jnp.asarray(rng.normal(size=(6, n)))}

    def loss(p, batch):
        d = layout.ravel(p)[None, :] - batch["c"]
        return 0.5 * jnp.mean(jnp.einsum("bi,ij,bj->b", d, A, d))

    theta = layout.ravel(params)
    g = np.asarray(A @ (theta - data["c"].mean(0)))
    d1, d2 = (jnp.asarray(rng.normal(size=(n,))) for _ in range(2))
    c0 = float(loss(params, data))
    s, r = np.linspace(-1.5, 2.0, 8), np.linspace(-0.5, 0.5, 3)

    def exact(s, r):
        q = s**2 * (d1 @ A @ d1) + 2 * s * r * (d1 @ A @ d2) + r**2 * (d2 @ A @ d2)
        return c0 + s * (g @ d1) + r * (g @ d2) + 0.5 * float(q)

    one = cv.loss_landscape(loss, params, data, directions=d1, grid=s)
    np.testing.assert_allclose(one.loss, [exact(a, 0.0) for a in s], rtol=1e-12, atol=1e-12)
    two = cv.loss_landscape(loss, params, data, directions=[d1, layout.unravel(d2)], grid=(s, r))
    want = np.array([[exact(a, b) for b in r] for a in s])
    assert two.loss.shape == (8, 3)
    np.testing.assert_allclose(two.loss, want, rtol=1e-12, atol=1e-12)

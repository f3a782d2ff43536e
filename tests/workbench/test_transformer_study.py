"""The transformer study's measurements on a tiny run, against dense Hessians of the member's
parameters: ``block_spectra`` (per-block top eigenvalues, densities and their Jensen-Shannon
distances), ``gradient_overlap`` and ``landscape``; and a transformer on modular addition, whose
one label per sequence makes ``model.readout="auto"`` read the last position."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from workbench_helpers import load_config, quiet

import curvature as cv
import experiments
from experiments import data as data_lib
from experiments import lifecycle, models, sweep
from experiments import run as run_lib
from experiments.errors import ConfigError
from experiments.measurements import measurement_key

STEPS = 10


def tiny(config, quantities, folder):
    # A text of 7 letters: a small vocabulary keeps the embedding and the head (and the dense
    # Hessians below) small.
    text = folder / "text.txt"
    letters = np.random.default_rng(0).choice(list("abcdefg"), size=400)
    text.write_text("".join(letters), encoding="utf-8")
    with config.unlocked():
        config.activations = ("gelu",)
        config.seeds = (0,)
        config.data.source = "characters"
        config.data.path = str(text)
        config.data.context = 6
        config.data.num_train = 40
        config.model.kind = "transformer"
        config.model.width, config.model.depth, config.model.heads = 8, 1, 2
        config.model.mlp_ratio = 2
        config.train.optimizer, config.train.learning_rate = "adam", 1e-2
        config.train.steps, config.train.batch_size = STEPS, 0
        config.measure.steps = (STEPS,)
        config.measure.num_examples = 6
        config.measure.quantities = quantities
    return config


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("transformer")
    config = tiny(load_config(), ("block_spectra", "gradient_overlap", "landscape"), workdir)
    with config.unlocked():
        s = config.measure.block_spectra
        s.k, s.num_steps, s.num_probes, s.density_steps = 2, 60, 3, 12
        config.measure.gradient_overlap.k = 3
        config.measure.gradient_overlap.num_steps = 80
        config.measure.landscape.radius = 0.002
        config.measure.landscape.num_points = 5
        config.measure.landscape.num_steps = 80
    run_lib.run(config, workdir / "run", progress=quiet())
    return experiments.load_run(workdir / "run")


def dense_problem(member):
    params = member.params(STEPS)
    H = cv.hessian(member.loss, params, member.measure_data)
    return params, H, np.asarray(cv.dense(H), np.float64)


def test_block_spectra_are_the_dense_blocks(study):
    for member in study.members.values():
        params, H, full = dense_problem(member)
        record = member.records[-1].block_spectra
        groups = cv.layer_groups(params)
        assert record.names == tuple(groups) and "layers/0/query" in record.names
        arrays = member.spectra(STEPS)
        densities = record.densities(arrays)
        for b, (name, selector) in enumerate(groups.items()):
            mask = np.concatenate(
                [
                    np.full(leaf.size, bool(keep))
                    for leaf, keep in zip(
                        jax.tree_util.tree_leaves(params),
                        jax.tree_util.tree_leaves(selector),
                        strict=True,
                    )
                ]
            )
            block = full[np.ix_(mask, mask)]
            eigs = np.linalg.eigvalsh(block)[::-1]
            top = record.top[b]
            assert record.sizes[b] == block.shape[0]
            for value, converged, want in zip(top.values, top.converged, eigs, strict=False):
                if converged:
                    assert value == pytest.approx(want, rel=1e-3, abs=1e-4 * abs(eigs[0]))
            assert top.converged[0], name
            # Its cost: Lanczos to min(60, size) steps, a rank check of as many unless the
            # block is spanned, a residual for each of its k = 2 pairs.
            steps = min(60, block.shape[0])
            checks = 0 if steps == block.shape[0] else steps
            assert top.num_matvecs == steps + checks + 2, name
            # Each block's density: Ritz values within the block's spectrum, its extremes found.
            d = densities[name]
            nodes = np.asarray(d.nodes)[np.asarray(d.weights) > 1e-6]
            slack = 1e-3 * abs(eigs).max()
            assert eigs[-1] - slack <= nodes.min() and nodes.max() <= eigs[0] + slack
        # The densities saved are the library's on the measurement's key.
        again = cv.block_densities(
            H,
            groups,
            key=measurement_key(0, STEPS, "block_slq"),
            num_probes=3,
            num_steps=12,
        )
        for name, d in again.items():
            m = d.nodes.shape[1]
            np.testing.assert_allclose(densities[name].nodes[:, :m], d.nodes, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(densities[name].weights[:, :m], d.weights, atol=1e-5)
        js = cv.jensen_shannon(densities, sigma=record.sigma)
        assert record.js_mean.value == pytest.approx(js.mean, rel=1e-9)
        distance = np.asarray(record.js_distance)
        assert np.allclose(distance, distance.T) and np.all(np.diag(distance) == 0)
        assert 0 < record.js_mean.value < 1 and record.js_mean.standard_error > 0


def test_gradient_overlap_and_landscape_against_dense(study):
    for member in study.members.values():
        params, H, full = dense_problem(member)
        record = member.records[-1]
        values, vectors = np.linalg.eigh(full)
        grad = np.asarray(H.layout.ravel(jax.grad(member.loss)(params, member.measure_data)))
        top = vectors[:, ::-1][:, :3]
        want = np.sum((top.T @ grad) ** 2) / np.sum(grad**2)
        overlap = record.gradient_overlap
        assert overlap.converged()
        assert overlap.overlap == pytest.approx(want, rel=1e-3, abs=1e-4)
        assert np.cumsum(overlap.shares)[-1] == pytest.approx(overlap.overlap, rel=1e-6)
        # The loss along the top eigenvector (either sign: an eigenvector's sign is arbitrary).
        land = record.landscape
        grid = land.grid(member.spectra(STEPS))
        v = vectors[:, -1]

        def along(s, v=v, layout=H.layout, params=params, member=member):
            moved = layout.unravel(layout.ravel(params) + s * jnp.asarray(v, jnp.float32))
            return float(member.loss(moved, member.measure_data))

        s = grid.coefficients[0]
        direct = np.array([along(c) for c in s])
        mirrored = np.array([along(-c) for c in s])
        got = np.asarray(grid.loss)
        assert np.allclose(got, direct, atol=1e-5) or np.allclose(got, mirrored, atol=1e-5)
        assert land.center == pytest.approx(along(0.0), abs=1e-6)
        # Over a small grid a smooth loss is quadratic: its second difference is the top
        # eigenvalue (not ReLU's: the grid crosses kinks, whose curvature the Hessian lacks).
        assert land.curvature[0] == pytest.approx(values[-1], rel=0.02), land
        assert land.eigenvalues.values[0] == pytest.approx(values[-1], rel=1e-3)


def test_bad_block_groups_are_refused_by_key(tmp_path):
    config = tiny(load_config(), ("block_spectra",), tmp_path)
    with config.unlocked():
        config.measure.block_spectra.groups = ("=*query",)
    with pytest.raises(ConfigError, match="block_spectra.*groups"):
        run_lib.run(config, tmp_path / "run", progress=quiet())


def test_a_transformer_on_modular_addition_reads_the_last_position(tmp_path):
    # One label per sequence: readout "auto" builds the model that predicts at the last
    # position, and the training loss takes the labels as they are. Shapes only (the runs
    # above compile and check the same model code).
    config = tiny(load_config(), ("lambda_max",), tmp_path)
    with config.unlocked():
        config.activations = ("relu",)
        config.data.source, config.data.modulus = "modular_addition", 5
        config.data.num_train = 0
        config.measure.num_examples = 0
    spec = sweep.members(config)[0]
    dataset = data_lib.load(spec.config.data)
    assert dataset.is_tokens and dataset.num_classes == 7  # 5 residues, "+" and "="
    s = lifecycle.setup(spec, ("relu",), dataset, lifecycle.device_data(dataset, jnp.float32))
    data = s.measure_data
    assert data["x"].shape[1:] == (4,) and data["x"].dtype == jnp.int32 and data["y"].ndim == 1
    logits = jax.eval_shape(s.model, s.init_params, data)
    assert logits.shape == (len(data["y"]), 7)
    assert jax.eval_shape(s.loss, s.init_params, data).shape == ()
    # Every position's logits ("all") do not match these labels: the loss says what to set.
    every = jnp.zeros((len(data["y"]), 4, 7))
    with pytest.raises(ValueError, match="model.readout='last'"):
        models.LOSSES.get("cross_entropy").value(every, data)
    model_cfg = spec.config.model
    assert models.resolved(model_cfg, 1).readout == "last"
    assert models.resolved(model_cfg, 2).readout == "all"

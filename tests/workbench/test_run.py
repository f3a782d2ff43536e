"""A run end to end: the smoke config's files, identical starts, programs shared by
members, threads, and refusals before anything is written."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvature as cv

pytest.importorskip("flax")
from workbench_helpers import (  # noqa: E402
    light_config,
    load_config,
    quiet,
)
from workbench_helpers import smoke_run as run_smoke_once  # noqa: E402

import experiments  # noqa: E402
from experiments import (  # noqa: E402
    measure,
    storage,
)
from experiments import run as run_lib  # noqa: E402
from experiments.errors import RunDirError  # noqa: E402


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    return run_smoke_once(tmp_path_factory)


def test_smoke_run_writes_every_measurement(smoke_run):
    config, workdir, statuses = smoke_run
    assert {s["state"] for s in statuses.values()} == {"done"}
    assert set(statuses) == {"relu-seed0", "tanh-seed0"}
    run = experiments.load_run(workdir)
    for member in run.members.values():
        assert member.steps == [0, 10, 20]
        for r in member.records:
            spectra = member.spectra(r.step)
            assert spectra["slq_nodes"].shape == (2, 15)
            assert np.allclose(spectra["slq_weights"].sum(1), 1.0, atol=1e-5)
            assert np.allclose(spectra["top"], r.top_eigenvalues.values)
            assert len(r.top_eigenvalues.values) == 3 and len(r.bottom_eigenvalues.values) == 2
            assert r.bottom_eigenvalues.values[0] <= r.bottom_eigenvalues.values[1]
            assert r.edge_of_stability == pytest.approx(2 / 0.2)
            assert r.sharpness_ratio == pytest.approx(0.2 * r.top_eigenvalues.values[0] / 2)
            assert (
                r.trace.num_matvecs == 30 and r.fingerprint == run.member_fingerprints[member.name]
            )
    assert json.loads((workdir / "config.json").read_text())["activations"] == ["relu", "tanh"]
    prov = json.loads((workdir / "provenance.json").read_text())["invocations"][0]
    for key in ("packages", "git", "seeds", "dtype", "matmul_precision", "device_count", "command"):
        assert key in prov
    summary = (workdir / "summary.md").read_text()
    assert "| relu | 1 | 0 | 20 |" in summary and "| tanh | 1 | 0 | 20 |" in summary


def test_initialisation_identical_across_activations_and_runs(tmp_path, smoke_run):
    config, workdir, _ = smoke_run
    run = experiments.load_run(workdir)
    relu, tanh = (run.members[f"{a}-seed0"].params(0) for a in ("relu", "tanh"))
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree_util.tree_leaves(relu), jax.tree_util.tree_leaves(tanh), strict=True
        )
    )
    # A second run with the same seed writes the same step-0 measurement.
    small = load_config()
    with small.unlocked():
        small.activations = ("relu",)
        small.train.steps = 0
        small.measure.quantities = ("top_eigenvalues", "bottom_eigenvalues", "trace")
    run_lib.run(small, tmp_path, progress=quiet())
    first = run.members["relu-seed0"].records[0]
    second = experiments.load_run(tmp_path).members["relu-seed0"].records[0]
    for key in ("train_loss", "test_accuracy", "grad_norm", "top_eigenvalues"):
        assert getattr(first, key) == getattr(second, key)
    # tr H: the smoke run's comes from the run shared with G (the same sketch and probes), the
    # second run's from cv.trace: the same value, the error bar to round-off.
    assert first.trace.value == second.trace.value
    assert first.trace.standard_error == pytest.approx(second.trace.standard_error, rel=1e-5)


def test_workdir_of_another_config_is_refused(smoke_run):
    config, workdir, _ = smoke_run
    other = load_config()
    with other.unlocked():
        other.train.learning_rate = 0.05
    with pytest.raises(RunDirError, match="train.learning_rate: 0.2 on disk, 0.05 now"):
        run_lib.run(other, workdir, progress=quiet())


def test_a_second_process_cannot_run_in_the_same_workdir(tmp_path):
    config = load_config()
    with storage.WorkdirLock(tmp_path):
        with pytest.raises(RunDirError, match="another process is running"):
            run_lib.run(config, tmp_path, progress=quiet())


def test_an_unwritable_workdir_is_a_one_line_error(tmp_path):
    # CI runs as root, who writes anywhere: a file where the workdir's parent should be makes the
    # workdir uncreatable for anyone.
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="cannot write to"):
        run_lib.run(light_config(), tmp_path / "file" / "run", progress=quiet())


def test_members_share_one_compiled_program(tmp_path):
    # Three activations, one set of programs: a run with new shapes compiles each estimator once.
    from curvature import _driver

    config = light_config()
    with config.unlocked():
        config.activations = ("relu", "tanh", "silu")
        config.data.num_train = 150  # shapes no other test uses
        config.workers = 1

    # Each member's functions are fresh closures (no module-level cache): the programs are
    # shared because functions compare by structure.
    def compiled():  # eigsh's and Hutch++'s programs, and the trainer
        traces = _driver.TRACES
        return [traces["eigsh"], traces["hutch++"], experiments.train._train._cache_size()]

    before = compiled()
    run_lib.run(config, tmp_path, progress=quiet())
    after = compiled()
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]
    with config.unlocked():
        config.share_activations = "no"
    plan = run_lib.prepare(config, tmp_path / "other")
    assert len({id(s.loss) for s in plan.setups.values()}) == 3


def test_float64_members_in_threads_compute_in_float64(tmp_path):
    # JAX's x64 switch is per thread: each member (and the warm-up) enters its own.
    config = load_config()
    with config.unlocked():
        config.dtype = "float64"
        config.workers = 2
        config.train.steps = 10
        config.measure.quantities = ("lambda_max", "gradient_noise")
        config.measure.gradient_noise.num_examples = 20
        config.measure.gradient_noise.batch_size = 8
    statuses = run_lib.run(config, tmp_path, progress=quiet())
    assert {s["state"] for s in statuses.values()} == {"done"}
    run = experiments.load_run(tmp_path)
    with jax.enable_x64(True):
        for member in run.members.values():
            params = member.params(10)
            assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float64
            H = cv.hessian(member.loss, params, member.measure_data)
            exact = np.linalg.eigvalsh(np.asarray(cv.dense(H)))[-1]
            assert member.records[-1].lambda_max.values[0] == pytest.approx(exact, rel=1e-9)
            assert member.records[-1].gradient_noise.trace_covariance > 0


def test_cnn_in_float64_with_momentum_runs_end_to_end(tmp_path):
    config = load_config()
    with config.unlocked():
        config.activations = ("gelu_tanh",)
        config.dtype = "float64"
        config.model.kind, config.model.channels = "cnn", (4,)
        config.data.image_shape, config.data.num_train = (8, 8, 1), 64
        config.train.optimizer, config.train.steps, config.measure.every = "momentum", 4, 4
        config.measure.quantities = ("top_eigenvalues", "density")
    statuses = run_lib.run(config, tmp_path, progress=quiet())
    assert statuses == {"gelu_tanh-seed0": {"state": "done", "step": 4}}
    run = experiments.load_run(tmp_path)
    member = run.members["gelu_tanh-seed0"]
    assert member.steps == [0, 4]
    assert member.records[0].edge_of_stability == pytest.approx((2 + 2 * 0.9) / 0.2)
    assert member.spectra(4)["slq_nodes"].dtype == np.float64
    with pytest.raises(RuntimeError, match="float64 run: use its members inside jax.enable_x64"):
        member.params(4)
    with jax.enable_x64(True):
        params = member.params(4)
        assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float64
        H = cv.hessian(member.loss, params, member.measure_data)
        top = cv.eigsh(H, k=3, num_steps=20, key=measure.measurement_key(0, 4, "eig"))
        assert np.allclose(top.eigenvalues, member.records[-1].top_eigenvalues.values, rtol=1e-8)

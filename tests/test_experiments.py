"""Experiments end to end on the smoke config: numbers written, reloaded runs that reproduce
them, resume, errors before training."""

import gzip
import importlib.util
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvature as cv

pytest.importorskip("flax")
import experiments  # noqa: E402
from experiments import config as config_lib  # noqa: E402
from experiments import data as data_lib  # noqa: E402
from experiments import lifecycle, measure, models, storage  # noqa: E402
from experiments import run as run_lib  # noqa: E402
from experiments.errors import RunDirError  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def cli(*args, timeout=240):
    """``python -m experiments ARGS`` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "experiments", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load_config(name="smoke"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.lock()
    return config


def quiet():
    return run_lib.Progress(enabled=False)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smoke")
    config = load_config()
    statuses = run_lib.run(config, workdir, progress=quiet())
    return config, workdir, statuses


def strip_timings(records):
    """Records without their wall times (measurement timings, training seconds)."""
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k != "timings"}
        if r.get("training"):
            r["training"] = {k: v for k, v in r["training"].items() if k != "seconds"}
        out.append(r)
    return out


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


def test_load_run_reproduces_the_recorded_curvature(smoke_run):
    # The load_run round trip: the reloaded loss, parameters and measurement set give the
    # recorded numbers at every measured step (kept by default), and the truth agrees.
    config, workdir, _ = smoke_run
    run = experiments.load_run(workdir)
    assert run.members.keys() == {"relu-seed0", "tanh-seed0"}
    dataset = data_lib.load(config.data)
    assert np.array_equal(run.data.x_train, dataset.x_train)
    for member in run.members.values():
        assert member.checkpoint_steps() == [0, 10, 20]
        assert member.config.activations == [member.activation] or tuple(
            member.config.activations
        ) == (member.activation,)
        for step in (10, 20):
            record = member.record(step)
            H = cv.hessian(member.loss, member.params(step), member.measure_data)
            again = cv.eigsh(
                H, k=6, which="BE", num_steps=20, key=measure.measurement_key(0, step, "eig")
            )
            assert np.allclose(again.eigenvalues[:3], record.top_eigenvalues.values, rtol=1e-5)
            assert np.allclose(
                again.eigenvalues[3:][::-1][:2], record.bottom_eigenvalues.values, rtol=1e-5
            )
            assert float(member.loss(member.params(step), member.measure_data)) == pytest.approx(
                record.train_loss, rel=1e-5
            )
        # And the truth: the dense Hessian of the saved parameters at the last step.
        final = member.records[-1]
        H = cv.hessian(member.loss, member.params(20), member.measure_data)
        exact = np.linalg.eigvalsh(np.asarray(cv.dense(H), np.float64))
        assert final.top_eigenvalues.values[0] == pytest.approx(exact[-1], rel=1e-3)
        assert final.trace.value == pytest.approx(
            np.sum(exact), abs=5 * final.trace.standard_error + 1e-4
        )
        # The optimizer state is kept with the parameters (plain SGD: the learning rate).
        state = member.opt_state(20)
        assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.2)
        with pytest.raises(KeyError, match="kept no parameters at step 5"):
            member.params(5)
        with pytest.raises(KeyError, match="saved no eigenvectors"):
            member.eigenvectors(20)


def test_checkpoint_leaves_are_saved_under_their_pytree_paths(smoke_run):
    _, workdir, _ = smoke_run
    arrays = storage.read_npz(
        workdir / "members" / "relu-seed0" / "checkpoints" / "step_000020.npz"
    )
    assert "params/hidden/0/kernel/value" in arrays and "params/readout/bias/value" in arrays
    assert arrays["params/hidden/0/kernel/value"].shape == (64, 8)
    assert "opt_state/hyperparams/learning_rate" in arrays
    assert int(arrays["step"]) == 20


def test_relu_residual_has_zero_trace(smoke_run):
    # R = H - G has a zero diagonal for ReLU networks, so tr R = 0: the estimate sits within its
    # error bar of zero. For tanh the same-layer terms make it clearly non-zero.
    _, workdir, _ = smoke_run
    run = experiments.load_run(workdir)
    for r in run.members["relu-seed0"].records:
        tr = r.gauss_newton.residual_trace
        assert abs(tr.value) <= 4 * tr.standard_error + 1e-6
        assert r.frobenius.relative_residual > 0.01  # yet R itself is not small
    last = run.members["tanh-seed0"].records[-1].gauss_newton.residual_trace
    assert abs(last.value) > 4 * last.standard_error


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


def adam_minibatch_config():
    config = load_config()
    with config.unlocked():
        config.train.optimizer, config.train.learning_rate, config.train.batch_size = (
            "adam",
            0.01,
            64,
        )
        config.measure.quantities = ("top_eigenvalues", "bottom_eigenvalues", "trace")
        config.workers = 1
    return config


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    # Adam (optimizer state to save and restore) on minibatches (an order to resume mid-epoch).
    config = adam_minibatch_config()
    run_lib.run(config, tmp_path / "reference", progress=quiet())
    calls = []

    def crash_at_second(name, step):
        calls.append((name, step))
        if len(calls) == 2:  # step 10 is recorded, the run dies before going on
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_lib.run(config, tmp_path / "run", on_measurement=crash_at_second, progress=quiet())
    assert calls == [("relu-seed0", 0), ("relu-seed0", 10)]
    resumed = []
    run_lib.run(
        config,
        tmp_path / "run",
        on_measurement=lambda n, t: resumed.append((n, t)),
        progress=quiet(),
    )
    # Nothing finished is measured again: relu reloads its step-10 checkpoint and measures only
    # step 20.
    assert resumed == [
        ("relu-seed0", 20),
        ("tanh-seed0", 0),
        ("tanh-seed0", 10),
        ("tanh-seed0", 20),
    ]
    for name in ("relu-seed0", "tanh-seed0"):
        got = storage.read_metrics(tmp_path / "run" / "members" / name / "metrics.jsonl")
        want = storage.read_metrics(tmp_path / "reference" / "members" / name / "metrics.jsonl")
        assert strip_timings(got) == strip_timings(want)
        for step in (0, 10, 20):
            a = storage.read_npz(
                tmp_path / "run" / "members" / name / "checkpoints" / f"step_{step:06d}.npz"
            )
            b = storage.read_npz(
                tmp_path / "reference" / "members" / name / "checkpoints" / f"step_{step:06d}.npz"
            )
            assert len(a) > 8  # parameters and Adam's moments
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_second_process_cannot_run_in_the_same_workdir(tmp_path):
    config = load_config()
    with storage.WorkdirLock(tmp_path):
        with pytest.raises(RunDirError, match="another process is running"):
            run_lib.run(config, tmp_path, progress=quiet())


def test_metrics_log_drops_a_record_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 10}\n{"step": 20, "hessian": {"top": [1.0]}')
    assert [r["step"] for r in storage.read_metrics(path)] == [0, 10]
    log = storage.MetricsLog(path)
    assert log.steps == {0, 10}
    assert path.read_text() == '{"step": 0}\n{"step": 10}\n'


def test_nonfinite_loss_stops_that_run_and_keeps_its_measurements(tmp_path):
    config = load_config()
    with config.unlocked():
        config.train.loss = "mse"  # squared error overflows where cross-entropy saturates
        config.train.learning_rate = 1e3
        config.train.divergence_factor = 0.0  # never stop for growth: wait for the overflow
        config.measure.quantities = ("top_eigenvalues", "bottom_eigenvalues", "trace")
    statuses = run_lib.run(config, tmp_path, progress=quiet())
    assert set(statuses) == {"relu-seed0", "tanh-seed0"}  # the sweep went on after the first
    for name, status in statuses.items():
        assert status["state"] == "failed" and "non-finite" in status["message"], status
        assert [
            r["step"] for r in storage.read_metrics(tmp_path / "members" / name / "metrics.jsonl")
        ][0] == 0
    assert "Stopped runs" in (tmp_path / "summary.md").read_text()
    # A failed member is final: running again neither retries nor re-measures it.
    kept = {
        n: len(storage.read_metrics(tmp_path / "members" / n / "metrics.jsonl")) for n in statuses
    }
    again = run_lib.run(
        config, tmp_path, on_measurement=lambda *a: pytest.fail("re-measured"), progress=quiet()
    )
    assert again == statuses
    assert kept == {
        n: len(storage.read_metrics(tmp_path / "members" / n / "metrics.jsonl")) for n in statuses
    }


@pytest.mark.parametrize(
    "change,match",
    [
        (
            lambda c: setattr(c, "activations", ("relu", "swish2")),
            "config key activations: unknown activation 'swish2'",
        ),
        (
            lambda c: setattr(c.data, "source", "mnist"),
            "config key data.source: unknown data source 'mnist'; known: digits",
        ),
        (
            lambda c: (
                setattr(c.data, "source", "npz"),
                setattr(c.data, "path", "/nonexistent/d.npz"),
            ),
            "data.path: /nonexistent/d.npz does not exist",
        ),
        (
            lambda c: setattr(c.measure.top_eigenvalues, "lanczos_steps", 2),
            "config key measure.top_eigenvalues: lanczos_steps=2 must be an integer >= k=3",
        ),
        (
            lambda c: setattr(c.train, "optimizer", "lbfgs"),
            "config key train.optimizer: unknown optimizer 'lbfgs'; known: sgd, momentum, adam, rmsprop",
        ),
        (
            lambda c: setattr(c.measure.density, "lanczos_steps", 10_000),
            "config key measure.density: lanczos_steps=10000 exceeds the 682 parameters",
        ),
        (
            lambda c: setattr(c.measure, "steps", (0, 5.5, 10)),
            "config key measure.steps: steps must be integers",
        ),
        (lambda c: setattr(c.measure, "num_examples", -100), "config key measure.num_examples"),
        (lambda c: setattr(c.measure, "split", "validation"), "config key measure.split"),
        (lambda c: setattr(c.train, "momentum", 1.5), "config key train.momentum"),
        (lambda c: setattr(c.data, "num_train", -5), "config key data.num_train"),
        (
            lambda c: setattr(c.model, "kind", "cnn"),
            "config key model.kind='cnn' needs image inputs",
        ),
        (
            lambda c: setattr(c.data, "test_fraction", 0.0001),
            "config key data.test_fraction: 0.0001 of 1797 examples leaves 0",
        ),
        (
            lambda c: setattr(c.train, "learning_rate", float("inf")),
            "config key train.learning_rate: inf is not a finite positive number",
        ),
        (
            lambda c: setattr(c.measure, "quantities", ("lambda_max", "hessian_rank")),
            "config key measure.quantities: unknown measurement 'hessian_rank'; known: lambda_max",
        ),
        (
            lambda c: setattr(c.measure, "quantities", ("optimizer_state",)),
            "config key measure.optimizer_state: needs an optimizer with a second moment "
            "\\(adam, rmsprop\\), not 'sgd'",
        ),
        (
            lambda c: setattr(c, "sweep", ("train.learning_rat=0.1,0.2",)),
            "sweep train.learning_rat: config key train.learning_rat does not exist",
        ),
        (
            lambda c: setattr(c, "sweep", ("train.learning_rate=0.1,fast",)),
            "sweep train.learning_rate: 'fast' is a str, the field is a float",
        ),
        (
            lambda c: setattr(c, "sweep", ("train.learning_rate=0.1,inf",)),
            "config key train.learning_rate: inf is not a finite positive number",
        ),
        (
            lambda c: setattr(c.measure, "save_eigenvectors", 4),
            "config key measure.save_eigenvectors: 4 exceeds the 3 eigenvalues",
        ),
        (
            lambda c: setattr(c.measure, "devices", 0),
            "config key measure.devices: 0 is not an integer >= 1 or 'all'",
        ),
        (
            lambda c: setattr(c.measure, "devices", "four"),
            "config key measure.devices: 'four' is not an integer >= 1 or 'all'",
        ),
        (
            lambda c: setattr(c.measure, "devices", 4096),
            r"config key measure.devices: 4096 devices asked for, but jax.device_count\(\) is "
            f"{jax.device_count()}",
        ),
    ],
)
def test_bad_config_fails_before_training(tmp_path, change, match):
    config = load_config()
    with config.unlocked():
        change(config)
    with pytest.raises(ValueError, match=match):
        run_lib.run(config, tmp_path, progress=quiet())
    assert not (tmp_path / "members").exists()


def test_an_old_key_set_in_a_config_file_names_its_new_place(tmp_path):
    config = load_config()
    with config.unlocked():
        config.measure.top_k = 3  # unlocked: a config file would add it silently
    with pytest.raises(
        ValueError, match="measure.top_k: does not exist; it moved to measure.top_eigenvalues.k"
    ):
        run_lib.run(config, tmp_path, progress=quiet())


def test_npz_with_wrong_arrays(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((4, 3)), y_train=np.zeros(4, np.int64), x_test=np.zeros((2, 3)))
    config = load_config()
    with config.unlocked():
        config.data.source, config.data.path = "npz", str(path)
    with pytest.raises(data_lib.DataError, match=r"lacks the arrays \['y_test'\]"):
        run_lib.run(config, tmp_path / "run", progress=quiet())
    np.savez(
        path,
        x_train=np.zeros((4, 3)),
        y_train=np.zeros(3, np.int64),
        x_test=np.zeros((2, 3)),
        y_test=np.zeros(2, np.int64),
    )
    with pytest.raises(data_lib.DataError, match=r"y_train has shape \(3,\); need \(4,\)"):
        data_lib.load(config.data)


def test_npz_labels_with_gaps_and_complex_inputs_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3))
    y = np.arange(20) % 10
    config = load_config()
    with config.unlocked():
        config.data.source, config.data.path = "npz", str(tmp_path / "d.npz")
    y_gap = y.copy()
    y_gap[0] = 100_000
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y_gap, x_test=x[:5], y_test=y[:5])
    with pytest.raises(
        data_lib.DataError, match="labels must be 0..C-1, but the largest is 100000"
    ):
        data_lib.load(config.data)
    np.savez(tmp_path / "d.npz", x_train=x + 1j, y_train=y, x_test=x[:5], y_test=y[:5])
    with pytest.raises(data_lib.DataError, match="x_train has dtype complex128; complex inputs"):
        data_lib.load(config.data)


def test_measure_devices_takes_equal_shards_or_names_its_key():
    # An integer must divide the measurement examples (no example dropped or padded); "all" is
    # the most devices that do; one device is the unsharded measurement, as before the key.
    from experiments.devices import measure_devices
    from experiments.errors import ConfigError

    assert measure_devices(4, 200, 8) == 4 and measure_devices(1, 7, 1) == 1
    assert measure_devices("all", 1348, 8) == 4 and measure_devices("all", 150, 8) == 6
    assert measure_devices("all", 7, 1) == 1 and measure_devices("all", 97, 8) == 1
    with pytest.raises(ConfigError, match="config key measure.devices: the 150 measurement "):
        measure_devices(4, 150, 8)
    with pytest.raises(ConfigError, match=r"9 devices asked for, but jax.device_count\(\) is 8"):
        measure_devices(9, 200, 8)
    # The locked config takes "all" as well as an integer (the field holds either); neither
    # changes what a member computes: its fingerprint, hence its run directory, is the same.
    config = load_config()
    config.measure.devices = "all"
    config_lib.validate(config)
    assert lifecycle.fingerprint(config, "data") == lifecycle.fingerprint(load_config(), "data")
    assert run_lib.num_workers(config, 4, sharded=True) == (
        min(4, os.cpu_count() or 1) if jax.default_backend() == "cpu" else 1
    )


# The child of test_data_parallel_measurement_equals_one_device: the smoke config measured on
# data sharded over 4 forced CPU devices, fresh (argv[2]) and resuming the 1-device smoke run
# (a copy, argv[3]); prints the shardings of the measurement sets and the statuses.
MESH_SCRIPT = """
import importlib.util, json, sys
import jax
from experiments import run as run_lib

spec = importlib.util.spec_from_file_location("smoke", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
config.measure.devices = 4
config.lock()
assert jax.device_count() == 4, jax.devices()
quiet = run_lib.Progress(enabled=False)
plan = run_lib.prepare(config, sys.argv[2])
shardings = {
    name: [list(s.measure_data["x"].sharding.spec), len(s.measure_data["x"].sharding.device_set)]
    for name, s in plan.setups.items()
}
fresh = run_lib.run(config, sys.argv[2], progress=quiet)
measured = []
resumed = run_lib.run(
    config, sys.argv[3], on_measurement=lambda *a: measured.append(a), progress=quiet
)
print(json.dumps(dict(shardings=shardings, fresh=fresh, resumed=resumed, measured=measured)))
"""


def test_data_parallel_measurement_equals_one_device(smoke_run, tmp_path):
    # measure.devices=4 on 4 forced CPU devices (a child process: this one keeps one device):
    # the measurement set is sharded along its examples, and every curvature number equals the
    # 1-device smoke run's up to float32 round-off (the order of summation). Training is not
    # sharded, so the parameters are the same. The provenance records the mesh; a 1-device run
    # directory resumes on 4 devices without measuring again (measure.devices changes how, not
    # what, is computed, like measure.batch_size).
    config, workdir, _ = smoke_run
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    flags = os.environ.get("XLA_FLAGS", "")
    env = dict(
        os.environ,
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=4".strip(),
        JAX_PLATFORMS="cpu",
    )
    out = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT, str(ROOT / "configs" / "smoke.py")]
        + [str(tmp_path / "fresh"), str(resumed)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shardings"] == {n: [["data"], 4] for n in result["fresh"]}
    assert {s["state"] for s in result["fresh"].values()} == {"done"}
    assert result["resumed"] == {n: {"state": "done", "step": 20} for n in result["fresh"]}
    assert result["measured"] == []

    mesh = json.loads((tmp_path / "fresh" / "provenance.json").read_text())["invocations"]
    assert mesh[-1]["measure_mesh"] == {
        "setting": 4,
        "sharded": True,
        "axis_names": ["data"],
        "shape": [4],
        "device_count": 4,
        "device_kind": "cpu",
        "platform": "cpu",
        "device_ids": [0, 1, 2, 3],
    }
    history = json.loads((resumed / "provenance.json").read_text())["invocations"]
    assert [h["measure_mesh"]["device_count"] for h in history] == [1, 4]
    assert history[0]["measure_mesh"]["setting"] == 1 and not history[0]["measure_mesh"]["sharded"]

    one, four = experiments.load_run(workdir), experiments.load_run(tmp_path / "fresh")
    assert one.member_fingerprints == four.member_fingerprints
    for name, member in one.members.items():
        pairs = list(zip(member.records, four.members[name].records, strict=True))
        assert [a.step for a, _ in pairs] == [0, 10, 20]
        for a, b in pairs:
            # Each number relative to its quantity's scale: the largest top eigenvalue, tr H,
            # ||H||_F^2 (tr R and ||R||_F^2 can be near 0), 1 for a spectral mass.
            eig = max(abs(v) for v in a.top_eigenvalues.values)
            trace, fro = abs(a.trace.value), a.frobenius.hessian.value
            checks = [
                (a.top_eigenvalues.values, b.top_eigenvalues.values, eig),
                (a.bottom_eigenvalues.values, b.bottom_eigenvalues.values, eig),
                (a.gauss_newton.top.values, b.gauss_newton.top.values, eig),
                (a.trace.value, b.trace.value, trace),
                (a.gauss_newton.trace.value, b.gauss_newton.trace.value, trace),
                (a.gauss_newton.residual_trace.value, b.gauss_newton.residual_trace.value, trace),
                (a.density.negative_mass.value, b.density.negative_mass.value, 1.0),
            ]
            checks += [
                (getattr(a.frobenius, p).value, getattr(b.frobenius, p).value, fro)
                for p in ("hessian", "gauss_newton", "residual")
            ]
            checks += [
                (getattr(a, f), getattr(b, f), getattr(a, f))
                for f in ("train_loss", "test_loss", "grad_norm")
            ]
            for x, y, scale in checks:
                error = np.max(np.abs(np.subtract(y, x))) / scale
                assert error < 1e-5, (name, a.step, x, y, error)
            assert (a.train_accuracy, a.test_accuracy) == (b.train_accuracy, b.test_accuracy)


def test_workdir_of_another_config_is_refused(smoke_run):
    config, workdir, _ = smoke_run
    other = load_config()
    with other.unlocked():
        other.train.learning_rate = 0.05
    with pytest.raises(RunDirError, match="train.learning_rate: 0.2 on disk, 0.05 now"):
        run_lib.run(other, workdir, progress=quiet())


def write_idx(path, array, code):
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def test_idx_and_npz_sources_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 255, (30, 4, 4)).astype(np.uint8),
        "y_train": (np.arange(30) % 3).astype(np.uint8),
        "x_test": rng.integers(0, 255, (10, 4, 4)).astype(np.uint8),
        "y_test": rng.integers(0, 3, 10).astype(np.uint8),
    }
    for key, stem in data_lib._IDX_NAMES.items():
        suffix = ".gz" if key.startswith("x") else ""
        write_idx(tmp_path / (stem + suffix), arrays[key], 0x08)
    config = load_config()
    with config.unlocked():
        config.data.source, config.data.path = "idx", str(tmp_path)
        config.data.standardize = False
    ds = data_lib.load(config.data)
    assert np.array_equal(ds.x_train, arrays["x_train"].astype(np.float32))
    assert np.array_equal(ds.y_test, arrays["y_test"]) and ds.num_classes == 3
    np.savez(
        tmp_path / "d.npz",
        **{k: v.astype(np.int64) if k.startswith("y") else v for k, v in arrays.items()},
    )
    with config.unlocked():
        config.data.source, config.data.path, config.data.standardize = (
            "npz",
            str(tmp_path / "d.npz"),
            True,
        )
    ds = data_lib.load(config.data)
    assert np.allclose(ds.x_train.reshape(30, -1).mean(0), 0, atol=1e-5)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(data_lib.DataError, match="bad magic number"):
        data_lib.read_idx(tmp_path / "bad" / "train-images-idx3-ubyte")
    (tmp_path / "bad" / "cut").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(data_lib.DataError, match="header is cut short"):
        data_lib.read_idx(tmp_path / "bad" / "cut")
    (tmp_path / "bad" / "fake.gz").write_bytes(b"not gzip at all")
    with pytest.raises(data_lib.DataError, match="cannot be read"):
        data_lib.read_idx(tmp_path / "bad" / "fake.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data_lib.DataError, match="lacks train-images-idx3-ubyte"):
        data_lib._idx(str(tmp_path / "empty"))
    for bad, match in (
        (dict(arrays, x_test=np.zeros((0, 4, 4))), "x_test is empty"),
        (dict(arrays, x_train=np.full((30, 2), "a")), "inputs must be numeric"),
    ):
        np.savez(
            tmp_path / "bad.npz",
            **{k: v.astype(np.int64) if k.startswith("y") else v for k, v in bad.items()},
        )
        with pytest.raises(data_lib.DataError, match=match):
            data_lib._npz(str(tmp_path / "bad.npz"))


def test_digits_split_is_deterministic():
    config = load_config()
    a, b = data_lib.load(config.data), data_lib.load(config.data)
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    assert a.x_train.shape == (200, 64) and a.num_classes == 10
    assert data_lib.fingerprint(a) == data_lib.fingerprint(b)
    with config.unlocked():
        config.data.num_train = 199
    assert data_lib.fingerprint(data_lib.load(config.data)) != data_lib.fingerprint(a)


def test_activations_by_name():
    x = jnp.linspace(-3, 3, 101)
    assert np.allclose(models.activation_fn("softplus:200")(x), jax.nn.relu(x), atol=5e-3)
    assert not np.allclose(
        models.activation_fn("gelu")(x), models.activation_fn("gelu_tanh")(x), atol=1e-5
    )
    assert np.allclose(models.activation_fn("leaky_relu:0.1")(-x), jnp.where(x > 0, -0.1 * x, -x))
    for bad, match in (
        ("softplus:-1", "beta must be positive"),
        ("tanh:2", "takes no parameter"),
        ("soft", "unknown activation"),
    ):
        with pytest.raises(ValueError, match=match):
            models.parse_activation(bad)


def test_softplus_beta_study_activations_tend_to_relu():
    # softplus(beta x) / beta against the formula in float64, for the study's betas: it exceeds
    # ReLU by at most log(2) / beta (at 0), so it approaches ReLU as beta grows.
    config = load_config("softplus_beta")
    betas = [models.parse_activation(a)[1] for a in config.activations[1:]]
    assert config.activations[0] == "relu" and betas == [1, 2, 5, 10, 20, 50]
    x = np.linspace(-4.0, 4.0, 801)
    gaps = []
    with jax.enable_x64(True):
        for name, beta in zip(config.activations[1:], betas, strict=True):
            got = np.asarray(models.activation_fn(name)(jnp.asarray(x)))
            assert np.allclose(got, np.logaddexp(0.0, beta * x) / beta, rtol=1e-12, atol=1e-14)
            gap = got - np.maximum(x, 0.0)
            assert np.all(gap > -1e-14) and np.max(gap) == pytest.approx(
                np.log(2) / beta, rel=1e-12
            )
            gaps.append(np.max(gap))
    assert np.all(np.diff(gaps) < 0)
    # The config validates, shares one compiled program across its seven activations and
    # measures the curvature by layer at the first and last steps only.
    config_lib.validate(config)
    assert run_lib.share_activations(config)
    assert "blocks" in config_lib.plan_at(config, 600) and "blocks" in config_lib.plan_at(config, 0)
    assert "blocks" not in config_lib.plan_at(config, 200)
    main = load_config("relu_vs_smooth")
    config_lib.validate(main)
    with_blocks = [s for s in config_lib.schedule(main) if "blocks" in config_lib.plan_at(main, s)]
    assert with_blocks == [0, 600]


def test_the_shared_program_computes_each_activation_exactly():
    # One compiled model for a sweep's activations (lax.switch on the data's activation column)
    # gives each activation's own network, bit for bit up to round-off.
    cfg = load_config().model
    shared = models.build(cfg, ("relu", "tanh", "gelu"), (5,), 3, seed=0)
    alone = models.build(cfg, ("tanh",), (5,), 3, seed=0)
    m_shared, _ = models.pure_functions(shared[0], jax.tree_util.tree_structure(shared[2]), "mse")
    m_alone, _ = models.pure_functions(alone[0], jax.tree_util.tree_structure(alone[2]), "mse")
    x = jax.random.normal(jax.random.key(1), (7, 5))
    want = m_alone(alone[1], models.with_activation({"x": x}, 0))
    got = m_shared(shared[1], models.with_activation({"x": x}, 1))
    assert np.allclose(got, want, rtol=1e-6, atol=1e-7)


def test_cli_rejects_a_misspelt_key_and_plots_a_run(tmp_path, smoke_run):
    _, workdir, _ = smoke_run
    args = ["run", "--config=configs/smoke.py", f"--workdir={tmp_path}"]
    out = cli(*args, "--config.train.stepz=5")
    assert out.returncode == 2
    assert 'error: config key train.stepz does not exist. Did you mean "steps"' in out.stderr
    bad_type = cli(*args, "--config.train.steps=abc")
    assert bad_type.returncode == 2 and "--config.train.steps=abc" in bad_type.stderr
    moved = cli(*args, "--config.measure.top_k=4")
    assert moved.returncode == 2
    assert (
        "config key measure.top_k does not exist. It moved to measure.top_eigenvalues.k"
        in moved.stderr
    )
    assert not (tmp_path / "members").exists()
    out = cli("plot", f"--workdir={workdir}")
    assert out.returncode == 0, out.stderr
    assert "| relu | 1 | 0 | 20 |" in out.stdout


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


def test_curvature_can_be_measured_on_a_named_subset_of_the_test_split(tmp_path):
    config = load_config()
    with config.unlocked():
        config.activations, config.train.steps, config.measure.every = ("relu",), 0, 1
        config.measure.split, config.measure.num_examples = "test", 50
        config.measure.quantities = ("top_eigenvalues",)
    run_lib.run(config, tmp_path, progress=quiet())
    member = experiments.load_run(tmp_path).members["relu-seed0"]
    record = member.records[0]
    dataset = data_lib.load(config.data)
    subset = {"x": jnp.asarray(dataset.x_test[:50]), "y": jnp.asarray(dataset.y_test[:50])}
    assert np.array_equal(member.measure_data["x"], subset["x"])
    params = member.params(0)
    assert record.train_loss == pytest.approx(float(member.loss(params, subset)), rel=1e-6)
    exact = np.linalg.eigvalsh(
        np.asarray(cv.dense(cv.hessian(member.loss, params, subset)), np.float64)
    )
    assert record.top_eigenvalues.values[0] == pytest.approx(exact[-1], rel=1e-3)


@pytest.mark.parametrize("source", ["teacher", "mixture"])
def test_synthetic_sources_are_deterministic_and_learnable(source):
    config = load_config()
    with config.unlocked():
        config.data.source, config.data.num_examples, config.data.num_classes = source, 400, 4
    a, b = data_lib.load(config.data), data_lib.load(config.data)
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_train, b.y_train)
    assert a.x_train.shape == (200, 20) and a.num_classes <= 4  # num_train=200 in smoke
    assert len(np.unique(a.y_train)) >= 2
    assert abs(float(a.x_train.mean())) < 0.05  # standardised on the training inputs


def test_schedule_and_per_measurement_plans():
    config = load_config()
    with config.unlocked():
        config.train.steps = 100
        config.measure.every = 25
        config.measure.density.steps = (0, 60)
        config.measure.trace.every = 50
    assert config_lib.schedule(config) == [0, 25, 50, 60, 75, 100]
    assert "density" in config_lib.plan_at(config, 60) and "trace" not in config_lib.plan_at(
        config, 60
    )
    assert "top_eigenvalues" not in config_lib.plan_at(config, 60)
    assert "density" in config_lib.plan_at(config, 100)  # the last step always
    assert "trace" in config_lib.plan_at(config, 50) and "trace" not in config_lib.plan_at(
        config, 25
    )

"""Experiments end to end on the smoke config: numbers written, resume, errors before training."""

import gzip
import importlib.util
import json
import pathlib
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvature as cv

pytest.importorskip("flax")
from experiments import config as config_lib  # noqa: E402
from experiments import data as data_lib  # noqa: E402
from experiments import models, report, storage  # noqa: E402
from experiments import run as run_lib  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def cli(*args, timeout=180):
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
    return [{k: v for k, v in r.items() if k != "timings"} for r in records]


def test_smoke_run_writes_every_measurement(smoke_run):
    config, workdir, statuses = smoke_run
    assert {s["state"] for s in statuses.values()} == {"done"}
    assert set(statuses) == {"relu-seed0", "tanh-seed0"}
    for name in statuses:
        records = storage.read_metrics(workdir / "members" / name / "metrics.jsonl")
        assert [r["step"] for r in records] == [0, 10, 20]
        for r in records:
            spectra = np.load(workdir / "members" / name / "spectra" / f"step_{r['step']:06d}.npz")
            assert spectra["slq_nodes"].shape == (2, 15)
            assert np.allclose(spectra["slq_weights"].sum(1), 1.0, atol=1e-5)
            assert np.allclose(spectra["top"], r["hessian"]["top"])
            assert r["lr_times_top"] == pytest.approx(0.2 * r["hessian"]["top"][0])
    assert json.loads((workdir / "config.json").read_text())["activations"] == ["relu", "tanh"]
    prov = json.loads((workdir / "provenance.json").read_text())["invocations"][0]
    for key in ("packages", "git", "seeds", "dtype", "matmul_precision", "device_count", "command"):
        assert key in prov
    summary = (workdir / "summary.md").read_text()
    assert "| relu | 1 | 0 | 20 |" in summary and "| tanh | 1 | 0 | 20 |" in summary


def test_recorded_curvature_matches_the_saved_parameters(smoke_run):
    config, workdir, _ = smoke_run
    dataset = data_lib.load(config.data)
    for activation in config.activations:
        member = workdir / "members" / f"{activation}-seed0"
        fns, template = run_lib._setup(config, dataset, activation, 0)
        optimizer = run_lib.make_optimizer(*run_lib.optimizer_args(config.train))
        (params, _), step = storage.load_checkpoint(
            member / "checkpoint.npz", (template, optimizer.init(template))
        )
        assert step == 20
        final = storage.read_metrics(member / "metrics.jsonl")[-1]
        data = {"x": jnp.asarray(dataset.x_train), "y": jnp.asarray(dataset.y_train)}
        H = cv.hessian(fns[2], params, data)
        # Same estimator, same key: the same number.
        again = cv.eigsh(
            H, k=6, which="BE", num_steps=20, key=run_lib.measurement_keys(0, 20)["eig"]
        )
        assert np.allclose(again.eigenvalues[:3], final["hessian"]["top"], rtol=1e-5)
        assert np.allclose(again.eigenvalues[3:][::-1][:2], final["hessian"]["bottom"], rtol=1e-5)
        # And the truth: the dense Hessian of the saved parameters.
        exact = np.linalg.eigvalsh(np.asarray(cv.dense(H), np.float64))
        assert final["hessian"]["top"][0] == pytest.approx(exact[-1], rel=1e-3)
        assert final["hessian"]["trace"] == pytest.approx(
            np.sum(exact), abs=5 * final["hessian"]["trace_se"] + 1e-4
        )
        loss = float(fns[2](params, data))
        assert final["train_loss"] == pytest.approx(loss, rel=1e-5)


def test_relu_residual_has_zero_trace(smoke_run):
    # R = H - G has a zero diagonal for ReLU networks, so tr R = 0: the estimate sits within its
    # error bar of zero. For tanh the same-layer terms make it clearly non-zero.
    _, workdir, _ = smoke_run
    for r in storage.read_metrics(workdir / "members" / "relu-seed0" / "metrics.jsonl"):
        assert abs(r["residual"]["trace"]) <= 4 * r["residual"]["trace_se"] + 1e-6
        assert r["residual"]["relative_frobenius"] > 0.01  # yet R itself is not small
    last = storage.read_metrics(workdir / "members" / "tanh-seed0" / "metrics.jsonl")[-1]
    assert abs(last["residual"]["trace"]) > 4 * last["residual"]["trace_se"]


def test_initialisation_identical_across_activations_and_runs(tmp_path, smoke_run):
    config, workdir, _ = smoke_run
    dataset = data_lib.load(config.data)
    _, relu = run_lib._setup(config, dataset, "relu", 0)
    _, tanh = run_lib._setup(config, dataset, "tanh", 0)
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
        small.measure.gauss_newton = False
    run_lib.run(small, tmp_path, progress=quiet())
    first = storage.read_metrics(workdir / "members" / "relu-seed0" / "metrics.jsonl")[0]
    second = storage.read_metrics(tmp_path / "members" / "relu-seed0" / "metrics.jsonl")[0]
    for key in ("train_loss", "test_accuracy", "grad_norm"):
        assert first[key] == second[key]
    assert first["hessian"]["top"] == second["hessian"]["top"]


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    # Adam (optimizer state to save and restore) on minibatches (an order to resume mid-epoch).
    config = load_config()
    with config.unlocked():
        config.train.optimizer, config.train.learning_rate, config.train.batch_size = (
            "adam",
            0.01,
            64,
        )
        config.measure.gauss_newton = False
    run_lib.run(config, tmp_path / "reference", progress=quiet())
    calls = []

    def crash_at_second(activation, seed, step):
        calls.append((activation, step))
        if len(calls) == 2:  # step 10 is recorded, but its checkpoint is not yet written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_lib.run(config, tmp_path / "run", on_measurement=crash_at_second, progress=quiet())
    assert calls == [("relu", 0), ("relu", 10)]
    resumed = []
    run_lib.run(
        config,
        tmp_path / "run",
        on_measurement=lambda a, s, t: resumed.append((a, t)),
        progress=quiet(),
    )
    # Nothing finished is measured again: relu retrains 0 -> 10 from its checkpoint, skips the
    # recorded step 10 and measures only step 20.
    assert resumed == [("relu", 20), ("tanh", 0), ("tanh", 10), ("tanh", 20)]
    for name in ("relu-seed0", "tanh-seed0"):
        got = storage.read_metrics(tmp_path / "run" / "members" / name / "metrics.jsonl")
        want = storage.read_metrics(tmp_path / "reference" / "members" / name / "metrics.jsonl")
        assert strip_timings(got) == strip_timings(want)
        with (
            np.load(tmp_path / "run" / "members" / name / "checkpoint.npz") as a,
            np.load(tmp_path / "reference" / "members" / name / "checkpoint.npz") as b,
        ):
            assert len(a.files) > 8  # parameters and Adam's moments
            assert all(np.array_equal(a[k], b[k]) for k in a.files)


def test_a_second_process_cannot_run_in_the_same_workdir(tmp_path):
    config = load_config()
    with storage.WorkdirLock(tmp_path):
        with pytest.raises(config_lib.ConfigError, match="another process is running"):
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
        config.measure.gauss_newton = False
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
        (lambda c: setattr(c.data, "source", "mnist"), "config key data.source"),
        (
            lambda c: (
                setattr(c.data, "source", "npz"),
                setattr(c.data, "path", "/nonexistent/d.npz"),
            ),
            "data.path: /nonexistent/d.npz does not exist",
        ),
        (lambda c: setattr(c.measure, "lanczos_steps", 2), "config key measure.lanczos_steps"),
        (lambda c: setattr(c.train, "optimizer", "lbfgs"), "config key train.optimizer"),
        (
            lambda c: setattr(c.measure, "slq_steps", 10_000),
            "config key measure.slq_steps: 10000 exceeds the 682 parameters",
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
    ],
)
def test_bad_config_fails_before_training(tmp_path, change, match):
    config = load_config()
    with config.unlocked():
        change(config)
    with pytest.raises((config_lib.ConfigError, data_lib.DataError), match=match):
        run_lib.run(config, tmp_path, progress=quiet())
    assert not (tmp_path / "members").exists()


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


def test_workdir_of_another_config_is_refused(smoke_run):
    config, workdir, _ = smoke_run
    other = load_config()
    with other.unlocked():
        other.train.learning_rate = 0.05
    with pytest.raises(config_lib.ConfigError, match="train.learning_rate: 0.2 on disk, 0.05 now"):
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
        "y_train": rng.integers(0, 3, 30).astype(np.uint8),
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


def test_cli_rejects_a_misspelt_key_and_plots_a_run(tmp_path, smoke_run):
    _, workdir, _ = smoke_run
    args = ["run", "--config=configs/smoke.py", f"--workdir={tmp_path}"]
    out = cli(*args, "--config.train.stepz=5")
    assert out.returncode == 2
    assert 'error: config key train.stepz does not exist. Did you mean "steps"' in out.stderr
    bad_type = cli(*args, "--config.train.steps=abc")
    assert bad_type.returncode == 2 and "--config.train.steps=abc" in bad_type.stderr
    assert not (tmp_path / "members").exists()
    out = cli("plot", f"--workdir={workdir}")
    assert out.returncode == 0, out.stderr
    assert "| relu | 1 | 0 | 20 |" in out.stdout
    assert report.load_run(workdir)["members"].keys() == {"relu-seed0", "tanh-seed0"}


def test_cnn_in_float64_with_momentum_runs_end_to_end(tmp_path):
    config = load_config()
    with config.unlocked():
        config.activations = ("gelu_tanh",)
        config.dtype = "float64"
        config.model.kind, config.model.channels = "cnn", (4,)
        config.data.image_shape, config.data.num_train = (8, 8, 1), 64
        config.train.optimizer, config.train.steps, config.measure.every = "momentum", 4, 4
        config.measure.gauss_newton = False
    statuses = run_lib.run(config, tmp_path, progress=quiet())
    assert statuses == {"gelu_tanh-seed0": {"state": "done", "step": 4}}
    records = storage.read_metrics(tmp_path / "members" / "gelu_tanh-seed0" / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 4]
    assert records[0]["edge_of_stability"] == pytest.approx((2 + 2 * 0.9) / 0.2)
    with np.load(tmp_path / "members" / "gelu_tanh-seed0" / "spectra" / "step_000004.npz") as f:
        assert f["slq_nodes"].dtype == np.float64
    with np.load(tmp_path / "members" / "gelu_tanh-seed0" / "checkpoint.npz") as f:
        assert f["leaf_00000"].dtype == np.float64


def test_curvature_can_be_measured_on_a_named_subset_of_the_test_split(tmp_path):
    config = load_config()
    with config.unlocked():
        config.activations, config.train.steps, config.measure.every = ("relu",), 0, 1
        config.measure.split, config.measure.num_examples = "test", 50
        config.measure.gauss_newton = False
    run_lib.run(config, tmp_path, progress=quiet())
    record = storage.read_metrics(tmp_path / "members" / "relu-seed0" / "metrics.jsonl")[0]
    dataset = data_lib.load(config.data)
    fns, params = run_lib._setup(config, dataset, "relu", 0)
    subset = {"x": jnp.asarray(dataset.x_test[:50]), "y": jnp.asarray(dataset.y_test[:50])}
    assert record["train_loss"] == pytest.approx(float(fns[2](params, subset)), rel=1e-6)
    exact = np.linalg.eigvalsh(np.asarray(cv.dense(cv.hessian(fns[2], params, subset)), np.float64))
    assert record["hessian"]["top"][0] == pytest.approx(exact[-1], rel=1e-3)


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

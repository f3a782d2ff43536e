"""``load_run``: a reloaded run reproduces the numbers it recorded; checkpoints keep leaves
under their pytree paths."""

import json
import pathlib
import shutil
import warnings

import numpy as np
import pytest

import curvature as cv

pytest.importorskip("flax")
from workbench_helpers import cli, load_config, quiet  # noqa: E402
from workbench_helpers import smoke_run as run_smoke_once  # noqa: E402

import experiments  # noqa: E402
from experiments import data as data_lib  # noqa: E402
from experiments import (  # noqa: E402
    measure,
    storage,
)
from experiments import run as run_lib  # noqa: E402


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    return run_smoke_once(tmp_path_factory)


def test_load_run_reproduces_the_recorded_curvature(smoke_run):
    # The load_run round trip: the reloaded loss, parameters and measurement set give the
    # recorded numbers at every measured step (kept by default), and the truth agrees.
    config, workdir, _ = smoke_run
    run = experiments.load_run(workdir)
    assert run.members.keys() == {"relu-seed0", "tanh-seed0"}
    dataset = data_lib.load(config.data)
    assert np.array_equal(run.data.x_train, dataset.x_train)
    for member in run.members.values():
        assert member.checkpoint_steps == [0, 10, 20]
        with pytest.warns(DeprecationWarning, match="checkpoint_steps is a property"):
            assert member.checkpoint_steps() == [0, 10, 20]  # as when it was a method
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


# Written by the release before the budgets were renamed (lanczos_steps, matvecs, probes, chunk,
# trace_matvecs ...): the smoke config with activations=('relu',), train.steps=10,
# measure.every=10, quantities (lambda_max, top_eigenvalues, trace, gauss_newton, frobenius,
# density, gradient_noise), gradient_noise.num_examples=20 and .chunk=8, density.lanczos_steps=12.
RUN_BEFORE_RENAMES = pathlib.Path(__file__).parent / "data" / "run_before_renames"


def test_a_run_directory_from_before_the_renames_loads_resumes_and_plots(tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(RUN_BEFORE_RENAMES, workdir)
    on_disk = json.loads((workdir / "config.json").read_text())["measure"]
    assert on_disk["density"]["lanczos_steps"] == 12 and on_disk["gradient_noise"]["chunk"] == 8
    member_dir = workdir / "members" / "relu-seed0"
    kept = {p: p.read_bytes() for p in sorted(member_dir.rglob("*")) if p.is_file()}
    # load_run: the stored configs read with today's names, the records as they were.
    member = experiments.load_run(workdir).members["relu-seed0"]
    assert member.config.measure.density.num_steps == 12
    assert member.config.measure.gradient_noise.batch_size == 8
    assert "lanczos_steps" not in member.config.measure.density
    assert member.steps == [0, 10] and member.records[-1].density.num_steps == 12
    assert member.records[-1].gradient_noise.num_examples == 20
    # Resumed with the config it was made from, written with today's names: the same config
    # (the same fingerprints), so nothing is measured again and nothing of the member changes.
    config = load_config()
    with config.unlocked():
        config.activations, config.train.steps, config.measure.every = ("relu",), 10, 10
        config.measure.quantities = (
            "lambda_max",
            "top_eigenvalues",
            "trace",
            "gauss_newton",
            "frobenius",
            "density",
            "gradient_noise",
        )
        config.measure.gradient_noise.num_examples = 20
        config.measure.gradient_noise.batch_size = 8
        config.measure.density.num_steps = 12
    measured = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the run directory's old names are not the user's to fix
        statuses = run_lib.run(
            config, workdir, on_measurement=lambda *a: measured.append(a), progress=quiet()
        )
    assert statuses == {"relu-seed0": {"state": "done", "step": 10}} and measured == []
    assert {p: p.read_bytes() for p in sorted(member_dir.rglob("*")) if p.is_file()} == kept
    # On the command line too: resumed with the config it stored, and plotted.
    shutil.copytree(RUN_BEFORE_RENAMES, tmp_path / "again")
    out = cli("run", f"--workdir={tmp_path / 'again'}", "--quiet")
    assert out.returncode == 0, out.stderr
    assert "deprecated" not in out.stderr and "| relu | 1 | 0 | 10 |" in out.stdout
    out = cli("plot", f"--workdir={tmp_path / 'again'}")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "again" / "figures" / "density.png").exists()
    records = storage.read_metrics(tmp_path / "again" / "members" / "relu-seed0" / "metrics.jsonl")
    assert records == storage.read_metrics(RUN_BEFORE_RENAMES / "members/relu-seed0/metrics.jsonl")

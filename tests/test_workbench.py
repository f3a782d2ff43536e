"""The experiment workbench: sweeps over any field, measurement plans (built-in and a user's
own), honest summaries, and run directories that never mix or lose results."""

import errno
import io
import json
import os
import shutil
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvature as cv

pytest.importorskip("flax")
from test_experiments import ROOT, cli, load_config, quiet, strip_timings  # noqa: E402

import experiments  # noqa: E402
from experiments import lifecycle, measure, report, storage, train  # noqa: E402
from experiments import run as run_lib  # noqa: E402
from experiments.errors import RunDirError  # noqa: E402
from experiments.record import Eigenvalues, Estimate, Record  # noqa: E402

LIGHT = ("top_eigenvalues", "bottom_eigenvalues", "trace")


def light_config(**train):
    config = load_config()
    with config.unlocked():
        config.measure.quantities = LIGHT
        for key, value in train.items():
            setattr(config.train, key, value)
    return config


def snapshot(folder):
    """Every file under ``folder`` with its bytes: to show that nothing was written."""
    return {
        p.relative_to(folder): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished light run to copy and damage."""
    workdir = tmp_path_factory.mktemp("finished")
    run_lib.run(light_config(), workdir, progress=quiet())
    return workdir


def resume(workdir) -> list[tuple[str, int]]:
    """Run the light config again in ``workdir``; the (member, step) pairs it measured."""
    measured = []
    run_lib.run(
        light_config(),
        workdir,
        on_measurement=lambda n, s: measured.append((n, s)),
        progress=quiet(),
    )
    return measured


def copy_of(finished, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


# --------------------------------------------------------------------------------------------
# Sweeps.


def test_a_sweep_over_the_learning_rate_runs_the_product(tmp_path):
    config = light_config()
    with config.unlocked():
        config.activations = ("relu",)
        config.seeds = (0, 1)
        config.sweep = ("train.learning_rate=0.1,0.3",)
    statuses = run_lib.run(config, tmp_path, progress=quiet())
    assert list(statuses) == [
        "relu-learning_rate=0.1-seed0",
        "relu-learning_rate=0.1-seed1",
        "relu-learning_rate=0.3-seed0",
        "relu-learning_rate=0.3-seed1",
    ]
    run = experiments.load_run(tmp_path)
    for name, member in run.members.items():
        lr = member.overrides["train.learning_rate"]
        assert member.config.train.learning_rate == lr and f"learning_rate={lr}" in name
        assert member.records[-1].learning_rate == lr
        assert member.records[-1].edge_of_stability == pytest.approx(2 / lr)
        assert float(member.opt_state(20).hyperparams["learning_rate"]) == pytest.approx(lr)
    # Members that share a seed start from the same parameters; a larger step moves further.
    a, b = run.members["relu-learning_rate=0.1-seed0"], run.members["relu-learning_rate=0.3-seed0"]
    assert a.records[0].train_loss == b.records[0].train_loss
    assert b.records[-1].train_loss < a.records[-1].train_loss
    rows = report.summary_rows(run)
    assert [r["group"] for r in rows] == ["relu-learning_rate=0.1", "relu-learning_rate=0.3"]
    assert all(r["seeds"] == 2 for r in rows)
    csv = (tmp_path / "summary.csv").read_text().splitlines()
    assert csv[0].startswith("group,activation,train.learning_rate,seeds")
    assert csv[1].startswith("relu-learning_rate=0.1,relu,0.1,2")


def test_sweep_from_the_command_line_and_compare_by_edge(tmp_path):
    args = ["--config=configs/smoke.py", "--config.activations=('tanh',)"]
    args += ["--config.measure.quantities=('lambda_max',)", "--config.train.steps=10"]
    out = cli(
        "run",
        *args,
        f"--workdir={tmp_path / 'a'}",
        "--sweep=train.learning_rate=0.2,0.4",
        "--sweep=model.width=4,8",
        "--quiet",
    )
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in (tmp_path / "a" / "members").iterdir())
    assert names == [
        f"tanh-learning_rate={lr}-width={w}-seed0" for lr in (0.2, 0.4) for w in (4, 8)
    ]
    cmp = cli("compare", f"--runs={tmp_path / 'a'}", f"--workdir={tmp_path / 'cmp'}")
    assert cmp.returncode == 0, cmp.stderr
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "tanh-learning_rate=0.4-width=8" in text and "λmax/edge" in text


# --------------------------------------------------------------------------------------------
# Measurement plans.


def test_a_lambda_max_plan_costs_its_lanczos_steps(tmp_path):
    config = load_config()
    with config.unlocked():
        config.activations = ("tanh",)
        config.measure.quantities = ("lambda_max",)
        config.measure.lambda_max.lanczos_steps = 12
        config.measure.save_eigenvectors = 1
    run_lib.run(config, tmp_path, progress=quiet())
    member = experiments.load_run(tmp_path).members["tanh-seed0"]
    for r in member.records:
        assert r.lambda_max.num_matvecs == 13  # 12 Lanczos steps + 1 residual check
        assert r.trace is None and r.top_eigenvalues is None and r.density is None
        assert set(r.timings) == {"evaluate", "lambda_max"}
        assert r.sharpness.values == r.lambda_max.values
    # The saved eigenvector is the one of the recorded eigenvalue.
    vector = member.eigenvectors(20)[:, 0]
    H = cv.hessian(member.loss, member.params(20), member.measure_data)
    assert member.eigenvectors(20).shape == (H.size, 1)
    rayleigh = float(vector @ (H @ jnp.asarray(vector)))
    assert rayleigh == pytest.approx(member.records[-1].lambda_max.values[0], rel=1e-4)
    assert not (member.dir / "spectra").exists()  # nothing else to keep


def test_a_users_measurement_registered_in_the_config_file(tmp_path):
    config_file = tmp_path / "mine.py"
    config_file.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(ROOT / "configs")!r})
            import jax, jax.numpy as jnp
            import curvature as cv
            from experiments import measure
            from smoke import get_config as smoke

            @measure.register_measurement("hessian_diagonal_sum", defaults={{"scale": 2.0}})
            def diagonal_sum(ctx):
                H = cv.hessian(ctx.loss, ctx.params, ctx.data)
                d = cv.diagonal(H, num_matvecs=8, key=ctx.key)
                return {{"value": ctx.settings.scale * float(d.diagonal.sum()), "n": H.size}}

            def get_config():
                c = smoke()
                c.activations = ("relu",)
                c.train.steps = 10
                c.measure.quantities = ("lambda_max", "hessian_diagonal_sum")
                return c
            """
        )
    )
    out = cli("run", f"--config={config_file}", f"--workdir={tmp_path / 'run'}", "--quiet")
    assert out.returncode == 0, out.stderr
    run = experiments.load_run(tmp_path / "run")
    member = run.members["relu-seed0"]
    assert member.config.measure.hessian_diagonal_sum.scale == 2.0
    for r in member.records:
        assert set(r.extra) == {"hessian_diagonal_sum"}
        assert r.extra["hessian_diagonal_sum"]["n"] == 682
        H = cv.hessian(member.loss, member.params(r.step), member.measure_data)
        exact = 2.0 * float(jnp.trace(cv.dense(H)))
        assert r.extra["hessian_diagonal_sum"]["value"] == pytest.approx(exact, rel=0.5)


def test_diagonal_optimizer_state_and_gradient_noise_against_exact_values(tmp_path):
    config = load_config()
    with config.unlocked():
        config.activations = ("tanh",)
        config.train.optimizer, config.train.learning_rate = "adam", 0.01
        config.train.steps, config.measure.every = 10, 10
        config.measure.quantities = ("diagonal", "optimizer_state", "gradient_noise")
        config.measure.diagonal.exact = True
        config.measure.optimizer_state.exact = True
        config.measure.gradient_noise.num_examples = 40
        config.measure.gradient_noise.chunk = 16
    run_lib.run(config, tmp_path, progress=quiet())
    member = experiments.load_run(tmp_path).members["tanh-seed0"]
    record = member.records[-1]
    params = member.params(10)
    H = cv.hessian(member.loss, params, member.measure_data)
    diag = np.diag(np.asarray(cv.dense(H)))
    spectra = member.spectra(10)
    assert np.allclose(spectra["diagonal"], diag, rtol=1e-5, atol=1e-7)
    assert record.diagonal.exact and record.diagonal.mean.value == pytest.approx(
        diag.mean(), rel=1e-5
    )
    # Adam's bias-corrected second moment, against the exact diagonal.
    nu_tree = train.OPTIMIZERS.get("adam").second_moment(member.opt_state(10))
    nu = np.asarray(H.ravel(nu_tree))
    assert np.allclose(spectra["second_moment"], nu)
    keep = diag != 0
    assert record.optimizer_state.second_moment.num_zeros == int((~keep).sum())
    want = np.corrcoef(nu[keep], diag[keep])[0, 1]
    assert record.optimizer_state.second_moment.pearson == pytest.approx(want, rel=1e-6)
    assert set(record.optimizer_state.per_layer) == {
        "['hidden'][0]['bias'].value",
        "['hidden'][0]['kernel'].value",
        "['hidden'][1]['bias'].value",
        "['hidden'][1]['kernel'].value",
        "['readout']['bias'].value",
        "['readout']['kernel'].value",
    }
    # Per-example gradients directly: tr of their covariance and B_simple.
    data = {k: v[:40] for k, v in member.measure_data.items()}
    per = jax.vmap(
        lambda x, y: H.ravel(jax.grad(member.loss)(params, {"x": x[None], "y": y[None]}))
    )(data["x"], data["y"])
    per = np.asarray(per, np.float64)
    mean = per.mean(0)
    trace_cov = np.sum((per - mean) ** 2) / 39
    noise = record.gradient_noise
    assert noise.num_examples == 40
    assert noise.trace_covariance == pytest.approx(trace_cov, rel=1e-3)
    assert noise.simple_noise_scale == pytest.approx(trace_cov / (mean @ mean), rel=1e-3)


# --------------------------------------------------------------------------------------------
# Honest summaries.


def test_summary_marks_unconverged_values_and_unreadable_estimates(tmp_path):
    config = load_config()
    with config.unlocked():
        config.activations = ("tanh",)
        config.train.steps = 10
        config.measure.quantities = ("top_eigenvalues", "bottom_eigenvalues", "trace", "density")
        config.measure.top_eigenvalues.lanczos_steps = 6  # too few to converge
        config.measure.bottom_eigenvalues.lanczos_steps = 6  # both ends: one run of 6 steps
        config.measure.trace.matvecs = 4
        config.measure.density.lanczos_steps = 4
    run_lib.run(config, tmp_path, progress=quiet())
    record = experiments.load_run(tmp_path).members["tanh-seed0"].records[-1]
    assert not all(record.top_eigenvalues.converged)
    text = (tmp_path / "summary.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| tanh"))
    assert "†" in row and "(coarse)" in row
    assert "† not converged" in text and "coarse: fewer than 20 Lanczos nodes" in text
    assert "nan" not in text.lower().replace("n/a", "")


def test_cells_carry_their_error_bars():
    # One seed: ± the estimator's standard error; an estimate within 2 SE of zero is not a number.
    assert report.cell([Estimate(7.3, 0.1)]).text() == "7.3 ± 0.1"
    assert report.cell([Estimate(0.007, 0.006)]).text() == "≈0 (±0.012)"
    assert report.cell([Estimate(1.0, 0.1), Estimate(3.0, 0.1)]).text() == "2 ± 1.4"
    unconverged = Eigenvalues((2.0,), (0.1,), (False,))
    assert report.cell([unconverged]).text() == "2†"
    assert report.cell([unconverged]).unconverged == pytest.approx(0.05)
    assert report.cell([float("nan")]).text() == "n/a"


def test_records_round_trip_through_json():
    record = Record(
        step=3,
        member="relu-seed0",
        fingerprint="abc",
        train_loss=1.0,
        train_accuracy=0.5,
        test_loss=float("nan"),
        test_accuracy=0.25,
        grad_norm=2.0,
        learning_rate=0.1,
        edge_of_stability=20.0,
        lambda_max=Eigenvalues((4.0,), (1e-4,), (True,), 21),
        trace=Estimate(12.0, 0.5, 30),
        extra={"mine": {"a": 1}},
    )
    again = Record.from_json(json.loads(json.dumps(record.to_json())))
    assert again.lambda_max == record.lambda_max and again.trace == record.trace
    assert np.isnan(again.test_loss) and again.extra == {"mine": {"a": 1}}
    assert again.sharpness_ratio == pytest.approx(0.2)


# --------------------------------------------------------------------------------------------
# Run directories that never mix or lose results (each case failed on the landed main).


def test_a_deleted_config_json_does_not_let_another_config_in(finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    (workdir / "config.json").unlink()
    before = snapshot(workdir)
    other = light_config(learning_rate=0.05, steps=30)
    with pytest.raises(
        RunDirError,
        match=r"members/relu-seed0 holds results of another config .*train.learning_rate: 0.2 on disk, 0.05 now",
    ):
        run_lib.run(other, workdir, progress=quiet())
    assert snapshot(workdir) == before
    # A sweep that does not match the folders on disk is refused as well.
    more = light_config()
    with more.unlocked():
        more.activations = ("gelu",)
    with pytest.raises(RunDirError, match="holds members of another config"):
        run_lib.run(more, workdir, progress=quiet())


def test_data_changed_between_a_kill_and_the_resume_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)), np.arange(60) % 3
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:20], y_test=y[:20])
    config = light_config()
    with config.unlocked():
        config.activations = ("relu",)
        config.data.source, config.data.path = "npz", str(tmp_path / "d.npz")
        config.data.num_train = config.data.num_test = 0
    calls = []

    def kill(name, step):
        calls.append(step)
        if step == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_lib.run(config, tmp_path / "run", on_measurement=kill, progress=quiet())
    x[0, 0] += 1.0
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:20], y_test=y[:20])
    before = snapshot(tmp_path / "run")
    with pytest.raises(RunDirError, match="holds a run on other data"):
        run_lib.run(config, tmp_path / "run", progress=quiet())
    assert snapshot(tmp_path / "run") == before
    (tmp_path / "run" / "run.json").unlink()  # even without the run's own record of it
    with pytest.raises(RunDirError, match="relu-seed0 holds results of another config or data set"):
        run_lib.run(config, tmp_path / "run", progress=quiet())


@pytest.mark.parametrize("damage", ["truncate_last", "lose_step0", "lose_middle"])
def test_a_lost_record_of_a_finished_member_is_measured_again(finished, tmp_path, damage):
    workdir = copy_of(finished, tmp_path)
    log = workdir / "members" / "tanh-seed0" / "metrics.jsonl"
    original = storage.read_metrics(log)
    lines = log.read_text().splitlines(keepends=True)
    if damage == "truncate_last":
        log.write_text("".join(lines[:-1]) + lines[-1][:40])
    elif damage == "lose_step0":
        log.write_text("".join(lines[1:]))
    else:
        log.write_text(lines[0] + lines[2])
    lost = {"truncate_last": 20, "lose_step0": 0, "lose_middle": 10}[damage]
    assert resume(workdir) == [("tanh-seed0", lost)]
    repaired = sorted(storage.read_metrics(log), key=lambda r: r["step"])
    # The same numbers: the same parameters, the same probes.
    assert strip_timings(repaired) == strip_timings(original)
    assert "| tanh | 1 | 0 | 20 |" in (workdir / "summary.md").read_text()


def test_a_corrupt_spectra_file_is_measured_again(finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    member = workdir / "members" / "relu-seed0"
    original = storage.read_metrics(member / "metrics.jsonl")
    good = (member / "spectra" / "step_000010.npz").read_bytes()
    (member / "spectra" / "step_000010.npz").write_bytes(b"junk")
    assert resume(workdir) == [("relu-seed0", 10)]
    again = storage.read_metrics(member / "metrics.jsonl")
    assert [r["step"] for r in again] == [0, 20, 10]  # one record a step, the new one appended
    again.sort(key=lambda r: r["step"])
    assert strip_timings(again) == strip_timings(original)
    repaired = storage.read_npz(member / "spectra" / "step_000010.npz")
    with np.load(io.BytesIO(good)) as want:
        assert sorted(repaired) == sorted(want.files)
        assert all(np.array_equal(repaired[k], want[k]) for k in want.files)


def test_a_lost_record_without_kept_parameters_is_retrained(tmp_path):
    config = light_config()
    with config.unlocked():
        config.activations = ("relu",)
        config.measure.keep_params = False
    run_lib.run(config, tmp_path, progress=quiet())
    member = tmp_path / "members" / "relu-seed0"
    assert lifecycle.MemberDir(member).checkpoint_steps() == [20]
    original = storage.read_metrics(member / "metrics.jsonl")
    lines = (member / "metrics.jsonl").read_text().splitlines(keepends=True)
    (member / "metrics.jsonl").write_text(lines[0] + lines[2])
    run_lib.run(config, tmp_path, progress=quiet())
    again = sorted(storage.read_metrics(member / "metrics.jsonl"), key=lambda r: r["step"])
    assert [r["top_eigenvalues"] for r in again] == [r["top_eigenvalues"] for r in original]
    assert lifecycle.MemberDir(member).checkpoint_steps() == [20]


@pytest.mark.parametrize(
    "target,content,match",
    [
        (
            "members/relu-seed0/checkpoints/step_000020.npz",
            b"PK\x03\x04garbage",
            "the checkpoint is corrupt",
        ),
        ("members/relu-seed0/status.json", b'{"state": "runn', "status.json is corrupt"),
        ("config.json", b"{not json", "config.json is corrupt"),
        ("members/relu-seed0/member.json", b"[1, 2]", "member.json is corrupt"),
    ],
)
def test_corrupt_files_are_one_line_errors_before_anything_is_written(
    finished, tmp_path, target, content, match
):
    workdir = copy_of(finished, tmp_path)
    (workdir / target).write_bytes(content)
    before = snapshot(workdir)
    with pytest.raises(RunDirError, match=match) as err:
        run_lib.run(light_config(), workdir, progress=quiet())
    assert "\n" not in str(err.value) and "allow_pickle" not in str(err.value)
    assert snapshot(workdir) == before


def test_corrupt_spectra_and_checkpoint_on_the_command_line(finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    (workdir / "members" / "tanh-seed0" / "spectra" / "step_000020.npz").write_bytes(b"junk")
    out = cli("plot", f"--workdir={workdir}")
    assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1
    assert "step_000020.npz: the spectra file is corrupt" in out.stderr
    checkpoint = workdir / "members" / "relu-seed0" / "checkpoints" / "step_000010.npz"
    checkpoint.write_bytes(b"junk")
    args = ["run", "--config=configs/smoke.py", f"--workdir={workdir}"]
    args.append("--config.measure.quantities=('top_eigenvalues', 'bottom_eigenvalues', 'trace')")
    out = cli(*args)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "step_000010.npz: the checkpoint is corrupt" in out.stderr
    assert "allow_pickle" not in out.stderr and "Traceback" not in out.stderr


def test_config_files_that_are_missing_or_raise(tmp_path):
    out = cli("run", "--config=configs/nope.py", f"--workdir={tmp_path / 'a'}")
    assert (
        out.returncode == 2 and out.stderr == "error: config file configs/nope.py does not exist\n"
    )
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    return undefined_name\n")
    out = cli("run", f"--config={broken}", f"--workdir={tmp_path / 'a'}")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "failed to load: NameError: name 'undefined_name' is not defined" in out.stderr


def test_an_unwritable_workdir_is_a_one_line_error(tmp_path):
    # CI runs as root, who writes anywhere: a file where the workdir's parent should be makes the
    # workdir uncreatable for anyone.
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="cannot write to"):
        run_lib.run(light_config(), tmp_path / "file" / "run", progress=quiet())


def test_a_full_disk_keeps_finished_results_and_is_one_line(tmp_path, monkeypatch):
    config = light_config()
    with config.unlocked():
        config.activations = ("relu",)
        config.workers = 1
    real = storage.atomic_write_bytes
    count = {"n": 0}

    def full(path, data):
        if "spectra" in str(path) and "step_000010" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        count["n"] += 1
        return real(path, data)

    monkeypatch.setattr(storage, "atomic_write_bytes", full)
    with pytest.raises(OSError, match="No space left"):
        run_lib.run(config, tmp_path, progress=quiet())
    monkeypatch.setattr(storage, "atomic_write_bytes", real)
    # The step-0 measurement is kept; the resume measures step 10 and goes on.
    log = tmp_path / "members" / "relu-seed0" / "metrics.jsonl"
    assert [r["step"] for r in storage.read_metrics(log)] == [0]
    resumed = []
    run_lib.run(config, tmp_path, on_measurement=lambda n, s: resumed.append(s), progress=quiet())
    assert resumed == [10, 20]


def test_the_command_line_reports_a_full_disk_in_one_line(tmp_path):
    # A workdir on a full file system, simulated by a file size limit of 0 bytes in the child.
    code = (
        "import resource, sys, runpy; resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)); "
        "import signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "sys.argv = ['experiments', 'run', '--config=configs/smoke.py', "
        f"'--workdir={tmp_path / 'run'}', '--quiet']; "
        "runpy.run_module('experiments', run_name='__main__')"
    )
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 2, out.stderr[-2000:]
    # (joblib, imported by scikit-learn, warns about the limit first)
    assert out.stderr.splitlines()[-1].startswith("error: cannot write the run directory")
    assert "Traceback" not in out.stderr


def test_tilde_in_the_workdir_expands(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home))
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments",
            "run",
            "--config=configs/smoke.py",
            "--workdir=~/x",
            "--config.activations=('relu',)",
            "--config.train.steps=0",
            "--config.measure.quantities=('lambda_max',)",
            "--quiet",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    assert (home / "x" / "members" / "relu-seed0" / "metrics.jsonl").exists()
    assert not (ROOT / "~").exists()


def test_a_diverging_member_stops_with_its_reason_and_exit_1(tmp_path):
    out = cli(
        "run",
        "--config=configs/smoke.py",
        f"--workdir={tmp_path}",
        "--config.activations=('relu',)",
        "--config.train.loss=mse",
        "--config.train.learning_rate=100.0",
        "--config.measure.quantities=('lambda_max',)",
        "--quiet",
    )
    assert out.returncode == 1, out.stderr
    status = json.loads((tmp_path / "members" / "relu-seed0" / "status.json").read_text())
    assert status["state"] == "failed" and status["message"].startswith("diverged: training loss")
    assert "10 x the initial" in status["message"] and "relu-seed0: diverged" in out.stderr
    assert (
        "Stopped runs (divergence or non-finite loss): relu (1)"
        in (tmp_path / "summary.md").read_text()
    )


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


# --------------------------------------------------------------------------------------------
# Found in review.


def test_float64_members_in_threads_compute_in_float64(tmp_path):
    # JAX's x64 switch is per thread: each member (and the warm-up) enters its own.
    config = load_config()
    with config.unlocked():
        config.dtype = "float64"
        config.workers = 2
        config.train.steps = 10
        config.measure.quantities = ("lambda_max", "gradient_noise")
        config.measure.gradient_noise.num_examples = 20
        config.measure.gradient_noise.chunk = 8
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


def test_a_data_sweep_gives_each_member_its_data(tmp_path):
    config = light_config()
    with config.unlocked():
        config.activations = ("relu",)
        config.train.steps = 0
        config.sweep = ("data.num_train=100,150",)
    run_lib.run(config, tmp_path, progress=quiet())
    run = experiments.load_run(tmp_path)
    for n in (100, 150):
        member = run.members[f"relu-num_train={n}-seed0"]
        assert member.measure_data["x"].shape == (n, 64)
        H = cv.hessian(member.loss, member.params(0), member.measure_data)
        top = cv.eigsh(H, k=3, num_steps=20, key=measure.measurement_key(0, 0, "eig"))
        assert top.eigenvalues[0] == pytest.approx(member.records[0].top_eigenvalues.values[0])
    fps = set(run.member_fingerprints.values())
    assert len(fps) == 2


@pytest.mark.parametrize(
    "sweep,match",
    [
        ("dtype=float32,float64", "dtype holds for the whole run; it cannot be swept"),
        ("train.steps=True,10", "'True' is a bool, the field is a int"),
        ("data.path=a/b.npz,a_b.npz", "different values give the same member name"),
        ("measure.devices=1,2", "measure.devices holds for the whole run; it cannot be swept"),
    ],
)
def test_sweeps_that_cannot_run_as_asked_are_refused(tmp_path, sweep, match):
    config = light_config()
    with config.unlocked():
        config.sweep = (sweep,)
    with pytest.raises(ValueError, match=match):
        run_lib.run(config, tmp_path, progress=quiet())
    assert not (tmp_path / "members").exists()


def test_figures_follow_each_measurements_own_schedule(tmp_path):
    from experiments import figures

    config = load_config()
    with config.unlocked():
        config.activations = ("relu",)
        config.measure.every = 5
        config.measure.quantities = ("lambda_max", "top_eigenvalues", "bottom_eigenvalues")
        config.measure.top_eigenvalues.every = 10
        config.measure.bottom_eigenvalues.steps = (0, 15)
        config.measure.top_eigenvalues.lanczos_steps = 20
    run_lib.run(config, tmp_path, progress=quiet())
    member = experiments.load_run(tmp_path).members["relu-seed0"]
    have_top = [r.step for r in member.records if r.top_eigenvalues is not None]
    have_bottom = [r.step for r in member.records if r.bottom_eigenvalues is not None]
    assert member.steps == [0, 5, 10, 15, 20] and have_top == [0, 10, 20]
    assert have_bottom == [0, 15, 20]
    lines = {
        line.get_gid(): line
        for ax in figures.eigenvalue_figure(experiments.load_run(tmp_path)).axes
        for line in ax.lines
        if line.get_gid()
    }
    assert list(lines["eig/relu/top0"].get_xdata()) == have_top
    assert list(lines["eig/relu/bottom0"].get_xdata()) == have_bottom
    assert figures.draw_all(tmp_path)


def test_diagonal_settings_are_their_own_and_its_mean_has_an_honest_error_bar(tmp_path):
    config = load_config()
    with config.unlocked():
        config.activations = ("relu",)
        config.train.optimizer, config.train.learning_rate = "adam", 0.01
        config.train.steps, config.measure.every = 10, 10
        config.measure.quantities = ("optimizer_state", "diagonal")
        config.measure.optimizer_state.exact = True
        config.measure.diagonal.matvecs = 12
    run_lib.run(config, tmp_path, progress=quiet())
    member = experiments.load_run(tmp_path).members["relu-seed0"]
    assert member.records[0].optimizer_state is None  # no gradient seen yet at step 0
    record = member.records[-1]
    assert not record.diagonal.exact and record.diagonal.mean.num_matvecs == 12
    # The diagonal's mean is tr H / n: its error bar is Hutchinson's with the same probes
    # (entries that share probes are correlated, so it is not sqrt(sum se_i^2) / n).
    H = cv.hessian(member.loss, member.params(10), member.measure_data)
    tr = cv.trace(
        H, num_matvecs=12, key=measure.measurement_key(0, 10, "diagonal"), method="hutchinson"
    )
    assert record.diagonal.mean.value == pytest.approx(float(tr.value) / H.size, rel=1e-4)
    assert record.diagonal.mean.standard_error == pytest.approx(
        float(tr.standard_error) / H.size, rel=1e-4
    )
    exact = np.diag(np.asarray(cv.dense(H)))
    assert np.allclose(member.spectra(10)["diagonal"], exact, atol=20 * exact.std())
    assert record.optimizer_state.second_moment.num_parameters > 0


def test_lost_results_of_a_stopped_member_and_deleted_spectra_are_repaired(finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    relu = workdir / "members" / "relu-seed0"
    storage.write_json(relu / "status.json", {"state": "failed", "message": "diverged", "step": 15})
    lines = (relu / "metrics.jsonl").read_text().splitlines(keepends=True)
    (relu / "metrics.jsonl").write_text(lines[0] + lines[2])  # step 10 lost
    (workdir / "members" / "tanh-seed0" / "spectra" / "step_000020.npz").unlink()
    assert sorted(resume(workdir)) == [("relu-seed0", 10), ("tanh-seed0", 20)]
    assert json.loads((relu / "status.json").read_text())["state"] == "failed"  # still final
    assert (workdir / "members" / "tanh-seed0" / "spectra" / "step_000020.npz").exists()
    assert resume(workdir) == []


def test_damaged_member_json_and_empty_compare_are_one_line_errors(finished, tmp_path):
    workdir = copy_of(finished, tmp_path)
    (workdir / "members" / "relu-seed0" / "member.json").write_text('{"name": "relu-seed0"}')
    with pytest.raises(RunDirError, match="member.json is corrupt \\(it lacks fingerprint"):
        experiments.load_run(workdir)
    (tmp_path / "empty").mkdir()
    storage.write_json(tmp_path / "empty" / "config.json", json.loads(light_config().to_json()))
    out = cli("compare", f"--runs={tmp_path / 'empty'}", f"--workdir={tmp_path / 'cmp'}")
    assert out.returncode == 2
    assert out.stderr == "error: none of the run directories holds a measurement yet\n"


def test_an_interrupted_command_says_how_to_resume(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "experiments", "run", "--config=configs/smoke.py"]
    args += [f"--workdir={tmp_path}", "--config.train.steps=2000", "--config.measure.every=10"]
    args += ["--config.measure.quantities=('lambda_max',)", "--quiet"]
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "members" / "relu-seed0" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(storage.read_metrics(log)) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().endswith(
        "interrupted: every finished measurement is kept; run the same command to resume"
    )
    assert "Traceback" not in err
    kept = storage.read_metrics(log)
    assert len(kept) >= 3 and [r["step"] for r in kept] == list(range(0, 10 * len(kept), 10))


def test_fisher_and_blocks_measurements_against_dense(tmp_path):
    config = load_config()
    with config.unlocked():
        config.train.steps, config.measure.every = 20, 20
        config.measure.quantities = ("fisher", "blocks")
        config.measure.fisher.k, config.measure.fisher.lanczos_steps = 2, 30
        config.measure.blocks.probes = 24
    run_lib.run(config, tmp_path, progress=quiet())
    run = experiments.load_run(tmp_path)
    shares = {}
    for member in run.members.values():
        record = member.records[-1]
        params = member.params(20)
        F = cv.empirical_fisher(member.loss, params, member.measure_data)
        exact = np.linalg.eigvalsh(np.asarray(cv.dense(F), np.float64))[::-1]
        assert np.allclose(record.fisher.top.values, exact[:2], rtol=1e-3)
        assert abs(record.fisher.trace.value - exact.sum()) < 4 * record.fisher.trace.standard_error
        blocks = record.blocks
        assert blocks.names == ("hidden/0", "hidden/1", "readout")
        assert sum(blocks.sizes) == F.size
        H = cv.hessian(member.loss, params, member.measure_data)
        G = cv.gauss_newton(member.model, params, member.measure_data, loss="cross_entropy")
        R = np.asarray(cv.dense(H - G), np.float64)
        edges = np.cumsum((0,) + blocks.sizes)
        for i in range(3):
            for j in range(3):
                want = np.sum(R[edges[i] : edges[i + 1], edges[j] : edges[j + 1]] ** 2)
                got = blocks.frobenius_sq["residual"][i][j]
                assert abs(got - want) <= 4 * blocks.frobenius_sq_se["residual"][i][j] + 1e-9
            block_trace = np.trace(R[edges[i] : edges[i + 1], edges[i] : edges[i + 1]])
            se = blocks.trace_se["residual"][i]
            assert abs(blocks.trace["residual"][i] - block_trace) <= 4 * se + 1e-6
        shares[member.activation] = blocks.same_layer_share("residual")
    # The question this project started from: a ReLU network's residual R = H - G has no
    # same-layer curvature at all (each layer enters piecewise linearly); tanh's has.
    assert shares["relu"].value < 1e-9
    assert shares["tanh"].value > 4 * shares["tanh"].standard_error > 0

"""One member across invocations: resume to the uninterrupted result, repair of lost results,
refusal of foreign or corrupt files (each case failed on an earlier main)."""

import errno
import io
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("flax")
from workbench_helpers import (  # noqa: E402
    cli,
    light_config,
    load_config,
    quiet,
    snapshot,
    strip_timings,
)

import experiments  # noqa: E402
from experiments import (  # noqa: E402
    lifecycle,
    storage,
)
from experiments import run as run_lib  # noqa: E402
from experiments.errors import RunDirError  # noqa: E402


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

"""The command line: one-line errors and exit statuses, ``~`` expanded, an interrupt that says
how to resume."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("flax")
from helpers import SIGINT_HANDLER  # noqa: E402
from workbench_helpers import (  # noqa: E402
    ROOT,
    cli,
)
from workbench_helpers import smoke_run as run_smoke_once  # noqa: E402

from experiments import cli as cli_lib  # noqa: E402
from experiments import (  # noqa: E402
    storage,
)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    return run_smoke_once(tmp_path_factory)


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


@pytest.mark.parametrize(
    "body, error",
    [
        (
            "x = 1\n",
            "config file {path} defines no get_config() (a function that returns the config, as "
            "in configs/smoke.py)",
        ),
        (
            "def get_config():\n    return {'train': 1}\n",
            "config file {path}: get_config() returned dict, not an ml_collections.ConfigDict "
            "(start from experiments.config.base_config())",
        ),
        (
            "import sys\n\ndef get_config():\n    return sys.get_config()\n",
            "config file {path} failed to load: AttributeError: module 'sys' has no attribute "
            "'get_config'",
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections'
def test_a_config_file_without_get_config_is_one_line(tmp_path, monkeypatch, capsys, body, error):
    # In-process: the command line's flag parser, as app.run calls it.
    from absl import flags

    import experiments.__main__  # noqa: F401 - defines the flags

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    path = tmp_path / "mine.py"
    path.write_text(body)
    args = ["experiments", "run", f"--config={path}", f"--workdir={tmp_path / 'run'}"]
    try:
        with pytest.raises(SystemExit) as stopped:
            cli_lib.parse_flags(args)
    finally:
        flags.FLAGS.unparse_flags()
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: " + error.format(path=path)
    assert not (tmp_path / "run").exists()


def test_the_command_line_reports_a_full_disk_in_one_line(tmp_path):
    # A workdir on a full file system, simulated by a file size limit of 0 bytes in the child.
    code = (
        "import resource, sys, runpy; resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)); "
        "import signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "sys.argv = ['experiments', 'run', '--config=configs/smoke.py', "
        f"'--workdir={tmp_path / 'run'}', '--quiet']; "
        "runpy.run_module('experiments', run_name='__main__')"
    )

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
        "Stopped runs (divergence, a non-finite loss or a failed measurement; the reason is in "
        "their status.json): relu (1)" in (tmp_path / "summary.md").read_text()
    )


def test_an_interrupted_command_says_how_to_resume(tmp_path):
    import signal
    import time

    # python -m experiments run ..., with Python's SIGINT handler whatever started the suite.
    main = SIGINT_HANDLER + "import runpy; runpy.run_module('experiments', run_name='__main__')"
    args = [sys.executable, "-c", main, "run", "--config=configs/smoke.py"]
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


def test_a_deprecated_key_on_the_command_line_sets_its_new_name(tmp_path):
    # Too few matvecs under the old name: the error, before any training, names the new key.
    out = cli(
        "run",
        "--config=configs/smoke.py",
        f"--workdir={tmp_path}",
        "--config.measure.trace.matvecs=3",
        "--quiet",
    )
    warning = "FutureWarning: config key measure.trace.matvecs is deprecated: use "
    assert warning + "measure.trace.num_matvecs" in out.stderr
    assert out.stderr.count("is deprecated") == 1
    assert out.returncode == 2, out.stderr
    error = "error: config key measure.trace: num_matvecs=3 must be an integer >= 4\n"
    assert out.stderr.endswith(error)
    assert not (tmp_path / "members").exists()

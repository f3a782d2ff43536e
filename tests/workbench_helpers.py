"""Shared helpers of the workbench tests (``tests/workbench/``): the repository root, the command
line, configs, and runs that several test modules read (made once per test process)."""

import importlib.util
import pathlib
import subprocess
import sys

from experiments import run as run_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent

# A plan of the cheaper measurements, for runs whose numbers a test does not look at.
LIGHT = ("top_eigenvalues", "bottom_eigenvalues", "trace")


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


def light_config(**train):
    config = load_config()
    with config.unlocked():
        config.measure.quantities = LIGHT
        for key, value in train.items():
            setattr(config.train, key, value)
    return config


def quiet():
    return run_lib.Progress(enabled=False)


def strip_timings(records):
    """Records without their wall times (measurement timings, training seconds)."""
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k != "timings"}
        if r.get("training"):
            r["training"] = {k: v for k, v in r["training"].items() if k != "seconds"}
        out.append(r)
    return out


def snapshot(folder):
    """Every file under ``folder`` with its bytes: to show that nothing was written."""
    return {
        p.relative_to(folder): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


_SMOKE: dict = {}


def smoke_run(tmp_path_factory):
    """``(config, workdir, statuses)`` of the smoke config, run once per test process: the test
    modules that read it share it (a test that changes a run works on a copy)."""
    if "run" not in _SMOKE:
        workdir = tmp_path_factory.mktemp("smoke")
        config = load_config()
        statuses = run_lib.run(config, workdir, progress=quiet())
        _SMOKE["run"] = (config, workdir, statuses)
    return _SMOKE["run"]

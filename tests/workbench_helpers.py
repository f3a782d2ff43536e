"""Shared helpers of the workbench tests (``tests/workbench/``): the repository root, the command
line, configs, and runs that several test modules read (made once per test process)."""

import importlib.util
import json
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


def main(*args) -> int:
    """``python -m experiments ARGS`` in this process (seconds faster than :func:`cli` where
    nothing compiles): the command line's flag parser and main with its one-line errors, as
    ``app.run`` calls them; returns the exit status (output: pytest's ``capsys``)."""
    from absl import flags

    from experiments import __main__ as command_line
    from experiments import cli as cli_lib

    argv = list(sys.argv)
    try:
        return cli_lib.one_line_errors(command_line._main)(
            cli_lib.parse_flags(["experiments", *args])
        )
    finally:
        flags.FLAGS.unparse_flags()
        sys.argv[:] = argv


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


def write_swept_run(workdir, record, *, sweep, quantities, seeds=None, activations=None):
    """:func:`write_run` of the smoke config with ``sweep`` and ``measure.quantities`` set (and
    ``seeds``, ``activations`` when given): a run whose records a test chooses."""
    config = load_config()
    with config.unlocked():
        if seeds is not None:
            config.seeds = seeds
        if activations is not None:
            config.activations = activations
        config.sweep = sweep
        config.measure.quantities = quantities
    return write_run(workdir, config, record)


def write_run(workdir, config, record):
    """A run directory of ``config``'s members written from chosen records, without training:
    ``record(spec, step)`` gives the fields of a member's record at each step of its schedule
    (besides the step, names and fingerprint; losses and accuracies default to 1 and 0.5), or
    ``None`` to stop the member there (failed). Loading it needs no model and no data: for
    tables and figures whose numbers a test chooses."""
    from experiments import measure, storage, sweep
    from experiments.measurements import Record
    from experiments.record import FORMAT

    workdir = pathlib.Path(workdir)
    specs = sweep.members(config)
    storage.write_json(workdir / "config.json", run_lib.resolved(config))
    members = [spec.name for spec in specs]
    info = {"format": FORMAT, "data_fingerprint": "test", "members": members}
    storage.write_json(workdir / "run.json", info)
    for spec in specs:
        folder = workdir / "members" / spec.name
        log = storage.MetricsLog(folder / "metrics.jsonl")
        status = {"state": "done", "step": spec.config.train.steps}
        for step in measure.schedule(spec.config):
            fields = record(spec, step)
            if fields is None:
                status = {"state": "failed", "message": "stopped by the test", "step": step}
                break
            head = {"train_loss": 1.0, "train_accuracy": 0.5, "test_loss": 1.0}
            head |= {"test_accuracy": 0.5, "grad_norm": 1.0, "edge_of_stability": None}
            head |= {"learning_rate": spec.config.train.learning_rate}
            ids = {"step": step, "member": spec.name, "fingerprint": "test"}
            log.append(Record(**ids, **{**head, **fields}).to_json())
        member = {
            "name": spec.name,
            "group": spec.group,
            "activation": spec.activation,
            "activation_index": spec.activation_index,
            "model_activations": list(config.activations),
            "seed": spec.seed,
            "overrides": spec.overrides,
            "fingerprint": "test",
            "config": json.loads(spec.config.to_json_best_effort()),
        }
        storage.write_json(folder / "member.json", member)
        storage.write_json(folder / "status.json", status)
    return workdir

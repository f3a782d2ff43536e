"""Registered measurements that misbehave: a taken name is refused, and a value the record cannot
hold fails its member at that step with the finished measurements kept and the run directory
readable; non-finite numbers come back from ``load_run`` as floats."""

import dataclasses
import math
import re

import pytest

pytest.importorskip("flax")
from workbench_helpers import light_config, quiet  # noqa: E402

import experiments  # noqa: E402
from experiments import pages, storage  # noqa: E402
from experiments import run as run_lib  # noqa: E402
from experiments.errors import ConfigError  # noqa: E402
from experiments.measurements import MEASUREMENTS, register_measurement  # noqa: E402
from experiments.record import Estimate  # noqa: E402
from experiments.rundir import MemberDir  # noqa: E402


def test_a_taken_name_is_refused_unless_replaced(monkeypatch):
    monkeypatch.setattr(MEASUREMENTS, "_entries", dict(MEASUREMENTS._entries))
    builtin = MEASUREMENTS.get("trace")
    message = (
        "register_measurement: the built-in measurement 'trace' is already registered; choose "
        "another name, or pass replace=True to replace it"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        register_measurement("trace", lambda ctx: 1.0)
    with pytest.raises(ConfigError, match=re.escape(message)):
        register_measurement("trace")(lambda ctx: 1.0)
    assert MEASUREMENTS.get("trace") is builtin
    # A config file loaded twice in one process registers its own function again.
    source = "def mine(ctx):\n    return 1.0\n"
    first, second = {}, {}
    exec(compile(source, "/configs/mine.py", "exec"), first)
    exec(compile(source, "/configs/mine.py", "exec"), second)
    register_measurement("mine", first["mine"])
    register_measurement("mine", second["mine"])
    assert MEASUREMENTS.get("mine").fn is second["mine"]
    with pytest.raises(ConfigError, match=r"measurement 'mine' \(mine in /configs/mine\.py\) is"):
        register_measurement("mine", lambda ctx: 2.0)
    replacement = register_measurement("mine", lambda ctx: 2.0, replace=True)
    assert MEASUREMENTS.get("mine").fn is replacement


def _trace(ctx):
    """Replaces the built-in: an Estimate, then (relu at step 10) a bare number."""
    if ctx.step == 10 and ctx.config.activations == ("relu",):
        return 0.5
    return Estimate(1.0 + ctx.step, 0.1, 0)


def _odd(ctx):
    """Non-finite numbers, then (tanh at step 10) an object that JSON cannot hold."""
    if ctx.step == 10 and ctx.config.activations == ("tanh",):
        return {"value": object()}
    return {"nan": math.nan, "inf": [math.inf, -math.inf], "ok": 1.5}


@pytest.fixture(scope="module")
def misbehaving_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("misbehaving")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MEASUREMENTS, "_entries", dict(MEASUREMENTS._entries))
        register_measurement("trace", _trace, defaults={"num_matvecs": 60}, replace=True)
        register_measurement("odd", _odd)
        config = light_config(steps=10)
        with config.unlocked():
            config.measure.every = 10
            config.measure.quantities = ("trace", "odd")
        statuses = run_lib.run(config, workdir, progress=quiet())
        resumed = run_lib.run(config, workdir, progress=quiet())
    return workdir, statuses, resumed


def test_a_value_the_record_cannot_hold_fails_its_member_and_keeps_the_rest(misbehaving_run):
    workdir, statuses, resumed = misbehaving_run
    failed = "measurement at step 10 failed: the registered measurement"
    assert statuses["relu-seed0"] == {
        "state": "failed",
        "message": f"{failed} 'trace' returned a float, not the Estimate its record field trace "
        "holds",
        "step": 10,
    }
    assert statuses["tanh-seed0"]["state"] == "failed"
    assert statuses["tanh-seed0"]["message"].startswith(
        f"{failed} 'odd' returned a value the record cannot hold (object at ['value']); return "
        "numbers, arrays"
    )
    assert resumed == statuses  # the directory resumes (and fails the same way)
    run = experiments.load_run(workdir)
    for name, member in run.members.items():
        assert member.steps == [0] and member.status == statuses[name]
    assert run.members["relu-seed0"].records[0].trace == Estimate(1.0, 0.1, 0)
    summary = (workdir / "summary.md").read_text()
    assert "| relu | 1 | 1 | 0 | " in summary and "a failed measurement" in summary
    assert workdir / "report.md" in pages.draw_all(workdir)


def test_non_finite_numbers_come_back_as_floats(misbehaving_run, tmp_path):
    workdir, _, _ = misbehaving_run
    value = experiments.load_run(workdir).members["tanh-seed0"].records[0].extra["odd"]
    assert math.isnan(value["nan"]) and value["inf"] == [math.inf, -math.inf]
    assert value["ok"] == 1.5
    # The log holds them as JSON strings; a string that is not one stays a string.
    record = experiments.load_run(workdir).members["tanh-seed0"].records[0]
    extra = {"m": {"x": [math.nan, -math.inf, "inf!"]}, "n": math.inf}
    storage.MetricsLog(tmp_path / "metrics.jsonl").append(
        dataclasses.replace(record, extra=extra).to_json()
    )
    (back,) = MemberDir(tmp_path).records()
    assert math.isnan(back.extra["m"]["x"][0]) and back.extra["m"]["x"][1:] == [-math.inf, "inf!"]
    assert back.extra["n"] == math.inf

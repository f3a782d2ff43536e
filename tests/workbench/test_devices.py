"""Data-parallel measurement (``measure.devices``)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("flax")
from workbench_helpers import (  # noqa: E402
    ROOT,
    load_config,
)
from workbench_helpers import smoke_run as run_smoke_once  # noqa: E402

import experiments  # noqa: E402
from experiments import config as config_lib  # noqa: E402
from experiments import (  # noqa: E402
    lifecycle,
)
from experiments import run as run_lib  # noqa: E402
from experiments.errors import ConfigError  # noqa: E402


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    return run_smoke_once(tmp_path_factory)


def test_measure_devices_takes_equal_shards_or_names_its_key():
    # An integer must divide the measurement examples (no example dropped or padded); "all" is
    # the most devices that do; one device is the unsharded measurement, as before the key.
    from experiments.devices import measure_devices

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

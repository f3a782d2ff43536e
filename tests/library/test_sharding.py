"""Sharded data and parameters give the unsharded results: 8 forced CPU devices in one process,
and 2 processes x 2 CPU devices under ``jax.distributed``.

Each configuration runs in child processes (``tests/library/_sharding_worker.py``), so this process keeps
its single device. All three children start together when the first test here needs them (their
compilations overlap on a 2-core machine) and each prints one JSON line of measurements, which the
tests below check. Float64: sharded and unsharded results differ only by the order of summation.
"""

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

WORKER = pathlib.Path(__file__).resolve().parent / "_sharding_worker.py"
TIMEOUT = 240
TIGHT = 1e-12  # relative to the operator's scale, about 5,000 float64 epsilons


def _env(extra_xla_flags=""):
    flags = os.environ.get("XLA_FLAGS", "--xla_backend_optimization_level=0")
    return dict(os.environ, XLA_FLAGS=f"{flags} {extra_xla_flags}".strip(), JAX_PLATFORMS="cpu")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(*args, env, logs):
    name = "_".join(map(str, args[:2]))
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), *map(str, args)], env=env, stdout=stdout, stderr=stderr
        )
    return proc, out, err


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """All three workers, started together; each group is awaited by its own fixture."""
    logs = tmp_path_factory.mktemp("sharding")
    port = _free_port()
    procs = {
        "devices": _start(
            "devices", env=_env("--xla_force_host_platform_device_count=8"), logs=logs
        ),
        0: _start("process", 0, port, env=_env(), logs=logs),
        1: _start("process", 1, port, env=_env(), logs=logs),
    }
    yield procs
    for proc, _, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait(procs, names):
    """The JSON results of ``names``. A worker that raised fails the wait at once: its peer in a
    distributed pair would otherwise wait for it until jax.distributed's timeouts."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        for name in names:
            proc, _, err = procs[name]
            text = err.read_text()
            if proc.poll() not in (None, 0) or "Traceback" in text:
                pytest.fail(f"worker {name} failed:\n{text[-3000:]}")
        if all(procs[name][0].poll() == 0 for name in names):
            return [json.loads(procs[n][1].read_text().strip().splitlines()[-1]) for n in names]
        if time.monotonic() > deadline:
            pytest.fail(f"workers {names} timed out after {TIMEOUT} s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def devices(launched):
    return _wait(launched, ["devices"])[0]


@pytest.fixture(scope="module")
def processes(launched):
    return _wait(launched, [0, 1])


def _assert_tight(errors, keys):
    for key in keys:
        assert errors[key] <= TIGHT * errors["scale"], (key, errors)


def test_data_sharded_over_8_devices_gives_the_unsharded_hessian_estimates(devices):
    assert devices["data_spec"] == "P('data',)"
    errors = devices["hessian"]
    assert errors["converged"]
    _assert_tight(
        errors, ["eigenvalues", "eigenvectors", "hutch++", "hutchinson", "slq_nodes", "slq_weights"]
    )


def test_data_sharded_over_8_devices_gives_the_unsharded_gauss_newton(devices):
    errors = devices["gauss_newton"]
    assert errors["converged"]
    _assert_tight(errors, ["eigenvalues", "eigenvectors"])


def test_chunked_data_sharded_over_8_devices_gives_the_same_numbers(devices):
    errors = devices["hessian_chunked"]
    assert errors["converged"]
    _assert_tight(errors, ["eigenvalues", "eigenvectors"])


@pytest.mark.parametrize("name", ["hessian", "gauss_newton"])
def test_one_matvec_is_one_all_reduce_and_no_gather(devices, name):
    # The gradient leaves are reduced together: one (tuple) all-reduce of the n-vector.
    assert devices[name]["collectives"] == {
        "all-reduce": 1,
        "all-gather": 0,
        "reduce-scatter": 0,
        "all-to-all": 0,
        "collective-permute": 0,
    }


def test_chunked_matvec_does_not_gather_the_data(devices):
    # Chunk i is examples i, i + m, ...: each device scans its own examples (one all-reduce per
    # chunk, inside the chunk loop), where contiguous chunks made XLA gather all the data.
    counts = devices["hessian_chunked"]["collectives"]
    assert counts["all-gather"] == 0 and counts["all-reduce"] == 1, counts


def test_shard_data_refuses_uneven_shards_and_explicit_meshes(devices):
    refused = devices["refused"]
    assert "60 examples do not split evenly over the 8 devices" in refused["uneven"]
    assert "AxisType.Explicit" in refused["explicit"] and "data_mesh()" in refused["explicit"]


def test_parameters_sharded_along_a_model_axis_shard_the_lanczos_basis(devices):
    model = devices["model_axis"]
    assert model["basis_spec"] == "P(None, 'model')"
    assert model["basis_shard_shape"] == [12, model["n"] // 8]
    _assert_tight(model, ["alphas", "betas"])


def test_two_processes_with_two_devices_each_give_the_unsharded_results(processes):
    first, second = processes
    for i, result in enumerate([first, second]):
        assert result["process_index"] == i
        assert (result["device_count"], result["local_device_count"]) == (4, 2)
        assert result["global_shape"] == [64, 5]
        errors = _worker().errors(result["result"], first["reference"])
        assert errors["converged"]
        _assert_tight(errors, ["eigenvalues", "eigenvectors", "hutch++"])
    # Every process holds the same replicated results.
    assert first["result"]["eigenvalues"] == second["result"]["eigenvalues"]
    assert first["result"]["hutch++"] == second["result"]["hutch++"]


def _worker():
    """The worker module, for its comparisons (its JAX imports are inside its functions)."""
    spec = importlib.util.spec_from_file_location("_sharding_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

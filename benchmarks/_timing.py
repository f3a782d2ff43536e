"""Timing helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, so
this directory is on ``sys.path``)."""

from __future__ import annotations

import json
import pathlib
import platform
import statistics
import time

import jax
import numpy as np


def once(fn, *args) -> float:
    """Wall time of one call of ``fn(*args)``, its result ready."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def median_time(fn, *args, repeats: int, warm_up: bool = False) -> float:
    """Median wall time of ``repeats`` calls of ``fn(*args)``, after one untimed call (which
    compiles) when ``warm_up``."""
    if warm_up:
        jax.block_until_ready(fn(*args))
    return statistics.median(once(fn, *args) for _ in range(repeats))


def interleaved(calls: dict, rounds: int = 15) -> tuple[dict, dict]:
    """Median times of several calls ``{name: (fn, args)}`` measured in alternation, in a shuffled
    order each round, so that drifting machine load (2 shared cores) affects all of them alike.
    Each is called once first (it compiles); returns ``(medians, first-call times)``. Run-to-run
    spread on our machines is about +-10%."""
    first = {name: once(fn, *args) for name, (fn, args) in calls.items()}
    times = {name: [] for name in calls}
    order = list(calls)
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            fn, args = calls[name]
            times[name].append(once(fn, *args))
    return {name: statistics.median(t) for name, t in times.items()}, first


def platform_record(**extra) -> dict:
    """Where a benchmark ran: machine, Python, JAX, backend, device and matmul precision."""
    return {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        **extra,
    }


def write_result(out: dict, name: str, table: str) -> None:
    """``out`` as ``benchmarks/results/<name>.json`` (with where it ran), and its table printed."""
    out["platform"] = platform_record(dtype="float32")
    path = pathlib.Path(__file__).parent / "results" / f"{name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(table)
    print(f"wrote {path}")

"""Timing helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, so
this directory is on ``sys.path``)."""

from __future__ import annotations

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

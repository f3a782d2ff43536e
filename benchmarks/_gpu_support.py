"""Measuring helpers of ``bench_gpu.py``: peak device memory, XLA's memory analysis, a compiled
program's compile and run times, the time budget, and matmul precision contexts."""

from __future__ import annotations

import contextlib
import time

import jax

# --- measurement helpers ------------------------------------------------------------------------


def peak_bytes():
    """The device's running peak of allocated bytes (None where the backend does not say)."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def memory_analysis(compiled):
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    fields = ("argument", "output", "temp", "alias", "generated_code")
    return {f"{f}_bytes": int(getattr(m, f"{f}_size_in_bytes", 0) or 0) for f in fields}


def run_program(fn, op, key):
    """Compile ``fn(op, key)`` ahead of time, then run the compiled program once: lowering,
    compile and run times, memory analysis, and the result."""
    jitted = jax.jit(fn)
    t0 = time.perf_counter()
    lowered = jitted.lower(op, key)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    result = jax.block_until_ready(compiled(op, key))
    t3 = time.perf_counter()
    timing = {
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "run_s": t3 - t2,
        "memory": memory_analysis(compiled),
        "peak_bytes_in_use": peak_bytes(),
    }
    return timing, result


class Budget:
    """A global deadline, shared out between the sections still to run."""

    def __init__(self, seconds: float, sections: int):
        self.start = time.perf_counter()
        self.end = self.start + seconds
        self.sections_left = sections
        self.section_end = self.end

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def open_section(self) -> None:
        now = time.perf_counter()
        share = (self.end - now) / max(self.sections_left, 1)
        # A section may overrun its fair share by half when the earlier ones left time over.
        self.section_end = min(self.end, now + 1.5 * share)
        self.sections_left -= 1

    def left(self) -> float:
        return min(self.section_end, self.end) - time.perf_counter()


def precision_context(precision: str):
    if precision == "default":
        return contextlib.nullcontext()
    return jax.default_matmul_precision(precision)


# --- one model at one precision -----------------------------------------------------------------

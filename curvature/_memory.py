"""Memory checks before large allocations (the Lanczos basis, Hutch++'s sketch, power
iteration's vectors) against what this process may still use: the device's free memory on an
accelerator; on CPU the least of the memory available on the machine, the room left under the
process's address-space limit (``ulimit -v``) and under its cgroup's limit (containers, batch
schedulers)."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import jax

_GiB = 2**30


def check_basis_memory(op, num_steps: int, what: str, copies: int = 1) -> None:
    """A clear error, before anything is allocated, when the Lanczos basis would not fit in the
    memory this process may still use."""
    if op.streamed:
        copies *= 2  # host-driven: each compiled update returns a new basis beside the old one
    check_vectors(
        op,
        copies * (num_steps + 1),
        what,
        f"the Lanczos basis ({copies} x {num_steps + 1} vectors)",
        "fewer num_steps (memory grows with them); reorthogonalize=False with "
        "lanczos(store_basis=False) or spectral_density, which keep two vectors instead of the "
        "basis (ghost Ritz values appear; the density's moments stay accurate); "
        "power_iteration for a few top eigenpairs (k vectors); restrict() to a block of the "
        "parameters; or shard the parameters over several devices",
    )


def check_vectors(op, count: int, what: str, held: str, ways_out: str) -> None:
    """A ``MemoryError`` naming ``held`` (``count`` vectors of the operator's length) and the
    ``ways_out`` when they would take more than 90% of :func:`available_bytes`."""
    need = count * op.size * op.dtype.itemsize
    have, limit = available()
    if have is None or need <= 0.9 * have:
        return
    raise MemoryError(
        f"{what}: {held} needs about {need / _GiB:.2f} GiB ({count:,} vectors of "
        f"n={op.size:,} {op.dtype}) and this process has {have / _GiB:.2f} GiB available "
        f"({limit}). Ways out: {ways_out}."
    )


def available_bytes() -> int | None:
    """Bytes this process may still allocate on the default device (see :func:`available`)."""
    return available()[0]


def available() -> tuple[int | None, str]:
    """``(bytes, what limits them)``: on an accelerator ``bytes_limit - bytes_in_use``; on CPU
    the least of the machine's available memory (``MemAvailable``, else its physical memory),
    ``RLIMIT_AS`` minus the process's virtual size, and the cgroup's ``memory.max`` (v2) or
    ``memory.limit_in_bytes`` (v1) minus its usage. ``(None, ...)`` if nothing is known."""
    device = jax.local_devices()[0]  # addressable under jax.distributed too
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return free, f"free memory of {device.device_kind}"
    limits = [x for x in (_machine(), _address_space(), _cgroup()) if x is not None]
    if not limits:
        return None, "unknown"
    return min(limits, key=lambda x: x[0])


def _machine() -> tuple[int, str] | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "the machine's available memory"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "physical memory"
    except (ValueError, OSError, AttributeError):
        return None


def _address_space() -> tuple[int, str] | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    used = _status_kib("VmSize")
    return max(soft - (used or 0) * 1024, 0), f"the address-space limit, ulimit -v {soft // 1024}"


def _cgroup() -> tuple[int, str] | None:
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit() or int(text) >= 2**60:
            return None
        try:
            used = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            used = 0
        return max(int(text) - used, 0), f"the cgroup's memory limit, {int(text) / _GiB:.1f} GiB"
    return None


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None

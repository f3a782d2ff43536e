"""Memory checks before large allocations: the Lanczos basis against the device's free memory."""

from __future__ import annotations

import os

import jax

from curvature.linear_operator import LinearOperator


def basis_bytes(op: LinearOperator, num_steps: int, copies: int = 1) -> int:
    """Bytes of the Lanczos basis: ``copies * (num_steps + 1)`` vectors of length ``n``."""
    return copies * (num_steps + 1) * op.size * op.dtype.itemsize


def check_basis_memory(op: LinearOperator, num_steps: int, what: str, copies: int = 1) -> None:
    """A clear error, before anything is allocated, when the Lanczos basis would not fit in the
    memory of the default device (its free memory on an accelerator, physical memory on CPU)."""
    if op.streamed:
        copies *= 2  # host-driven: each compiled update returns a new basis beside the old one
    need = basis_bytes(op, num_steps, copies)
    have = available_bytes()
    if have is None or need <= 0.9 * have:
        return
    raise MemoryError(
        f"{what}: the Lanczos basis needs about {need / 2**30:.2f} GiB ({copies} x "
        f"{num_steps + 1} vectors of n={op.size:,} {op.dtype}) and the device has "
        f"{have / 2**30:.2f} GiB available. Ways out: fewer num_steps (memory grows with them); "
        "reorthogonalize=False with lanczos(store_basis=False) or spectral_density, which keep "
        "two vectors instead of the basis (ghost Ritz values appear; the density's moments "
        "stay accurate); power_iteration for a few top eigenpairs (k vectors); restrict() to a "
        "block of the parameters; or shard the parameters over several devices."
    )


def available_bytes() -> int | None:
    """Free memory of the default device: ``bytes_limit - bytes_in_use`` where the device reports
    it (GPU, TPU), else the machine's physical memory (CPU); ``None`` if neither is known."""
    device = jax.local_devices()[0]  # addressable under jax.distributed too
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None

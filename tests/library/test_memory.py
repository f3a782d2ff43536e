"""Memory: the Monte Carlo estimators hold one block of probes whatever their number (read from
XLA's memory analysis of the compiled programs), the Lanczos basis is estimated before it is
allocated, and the low-memory Lanczos modes keep no basis."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvature as cv

N = 50_000  # 200 kB a float32 vector


@dataclasses.dataclass(frozen=True)
class Diagonal:
    name = "diagonal"

    def __call__(self, d, v):
        return d * v


def diagonal_operator(n=N):
    d = jnp.linspace(1.0, 2.0, n)
    return cv.LinearOperator(Diagonal(), d, cv.Layout.of(d))


def temp_bytes(estimate, op, num_matvecs):
    """Temporary memory of the compiled program of ``estimate(op, key, num_matvecs)`` (the
    estimator's whole run, as it compiles inside jax.jit)."""
    run = jax.jit(lambda o, k: estimate(o, k, num_matvecs))
    analysis = run.lower(op, jax.random.key(0)).compile().memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    return analysis.temp_size_in_bytes


@pytest.mark.parametrize(
    "estimate",
    [
        lambda op, key, m: cv.trace(
            op, num_matvecs=m, key=key, method="hutchinson", probe_batch_size=4
        ),
        lambda op, key, m: cv.diagonal(op, num_matvecs=m, key=key, probe_batch_size=4),
        lambda op, key, m: cv.frobenius_norm_squared(
            op, num_matvecs=m, key=key, probe_batch_size=4
        ),
    ],
    ids=["trace", "diagonal", "frobenius"],
)
def test_probe_memory_does_not_grow_with_the_number_of_probes(estimate):
    op = diagonal_operator()
    vector = N * 4
    small = temp_bytes(estimate, op, 20)
    large = temp_bytes(estimate, op, 2000)
    # 2000 probes held at once would be 400 MB; a block of 4 is under 1 MB.
    assert large <= small + vector, (small, large)
    assert large < 40 * vector, large


def test_hutch_plus_plus_holds_its_sketch_and_one_block():
    op = diagonal_operator()
    vector = N * 4
    # At 200 the sketch's blocks of 4 do not divide it: it was copied whole to be orthonormalised
    # (2.3 sketches); it is built orthonormal in place (1.3). One probe at a time, the projection
    # of each probe off the sketch held a transposed copy of it (2.1 sketches; now 1.1).
    for num, block in ((60, 4), (200, 4), (300, 4), (200, None)):
        sketch = num // 3
        used = temp_bytes(
            lambda o, k, m, b=block: cv.trace(o, num_matvecs=m, key=k, probe_batch_size=b), op, num
        )
        assert used < (sketch + 30) * vector, (num, block, used / vector)


def test_the_lanczos_basis_is_checked_before_it_is_allocated(monkeypatch):
    from curvature import _memory

    op = diagonal_operator(1000)
    monkeypatch.setattr(_memory, "available", lambda: (100_000, "test"))  # 100 kB free
    # eigsh: the run's basis and its rank check's, 40 steps each.
    message = r"the Lanczos basis \(1 x 81 vectors\) needs about .* GiB \(81 vectors of n=1,000"
    with pytest.raises(MemoryError, match=message + ".*fewer num_steps.*store_basis=False"):
        cv.eigsh(op, k=2, num_steps=40, key=jax.random.key(0))
    with pytest.raises(MemoryError, match="lanczos: the Lanczos basis"):
        cv.lanczos(op, num_steps=40, key=jax.random.key(0))
    with pytest.raises(MemoryError, match=r"spectral_density: the Lanczos basis \(4 x 41 vectors"):
        cv.spectral_density(
            op, num_probes=8, num_steps=40, key=jax.random.key(0), probe_batch_size=4
        )
    # The low-memory modes need no basis and run.
    run = cv.lanczos(
        op, num_steps=40, key=jax.random.key(0), reorthogonalize=False, store_basis=False
    )
    assert run.basis.shape == (0, 1000)
    cv.spectral_density(
        op, num_probes=2, num_steps=40, key=jax.random.key(0), reorthogonalize=False
    )


def test_low_memory_lanczos_has_the_same_recurrence_and_slq_keeps_its_moments(x64):
    # A spectrum with an outlier (converges early, so the plain recurrence grows ghosts).
    eigs = jnp.concatenate([jnp.linspace(0.0, 1.0, 297), jnp.array([5.0, 8.0, 20.0])])
    d = eigs[jax.random.permutation(jax.random.key(1), eigs.shape[0])]
    op = cv.LinearOperator(Diagonal(), d, cv.Layout.of(d))
    key = jax.random.key(0)
    stored = cv.lanczos(op, num_steps=80, key=key, reorthogonalize=False)
    streamed = cv.lanczos(op, num_steps=80, key=key, reorthogonalize=False, store_basis=False)
    np.testing.assert_allclose(streamed.alphas, stored.alphas, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(streamed.betas, stored.betas, rtol=1e-12, atol=1e-12)
    # SLQ without the basis against the full mode, same probes: the trace is identical and the
    # moments tr(A^p)/n agree, though the low-memory nodes include ghosts.
    full = cv.spectral_density(op, num_probes=6, num_steps=80, key=key)
    low = cv.spectral_density(op, num_probes=6, num_steps=80, key=key, reorthogonalize=False)
    np.testing.assert_allclose(low.trace()[0], full.trace()[0], rtol=1e-10)
    for p in (2, 3, 4):
        exact = float(jnp.mean(d**p))
        assert low.moment(p)[0] == pytest.approx(full.moment(p)[0], rel=1e-6), p
        assert abs(low.moment(p)[0] - exact) < 4 * low.moment(p)[1] + 1e-9, p
    grid = np.linspace(-1, 21, 500)
    _, a = full.density(grid, sigma=0.3)
    _, b = low.density(grid, sigma=0.3)
    assert np.trapezoid(np.abs(a - b), grid) < 0.02  # L1 distance of the smoothed densities


def test_hutch_plus_plus_and_power_iteration_check_their_vectors(monkeypatch):
    from curvature import _memory

    op = diagonal_operator(1000)
    monkeypatch.setattr(_memory, "available", lambda: (100_000, "test"))  # 25 vectors
    with pytest.raises(MemoryError, match=r"trace: Hutch\+\+'s sketch \(20 vectors.*hutchinson"):
        cv.trace(op, num_matvecs=60, key=jax.random.key(0))
    with pytest.raises(MemoryError, match=r"power_iteration: its 30 eigenvectors"):
        cv.power_iteration(op, k=30, key=jax.random.key(0), max_steps=5)
    # Within the memory: they run.
    assert cv.trace(op, num_matvecs=12, key=jax.random.key(0)).value > 0
    cv.power_iteration(op, k=2, key=jax.random.key(0), max_steps=5)


def test_the_memory_a_process_may_use_counts_its_address_space_limit():
    # ulimit -v: the machine has far more memory, this process may not use it.
    script = """
import resource
import jax, jax.numpy as jnp
import curvature as cv
from curvature import _memory
used = _memory._status_kib("VmSize") * 1024
resource.setrlimit(resource.RLIMIT_AS, (used + 2**30, resource.RLIM_INFINITY))
have, why = _memory.available()
assert have <= 2**30 and "ulimit -v" in why, (have, why)
d = jnp.ones(4_000_000)  # 16 MB a vector: a basis of 81 is 1.3 GB
op = cv.from_function(lambda v: d * v, d)
try:
    cv.lanczos(op, num_steps=80, key=jax.random.key(0))
except MemoryError as err:
    print("refused:", err)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused: lanczos: the Lanczos basis" in out.stdout
    assert "the address-space limit, ulimit -v" in out.stdout

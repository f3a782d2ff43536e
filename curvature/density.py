"""Spectral density by stochastic Lanczos quadrature (SLQ).

The spectral measure of a symmetric ``n x n`` operator is $\\mu = \\frac1n \\sum_i \\delta_{\\lambda_i}$.
For a unit start vector $v$, ``m`` Lanczos steps give $T = S \\Theta S^T$, and the Gauss quadrature
$\\sum_k \\tau_k^2 \\delta_{\\theta_k}$ with $\\tau_k = S_{0k}$ matches $v^T f(A) v$ exactly for every
polynomial ``f`` of degree below ``2m`` (Golub & Meurant 2010). Averaging over random
$v = z / \\|z\\|$ (Rademacher ``z``, so $\\|z\\|^2 = n$) estimates $\\mu$ (Ubaru, Chen & Saad 2017;
Ghorbani, Krishnan & Xiao 2019; Papyan 2020).

:class:`SpectralDensity` keeps the raw nodes and weights per probe. Smoothing is done only on
request, with a Gaussian kernel whose width ``sigma`` is its *standard deviation* (PyHessian calls
a variance "sigma"; we do not).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvature._checks import (
    check_finite_result,
    check_key,
    check_steps,
    positive_int,
    require_square,
)
from curvature._driving import host_driven
from curvature._lanczos import _lanczos_recurrence, _lanczos_run
from curvature._memory import check_basis_memory
from curvature.krylov import eigh_tridiagonal
from curvature.linear_operator import LinearOperator
from curvature.stochastic_trace import probe_rows

__all__ = ["SpectralDensity", "spectral_density"]


class SpectralDensity(NamedTuple):
    """Raw SLQ output and the estimates derived from it.

    Attributes:
      nodes: ``(num_probes, num_steps)`` Ritz values per probe.
      weights: ``(num_probes, num_steps)`` quadrature weights ``tau_k^2``; each row sums to 1.
      dimension: ``n``, the operator's size.
    """

    nodes: jax.Array
    weights: jax.Array
    dimension: jax.Array

    @property
    def num_probes(self) -> int:
        return int(self.nodes.shape[0])

    def moment(self, power: int) -> tuple[float, float]:
        """``(1/n) tr(A^power)`` estimated, with its standard error over probes.

        Exact per probe (``v^T A^p v``) for ``power < 2 * num_steps``.
        """
        per_probe = np.sum(np.asarray(self.weights) * np.asarray(self.nodes) ** power, axis=1)
        return _mean_error(per_probe)

    def trace(self) -> tuple[float, float]:
        """``tr(A)`` with its standard error: identical to Hutchinson with the same probes."""
        mean, error = self.moment(1)
        n = int(self.dimension)
        return mean * n, error * n

    def mass_below(self, threshold: float | None = None) -> tuple[float, float]:
        """Fraction of the spectral mass strictly below ``threshold``, with its standard error.

        The default, ``-sqrt(eps) * max |node|``, counts negative eigenvalues and not the
        (often large) cluster of exact zeros of network Hessians (softmax shift invariance, dead
        ReLUs, over-parameterisation), which SLQ places at a node of round-off size and random
        sign. Pass ``0.0`` for the literal count. Ritz values interior to the spectrum are only
        approximate, so this is a smoothed count: trust it to about the spacing of the nodes.
        """
        nodes = np.asarray(self.nodes)
        if threshold is None:
            threshold = -np.sqrt(np.finfo(nodes.dtype).eps) * np.abs(nodes).max(initial=0.0)
        per_probe = np.sum(np.asarray(self.weights) * (nodes < threshold), axis=1)
        return _mean_error(per_probe)

    def density(
        self, grid: np.ndarray | None = None, *, sigma: float, num_points: int = 1000
    ) -> tuple[np.ndarray, np.ndarray]:
        """The density smoothed with a Gaussian kernel of standard deviation ``sigma``.

        ``grid`` defaults to ``num_points`` points from 5 ``sigma`` below the smallest node to
        5 ``sigma`` above the largest, so the returned density integrates to 1 over it.
        Returns ``(grid, density)``.
        """
        if not sigma > 0:
            raise ValueError(
                f"sigma (the kernel's standard deviation) must be positive, got {sigma}"
            )
        nodes = np.asarray(self.nodes, np.float64).ravel()
        weights = np.asarray(self.weights, np.float64).ravel() / self.num_probes
        if grid is None:
            grid = np.linspace(nodes.min() - 5 * sigma, nodes.max() + 5 * sigma, num_points)
        grid = np.asarray(grid, np.float64)
        z = (grid[:, None] - nodes[None, :]) / sigma
        values = np.exp(-0.5 * z**2) @ weights / (sigma * np.sqrt(2 * np.pi))
        return grid, values


def _mean_error(per_probe: np.ndarray) -> tuple[float, float]:
    m = per_probe.shape[0]
    error = float(np.std(per_probe, ddof=1) / np.sqrt(m)) if m > 1 else float("nan")
    return float(np.mean(per_probe)), error


@host_driven
@functools.partial(
    jax.jit, static_argnames=("num_probes", "num_steps", "reorthogonalize", "probe_batch_size")
)
def _slq(op, key, *, num_probes, num_steps, reorthogonalize, probe_batch_size=None):
    op = op.prepared()
    n, dtype = op.size, op.dtype
    # The probes are exactly those of trace(..., method="hutchinson") with the same key, so the
    # two trace estimates agree; restart keys are derived apart from them.
    key_restart = jax.random.fold_in(key, 0x5EED)

    def one(i):
        z = probe_rows(key, i[None], n, dtype)[0]  # drawn here: the probes are never all held
        restart = jax.random.fold_in(key_restart, i)
        if reorthogonalize:
            run = _lanczos_run(op, z, restart, num_steps, True)
        else:  # the quadrature needs only T: no basis
            run = _lanczos_recurrence(op, z, restart, num_steps)
        theta, s = eigh_tridiagonal(run)
        return theta, s[0] ** 2

    nodes, weights = jax.lax.map(one, jnp.arange(num_probes), batch_size=probe_batch_size)
    return SpectralDensity(nodes, weights, jnp.asarray(n))


def spectral_density(
    op: LinearOperator,
    /,
    *,
    num_probes: int,
    num_steps: int,
    key: jax.Array,
    reorthogonalize: bool = True,
    probe_batch_size: int | None = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature: ``num_probes`` Lanczos runs of ``num_steps`` steps.

    Cost: ``num_probes * num_steps`` matvecs; memory: one ``(num_steps, n)`` basis at a time
    (probes run one after another in one compiled ``lax.map``), or ``probe_batch_size`` bases
    when that many probes run together (vmapped: their matvecs become one matrix product, faster
    for small networks, the same numbers up to round-off). The basis memory is checked before it
    is allocated.

    Low-memory mode: ``reorthogonalize=False`` keeps two vectors per probe instead of the basis
    (memory ``O(n)``). The Lanczos vectors then lose orthogonality once Ritz values converge and
    ``T`` gets spurious copies ("ghosts") of converged eigenvalues, which share those
    eigenvalues' weight: the quadrature's moments and the smoothed density stay close to the full
    mode's (tested), individual nodes do not.
    """
    check_key(key)
    require_square(op, "spectral_density")
    num_steps = check_steps(op, num_steps)
    num_probes = positive_int(num_probes, "num_probes")
    if probe_batch_size is not None:
        probe_batch_size = positive_int(probe_batch_size, "probe_batch_size")
        probe_batch_size = None if probe_batch_size <= 1 else min(probe_batch_size, num_probes)
    if probe_batch_size is not None and op.streamed:
        raise ValueError(
            "spectral_density(probe_batch_size=) vmaps the probes' Lanczos runs, which a streamed "
            "operator (a loop over batches on the host) cannot do; leave it None"
        )
    if reorthogonalize:
        check_basis_memory(op, num_steps, "spectral_density", copies=probe_batch_size or 1)
    result = _slq(
        op,
        key,
        num_probes=num_probes,
        num_steps=num_steps,
        reorthogonalize=reorthogonalize,
        probe_batch_size=probe_batch_size,
    )
    check_finite_result(result.nodes, "spectral_density")
    return result

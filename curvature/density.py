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

from curvature import _driver
from curvature._checks import (
    check_finite_result,
    check_key,
    check_steps,
    positive_int,
    require_square,
)
from curvature._lanczos import (
    basis_init,
    basis_update,
    bucket,
    padded_eigh,
    recurrence_init,
    recurrence_update,
)
from curvature._memory import check_basis_memory
from curvature.linear_operator import LinearOperator
from curvature.stochastic_trace import TraceResult, probe_rows

__all__ = [
    "JensenShannon",
    "SpectralDensity",
    "common_grid",
    "default_sigma",
    "jensen_shannon",
    "logdet",
    "spectral_density",
    "trace_function",
]


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

    @property
    def num_matvecs(self) -> int:
        """The products the estimate took: ``num_probes * num_steps``."""
        return int(self.nodes.shape[0] * self.nodes.shape[1])

    def moment(self, power: int) -> TraceResult:
        """``(1/n) tr(A^power)`` estimated, with its standard error over probes, as a
        :class:`~curvature.TraceResult` (``value``, ``standard_error``, ``num_matvecs``).

        Exact per probe (``v^T A^p v``) for ``power < 2 * num_steps``.
        """
        return self._estimate(*self._quadrature(lambda x: x**power))

    def trace(self) -> TraceResult:
        """``tr(A)`` with its standard error, a :class:`~curvature.TraceResult` as
        :func:`curvature.trace` returns: identical to Hutchinson with the same probes."""
        mean, error, _ = self.moment(1)
        n = int(self.dimension)
        return self._estimate(mean * n, error * n)

    def _estimate(self, value: float, error: float) -> TraceResult:
        return TraceResult(value, error, self.num_matvecs)

    def trace_function(self, f, *, shift: float = 0.0) -> TraceResult:
        """``tr f(A + shift I)`` with its standard error over the probes, a
        :class:`~curvature.TraceResult`: ``n`` times the mean over probes of
        ``sum_k tau_k^2 f(theta_k + shift)``.

        ``f`` maps a numpy array of Ritz values to an array of the same shape (``np.log``,
        ``np.exp``, ``lambda x: x**2``). The quadrature is exact per probe for polynomials of
        degree below ``2 num_steps``; for other ``f`` its error falls fast with ``num_steps``
        when ``f`` is smooth over the spectrum (Ubaru, Chen & Saad 2017). The standard error
        is that of the probes' mean; it does not include the quadrature error, which more
        steps make small. Cost: none beyond the density's.
        """
        mean, error = self._quadrature(lambda x: f(x + shift))
        n = int(self.dimension)
        return self._estimate(mean * n, error * n)

    def _quadrature(self, f) -> tuple[float, float]:
        """The mean over probes of ``sum_k tau_k^2 f(theta_k)`` (``(1/n) v^T f(A) v``) and its
        standard error."""
        nodes = np.asarray(self.nodes, np.float64)
        values = np.asarray(f(nodes), np.float64)
        if values.shape != nodes.shape:
            raise ValueError(
                f"trace_function: f must map an array of Ritz values to one of the same shape "
                f"{nodes.shape}, got {values.shape}"
            )
        return _mean_error(np.sum(np.asarray(self.weights, np.float64) * values, axis=1))

    def mass_below(self, threshold: float | None = None) -> TraceResult:
        """Fraction of the spectral mass strictly below ``threshold``, with its standard error,
        as a :class:`~curvature.TraceResult` (``value``, ``standard_error``, ``num_matvecs``).

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
        return self._estimate(*_mean_error(per_probe))

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


def _probe_steps(rows: int, reorthogonalize: bool):
    """One probe's quadrature, as steps on its own state ``{"index", "key", "restart", "like",
    "num_steps"}``: the probe (row ``index`` of the Rademacher probes of ``key``, so the probes
    are those of ``trace(..., method="hutchinson")`` with the same key), ``num_steps`` (traced)
    Lanczos steps in a basis preallocated for ``rows``, and the nodes and weights of its Gauss
    quadrature (``rows`` of each; those from ``num_steps`` on are padding of weight 0)."""
    init = basis_init if reorthogonalize else recurrence_init

    def start(probe, i):
        like = probe["like"]
        z = probe_rows(probe["key"], probe["index"][None], like.shape[1], like.dtype)[0]
        if "mask" in probe:  # a block on full-length vectors: its own probe, on its entries
            z = z[probe["rank"]] * probe["mask"]
        restart = jax.random.fold_in(probe["restart"], probe["index"])
        kept = {k: probe[k] for k in ("num_steps", "mask") if k in probe}
        return {"lanczos": init(z, rows), "restart": restart, **kept}

    def rows_of(probe, j):
        if reorthogonalize:
            return probe["lanczos"][0][j]
        return probe["lanczos"][1]

    def update(probe, j, w):
        m, mask = probe["num_steps"], probe.get("mask")
        if mask is not None:
            w = w * mask
        if reorthogonalize:
            project = None if mask is None else (lambda r: r * mask)
            new = basis_update(probe["lanczos"], j, w, probe["restart"], m, True, project)
        else:
            new = recurrence_update(probe["lanczos"], j, w, probe["restart"], m)
        return {**probe, "lanczos": new}

    def quadrature(probe, i):
        # Both states end with (..., alphas, betas, restarts, anorm).
        alphas, betas = probe["lanczos"][-4], probe["lanczos"][-3]
        theta, s = padded_eigh(alphas, betas, probe["num_steps"])
        return {"nodes": theta, "weights": s[0] ** 2}

    lanczos = _driver.Repeat(lambda probe: probe["num_steps"], _driver.Apply(rows_of, update))
    return start, lanczos, quadrature


def _focused(steps, field: str):
    """The steps of one item acting on ``state[field]`` (no batch axis)."""
    start, lanczos, quadrature = steps
    inner = lanczos.body
    return _driver.Seq(
        _driver.Map(lambda state, i: {**state, field: start(state[field], i)}),
        _driver.Repeat(
            lambda state: lanczos.count(state[field]),
            _driver.Apply(
                lambda state, j: inner.rows(state[field], j),
                lambda state, j, w: {**state, field: inner.update(state[field], j, w)},
            ),
        ),
        _driver.Map(lambda state, i: {**state, field: quadrature(state[field], i)}),
    )


@functools.cache
def slq_program(
    num_probes, rows, reorthogonalize, probe_batch_size, num_groups=None
) -> _driver.Program:
    """Probes one at a time, or in groups of ``probe_batch_size`` run together (vmapped: one
    ``(P, n)`` block of products a step), the last, smaller group alone; each to a traced
    ``num_steps`` in a basis preallocated for ``rows`` (one program for every ``num_steps`` up
    to ``rows``). With ``num_groups``, the densities of that many diagonal blocks, one after
    another (probes one at a time): block ``g`` is the operator masked to the entries of group
    ``g`` on full-length vectors, its probes those of the block on its own vectors."""
    if num_groups is not None:
        return _grouped_slq_program(num_probes, rows, num_groups)
    steps = _probe_steps(rows, reorthogonalize)
    shared_fields = ("key", "restart", "like")

    def init(specs, key, num_steps):
        n, dtype = specs[0].size, specs[0].dtype
        return {
            "key": key,
            "restart": jax.random.fold_in(key, 0x5EED),  # restart keys apart from the probes
            "like": jnp.zeros((0, n), dtype),  # n and the dtype, without memory
            "num_steps": num_steps,
            "nodes": jnp.zeros((num_probes, rows), dtype),
            "weights": jnp.zeros((num_probes, rows), dtype),
        }

    def gather(size: int, offset: int):
        def probes(state, g):
            index = offset + g * size + jnp.arange(size)
            shared = {k: state[k] for k in shared_fields}
            batch = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (size, *x.shape)), shared)
            return {**state, "probe": {**batch, "index": index}}

        def store(state, g):
            first = offset + g * size
            out = {k: v for k, v in state.items() if k != "probe"}
            for k in ("nodes", "weights"):
                out[k] = jax.lax.dynamic_update_slice_in_dim(state[k], state["probe"][k], first, 0)
            return out

        start, lanczos, quadrature = steps
        body = _driver.Seq(_driver.Map(start), lanczos, _driver.Map(quadrature))
        vmapped = _driver.Vmap("probe", body, shared="num_steps")
        return _driver.Seq(_driver.Map(probes), vmapped, _driver.Map(store))

    if probe_batch_size is None:

        def one(state, i):
            shared = {k: state[k] for k in (*shared_fields, "num_steps")}
            return {**state, "probe": {**shared, "index": jnp.asarray(i)}}

        def store_one(state, i):
            out = {k: v for k, v in state.items() if k != "probe"}
            for k in ("nodes", "weights"):
                out[k] = state[k].at[i].set(state["probe"][k])
            return out

        body = _driver.Seq(_driver.Map(one), _focused(steps, "probe"), _driver.Map(store_one))
        parts = [_driver.Repeat(num_probes, body)]
    else:
        groups, remainder = divmod(num_probes, probe_batch_size)
        parts = []
        if groups:
            parts.append(_driver.Repeat(groups, gather(probe_batch_size, 0)))
        if remainder:
            parts.append(gather(remainder, groups * probe_batch_size))

    def finish(state, specs, key, num_steps):
        return SpectralDensity(state["nodes"], state["weights"], jnp.asarray(specs[0].size))

    return _driver.Program(init, _driver.Seq(*parts), finish, name="spectral_density")


def _grouped_slq_program(num_probes, rows, num_groups) -> _driver.Program:
    steps = _focused(_probe_steps(rows, True), "probe")
    fields = ("key", "restart", "like", "num_steps", "mask", "rank")

    def begin(state, g):
        key = state["keys"][g]
        dtype = state["like"].dtype
        return {
            **state,
            "key": key,
            "restart": jax.random.fold_in(key, 0x5EED),
            "num_steps": state["group_steps"][g],
            "mask": (state["entry_group"] == g).astype(dtype),
            "group": jnp.asarray(g, jnp.int32),
        }

    def init(specs, keys, group_steps, entry_group, rank):
        n, dtype = specs[0].size, specs[0].dtype
        base = {
            "keys": keys,
            "group_steps": group_steps,
            "entry_group": entry_group,
            "rank": rank,
            "like": jnp.zeros((0, n), dtype),
            "nodes": jnp.zeros((num_groups, num_probes, rows), dtype),
            "weights": jnp.zeros((num_groups, num_probes, rows), dtype),
        }
        return begin(base, 0)

    def one(state, i):
        shared = {k: state[k] for k in fields}
        return {**state, "probe": {**shared, "index": jnp.asarray(i)}}

    def store_one(state, i):
        g = state["group"]
        out = {k: v for k, v in state.items() if k != "probe"}
        for k in ("nodes", "weights"):
            out[k] = state[k].at[g, i].set(state["probe"][k])
        return out

    probes = _driver.Repeat(
        num_probes, _driver.Seq(_driver.Map(one), steps, _driver.Map(store_one))
    )
    body = _driver.Repeat(num_groups, _driver.Seq(_driver.Map(begin), probes))

    def finish(state, specs, *args):
        return state["nodes"], state["weights"]

    return _driver.Program(init, body, finish, name="block_densities")


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
    (probes run one after another in one compiled loop), or ``probe_batch_size`` bases
    when that many probes run together (vmapped: their matvecs become one matrix product, faster
    for small networks, the same numbers up to round-off). The basis memory is checked before it
    is allocated.

    Low-memory mode: ``reorthogonalize=False`` keeps two vectors per probe instead of the basis
    (memory ``O(n)``). The Lanczos vectors then lose orthogonality once Ritz values converge and
    ``T`` gets spurious copies ("ghosts") of converged eigenvalues, which share those
    eigenvalues' weight: the quadrature's moments and the smoothed density stay close to the full
    mode's (tested), individual nodes do not.

    Compiled once for every ``num_steps`` within a size bucket (the basis is preallocated to
    the bucket, at most a third more than asked; see :func:`curvature.lanczos`).
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
    rows = bucket(num_steps, op.size)
    if reorthogonalize:
        check_basis_memory(op, rows, "spectral_density", copies=probe_batch_size or 1)
    program = slq_program(num_probes, rows, reorthogonalize, probe_batch_size)
    result = _driver.run(program, (op,), key, jnp.asarray(num_steps, jnp.int32))
    # The Ritz values come ascending, then the padding's (weight 0): keep the run's.
    result = result._replace(
        nodes=result.nodes[:, :num_steps], weights=result.weights[:, :num_steps]
    )
    check_finite_result(result.nodes, "spectral_density")
    return result


def trace_function(
    op: LinearOperator,
    f,
    /,
    *,
    num_probes: int,
    num_steps: int,
    key: jax.Array,
    shift: float = 0.0,
    **kwargs,
) -> TraceResult:
    """``tr f(A + shift I)`` by stochastic Lanczos quadrature, with its standard error over the
    probes: ``spectral_density(op, ...).trace_function(f, shift=shift)``.

    Args:
      op: a symmetric operator.
      f: a function of a numpy array of eigenvalues, elementwise (``np.log``, ``np.exp``).
      num_probes: Rademacher probes; the standard error falls as ``1/sqrt(num_probes)``.
      num_steps: Lanczos steps per probe; the quadrature is exact for polynomials of degree
        below ``2 num_steps``.
      key: PRNG key of the probes (the same probes as :func:`trace` draws with it).
      shift: added to every eigenvalue, e.g. a damping ``lambda`` for ``f(A + lambda I)``.
        Lanczos on ``A + lambda I`` gives the same basis and Ritz values shifted by ``lambda``,
        so the shift costs nothing.
      **kwargs: ``reorthogonalize``, ``probe_batch_size``, as for :func:`spectral_density`.

    Returns a :class:`~curvature.TraceResult` (``value``, ``standard_error``, ``num_matvecs``).
    Cost: ``num_probes * num_steps`` matvecs.
    """
    density = spectral_density(op, num_probes=num_probes, num_steps=num_steps, key=key, **kwargs)
    return density.trace_function(f, shift=shift)


def logdet(
    op: LinearOperator,
    /,
    *,
    num_probes: int,
    num_steps: int,
    key: jax.Array,
    damping: float = 0.0,
    **kwargs,
) -> TraceResult:
    """``log det(A + damping I)`` by stochastic Lanczos quadrature, with its standard error:
    the quantity Laplace approximations and marginal likelihoods need (Ubaru, Chen & Saad 2017).

    ``A + damping I`` must be positive definite: if a Ritz value of it is not positive, that is
    an eigenvalue of it that is not either (Ritz values lie within the spectrum), and the call
    raises ``ValueError`` naming the value and the damping that would lift it. A network
    Hessian is indefinite; a Gauss-Newton or Fisher matrix is positive semi-definite with many
    zero eigenvalues, so it needs ``damping > 0``. The smaller the damping, the more steps the
    logarithm near 0 needs: compare two ``num_steps`` to see the quadrature error.

    Args, returns and cost as for :func:`trace_function` (``damping`` is its ``shift``).
    """
    density = spectral_density(op, num_probes=num_probes, num_steps=num_steps, key=key, **kwargs)
    lowest = float(np.min(np.asarray(density.nodes, np.float64))) + damping
    if not lowest > 0:
        raise ValueError(
            f"logdet: A + damping I is not positive definite: it has an eigenvalue at most "
            f"{lowest:.6g} (the smallest Ritz value plus damping={damping}); use a damping above "
            f"{damping - lowest:.6g}, or a positive semi-definite operator (gauss_newton) "
            "with damping > 0"
        )
    return density.trace_function(np.log, shift=damping)


# --------------------------------------------------------------------------------------------
# Distances between densities.


def common_grid(
    densities, *, sigma: float, num_points: int = 2000, margin: float = 5.0
) -> np.ndarray:
    """One grid covering every density's nodes with ``margin`` kernel widths (``sigma``, the
    Gaussian kernel's standard deviation) on each side, so that densities smoothed on it share
    their grid and each integrates to 1 over it (up to ``exp(-margin**2 / 2)``)."""
    nodes = np.concatenate([np.asarray(d.nodes, np.float64).ravel() for d in densities])
    return np.linspace(nodes.min() - margin * sigma, nodes.max() + margin * sigma, num_points)


def default_sigma(densities) -> float:
    """The default kernel width of :func:`jensen_shannon` and
    :func:`curvature.plotting.plot_block_densities`: 1% of the spread of all nodes (largest
    minus smallest); if every node is equal, 1% of their magnitude; if they are all 0, 0.01."""
    nodes = np.concatenate([np.asarray(d.nodes, np.float64).ravel() for d in densities])
    return 0.01 * (float(nodes.max() - nodes.min()) or float(np.abs(nodes).max()) or 1.0)


def _per_probe(density: SpectralDensity, grid: np.ndarray, sigma: float) -> np.ndarray:
    """``(num_probes, len(grid))``: each probe's quadrature smoothed with the Gaussian kernel;
    their mean over probes is ``density.density(grid, sigma=sigma)[1]``."""
    nodes = np.asarray(density.nodes, np.float64)
    weights = np.asarray(density.weights, np.float64)
    out = np.empty((nodes.shape[0], grid.shape[0]))
    for i in range(nodes.shape[0]):  # one probe at a time: memory len(grid) x num_steps
        z = (grid[:, None] - nodes[i][None, :]) / sigma
        out[i] = np.exp(-0.5 * z**2) @ weights[i]
    return out / (sigma * np.sqrt(2 * np.pi))


def _js_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The Jensen-Shannon distance (base 2) between the rows of ``p`` and ``q`` (``(..., G)``
    probability vectors over the same grid cells), in ``[0, 1]``."""

    def kl(a, m):
        ratio = np.where(a > 0, a / np.where(m > 0, m, 1), 1)
        return np.sum(np.where(a > 0, a * np.log2(ratio), 0), axis=-1)

    m = 0.5 * (p + q)
    divergence = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    return np.sqrt(np.clip(divergence, 0.0, 1.0))


def _cell_masses(values: np.ndarray) -> np.ndarray:
    """Densities on a uniform grid as probability vectors over its cells (rows sum to 1)."""
    values = np.maximum(values, 0.0)
    return values / np.sum(values, axis=-1, keepdims=True)


class JensenShannon(NamedTuple):
    """Jensen-Shannon distances between spectral densities, with bootstrap errors.

    Attributes:
      names: the densities' names, in order (``0, 1, ...`` for a sequence).
      distance: ``(m, m)`` numpy array, symmetric with a zero diagonal, each entry in ``[0, 1]``.
      standard_error: ``(m, m)`` the bootstrap standard error of each distance.
      mean: the mean of the ``m (m - 1) / 2`` distinct off-diagonal distances.
      mean_standard_error: its bootstrap standard error.
      sigma: the Gaussian kernel's standard deviation used (in units of each density's own
        spectral radius with ``scale="own"``).
      scale: ``"shared"`` or ``"own"`` (see :func:`jensen_shannon`).
    """

    names: tuple
    distance: np.ndarray
    standard_error: np.ndarray
    mean: float
    mean_standard_error: float
    sigma: float
    scale: str = "shared"


def jensen_shannon(
    densities,
    *,
    sigma: float | None = None,
    grid: np.ndarray | None = None,
    num_bootstrap: int = 200,
    seed: int = 0,
    scale: str = "shared",
) -> JensenShannon:
    """The Jensen-Shannon distance between every pair of spectral densities: the block
    heterogeneity measure of Zhang et al. (2024, "Why Transformers need Adam: a Hessian
    perspective"), on the densities of :func:`curvature.block_densities`.

    Each density is smoothed with a Gaussian kernel of standard deviation ``sigma``
    (:meth:`SpectralDensity.density`) on one shared, uniform grid and read as a probability
    vector over the grid's points (normalised to sum 1). The distance is the square root of
    the Jensen-Shannon divergence with base-2 logarithms,
    $\\sqrt{\\tfrac12 KL(p \\| m) + \\tfrac12 KL(q \\| m)}$ with $m = (p + q) / 2$: 0 for equal
    densities, 1 for densities with disjoint support, a metric in between.

    Args:
      densities: ``{name: SpectralDensity}`` (as :func:`curvature.block_densities` returns)
        or a sequence of them (named ``0, 1, ...``); at least two.
      sigma: the kernel's standard deviation. Default: 1% of the spread of all nodes of all
        densities (largest minus smallest); if every node is equal, 1% of their magnitude,
        else 0.01. The distance depends on it: report it (it is returned).
      grid: a uniform, increasing grid of eigenvalues; default :func:`common_grid` with 5
        ``sigma`` margins and points at most ``sigma / 8`` apart (2,000 to 20,000 of them).
      num_bootstrap: bootstrap replicates of the standard errors. Each replicate resamples the
        probe rows (nodes and weights together) of every density independently, with
        replacement, and recomputes every distance.
      seed: of the bootstrap's ``numpy.random.Generator`` (host randomness, no PRNG key).
      scale: ``"shared"`` (default): the densities as they are, so blocks differ by the scale of
        their eigenvalues as well as by their shape. ``"own"``: each density's eigenvalues
        divided by its own largest Ritz value in magnitude first (its spectral radius, which
        Lanczos finds to high accuracy), so that only the shapes are compared: a block whose
        spectrum is another's times a constant is at distance 0.

    Returns a :class:`JensenShannon`. The standard errors cover the probes' randomness, not the
    choice of ``sigma`` or the quadrature. A density of a single probe has zero bootstrap
    error (there is nothing to resample).

    Cost: no matvec; host numpy, about ``num_probes * num_steps * len(grid)`` operations per
    density and ``num_bootstrap * m**2 * len(grid)`` for the bootstrap.
    """
    if isinstance(densities, dict):
        names, items = tuple(densities), list(densities.values())
    elif isinstance(densities, list | tuple):
        names, items = tuple(range(len(densities))), list(densities)
    else:
        raise TypeError(
            "densities: expected {name: SpectralDensity} or a sequence of SpectralDensity, got "
            f"{type(densities).__name__}"
        )
    for name, d in zip(names, items, strict=True):
        if not isinstance(d, SpectralDensity):
            raise TypeError(f"densities[{name!r}] is a {type(d).__name__}, not a SpectralDensity")
    if len(items) < 2:
        raise ValueError(f"jensen_shannon needs at least two densities, got {len(items)}")
    num_bootstrap = positive_int(num_bootstrap, "num_bootstrap")
    if scale not in ("shared", "own"):
        raise ValueError(f"scale must be 'shared' or 'own', got {scale!r}")
    if scale == "own":
        items = [_own_scale(d) for d in items]
    nodes = np.concatenate([np.asarray(d.nodes, np.float64).ravel() for d in items])
    if not np.all(np.isfinite(nodes)):
        raise ValueError("jensen_shannon: a density has non-finite nodes")
    if sigma is None:
        sigma = default_sigma(items)
    elif not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma (the kernel's standard deviation) must be positive, got {sigma}")
    sigma = float(sigma)
    if grid is None:
        span = float(nodes.max() - nodes.min()) + 10 * sigma
        num_points = int(np.clip(np.ceil(8 * span / sigma) + 1, 2000, 20000))
        grid = common_grid(items, sigma=sigma, num_points=num_points)
    grid = np.asarray(grid, np.float64)
    if grid.ndim != 1 or grid.size < 2 or np.any(np.diff(grid) <= 0):
        raise ValueError("grid: expected an increasing 1-D array of at least two eigenvalues")
    steps = np.diff(grid)
    if not np.allclose(steps, steps[0], rtol=1e-6):
        raise ValueError("grid: expected uniformly spaced points (np.linspace)")
    rows = [_per_probe(d, grid, sigma) for d in items]
    m = len(items)
    upper = np.triu_indices(m, 1)

    def distances(masses):  # m arrays (..., G) -> (..., m, m), one pair at a time
        out = np.zeros((*masses[0].shape[:-1], m, m))
        for i, j in zip(*upper, strict=True):
            out[..., i, j] = out[..., j, i] = _js_distance(masses[i], masses[j])
        return out

    distance = distances([_cell_masses(r.mean(axis=0)) for r in rows])
    rng = np.random.default_rng(seed)
    replicates = []
    for r in rows:
        p = r.shape[0]
        counts = rng.multinomial(p, np.full(p, 1.0 / p), size=num_bootstrap)  # (B, P)
        replicates.append(_cell_masses(counts @ r / p))
    boot = distances(replicates)  # (B, m, m)
    standard_error = boot.std(axis=0, ddof=1) if num_bootstrap > 1 else np.full((m, m), np.nan)
    np.fill_diagonal(standard_error, 0.0)  # a density's distance to itself is 0 exactly
    means = boot[:, upper[0], upper[1]].mean(axis=1)
    return JensenShannon(
        names=names,
        distance=distance,
        standard_error=standard_error,
        mean=float(distance[upper].mean()),
        mean_standard_error=float(means.std(ddof=1)) if num_bootstrap > 1 else float("nan"),
        sigma=sigma,
        scale=scale,
    )


def _own_scale(density: SpectralDensity) -> SpectralDensity:
    """``density`` with its nodes divided by their largest magnitude (1 for an all-zero one)."""
    nodes = np.asarray(density.nodes, np.float64)
    radius = float(np.abs(nodes).max(initial=0.0)) or 1.0
    return SpectralDensity(nodes / radius, density.weights, density.dimension)

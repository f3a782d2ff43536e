"""``block_spectra``: the spectrum of every parameter block of the Hessian (or of its Gauss-Newton
part) on its own: per block the top eigenvalues (Lanczos, with residuals) and the SLQ spectral
density, and how different the blocks' densities are: the Jensen-Shannon distance between them
(Zhang et al. 2024, "Why Transformers Need Adam: A Hessian Perspective", who find a
transformer's blocks heterogeneous and a CNN's not).

The blocks are the parameter groups: by default one per named sub-module
(``curvature.layer_groups``: a transformer's ``layers/0/query``, ``layers/0/mlp_in``, ...), or
the groups that ``groups`` patterns name (``"attention=*query|*key"``: every sub-module whose
name matches a glob joins the group ``attention``; a pattern without ``name=`` names its group
itself). The densities' nodes and weights are saved in the step's spectra file
(``block_slq_nodes`` / ``block_slq_weights``, ``(blocks, probes, steps)``, zero weights past a
block's own number of steps).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math

import jax
import numpy as np

import curvature as cv
from experiments.figures import heterogeneity
from experiments.measurements.base import Context, Measurement, at_least
from experiments.record import Eigenvalues, Estimate
from experiments.table import Column

OPERATORS = ("hessian", "gauss_newton")


@dataclasses.dataclass(frozen=True)
class BlockSpectra:
    """Per block (``names``, ``sizes`` parameters) its top eigenvalues with residuals
    (``top[b]``), and the Jensen-Shannon distances between the blocks' smoothed densities
    (``js_distance[i][j]`` ± ``js_standard_error[i][j]``, a bootstrap over the SLQ probes; kernel
    width ``sigma``), with their mean over pairs ``js_mean`` (± its bootstrap SE): on one shared
    eigenvalue scale, so blocks differ by scale and shape. ``js_shape_mean``: the same mean with
    each block's density on its own scale (divided by its spectral radius): shape alone.
    ``operator``: ``hessian`` or ``gauss_newton``."""

    operator: str
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    top: tuple[Eigenvalues, ...]
    js_mean: Estimate
    js_distance: tuple[tuple[float, ...], ...]
    js_standard_error: tuple[tuple[float, ...], ...]
    sigma: float
    num_probes: int
    num_steps: int
    js_shape_mean: Estimate | None = None

    def top_spread(self) -> float:
        """log10 of the largest over the smallest top eigenvalue of the blocks (those with a
        positive, converged one): how many decades the blocks' curvature scales span."""
        tops = [t.values[0] for t in self.top if t.values and t.converged[0] and t.values[0] > 0]
        return math.log10(max(tops) / min(tops)) if len(tops) > 1 else math.nan

    def densities(self, arrays: dict) -> dict[str, cv.SpectralDensity]:
        """``{block: SpectralDensity}`` from the step's spectra file (``arrays``)."""
        nodes, weights = arrays["block_slq_nodes"], arrays["block_slq_weights"]
        return {
            name: cv.SpectralDensity(nodes[b], weights[b], np.asarray(self.sizes[b]))
            for b, name in enumerate(self.names)
        }


def parse_groups(patterns) -> list[tuple[str, tuple[str, ...]]]:
    """``("attention=*query|*key", "*mlp*")`` -> ``[("attention", ("*query", "*key")),
    ("*mlp*", ("*mlp*",))]``; a ``ValueError`` naming a bad entry."""
    out = []
    for entry in patterns:
        if not isinstance(entry, str) or not entry.strip():
            raise ValueError(f"groups: {entry!r} is not a pattern (a non-empty string)")
        name, sep, globs = entry.partition("=")
        if not sep:
            name, globs = entry, entry
        globs = tuple(g.strip() for g in globs.split("|") if g.strip())
        if not name.strip() or not globs:
            raise ValueError(f"groups: {entry!r} needs a name and a glob, as 'name=glob|glob'")
        out.append((name.strip(), globs))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"groups: the group names {names} repeat")
    return out


def groups_of(params, patterns) -> dict:
    """The partition the ``groups`` setting names: ``curvature.layer_groups`` when it is empty;
    else per pattern the union of the sub-modules whose names match one of its globs (a
    sub-module in the first group that matches it; sub-modules no pattern matches are left
    out). A pattern that matches nothing is a ``ValueError`` listing the sub-modules."""
    modules = cv.layer_groups(params)
    if not patterns:
        return modules
    taken, out = set(), {}
    for name, globs in parse_groups(patterns):
        chosen = [
            m for m in modules if m not in taken and any(fnmatch.fnmatch(m, g) for g in globs)
        ]
        if not chosen:
            raise ValueError(
                f"groups: {name!r} ({'|'.join(globs)}) matches no sub-module; they are "
                f"{', '.join(modules)}"
            )
        taken.update(chosen)
        masks = [jax.tree_util.tree_leaves(modules[m]) for m in chosen]
        union = [any(flags) for flags in zip(*masks, strict=True)]
        treedef = jax.tree_util.tree_structure(modules[chosen[0]])
        out[name] = jax.tree_util.tree_unflatten(treedef, union)
    return out


def block_spectra(ctx: Context) -> BlockSpectra:
    """Per parameter block (``groups``; default one per named sub-module) of H (or of G with
    ``operator="gauss_newton"``): its ``k`` top eigenvalues with residuals
    (``curvature.block_eigenvalues``, ``num_steps`` Lanczos steps) and its SLQ spectral density
    (``curvature.block_densities``, ``num_probes`` probes of ``density_steps`` steps), and the
    Jensen-Shannon distances between the blocks' densities (``curvature.jensen_shannon``, kernel
    width ``sigma``, 0: 1% of the spread of all nodes) with bootstrap errors. Cost: blocks x
    (2 num_steps + k + num_probes x density_steps) matvecs, two compiled programs. The
    distances are also taken with each density on its own scale (``js_shape_mean``)."""
    s = ctx.settings
    op = ctx.hessian() if s.operator == "hessian" else ctx.gauss_newton()
    groups = groups_of(ctx.params, tuple(s.groups))
    tops = cv.block_eigenvalues(
        op, groups, k=s.k, key=ctx.key_for("block_top"), num_steps=s.num_steps
    )
    densities = cv.block_densities(
        op,
        groups,
        key=ctx.key_for("block_slq"),
        num_probes=s.num_probes,
        num_steps=s.density_steps,
    )
    js = cv.jensen_shannon(densities, sigma=s.sigma or None)
    shape = cv.jensen_shannon(densities, scale="own")
    steps = max(d.nodes.shape[1] for d in densities.values())
    nodes = np.zeros((len(densities), s.num_probes, steps))
    weights = np.zeros_like(nodes)
    for b, d in enumerate(densities.values()):
        m = d.nodes.shape[1]
        nodes[b, :, :m] = np.asarray(d.nodes)
        nodes[b, :, m:] = np.asarray(d.nodes)[:, :1]  # padding: a node of the density, weight 0
        weights[b, :, :m] = np.asarray(d.weights)
    ctx.spectra.update(block_slq_nodes=nodes, block_slq_weights=weights)
    top = tuple(
        _top_record(tops, b, s.k, s.num_steps, int(size)) for b, size in enumerate(tops.sizes)
    )
    return BlockSpectra(
        operator=s.operator,
        names=tuple(tops.names),
        sizes=tuple(int(v) for v in tops.sizes),
        top=top,
        js_mean=Estimate(float(js.mean), float(js.mean_standard_error)),
        js_distance=tuple(tuple(float(v) for v in row) for row in js.distance),
        js_standard_error=tuple(tuple(float(v) for v in row) for row in js.standard_error),
        sigma=float(js.sigma),
        num_probes=s.num_probes,
        num_steps=s.density_steps,
        js_shape_mean=Estimate(float(shape.mean), float(shape.mean_standard_error)),
    )


def _top_record(tops, b: int, k: int, num_steps: int, size: int) -> Eigenvalues:
    """Block ``b``'s Ritz pairs (those it has: at most its size) and the matvecs they took, as
    ``curvature.block_eigenvalues`` runs them: Lanczos of min(num_steps, size) steps (at least
    k), a rank check of as many (none when the block is spanned) and a residual each."""
    valid = np.isfinite(tops.eigenvalues[b])
    steps = max(min(num_steps, size), min(k, size))
    checks = 0 if steps == size else min(steps, size - 1)
    return Eigenvalues(
        tuple(float(v) for v in tops.eigenvalues[b][valid]),
        tuple(float(v) for v in tops.residual_norms[b][valid]),
        tuple(bool(c) for c in tops.converged[b][valid]),
        steps + checks + int(valid.sum()),
    )


def _check(s, info):
    if s.operator not in OPERATORS:
        return f"operator={s.operator!r} is not one of {', '.join(OPERATORS)}"
    bad = at_least(1, "k,num_steps")(s, info) or at_least(2, "num_probes,density_steps")(s, info)
    if bad:
        return bad
    if s.num_steps < s.k:
        return f"num_steps={s.num_steps} must be >= k={s.k}"
    if not isinstance(s.sigma, int | float) or s.sigma < 0:
        return f"sigma={s.sigma!r} must be a number >= 0 (0: 1% of the spread of the nodes)"
    try:
        parse_groups(tuple(s.groups))
    except ValueError as err:
        return str(err)
    return None


BLOCK_SPECTRA = Measurement(
    "block_spectra",
    block_spectra,
    defaults={
        "operator": "hessian",
        "groups": (),  # () : one block per named sub-module; else "name=glob|glob" patterns
        "k": 3,
        "num_steps": 30,
        "num_probes": 4,
        "density_steps": 40,
        "sigma": 0.0,  # 0: 1% of the spread of all blocks' nodes
    },
    check=_check,
    record_type=BlockSpectra,
    columns=(
        Column(
            "block JS",
            lambda r: r.block_spectra.js_mean if r.block_spectra else None,
            rank=125,
            legend="block JS: the mean Jensen-Shannon distance between the blocks' spectral "
            "densities on one eigenvalue scale (0: alike, 1: disjoint; Zhang et al. 2024), ± a "
            "bootstrap SE over probes",
        ),
        Column(
            "block JS shape",
            lambda r: r.block_spectra.js_shape_mean if r.block_spectra else None,
            rank=126,
            legend="block JS shape: the same with each block's density on its own scale "
            "(divided by its largest eigenvalue): the blocks' shapes alone",
        ),
        Column(
            "block λ decades",
            lambda r: r.block_spectra.top_spread() if r.block_spectra else None,
            rank=127,
            legend="block λ decades: log10 of the largest over the smallest top eigenvalue of "
            "the blocks (converged ones)",
        ),
    ),
    figures=(heterogeneity.BLOCK_SPECTRA,),
    spectra=True,
    cost=2,
)

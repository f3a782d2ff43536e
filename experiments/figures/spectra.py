"""Spectra: the SLQ spectral ``density`` (and the densities a report pools over seeds) and the
top eigenvalues against their index (``spectrum``)."""

from __future__ import annotations

import numpy as np

import curvature as cv
from curvature import plotting
from experiments import storage, table
from experiments.figures import common


def density_at(member, step) -> cv.SpectralDensity | None:
    path = member.dir / "spectra" / f"step_{step:06d}.npz"
    if not path.exists():
        return None
    arrays = storage.read_npz(path, "spectra file")
    if "slq_nodes" not in arrays:
        return None
    return cv.SpectralDensity(arrays["slq_nodes"], arrays["slq_weights"], arrays["dimension"])


def pooled_density(members, step) -> cv.SpectralDensity | None:
    """The seeds' SLQ probes pooled into one estimate (more probes, same measure)."""
    found = [d for d in (density_at(m, step) for m in members) if d is not None]
    if not found:
        return None
    return cv.SpectralDensity(
        np.concatenate([np.asarray(d.nodes) for d in found]),
        np.concatenate([np.asarray(d.weights) for d in found]),
        found[0].dimension,
    )


def default_sigma(densities) -> float:
    nodes = np.concatenate([np.asarray(d.nodes).ravel() for d in densities])
    return float(max(np.ptp(nodes), 1e-12) / 100.0)


def density_figure(run, *, sigma: float | None = None, floor: float = 1e-5):
    plt = common.pyplot()
    groups = common.groups(run)
    finals = {a: max(table.common_steps(ms) or [0]) for a, ms in groups}
    panels = [("initialisation (step 0)", {a: pooled_density(ms, 0) for a, ms in groups})]
    panels.append(("last step", {a: pooled_density(ms, finals[a]) for a, ms in groups}))
    everything = [d for _, ds in panels for d in ds.values() if d is not None]
    if not everything:
        return None, None
    sigma = sigma or default_sigma(everything)
    grid = plotting.density_grid(everything, sigma=sigma)
    with plt.rc_context(common.PAPER_RC):
        fig, axes = plt.subplots(
            1, 2, figsize=(common.WIDTH, 2.8), sharey=True, layout="constrained"
        )
        drawn = {}
        for ax, (title, densities) in zip(axes, panels, strict=True):
            for i, (activation, d) in enumerate(densities.items()):
                if d is None:
                    continue
                label = (
                    activation
                    if title.startswith("init")
                    else f"{activation} (step {finals[activation]})"
                )
                _, values = plotting.plot_density(
                    ax,
                    d,
                    sigma=sigma,
                    grid=grid,
                    floor=floor,
                    rug=True,
                    label=label,
                    **plotting.series_style(i),
                )
                ax.lines[-2].set_gid(f"density/{title}/{activation}")
                drawn[(title, activation)] = values
            ax.set_title(title)
            ax.axvline(0.0, color="0.6", linewidth=0.6, zorder=0)
            ax.legend(loc="upper right", frameon=False)
        axes[1].set_ylabel("")
        fig.suptitle(
            f"Hessian spectral density (SLQ; Gaussian kernel, standard deviation σ = {sigma:.3g})",
            fontsize=8,
        )
    fig._curvature_density = {"grid": grid, "values": drawn, "sigma": sigma}
    return fig, sigma


def _num_classes(run) -> int | None:
    """C, from a member's model: the width of its read-out in a kept checkpoint (no data
    needed); ``None`` when no checkpoint tells."""
    for _, members in common.groups(run):
        for member in members:
            for step in member.checkpoint_steps[-1:]:
                path = member.dir / "checkpoints" / f"step_{step:06d}.npz"
                arrays = storage.read_npz(path, "checkpoint", ("params/readout/bias/value",))
                if arrays:
                    return int(next(iter(arrays.values())).shape[0])
    return None


def spectrum_figure(run):
    """The top eigenvalues of H (filled) and G (hollow) against their index, at initialisation
    and at the last step, a panel per group, log axis: outliers stand apart from the bulk. The
    dotted lines mark C − 1 and C (the read-out's width)."""
    plt = common.pyplot()
    groups = [
        (g, ms)
        for g, ms in common.groups(run)
        if common.has([(g, ms)], lambda r: r.top_eigenvalues is not None)
    ]
    classes = None
    with plt.rc_context(common.PAPER_RC):
        fig, axes, _ = common.panels(plt, len(groups), 2.3, sharex=False)
        for (group, members), ax in zip(groups, axes.ravel(), strict=False):
            with_top = [
                {r.step for r in m.records if r.top_eigenvalues is not None} for m in members
            ]
            final = max(set.intersection(*with_top) or {0})
            for j, (step, name) in enumerate(((0, "init"), (final, f"step {final}"))):
                style = plotting.series_style(j)
                records = [
                    m.record(step)
                    for m in members
                    if step in m.steps and m.record(step).top_eigenvalues is not None
                ]
                if not records:
                    continue
                top = np.mean([r.top_eigenvalues.values for r in records], axis=0)
                index = np.arange(1, len(top) + 1)
                (line,) = ax.plot(index, top, label=f"H, {name}", **{**style, "markersize": 3})
                line.set_gid(f"spectrum/{group}/H/{step}")
                if all(r.gauss_newton for r in records):
                    g = np.mean([r.gauss_newton.top.values for r in records], axis=0)
                    hollow = {**style, "markerfacecolor": "none", "linestyle": ":", "markersize": 3}
                    (line,) = ax.plot(np.arange(1, len(g) + 1), g, label=f"G, {name}", **hollow)
                    line.set_gid(f"spectrum/{group}/G/{step}")
            classes = classes or _num_classes(run)
            if classes:
                for x in (classes - 0.5, classes + 0.5):
                    ax.axvline(x, color="0.6", linewidth=0.5, linestyle=":", zorder=0)
                ax.text(
                    classes + 0.9,
                    0.03,
                    "C−1 | C",
                    transform=ax.get_xaxis_transform(),
                    ha="left",
                    va="bottom",
                    fontsize=6,
                    color="0.4",
                )
            ax.set_yscale("log")
            ax.set_title(group)
            ax.set_xlabel("eigenvalue index")
            if ax is axes[ax.get_subplotspec().rowspan.start, 0]:
                ax.set_ylabel("eigenvalue")
        axes[0, 0].legend(frameon=False, fontsize=6)
    return fig


def _draw_density(run, facts):
    fig, sigma = density_figure(run, sigma=facts.get("sigma"))
    if fig is not None:
        facts["sigma"] = sigma  # the caption states the width drawn
    return fig


DENSITY = common.Figure(
    "density",
    _draw_density,
    lambda r: True,  # whenever a spectra file holds SLQ nodes (density_figure looks)
    "Hessian spectral density at initialisation and at the last step; Gaussian kernel "
    "of standard deviation σ = {sigma:.3g} on one grid for all groups; ticks: Ritz nodes.",
    rank=0,
)
SPECTRUM = common.Figure(
    "spectrum",
    lambda run, facts: spectrum_figure(run),
    lambda r: r.top_eigenvalues is not None and len(r.top_eigenvalues.values) >= 10,
    "Top Hessian (filled) and Gauss-Newton (hollow, dotted) eigenvalues against their "
    "index at initialisation and at the last step, mean over seeds.",
    rank=50,
)

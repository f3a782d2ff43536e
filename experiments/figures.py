"""Figures and the report of a run directory, drawn from what is on disk (never re-measured).

``draw_all(workdir)`` writes, under ``workdir/figures/``, PNG and PDF files:

* ``density``: SLQ spectral density at initialisation and at the last step, every activation on
  one shared grid and one kernel width (a Gaussian whose standard deviation is in the caption),
  signed eigenvalue axis, log density with a floor, Ritz nodes as a rug;
* ``eigenvalues``: top-k and bottom-k Hessian eigenvalues against step, a panel per activation,
  with the 2/η edge-of-stability line for plain gradient descent;
* ``trace``: tr H and tr G against step, and the residual share ‖H − G‖F / ‖H‖F;
* ``training``: training loss and test accuracy, seeds as thin lines around their mean;
* ``edge_of_stability``: λmax / edge (η·λmax/2 for gradient descent) against step, the line at 1
  (Cohen et al. 2021), for full-batch runs with an edge;
* ``spectrum``: the top eigenvalues of H (and G) against their index at initialisation and at
  the last step, on a log axis (the outliers of Papyan 2019; Sagun et al. 2017);
* ``blocks``: where R = H − G lives: the share of ‖R‖F² in same-layer blocks per group, at
  initialisation and at the last step, and beside it the same share of ‖H‖F² and ‖G‖F² (the
  ``blocks`` measurement; zero up to round-off for ReLU, whose R couples only different layers);
* ``activation_parameter``: curvature at the last step against an activation's parameter (β of
  ``softplus:β``, ...) when a run holds two or more values of it, the run's unparametrised
  activations (ReLU) as horizontal reference lines;

each drawn when the records hold its quantities, and, through :mod:`experiments.pages`, ``report.md``
/ ``report.html``. The density and spectrum figures are in :mod:`experiments.figures_spectra`,
blocks and activation_parameter in :mod:`experiments.figures_structure`.
"""

from __future__ import annotations

import io
import pathlib

import numpy as np

from curvature import plotting
from experiments import storage
from experiments.figures_spectra import density_figure, spectrum_figure
from experiments.figures_structure import blocks_figure, parameter_figure
from experiments.load import load_run

PAPER_RC = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "lines.linewidth": 1.2,
    "figure.dpi": 100,
    "savefig.dpi": 200,
    "pdf.fonttype": 42,
}
WIDTH = 7.0  # inches: a two-column paper's full width


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------------------------
# Data from a run directory.


def _groups(run) -> list[tuple[str, list]]:
    """``(group, members with records)`` in sweep order; a group is an activation and swept values."""
    out = []
    for group, members in run.groups().items():
        measured = [m for m in members if m.records]
        if measured:
            out.append((group, measured))
    return out


def _has(groups, get) -> bool:
    """Whether any record of ``groups`` has the quantity (``get`` is neither None nor False)."""
    return any(
        get(r) is not None and get(r) is not False
        for _, ms in groups
        for m in ms
        for r in m.records
    )


def series(members, get) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """``(steps, mean over seeds, per-seed (steps, values))`` of ``get(record)``, at the steps
    where every seed has a value."""
    by_step = [{r.step: get(r) for r in m.records if get(r) is not None} for m in members]
    per_seed = [(np.array(list(v)), np.array(list(v.values()), float)) for v in by_step]
    common = sorted(set.intersection(*(set(v) for v in by_step))) if by_step else []
    mean = np.array([np.mean([v[s] for v in by_step], axis=0) for s in common], float)
    return np.array(common), mean, per_seed


def _edge(groups) -> tuple[float | None, str]:
    """The edge of stability recorded with the measurements (one value for all groups, or none)."""
    edges = {r.edge_of_stability for _, ms in groups for m in ms for r in m.records}
    if len(edges) != 1 or None in edges:
        return None, ""
    optimizer = groups[0][1][0].config.train.optimizer
    return edges.pop(), "(2+2β)/η" if optimizer == "momentum" else "2/η"


def _panels(plt, count: int, height: float, *, sharex: bool):
    """A grid of up to three panels a row, one per group, the unused ones hidden."""
    cols = min(count, 3)
    rows = int(np.ceil(count / cols))
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(WIDTH, height * rows),
        sharex=sharex,
        sharey=True,
        layout="constrained",
        squeeze=False,
    )
    for ax in axes.ravel()[count:]:
        ax.set_visible(False)
    return fig, axes, cols


def _top(r):
    e = r.top_eigenvalues or r.lambda_max
    return None if e is None else list(e.values)


def _top_of(members):
    """The top-eigenvalue series of a group: ``top_eigenvalues`` where the group has them (its
    records without them left out, so a series never mixes k values with one), else λmax."""
    if any(r.top_eigenvalues is not None for m in members for r in m.records):
        return lambda r: list(r.top_eigenvalues.values) if r.top_eigenvalues else None
    return lambda r: list(r.lambda_max.values) if r.lambda_max else None


def _bottom(r):
    e = r.bottom_eigenvalues
    return None if e is None else list(e.values)


def eigenvalue_figure(run):
    plt = _pyplot()
    groups = [(g, ms) for g, ms in _groups(run) if _has([(g, ms)], _top)]
    edge, edge_label = _edge(groups)
    with plt.rc_context(PAPER_RC):
        fig, axes, cols = _panels(plt, len(groups), 2.2, sharex=True)
        highest = -np.inf
        for i, ((group, members), ax) in enumerate(zip(groups, axes.ravel(), strict=False)):
            style = plotting.series_style(i)
            steps, top, per_seed = series(members, _top_of(members))
            if not len(steps):
                continue
            highest = max(highest, float(np.max(top)))
            lines = plotting.plot_trajectories(
                ax, steps, top, label=f"top {top.shape[-1]}", style=style
            )
            for j, line in enumerate(lines):
                line.set_gid(f"eig/{group}/top{j}")
                line.set_linewidth(1.4 if j == 0 else 0.7)
            if len(members) > 1:  # each seed's largest eigenvalue, also past the common steps
                for seed_steps, values in per_seed:
                    ax.plot(
                        seed_steps, values[:, 0], color=style["color"], linewidth=0.4, alpha=0.5
                    )
            bottom_steps, bottom, _ = series(members, _bottom)
            if len(bottom_steps):
                hollow = {**style, "markerfacecolor": "none"}
                label = f"bottom {bottom.shape[-1]} (hollow)"
                lines = plotting.plot_trajectories(
                    ax, bottom_steps, bottom, label=label, style=hollow
                )
                for j, line in enumerate(lines):
                    line.set_gid(f"eig/{group}/bottom{j}")
                    line.set_linewidth(0.7)
            ax.axhline(0.0, color="0.7", linewidth=0.5, zorder=0)
            ax.set_title(f"{group} ({len(members)} seed{'s' if len(members) > 1 else ''}, mean)")
            if ax in axes[-1] or i + cols >= len(groups):
                ax.set_xlabel("training step")
            if ax is axes[ax.get_subplotspec().rowspan.start, 0]:
                ax.set_ylabel("Hessian eigenvalue")
        if edge is not None:
            # The edge of stability of full-batch (heavy-ball) gradient descent; in words when
            # it lies far above the data.
            for ax in axes.ravel()[: len(groups)]:
                if edge <= 1.5 * highest:
                    ax.axhline(edge, color="0.3", linestyle="--", linewidth=0.8, label=edge_label)
                else:
                    text = ax.text(
                        0.98,
                        0.97,
                        f"{edge_label} = {edge:.3g} (above)",
                        transform=ax.transAxes,
                        ha="right",
                        va="top",
                        fontsize=6,
                        color="0.3",
                    )
                    text.set_gid("edge_of_stability")
        axes[0, 0].legend(loc="center right", frameon=False)
    return fig


def _frobenius_share(r):
    return r.frobenius.relative_residual if r.frobenius else None


def trace_figure(run):
    plt = _pyplot()
    groups = _groups(run)
    has_gn = _has(groups, lambda r: r.gauss_newton)
    has_share = _has(groups, _frobenius_share)
    with plt.rc_context(PAPER_RC):
        fig, axes = plt.subplots(
            1, 2 if has_share else 1, figsize=(WIDTH, 2.6), layout="constrained", squeeze=False
        )
        ax = axes[0, 0]
        for i, (group, members) in enumerate(groups):
            style = plotting.series_style(i)
            steps, tr_h, _ = series(members, lambda r: r.trace.value if r.trace else None)
            (line,) = plotting.plot_trajectories(
                ax, steps, tr_h, label=f"{group}: tr H", style=style
            )
            line.set_gid(f"trace/{group}/H")
            if has_gn:
                steps, tr_g, _ = series(
                    members, lambda r: r.gauss_newton.trace.value if r.gauss_newton else None
                )
                thin = {**style, "markerfacecolor": "none", "linewidth": 0.7}
                (line,) = plotting.plot_trajectories(ax, steps, tr_g, style=thin)
                line.set_gid(f"trace/{group}/G")
        ax.set_xlabel("training step")
        ax.set_ylabel("trace (Hutch++)")
        if has_gn:
            ax.set_title("thick, filled markers: tr H; thin, hollow: tr G (Gauss-Newton)")
        ax.legend(frameon=False)
        if has_share:
            ax = axes[0, 1]
            for i, (group, members) in enumerate(groups):
                steps, share, _ = series(members, _frobenius_share)
                (line,) = plotting.plot_trajectories(
                    ax, steps, share, label=group, style=plotting.series_style(i)
                )
                line.set_gid(f"residual/{group}")
            ax.set_xlabel("training step")
            ax.set_ylabel("residual share ‖H − G‖F / ‖H‖F")
            ax.set_ylim(bottom=0)
            ax.legend(frameon=False)
    return fig


def training_figure(run):
    plt = _pyplot()
    groups = _groups(run)
    with plt.rc_context(PAPER_RC):
        fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 2.6), layout="constrained")
        for key, ax, ylabel in (
            ("train_loss", axes[0], "training loss (measurement set)"),
            ("test_accuracy", axes[1], "test accuracy"),
        ):
            for i, (group, members) in enumerate(groups):
                style = plotting.series_style(i)
                steps, mean, per_seed = series(members, lambda r, k=key: getattr(r, k))
                for s, v in per_seed:
                    ax.plot(
                        s,
                        v,
                        color=style["color"],
                        linestyle=style["linestyle"],
                        linewidth=0.5,
                        alpha=0.5,
                    )
                (line,) = plotting.plot_trajectories(ax, steps, mean, label=group, style=style)
                line.set_gid(f"{key}/{group}")
            ax.set_xlabel("training step")
            ax.set_ylabel(ylabel)
        axes[0].set_yscale("log")
        axes[1].legend(frameon=False, loc="lower right", fontsize=6)
    return fig


def sharpness_ratio_panel(ax, curves) -> None:
    """λmax / edge against step for ``(label, members)`` curves, with the line at 1; unconverged
    values drawn hollow."""
    for i, (label, members) in enumerate(curves):
        style = plotting.series_style(i)
        steps, ratio, _ = series(members, lambda r: r.sharpness_ratio)
        (line,) = plotting.plot_trajectories(ax, steps, ratio, label=label, style=style)
        line.set_gid(f"ratio/{label}")
        bad = [
            (r.step, r.sharpness_ratio)
            for m in members
            for r in m.records
            if r.sharpness is not None
            and r.sharpness_ratio is not None
            and not r.sharpness.converged[0]
        ]
        if bad:
            ax.plot(
                *zip(*bad, strict=True),
                linestyle="none",
                marker="x",
                color=style["color"],
                markersize=3,
            )
    ax.axhline(1.0, color="0.2", linestyle="--", linewidth=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("λmax / edge  (= η·λmax/2 for GD)")
    ax.legend(frameon=False, fontsize=6)


def sharpness_figure(run):
    """λmax / edge of stability against step, the line at 1 (Cohen et al. 2021): sharpness rises
    (progressive sharpening), then hovers at 2/η. A panel per activation when a run sweeps more
    than one, its groups (swept values) as curves."""
    plt = _pyplot()
    groups = _groups(run)
    activations = list(dict.fromkeys(ms[0].activation for _, ms in groups))
    with plt.rc_context(PAPER_RC):
        fig, axes = plt.subplots(
            1,
            len(activations),
            figsize=(WIDTH, 2.8),
            sharey=True,
            layout="constrained",
            squeeze=False,
        )
        for ax, activation in zip(axes[0], activations, strict=True):
            curves = [(g, ms) for g, ms in groups if ms[0].activation == activation]
            sharpness_ratio_panel(ax, curves)
            if len(activations) > 1:
                ax.set_title(activation)
            if ax is not axes[0, 0]:
                ax.set_ylabel("")
        fig.suptitle("sharpness over the edge of stability; ×: Lanczos not converged", fontsize=8)
    return fig


FIGURES = {
    "eigenvalues": (eigenvalue_figure, lambda r: _top(r)),
    "trace": (trace_figure, lambda r: r.trace),
    "training": (training_figure, lambda r: True),
    "edge_of_stability": (sharpness_figure, lambda r: r.sharpness_ratio),
    "spectrum": (
        spectrum_figure,
        lambda r: r.top_eigenvalues is not None and len(r.top_eigenvalues.values) >= 10,
    ),
    "blocks": (blocks_figure, lambda r: r.blocks),
    "activation_parameter": (parameter_figure, lambda r: r.sharpness or r.trace or r.frobenius),
}


def _save(fig, folder: pathlib.Path, name: str) -> list[pathlib.Path]:
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = folder / f"{name}.{ext}"
        buffer = io.BytesIO()
        fig.savefig(buffer, format=ext)
        storage.atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    plt.close(fig)
    return paths


def draw_all(workdir, *, sigma: float | None = None) -> list[pathlib.Path]:
    """Every figure and the report of ``workdir``; returns the written paths."""
    workdir = pathlib.Path(workdir).expanduser()
    run = load_run(workdir)
    groups = _groups(run)
    if not groups:
        return []
    folder = workdir / "figures"
    paths = []
    drawn = []
    fig, drawn_sigma = density_figure(run, sigma=sigma)
    if fig is not None:
        paths += _save(fig, folder, "density")
        sigma = drawn_sigma
        drawn.append("density")
    for name, (make, when) in FIGURES.items():
        if _has(groups, when):
            fig = make(run)
            if fig is None:
                continue
            paths += _save(fig, folder, name)
            drawn.append(name)
    from experiments import pages

    paths += pages.write_report(workdir, run, sigma, drawn)
    return paths


# The optimizer comparison and the preconditioner study add their figures on import.
from experiments import figures_optim as _figures_optim  # noqa: E402, F401
from experiments import figures_preconditioner as _figures_preconditioner  # noqa: E402, F401

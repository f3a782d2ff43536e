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

each drawn when the records hold its quantities, and, through :mod:`experiments.pages`, ``report.md`` / ``report.html``.
"""

from __future__ import annotations

import io
import pathlib

import numpy as np

import curvature as cv
from curvature import plotting
from experiments import report, storage
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


# --------------------------------------------------------------------------------------------
# Figures.


def density_figure(run, *, sigma: float | None = None, floor: float = 1e-5):
    plt = _pyplot()
    groups = _groups(run)
    finals = {a: max(report.common_steps(ms) or [0]) for a, ms in groups}
    panels = [("initialisation (step 0)", {a: pooled_density(ms, 0) for a, ms in groups})]
    panels.append(("last step", {a: pooled_density(ms, finals[a]) for a, ms in groups}))
    everything = [d for _, ds in panels for d in ds.values() if d is not None]
    if not everything:
        return None, None
    sigma = sigma or default_sigma(everything)
    grid = plotting.density_grid(everything, sigma=sigma)
    with plt.rc_context(PAPER_RC):
        fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 2.8), sharey=True, layout="constrained")
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


def _num_classes(run) -> int | None:
    """C, from a member's model: the width of its read-out in a kept checkpoint (no data
    needed); ``None`` when no checkpoint tells."""
    for _, members in _groups(run):
        for member in members:
            for step in member.checkpoint_steps()[-1:]:
                path = member.dir / "checkpoints" / f"step_{step:06d}.npz"
                arrays = storage.read_npz(path, "checkpoint", ("params/readout/bias/value",))
                if arrays:
                    return int(next(iter(arrays.values())).shape[0])
    return None


def spectrum_figure(run):
    """The top eigenvalues of H (filled) and G (hollow) against their index, at initialisation
    and at the last step, a panel per group, log axis: outliers stand apart from the bulk. The
    dotted lines mark C − 1 and C (the read-out's width)."""
    plt = _pyplot()
    groups = [
        (g, ms)
        for g, ms in _groups(run)
        if _has([(g, ms)], lambda r: r.top_eigenvalues is not None)
    ]
    classes = None
    with plt.rc_context(PAPER_RC):
        fig, axes, _ = _panels(plt, len(groups), 2.3, sharex=False)
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


def _label_bars(ax, bars, values, errors) -> None:
    """The value at the end of each horizontal bar: two digits, the order of a tiny one, or
    "≈0" for one within two standard errors of zero (round-off, e.g. ReLU's same-layer R)."""
    for bar, v, e in zip(bars, values, errors, strict=True):
        if not np.isfinite(v):
            continue
        if np.isfinite(e) and abs(v) <= 2 * e:
            text = "≈0"
        else:
            text = f"{v:.2f}" if abs(v) >= 5e-3 else f"{v:.0e}"
        x = v + (e if np.isfinite(e) else 0.0) + 0.015
        ax.text(x, bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=5.5)


def _share_bars(ax, rows, labels, values_of, *, gid: str) -> None:
    """Grouped horizontal bars, one group of ``len(labels)`` bars per row (a sweep group):
    ``values_of(row, j) -> [Estimate per seed]``; mean over seeds, error bar ± the standard error
    of that mean from the estimators' own SEs, seeds as dots."""
    count = len(labels)
    height = 0.8 / count
    hatches = ("", "////", "....", "xxx")
    for j, label in enumerate(labels):
        means, errors, positions = [], [], []
        for i, row in enumerate(rows):
            found = [e for e in values_of(row, j) if e is not None]
            c = report.cell(found)
            y = i - 0.4 + height * (j + 0.5)
            positions.append(y)
            means.append(c.mean if c else np.nan)
            errors.append(c.standard_error if c and c.standard_error is not None else np.nan)
            if len(found) > 1:
                ax.plot(
                    [e.value for e in found],
                    [y] * len(found),
                    linestyle="none",
                    marker="o",
                    markersize=2,
                    markerfacecolor="none",
                    color="0.15",
                )
        style = plotting.series_style(j)
        bars = ax.barh(
            positions,
            means,
            height=height * 0.9,
            xerr=np.nan_to_num(errors),
            color=style["color"] if j == 0 else "white",
            edgecolor=style["color"],
            hatch=hatches[j % len(hatches)],
            linewidth=0.6,
            error_kw={"elinewidth": 0.7, "capsize": 1.5},
            label=label,
        )
        for bar, row in zip(bars, rows, strict=True):
            bar.set_gid(f"{gid}/{label}/{row[0]}")
        _label_bars(ax, bars, means, errors)
    ax.set_yticks(range(len(rows)), [row[0] for row in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the first group on top
    ax.set_xlim(0, 1.45)  # room on the right for the labels and the legend
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])


def blocks_figure(run):
    """Where the residual R = H − G lives, from the ``blocks`` measurement: (a) the share of
    ‖R‖F² in same-layer blocks per group at initialisation and at the last step it was measured
    (the rest couples different layers); (b) at that last step the same share of ‖H‖F², ‖G‖F²
    and ‖R‖F². A piecewise-linear activation (ReLU) has no same-layer R at all: each layer's
    weights enter its network piecewise linearly, so R couples only different layers."""
    plt = _pyplot()
    rows = []
    for group, members in _groups(run):
        steps = [{r.step for r in m.records if r.blocks is not None} for m in members]
        common = sorted(set.intersection(*steps))
        if common:
            rows.append((group, members, common[0], common[-1]))
    if not rows:
        return None

    def share(row, step, operator):
        return [m.record(step).blocks.same_layer_share(operator) for m in row[1]]

    first = {row[2] for row in rows}
    last = {row[3] for row in rows}
    init = f"step {first.pop()}" if len(first) == 1 else "first step"
    final = f"step {last.pop()}" if len(last) == 1 else "the last step"
    with plt.rc_context(PAPER_RC):
        height = max(2.4, 0.32 * len(rows) + 1.0)
        fig, axes = plt.subplots(
            1, 2, figsize=(WIDTH, height), sharey=True, layout="constrained", squeeze=False
        )
        ax = axes[0, 0]
        _share_bars(
            ax,
            rows,
            (init, final),
            lambda row, j: share(row, row[2 + j], "residual"),
            gid="blocks/R",
        )
        ax.set_xlabel("same-layer share of ‖R‖F²  (R = H − G)")
        ax.set_ylabel("group")
        ax.set_title("(a) residual: same layer vs. across layers")
        ax.legend(frameon=False, loc="center right")
        ax = axes[0, 1]
        operators = (("H", "hessian"), ("G", "gauss_newton"), ("R", "residual"))
        _share_bars(
            ax,
            rows,
            tuple(f"‖{o}‖F²" for o, _ in operators),
            lambda row, j: share(row, row[3], operators[j][1]),
            gid=f"blocks/{final}",
        )
        ax.set_xlabel(f"same-layer share at {final}")
        ax.set_title("(b) Hessian, Gauss-Newton part, residual")
        ax.legend(frameon=False, loc="center right")
    return fig


# The axis label of an activation's parameter; others are called "parameter".
PARAMETER_LABELS = {"softplus": "β of softplus(βx)/β", "leaky_relu": "negative slope", "elu": "α"}

# The panels of the parameter figure: ``(title, [(report column, series label)])``.
PARAMETER_PANELS = (
    ("λmax(H)", [("λmax(H)", "λmax(H)")]),
    ("trace", [("tr H", "tr H"), ("tr G", "tr G")]),
    ("residual share ‖R‖F/‖H‖F", [("‖R‖F/‖H‖F", "‖R‖F/‖H‖F")]),
    ("same-layer share of ‖R‖F²", [("R same-layer", "R same-layer")]),
)


def parameter_series(rows) -> tuple[str, list[tuple[float, dict]], list[dict]] | None:
    """From summary rows: ``(activation, [(parameter, row)] by parameter, reference rows)`` for
    the parametrised activation with the most values (two or more) among the groups without
    swept values, and the groups whose activation takes no parameter; ``None`` when no
    activation appears with two parameter values."""
    from experiments import models

    by_base, references = {}, []
    for row in rows:
        if row["overrides"]:
            continue
        base, parameter = models.parse_activation(row["activation"])
        if parameter is None:
            references.append(row)
        else:
            by_base.setdefault(base, {})[parameter] = row
    if not by_base:
        return None
    base, found = max(by_base.items(), key=lambda item: len(item[1]))
    if len(found) < 2:
        return None
    return base, sorted(found.items()), references


def parameter_figure(run):
    """Curvature at the last step against an activation's parameter (``softplus:β`` for β = 1
    ... 50: softplus(βx)/β tends to ReLU as β grows), one panel per measure, mean ± sd over seeds
    (± the standard error for one seed), the unparametrised activations' values as horizontal
    lines with their band."""
    found = parameter_series(report.summary_rows(run))
    if found is None:
        return None
    return parameter_panels(*found)


def parameter_panels(base: str, series_rows, references):
    plt = _pyplot()
    x = np.array([p for p, _ in series_rows], float)
    panels = [
        (title, columns)
        for title, columns in PARAMETER_PANELS
        if any(row.get(c) is not None for _, row in series_rows for c, _ in columns)
    ]
    with plt.rc_context(PAPER_RC):
        cols = min(len(panels), 2)
        rows = int(np.ceil(len(panels) / cols))
        fig, axes = plt.subplots(
            rows, cols, figsize=(WIDTH, 2.2 * rows), layout="constrained", squeeze=False
        )
        for ax in axes.ravel()[len(panels) :]:
            ax.set_visible(False)
        for i, ((title, columns), ax) in enumerate(zip(panels, axes.ravel(), strict=False)):
            for j, (column, label) in enumerate(columns):
                style = plotting.series_style(j)
                cells = [row.get(column) for _, row in series_rows]
                mean = np.array([c.mean if c else np.nan for c in cells])
                err = np.array([c.spread if c and c.spread is not None else np.nan for c in cells])
                container = ax.errorbar(
                    x,
                    mean,
                    yerr=np.nan_to_num(err),
                    label=f"{base}: {label}",
                    markersize=3,
                    capsize=1.5,
                    elinewidth=0.7,
                    **({**style, "markerfacecolor": "none"} if j else style),
                )
                container.lines[0].set_gid(f"param/{title}/{label}")
                for k, row in enumerate(references):
                    ref = row.get(column)
                    if ref is None or not np.isfinite(ref.mean):
                        continue
                    dash = ("--", "-.", ":")[(j + k) % 3]
                    line = ax.axhline(
                        ref.mean,
                        color="0.3",
                        linestyle=dash,
                        linewidth=0.8,
                        label=f"{row['group']}: {label}",
                    )
                    line.set_gid(f"param/{title}/{label}/{row['group']}")
                    spread = ref.spread if ref.spread is not None else 0.0
                    if np.isfinite(spread) and spread > 0:
                        ax.axhspan(
                            ref.mean - spread, ref.mean + spread, color="0.85", zorder=0, lw=0
                        )
            ax.set_xscale("log")
            ax.set_xticks(x, [f"{v:g}" for v in x])
            ax.minorticks_off()
            ax.set_title(title)
            ax.set_ylabel(title)
            if i + cols >= len(panels):
                ax.set_xlabel(PARAMETER_LABELS.get(base, f"{base} parameter"))
            ax.legend(frameon=False, fontsize=5.5)
    return fig


# ``name: (make, drawn when)``; a maker may return None: nothing to draw for this run.
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


# The optimizer comparison (experiments.figures_optim) adds its figure on import.
from experiments import figures_optim as _figures_optim  # noqa: E402, F401
from experiments import figures_preconditioner as _figures_preconditioner  # noqa: E402, F401

"""Eigenvalues along training: the top-k and bottom-k Hessian eigenvalues against step
(``eigenvalues``), with the edge of stability, and λmax over the edge against step
(``edge_of_stability``, Cohen et al. 2021)."""

from __future__ import annotations

import numpy as np

from curvature import plotting
from experiments.figures import common


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
    plt = common.pyplot()
    groups = [(g, ms) for g, ms in common.groups(run) if common.has([(g, ms)], _top)]
    edge, edge_label = common.edge(groups)
    with plt.rc_context(common.PAPER_RC):
        fig, axes, cols = common.panels(plt, len(groups), 2.2, sharex=True)
        highest = -np.inf
        for i, ((group, members), ax) in enumerate(zip(groups, axes.ravel(), strict=False)):
            style = plotting.series_style(i)
            steps, top, per_seed = common.series(members, _top_of(members))
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
            bottom_steps, bottom, _ = common.series(members, _bottom)
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


def sharpness_ratio_panel(ax, curves) -> None:
    """λmax / edge against step for ``(label, members)`` curves, with the line at 1; unconverged
    values drawn hollow."""
    for i, (label, members) in enumerate(curves):
        style = plotting.series_style(i)
        steps, ratio, _ = common.series(members, lambda r: r.sharpness_ratio)
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
    plt = common.pyplot()
    groups = common.groups(run)
    activations = list(dict.fromkeys(ms[0].activation for _, ms in groups))
    with plt.rc_context(common.PAPER_RC):
        fig, axes = plt.subplots(
            1,
            len(activations),
            figsize=(common.WIDTH, 2.8),
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


EIGENVALUES = common.Figure(
    "eigenvalues",
    lambda run, facts: eigenvalue_figure(run),
    _top,
    "Top-k and bottom-k (hollow markers) Hessian eigenvalues (Lanczos) against "
    "training step, mean over seeds; thin lines: each seed's largest eigenvalue{edge}.",
    rank=10,
)
EDGE_OF_STABILITY = common.Figure(
    "edge_of_stability",
    lambda run, facts: sharpness_figure(run),
    lambda r: r.sharpness_ratio,
    "λmax over the edge of stability (η·λmax/2 for gradient descent) against "
    "step; dashed: 1, the edge; ×: eigenvalues whose Lanczos residual did not converge.",
    rank=40,
)

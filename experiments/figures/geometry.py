"""The geometry around the spectrum: the share of the gradient in the top-k Hessian eigenspace
along training (``gradient_overlap``) and the loss along the top eigenvectors or random
directions at the last measured step (``landscape``)."""

from __future__ import annotations

import numpy as np

from curvature import plotting
from experiments.figures import common
from experiments.figures.heterogeneity import measured, spectra_file


def gradient_overlap_figure(run):
    plt = common.pyplot()
    groups = common.groups(run)
    with plt.rc_context(common.PAPER_RC):
        fig, axes = plt.subplots(1, 2, figsize=(common.WIDTH, 2.6), layout="constrained")
        for i, (group, members) in enumerate(groups):
            style = plotting.series_style(i)
            get = lambda r: r.gradient_overlap.overlap if r.gradient_overlap else None  # noqa: E731
            steps, mean, per_seed = common.series(members, get)
            for s, v in per_seed:
                axes[0].plot(s, v, color=style["color"], linewidth=0.5, alpha=0.5)
            (line,) = plotting.plot_trajectories(axes[0], steps, mean, label=group, style=style)
            line.set_gid(f"gradient_overlap/{group}")
            last = measured(members[0], "gradient_overlap")
            if last:
                shares = np.cumsum(last[-1].gradient_overlap.shares)
                axes[1].plot(
                    np.arange(1, len(shares) + 1),
                    shares,
                    label=f"{group} (step {last[-1].step})",
                    **style,
                )
        axes[0].set_xlabel("training step")
        axes[0].set_ylabel("‖P_k g‖² / ‖g‖²")
        axes[0].set_ylim(0, 1.02)
        axes[0].legend(frameon=False, fontsize=6)
        axes[1].set_xlabel("k (top eigenvectors)")
        axes[1].set_ylabel("gradient share in the top-k eigenspace")
        axes[1].set_ylim(0, 1.02)
        axes[1].legend(frameon=False, fontsize=6)
    return fig


GRADIENT_OVERLAP = common.Figure(
    "gradient_overlap",
    lambda run, facts: gradient_overlap_figure(run),
    lambda r: r.gradient_overlap,
    "Left: the share of the gradient in the top-k Hessian eigenspace along training (Gur-Ari et "
    "al. 2018); thin lines: seeds. Right: the share for every k' <= k at the last measured step.",
    rank=80,
)


def landscape_figure(run):
    plt = common.pyplot()
    found = []
    for group, members in common.groups(run):
        records = measured(members[0], "landscape")
        if records:
            arrays = spectra_file(members[0], records[-1].step)
            if arrays is not None and "landscape_loss" in arrays:
                found.append((group, records[-1], arrays))
    if not found:
        return None
    two_d = np.asarray(found[0][2]["landscape_loss"]).ndim == 2
    with plt.rc_context(common.PAPER_RC):
        if not two_d:
            fig, ax = plt.subplots(figsize=(common.WIDTH / 2, 2.6), layout="constrained")
            lines = []
            for i, (group, record, arrays) in enumerate(found):
                grid = record.landscape.grid(arrays)
                line, _ = plotting.plot_landscape(
                    ax, grid, label=f"{group} (step {record.step})", **plotting.series_style(i)
                )
                lines.append(line)
            ax.set_xlabel(_axis(found[0][1].landscape))
            ax.legend(handles=lines, frameon=False, fontsize=6)  # the centres: the marked points
            return fig
        fig, axes, cols = common.panels(plt, len(found), 2.6, sharex=True)
        for ax, (group, record, arrays) in zip(axes.ravel(), found, strict=False):
            plotting.plot_landscape(ax, record.landscape.grid(arrays))
            ax.set_title(f"{group} (step {record.step})")
    return fig


def _axis(landscape) -> str:
    if landscape.directions == "top":
        return "s (along the top Hessian eigenvector)"
    return f"s (along a random direction, {landscape.normalize or 'unnormalised'})"


LANDSCAPE = common.Figure(
    "landscape",
    lambda run, facts: landscape_figure(run),
    lambda r: r.landscape,
    "The loss on the measurement set along the top Hessian eigenvector(s) (or random directions) "
    "at the last measured step, through the parameters (marked).",
    rank=85,
)

"""Where the curvature lives: tr H against its Gauss-Newton part tr G and the residual share
‖H − G‖F / ‖H‖F along training (``trace``), and the share of ‖R‖F² (R = H − G) in same-layer
blocks (``blocks``)."""

from __future__ import annotations

import numpy as np

from curvature import plotting
from experiments import table
from experiments.figures import common


def _frobenius_share(r):
    return r.frobenius.relative_residual if r.frobenius else None


def trace_figure(run):
    plt = common.pyplot()
    groups = common.groups(run)
    has_gn = common.has(groups, lambda r: r.gauss_newton)
    has_share = common.has(groups, _frobenius_share)
    with plt.rc_context(common.PAPER_RC):
        fig, axes = plt.subplots(
            1,
            2 if has_share else 1,
            figsize=(common.WIDTH, 2.6),
            layout="constrained",
            squeeze=False,
        )
        ax = axes[0, 0]
        for i, (group, members) in enumerate(groups):
            style = plotting.series_style(i)
            steps, tr_h, _ = common.series(members, lambda r: r.trace.value if r.trace else None)
            (line,) = plotting.plot_trajectories(
                ax, steps, tr_h, label=f"{group}: tr H", style=style
            )
            line.set_gid(f"trace/{group}/H")
            if has_gn:
                steps, tr_g, _ = common.series(
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
                steps, share, _ = common.series(members, _frobenius_share)
                (line,) = plotting.plot_trajectories(
                    ax, steps, share, label=group, style=plotting.series_style(i)
                )
                line.set_gid(f"residual/{group}")
            ax.set_xlabel("training step")
            ax.set_ylabel("residual share ‖H − G‖F / ‖H‖F")
            ax.set_ylim(bottom=0)
            ax.legend(frameon=False)
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
            c = table.cell(found)
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
    plt = common.pyplot()
    rows = []
    for group, members in common.groups(run):
        steps = [{r.step for r in m.records if r.blocks is not None} for m in members]
        shared = sorted(set.intersection(*steps))
        if shared:
            rows.append((group, members, shared[0], shared[-1]))
    if not rows:
        return None

    def share(row, step, operator):
        return [m.record(step).blocks.same_layer_share(operator) for m in row[1]]

    first = {row[2] for row in rows}
    last = {row[3] for row in rows}
    init = f"step {first.pop()}" if len(first) == 1 else "first step"
    final = f"step {last.pop()}" if len(last) == 1 else "the last step"
    with plt.rc_context(common.PAPER_RC):
        height = max(2.4, 0.32 * len(rows) + 1.0)
        fig, axes = plt.subplots(
            1, 2, figsize=(common.WIDTH, height), sharey=True, layout="constrained", squeeze=False
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


TRACES = common.Figure(
    "trace",
    lambda run, facts: trace_figure(run),
    lambda r: r.trace,
    "Hessian trace and its Gauss-Newton part (Hutch++), and the relative size of the "
    "residual R = H − G.",
    rank=20,
)
BLOCKS = common.Figure(
    "blocks",
    lambda run, facts: blocks_figure(run),
    lambda r: r.blocks,
    "Where the residual R = H − G lives (blocks measurement): (a) the share of ‖R‖F² in "
    "same-layer blocks, at initialisation and at the last step measured, the rest coupling "
    "different layers; (b) the same share of ‖H‖F², ‖G‖F² and ‖R‖F² at that step. Bars: mean "
    "over seeds; error bars: ± the standard error of that mean, from the estimators' own "
    "standard errors; dots: seeds. A piecewise-linear activation (ReLU) has no same-layer R: "
    "0 up to float round-off (e.g. 1e-09).",
    rank=60,
)

"""The structure figures of a run directory: where the curvature lives by layer (``blocks``) and
how it moves with an activation's parameter (``activation_parameter``), listed in
:data:`experiments.figures.FIGURES`. Helpers (``figures._pyplot``, ...) are read when a figure
is drawn, so the two modules may import each other.
"""

from __future__ import annotations

import numpy as np

from curvature import plotting
from experiments import figures, report


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
    plt = figures._pyplot()
    rows = []
    for group, members in figures._groups(run):
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
    with plt.rc_context(figures.PAPER_RC):
        height = max(2.4, 0.32 * len(rows) + 1.0)
        fig, axes = plt.subplots(
            1, 2, figsize=(figures.WIDTH, height), sharey=True, layout="constrained", squeeze=False
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

# The panels of the parameter figure: ``(title, [(report column, figures.series label)])``.
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
    plt = figures._pyplot()
    x = np.array([p for p, _ in series_rows], float)
    panels = [
        (title, columns)
        for title, columns in PARAMETER_PANELS
        if any(row.get(c) is not None for _, row in series_rows for c, _ in columns)
    ]
    with plt.rc_context(figures.PAPER_RC):
        cols = min(len(panels), 2)
        rows = int(np.ceil(len(panels) / cols))
        fig, axes = plt.subplots(
            rows, cols, figsize=(figures.WIDTH, 2.2 * rows), layout="constrained", squeeze=False
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

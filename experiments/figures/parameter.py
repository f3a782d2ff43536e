"""Curvature against an activation's parameter (``activation_parameter``): λmax, the traces, the
residual share and the same-layer share of ‖R‖F² at the last step against β of ``softplus:β``
(or another parametrised activation), the run's unparametrised activations (ReLU) as reference
lines. Read from the summary rows (:mod:`experiments.report`)."""

from __future__ import annotations

import numpy as np

from curvature import plotting
from experiments import models, report
from experiments.figures import common

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
    plt = common.pyplot()
    x = np.array([p for p, _ in series_rows], float)
    panels = [
        (title, columns)
        for title, columns in PARAMETER_PANELS
        if any(row.get(c) is not None for _, row in series_rows for c, _ in columns)
    ]
    with plt.rc_context(common.PAPER_RC):
        cols = min(len(panels), 2)
        rows = int(np.ceil(len(panels) / cols))
        fig, axes = plt.subplots(
            rows, cols, figsize=(common.WIDTH, 2.2 * rows), layout="constrained", squeeze=False
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


ACTIVATION_PARAMETER = common.Figure(
    "activation_parameter",
    lambda run, facts: parameter_figure(run),
    lambda r: r.sharpness or r.trace or r.frobenius,
    "Curvature at the last step against the activation's parameter, "
    "mean ± sd over seeds (one seed: ± the standard error); horizontal lines: the activations "
    "without a parameter (ReLU), with their ± sd band.",
    rank=70,
)

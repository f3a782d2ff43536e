"""Optimizers compared: the ``optimizers`` figure and the cost table of a run whose members use
two or more optimizers (``configs/optimizers.py``), from their per-step training logs
(:mod:`experiments.training_log`).

* figure ``optimizers``: per activation (a row), the training loss against steps, against
  gradient-equivalents (the cost in gradients of the training batch,
  :func:`experiments.train.gradient_equivalents`) and against wall seconds (compilation
  excluded), and λmax(H) at the measured steps against gradient-equivalents;
* :func:`cost_table`: per group, the steps, gradient-equivalents and seconds to reach each target
  training loss, the final loss, and the trace of H at the end; appended to ``summary.md``.

The figure is declared here (:data:`OPTIMIZERS`) and drawn by :mod:`experiments.pages`; the
summary (:mod:`experiments.report`) appends the cost table.
"""

from __future__ import annotations

import math

import numpy as np

from curvature import plotting
from experiments.figures import common
from experiments.table import markdown

TARGETS = (1e-2, 1e-4, 1e-6)  # training losses the cost table reports the cost of reaching
CAPTION = (
    "Training loss (full training batch) against steps, against gradient-equivalents (the cost "
    "in gradients of the training batch: 1 a step for first-order methods; Hessian-free counts "
    "its CG curvature products at 1.5 and its loss evaluations at 0.5) and against wall "
    "seconds (compilation and measurements excluded; within a stretch between measurements "
    "the time is divided in proportion to the gradient-equivalents), and the top Hessian "
    "eigenvalue at the measured steps. Same initial parameters for every optimizer."
)


def _label(member) -> str:
    t = member.config.train
    if t.optimizer == "hessian_free":
        hf = t.hessian_free
        extra = "" if t.learning_rate == 1.0 else f", η = {t.learning_rate:g}"
        return f"Hessian-free ({hf.curvature.replace('_', '-')}{extra})"
    return f"{t.optimizer} (η = {t.learning_rate:g})"


def _optimizer_groups(run) -> list[tuple[str, list]] | None:
    """The run's groups with training logs, when they hold two or more optimizers."""
    groups = [(g, ms) for g, ms in common.groups(run) if all(m.training() for m in ms)]
    if len({ms[0].config.train.optimizer for _, ms in groups}) < 2:
        return None
    return groups


def _positive(values: np.ndarray) -> np.ndarray:
    """Values for a log axis: zeros and below (a loss at float round-off) as NaN."""
    values = np.asarray(values, float)
    return np.where(values > 0, values, np.nan)


def optimizer_figure(run):
    groups = _optimizer_groups(run)
    if groups is None:
        return None
    plt = common.pyplot()
    activations = list(dict.fromkeys(ms[0].activation for _, ms in groups))
    optimizers = list(dict.fromkeys(_label(ms[0]) for _, ms in groups))
    panels = (
        ("step", "training step + 1", True),
        ("gradient_equivalents", "gradient-equivalents", False),
        ("seconds", "wall seconds (compile excluded)", False),
    )
    with plt.rc_context(common.PAPER_RC):
        fig, axes = plt.subplots(
            len(activations),
            4,
            figsize=(common.WIDTH, 1.9 * len(activations) + 0.5),
            layout="constrained",
            squeeze=False,
        )
        for row, activation in zip(axes, activations, strict=True):
            for group, members in groups:
                if members[0].activation != activation:
                    continue
                label = _label(members[0])
                style = plotting.series_style(optimizers.index(label))
                style = {"color": style["color"], "linestyle": style["linestyle"]}
                for k, member in enumerate(members):  # seeds
                    curves = member.training()
                    for ax, (x_name, _, _) in zip(row, panels, strict=False):
                        x = getattr(curves, x_name) + (1 if x_name == "step" else 0)
                        (line,) = ax.plot(
                            x, _positive(curves.loss), label=label if k == 0 else None, **style
                        )
                        line.set_gid(f"{x_name}/{group}/{member.seed}")
                    records = [r for r in member.records if r.sharpness and r.training]
                    if records:
                        (line,) = row[3].plot(
                            [r.training.gradient_equivalents for r in records],
                            [r.sharpness.values[0] for r in records],
                            marker=".",
                            markersize=3,
                            **style,
                        )
                        line.set_gid(f"lambda_max/{group}/{member.seed}")
            for ax, (_, xlabel, log_x) in zip(row, panels, strict=False):
                ax.set_yscale("log")
                if log_x:
                    ax.set_xscale("log")
                ax.set_xlabel(xlabel)
                ax.set_ylabel(f"{activation}: training loss" if ax is row[0] else "")
            row[3].set_xlabel("gradient-equivalents")
            row[3].set_ylabel("λmax(H)")
            row[3].set_yscale("log")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside upper center", ncols=len(labels), frameon=False)
    return fig


def _fmt(value, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}g}"


def cost_table(run) -> str | None:
    """Markdown: per group (seeds averaged), the steps, gradient-equivalents and seconds to the
    first training loss at or below each of :data:`TARGETS` ("not reached" otherwise), and at
    the end; ``None`` unless the run holds two or more optimizers."""
    groups = _optimizer_groups(run)
    if groups is None:
        return None
    head = ["activation", "optimizer", "steps"]
    head += [f"to loss ≤ {t:g}: steps / grad-eq. / s" for t in TARGETS]
    head += ["final loss", "grad-eq.", "train s", "compile s", "λmax(H)", "tr H"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, members in groups:
        curves = [m.training() for m in members]
        cells = [members[0].activation, _label(members[0]), str(members[0].config.train.steps)]
        for target in TARGETS:
            hits = [c.first_below(target) for c in curves]
            if any(h is None for h in hits):
                cells.append("not reached")
                continue
            steps = np.mean(hits)
            cost = np.mean([c.gradient_equivalents[h] for c, h in zip(curves, hits, strict=True)])
            secs = np.mean([c.seconds[h] for c, h in zip(curves, hits, strict=True)])
            cells.append(f"{steps:.0f} / {cost:.0f} / {secs:.3g}")
        last = [m.records[-1] for m in members]
        cells.append(_fmt(np.mean([r.train_loss for r in last])))
        trained = [r.training for r in last if r.training]
        cells.append(_fmt(np.mean([t.gradient_equivalents for t in trained]), 4))
        cells.append(_fmt(np.mean([t.seconds for t in trained])))
        cells.append(_fmt(np.mean([c.compile_seconds for c in curves])))
        top = [r.sharpness.values[0] for r in last if r.sharpness]
        cells.append(_fmt(np.mean(top)) if top else "-")
        trace = [r.trace.value for r in last if r.trace]
        cells.append(_fmt(np.mean(trace)) if trace else "-")
        lines.append("| " + " | ".join(map(markdown, cells)) + " |")
    legend = (
        "Per group, mean over seeds: the first step whose training-batch loss is at or below "
        "the target, with the gradient-equivalents and wall seconds spent to reach it; at the "
        "end, the loss on the measurement set, the total cost, the compile time of the trainer "
        "(about 0 when another member had compiled the same program), and the curvature at the "
        "last step."
    )
    return "\n".join(["## Optimizers", "", *lines, "", legend]) + "\n"


OPTIMIZERS = common.Figure(
    "optimizers",
    lambda run, facts: optimizer_figure(run),
    lambda r: r.training is not None,
    CAPTION,
    rank=80,
)

"""The ``preconditioner`` figure: how well Adam's or RMSProp's second moment ν tracks the
curvature diagonal, and what dividing by it does to the Hessian's conditioning (the
``preconditioner`` measurement, :mod:`experiments.measurements.preconditioner`; ``configs/preconditioner.py``).

* (a–c) along training, the Spearman correlation of ν (solid) and the Pearson correlation of √ν
  (dashed) with the exact diagonals of H, G and the empirical Fisher F, over all parameters;
* (d) per layer at the last step, against diag H: Spearman (bars), Pearson of √ν (dots);
* (e) the condition number λmax / mean eigenvalue of H (solid) and of P^-1/2 H P^-1/2 (dashed,
  P what the update divides by) along training;
* (f) at the last step, that condition number with P = I (H itself), the optimizer's P, and
  P from the exact diagonals: √diag F + ε and diag G + δ.

The ``preconditioner`` measurement (:mod:`experiments.measurements.preconditioner`) lists this
figure (:data:`PRECONDITIONER`, with its caption) in its declaration.
"""

from __future__ import annotations

import numpy as np

from curvature import plotting
from experiments.figures import common

CURVATURES = (("hessian", "diag H"), ("gauss_newton", "diag G"), ("fisher", "diag F"))
CONDITIONS = (("H", "P = I (H)"), ("P", "optimizer's P"), ("sqrt_fisher", "√diag F"))
CONDITIONS += (("gauss_newton", "diag G"),)
CAPTION = (
    "The optimizer's second moment ν against the exact curvature diagonals (preconditioner "
    "measurement), over the parameters, entries where the exact diagonal is exactly 0 "
    "(weights on constant pixels) excluded: (a–c) Spearman correlation of ν (solid; √ν has the "
    "same ranks) and Pearson correlation of √ν, what the update divides by (dashed), with the "
    "diagonals of H, of its Gauss-Newton part G and of the empirical Fisher F, along training; "
    "(d) per layer at the last step, against diag H: Spearman (bars), Pearson of √ν (dots); "
    "(e) the condition number λmax / mean eigenvalue (mean over the nonzero diagonal entries) "
    "of H (solid) and of P^-1/2 H P^-1/2 (dashed), P = √ν̂ + ε for Adam, √(ν + ε) for "
    "RMSProp; (f) at the last step, that condition number for P = I, the optimizer's P, and P "
    "from the exact diagonals (√diag F + ε, diag G + δ)."
)


def _label(members) -> str:
    return f"{members[0].activation}, {members[0].config.train.optimizer}"


def _condition(r, which: str):
    p = r.preconditioner
    if p is None:
        return None
    c = {"H": p.hessian, "P": p.preconditioned}.get(which) or p.references.get(which)
    return None if c is None else c.condition


def _last(members):
    """Each seed's last record with the measurement, at the last step every seed has it."""
    steps = [{r.step for r in m.records if r.preconditioner is not None} for m in members]
    shared = sorted(set.intersection(*steps))
    return [m.record(shared[-1]) for m in members] if shared else []


def preconditioner_figure(run):
    groups = [(g, ms) for g, ms in common.groups(run) if _last(ms)]
    if not groups:
        return None
    plt = common.pyplot()
    with plt.rc_context(common.PAPER_RC):
        fig, axes = plt.subplots(2, 3, figsize=(common.WIDTH, 4.6), layout="constrained")
        for ax, (name, title) in zip(axes[0], CURVATURES, strict=True):
            for i, (group, members) in enumerate(groups):
                style = plotting.series_style(i)
                for which, stat, linestyle in (
                    ("second_moment", "spearman", "-"),
                    ("sqrt_second_moment", "pearson", "--"),
                ):

                    def get(r, which=which, stat=stat, name=name):
                        p = r.preconditioner
                        return getattr(getattr(p, which)[name].overall, stat) if p else None

                    _line(ax, members, get, style, linestyle, f"corr/{name}/{which}/{group}")
            ax.set_title(f"ν against {title}")
            ax.set_xlabel("training step")
            ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.0)
        axes[0, 0].set_ylabel("correlation over parameters")
        _layers_panel(axes[1, 0], groups)
        _condition_panel(axes[1, 1], groups)
        _references_panel(axes[1, 2], groups)
        for ax, letter in zip(axes.flat, "abcdef", strict=True):
            ax.set_title(f"({letter}) {ax.get_title()}", loc="left")
            ax.set_title("")  # the centred one
        handles = [
            axes[0, 0].plot([], [], color=plotting.series_style(i)["color"], marker="o")[0]
            for i in range(len(groups))
        ]
        handles += [axes[0, 0].plot([], [], "k-")[0], axes[0, 0].plot([], [], "k--")[0]]
        labels = [_label(ms) for _, ms in groups] + ["Spearman ρ(ν)", "Pearson r(√ν)"]
        fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False)
    return fig


def _layers_panel(ax, groups) -> None:
    first = _last(groups[0][1])[0].preconditioner.second_moment["hessian"]
    layers = [*first.per_layer, "all"]
    width = 0.8 / len(groups)
    for i, (group, members) in enumerate(groups):
        style = plotting.series_style(i)
        spearman, pearson = [], []
        for layer in layers:
            found = []
            for r in _last(members):
                p = r.preconditioner
                ms, ps = p.second_moment["hessian"], p.sqrt_second_moment["hessian"]
                a, b = (
                    (ms.overall, ps.overall)
                    if layer == "all"
                    else (ms.per_layer[layer], ps.per_layer[layer])
                )
                found.append((a.spearman, b.pearson))
            spearman.append(np.mean([f[0] for f in found]))
            pearson.append(np.mean([f[1] for f in found]))
        x = np.arange(len(layers)) - 0.4 + width * (i + 0.5)
        bars = ax.bar(x, spearman, width * 0.9, color=style["color"], alpha=0.8)
        for bar, layer in zip(bars, layers, strict=True):
            bar.set_gid(f"layers/{group}/{layer}")
        ax.plot(x, pearson, linestyle="none", marker="o", markersize=2.5, color="0.1")
    ax.set_xticks(range(len(layers)), layers, fontsize=6)
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.0)
    ax.set_ylabel("correlation with diag H")
    ax.set_title("per layer, last step")


def _line(ax, members, get, style, linestyle, gid: str) -> None:
    """The seeds' mean of ``get(record)`` against step, in a group's style, tagged ``gid``."""
    steps, mean, _ = common.series(members, get)
    line = ax.plot(
        steps, mean, color=style["color"], marker=style["marker"], markersize=2.5,
        linestyle=linestyle,
    )[0]  # fmt: skip
    line.set_gid(gid)


def _condition_panel(ax, groups) -> None:
    for i, (group, members) in enumerate(groups):
        style = plotting.series_style(i)
        for which, linestyle in (("H", "-"), ("P", "--")):
            get = lambda r, w=which: _condition(r, w)  # noqa: E731
            _line(ax, members, get, style, linestyle, f"condition/{which}/{group}")
    ax.plot([], [], "k-", label="H")
    ax.plot([], [], "k--", label="P⁻½HP⁻½")
    ax.legend(frameon=False, fontsize=5.5)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib_ticker().LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib_ticker().ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib_ticker().NullFormatter())
    ax.set_xlabel("training step")
    ax.set_ylabel("λmax / mean eigenvalue")
    ax.set_title("condition along training")


def matplotlib_ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def _references_panel(ax, groups) -> None:
    hatches = ("", "////", "....", "xxx")
    width = 0.8 / len(CONDITIONS)
    for j, (which, label) in enumerate(CONDITIONS):
        values = []
        for _, members in groups:
            found = [_condition(r, which) for r in _last(members)]
            found = [v for v in found if v is not None]
            values.append(np.mean(found) if found else np.nan)
        x = np.arange(len(groups)) - 0.4 + width * (j + 0.5)
        ax.bar(
            x,
            values,
            width * 0.9,
            color="0.35" if j == 0 else "white",
            edgecolor="0.2",
            hatch=hatches[j],
            linewidth=0.6,
            label=label,
        )
    ax.set_xticks(
        range(len(groups)), [_label(ms).replace(", ", "\n") for _, ms in groups], fontsize=6
    )
    ax.set_ylabel("λmax / mean eigenvalue")
    ax.set_title("preconditioners, last step")
    ax.legend(frameon=False, fontsize=5.5)


PRECONDITIONER = common.Figure(
    "preconditioner",
    lambda run, facts: preconditioner_figure(run),
    lambda r: r.preconditioner,
    CAPTION,
    rank=90,
)

"""The ``approximations`` figure: how close K-FAC and the other curvature approximations come to
the Hessian H and to its Gauss-Newton part G along training, per activation (the
``approximations`` measurement, :mod:`experiments.measurements.approximations`;
``configs/approximations.py``).

* one row per group (activation and swept values), four panels each: the overlap of the
  approximation's top-k eigenspace with H's and with G's, and the relative Frobenius error
  ‖A − Â‖F / ‖A‖F (error bars: ± its standard error) against H and against G, against step,
  one colour and line style per approximation;
* a last panel at the last step: K-FAC's relative error against H and against G per group, next
  to what no block-diagonal approximation of G sees of H: H's blocks between layers
  ‖H_cross‖F / ‖H‖F, the residual R = H − G, ‖R‖F / ‖H‖F, and its same-layer blocks
  ‖R_same‖F / ‖H‖F (from the ``blocks`` measurement, where the run has it). H − K splits into
  H_cross and a same-layer part, (G_same − K) + R_same, orthogonal to it: ‖H − K‖F² =
  ‖H_cross‖F² + ‖G_same − K + R_same‖F².
"""

from __future__ import annotations

import math

import numpy as np

from curvature import plotting
from experiments import table
from experiments.figures import common
from experiments.record import Estimate

NAMES = {
    "kfac": "K-FAC",
    "kfac_mc": "K-FAC (MC)",
    "ekfac": "EK-FAC",
    "empirical_fisher": "empirical Fisher",
    "diagonal_ggn": "diag G",
    "second_moment": "B·ν (optimizer)",
}
PANELS = (
    ("hessian", "overlap", "top-k overlap with H"),
    ("gauss_newton", "overlap", "top-k overlap with G"),
    ("hessian", "relative_error", "‖H − Â‖F / ‖H‖F"),
    ("gauss_newton", "relative_error", "‖G − Â‖F / ‖G‖F"),
)
CAPTION = (
    "Curvature approximations against the Hessian H and its Gauss-Newton part G along training "
    "(approximations measurement), one row per group: the overlap of the approximation's top-k "
    "eigenspace with H's and with G's (mean squared cosine of the principal angles: 1 the same "
    "subspace, k/n at random) and the relative Frobenius error ‖A − Â‖F / ‖A‖F (error bars: ± "
    "its standard error from shared Rademacher probes; mean over seeds). Last panel, at the "
    "last step: K-FAC's relative error against H and against G, and what no block-diagonal "
    "approximation of G sees of H: H's blocks between layers, the residual R = H − G and R's "
    "same-layer blocks, each relative to ‖H‖F (blocks measurement, where measured); "
    "‖H − K‖F² = ‖H_cross‖F² + ‖G_same − K + R_same‖F²."
)


def _approximation(r, name: str):
    a = r.approximations
    return None if a is None else a.approximations.get(name)


def _names(groups) -> list[str]:
    """The approximations any record holds, in the measurement's order."""
    found = []
    for _, members in groups:
        for m in members:
            for r in m.records:
                if r.approximations is not None:
                    found += [n for n in r.approximations.approximations if n not in found]
    return found


def _series(members, get):
    """``(steps, mean over seeds, standard error of the mean)`` of ``get(record)`` (an
    :class:`Estimate` or a number), at the steps where every seed has it."""
    by_step = [{r.step: get(r) for r in m.records if get(r) is not None} for m in members]
    steps = sorted(set.intersection(*(set(v) for v in by_step))) if by_step else []
    mean, error = [], []
    for step in steps:
        c = table.cell([v[step] for v in by_step])
        mean.append(c.mean)
        error.append(c.standard_error if c.standard_error is not None else np.nan)
    return np.array(steps), np.array(mean, float), np.array(error, float)


def _last(members, get):
    """Each seed's ``get(record)`` at the last step every seed has it (empty: none)."""
    steps = [{r.step for r in m.records if get(r) is not None} for m in members]
    shared = sorted(set.intersection(*steps)) if steps else []
    return [get(m.record(shared[-1])) for m in members] if shared else []


def block_share(r, operator: str, part: str) -> Estimate | None:
    """‖A_part‖F / ‖H‖F from the ``blocks`` measurement (one set of probes for every table):
    ``operator`` ``"hessian"`` or ``"residual"`` (R = H − G), ``part`` ``"all"`` of its
    blocks, the ``"same"``-layer ones or the ``"cross"``-layer ones; with a delta-method error
    bar (the tables' errors taken as independent: conservative). ``None`` without ``blocks``."""
    b = r.blocks
    if b is None:
        return None
    table, errors = np.asarray(b.frobenius_sq[operator]), np.asarray(b.frobenius_sq_se[operator])
    keep = {"all": np.ones(table.shape, bool), "same": np.eye(len(table), dtype=bool)}
    keep["cross"] = ~keep["same"]
    chosen = keep[part]
    value, value_se = float(table[chosen].sum()), float(np.sqrt(np.sum(errors[chosen] ** 2)))
    total = float(np.sum(b.frobenius_sq["hessian"]))
    total_se = float(np.sqrt(np.sum(np.asarray(b.frobenius_sq_se["hessian"]) ** 2)))
    if not total > 0:
        return None
    ratio = math.sqrt(max(value, 0.0) / total)
    if value > 0:
        error = 0.5 * ratio * math.hypot(value_se / value, total_se / total)
    else:
        error = math.sqrt(value_se / total)
    return Estimate(ratio, error)


def approximations_figure(run):
    groups = [
        (g, ms)
        for g, ms in common.groups(run)
        if any(r.approximations is not None for m in ms for r in m.records)
    ]
    if not groups:
        return None
    names = _names(groups)
    plt = common.pyplot()
    with plt.rc_context(common.PAPER_RC):
        rows = len(groups)
        fig = plt.figure(figsize=(common.WIDTH, 1.55 * rows + 2.4), layout="constrained")
        grid = fig.add_gridspec(rows + 1, len(PANELS), height_ratios=[1.0] * rows + [1.35])
        axes = np.array(
            [[fig.add_subplot(grid[i, j]) for j in range(len(PANELS))] for i in range(rows)]
        )
        for i, (group, members) in enumerate(groups):
            for j, (reference, field, title) in enumerate(PANELS):
                ax = axes[i, j]
                for n, name in enumerate(names):
                    style = plotting.series_style(n)

                    def get(r, name=name, reference=reference, field=field):
                        found = _approximation(r, name)
                        return None if found is None else getattr(getattr(found, reference), field)

                    steps, mean, error = _series(members, get)
                    if not len(steps):
                        continue
                    line = ax.errorbar(
                        steps,
                        mean,
                        yerr=None if field == "overlap" else np.nan_to_num(error),
                        color=style["color"],
                        linestyle=style["linestyle"],
                        marker=style["marker"],
                        markersize=2.5,
                        linewidth=1.0,
                        elinewidth=0.6,
                        capsize=1.5,
                    )
                    line.lines[0].set_gid(f"{field}/{reference}/{name}/{group}")
                ax.set_ylim(0.0, 1.05 if field == "overlap" else max(1.05, ax.get_ylim()[1]))
                if i == 0:
                    ax.set_title(title)
                if i == rows - 1:
                    ax.set_xlabel("training step")
                if j == 0:
                    ax.set_ylabel(group)
        handles = [
            axes[0, 0].plot([], [], **plotting.series_style(n), markersize=3)[0]
            for n in range(len(names))
        ]
        fig.legend(
            handles,
            [NAMES.get(n, n) for n in names],
            loc="outside upper center",
            ncol=min(len(names), 6),
            frameon=False,
        )
        _answer(fig.add_subplot(grid[rows, :]), groups)
    return fig


def _answer(ax, groups) -> None:
    """At the last step, per group: K-FAC's relative error against H and G, ‖R‖F/‖H‖F and
    ‖R_same‖F/‖H‖F (bars: mean over seeds; error bars: ± the standard error of that mean)."""

    def kfac(reference):
        def get(r):
            found = _approximation(r, "kfac")
            return None if found is None else getattr(found, reference).relative_error

        return get

    bars = [
        ("‖H − K‖F/‖H‖F (K-FAC vs H)", kfac("hessian")),
        ("‖G − K‖F/‖G‖F (K-FAC vs G)", kfac("gauss_newton")),
        ("‖H_cross‖F/‖H‖F (between layers)", lambda r: block_share(r, "hessian", "cross")),
        ("‖R‖F/‖H‖F", lambda r: block_share(r, "residual", "all")),
        ("‖R_same‖F/‖H‖F (R within layers)", lambda r: block_share(r, "residual", "same")),
    ]
    bars = [(label, get) for label, get in bars if common.has(groups, get)]
    width = 0.8 / max(len(bars), 1)
    hatches = ("", "////", "....", "xxx", "\\\\\\\\")
    for j, (label, get) in enumerate(bars):
        means, errors = [], []
        for _, members in groups:
            c = table.cell(_last(members, get))
            means.append(c.mean if c else np.nan)
            errors.append(c.standard_error if c and c.standard_error is not None else np.nan)
        x = np.arange(len(groups)) - 0.4 + width * (j + 0.5)
        drawn = ax.bar(
            x,
            means,
            width * 0.9,
            yerr=np.nan_to_num(errors),
            color="0.3" if j == 0 else "white",
            edgecolor="0.2",
            hatch=hatches[j % len(hatches)],
            linewidth=0.6,
            error_kw={"elinewidth": 0.7, "capsize": 1.5},
            label=label,
        )
        for bar, (group, _) in zip(drawn, groups, strict=True):
            bar.set_gid(f"answer/{label}/{group}")
    ax.set_xticks(range(len(groups)), [g for g, _ in groups])
    ax.set_ylabel("relative Frobenius norm")
    ax.set_ylim(0.0, 1.45)  # room above the bars for the legend
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_title(
        "last step: K-FAC's error, and what no block-diagonal approximation of G sees of H",
        loc="left",
    )
    ax.legend(frameon=False, fontsize=6, ncol=3, loc="upper center")


APPROXIMATIONS = common.Figure(
    "approximations",
    lambda run, facts: approximations_figure(run),
    lambda r: r.approximations,
    CAPTION,
    rank=95,
)

"""Figures and the report of a run directory, drawn from what is on disk (never re-measured).

``draw_all(workdir)`` writes, under ``workdir/figures/``, PNG and PDF files:

* ``density``: SLQ spectral density at initialisation and at the last step, every activation on
  one shared grid and one kernel width (a Gaussian whose standard deviation is in the caption),
  signed eigenvalue axis, log density with a floor, Ritz nodes as a rug;
* ``eigenvalues``: top-k and bottom-k Hessian eigenvalues against step, a panel per activation,
  with the 2/η edge-of-stability line for plain gradient descent;
* ``trace``: tr H and tr G against step, and the residual share ‖H − G‖F / ‖H‖F;
* ``training``: training loss and test accuracy, seeds as thin lines around their mean;

and ``report.md`` / ``report.html`` with the figures and the per-activation table.
``compare(workdirs, out)`` overlays several run directories.
"""

from __future__ import annotations

import html
import io
import pathlib

import numpy as np

import curvature as cv
from curvature import plotting
from experiments import report, storage

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


def _groups(run) -> list[tuple[str, list[dict]]]:
    return [(a, ms) for a, ms in report.by_activation(run).items() if ms]


def series(members, get) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """``(steps, mean over seeds, per-seed (steps, values))`` of ``get(record)``."""
    by_step = [{r["step"]: get(r) for r in m["records"]} for m in members]
    per_seed = [(np.array(list(v)), np.array(list(v.values()), float)) for v in by_step]
    common = report.common_steps(members)
    mean = np.array([np.mean([v[s] for v in by_step], axis=0) for s in common], float)
    return np.array(common), mean, per_seed


def density_at(member, step) -> cv.SpectralDensity | None:
    path = member["dir"] / "spectra" / f"step_{step:06d}.npz"
    if not path.exists():
        return None
    with np.load(path) as f:
        return cv.SpectralDensity(f["slq_nodes"], f["slq_weights"], f["dimension"])


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


def _edge(config) -> tuple[float | None, str]:
    """The edge of stability to draw: full-batch gradient descent (2/η) or heavy-ball momentum
    ((2 + 2β)/η); none for minibatches or Adam, where no such line holds."""
    train = config["train"]
    if train["batch_size"] != 0:
        return None, ""
    if train["optimizer"] == "sgd":
        return 2.0 / train["learning_rate"], "2/η"
    if train["optimizer"] == "momentum":
        return (2.0 + 2.0 * train["momentum"]) / train["learning_rate"], "(2+2β)/η"
    return None, ""


def eigenvalue_figure(run):
    plt = _pyplot()
    groups = _groups(run)
    config = run["config"]
    edge, edge_label = _edge(config)
    top_k, bottom_k = config["measure"]["top_k"], config["measure"]["bottom_k"]
    with plt.rc_context(PAPER_RC):
        cols = min(len(groups), 3)
        rows = int(np.ceil(len(groups) / cols))
        fig, axes = plt.subplots(
            rows,
            cols,
            figsize=(WIDTH, 2.2 * rows),
            sharex=True,
            sharey=True,
            layout="constrained",
            squeeze=False,
        )
        for ax in axes.ravel()[len(groups) :]:
            ax.set_visible(False)
        highest = -np.inf
        for i, ((activation, members), ax) in enumerate(zip(groups, axes.ravel(), strict=False)):
            style = plotting.series_style(i)
            steps, top, per_seed = series(members, lambda r: r["hessian"]["top"])
            highest = max(highest, float(np.max(top)))
            lines = plotting.plot_trajectories(ax, steps, top, label=f"top {top_k}", style=style)
            for j, line in enumerate(lines):
                line.set_gid(f"eig/{activation}/top{j}")
                line.set_linewidth(1.4 if j == 0 else 0.7)
            if len(members) > 1:  # each seed's largest eigenvalue, also past the common steps
                for seed_steps, values in per_seed:
                    ax.plot(
                        seed_steps, values[:, 0], color=style["color"], linewidth=0.4, alpha=0.5
                    )
            if "bottom" in members[0]["records"][0]["hessian"]:
                _, bottom, _ = series(members, lambda r: r["hessian"]["bottom"])
                hollow = {**style, "markerfacecolor": "none"}
                label = f"bottom {bottom_k} (hollow)"
                lines = plotting.plot_trajectories(ax, steps, bottom, label=label, style=hollow)
                for j, line in enumerate(lines):
                    line.set_gid(f"eig/{activation}/bottom{j}")
                    line.set_linewidth(0.7)
            ax.axhline(0.0, color="0.7", linewidth=0.5, zorder=0)
            ax.set_title(
                f"{activation} ({len(members)} seed{'s' if len(members) > 1 else ''}, mean)"
            )
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


def trace_figure(run):
    plt = _pyplot()
    groups = _groups(run)
    has_gn = all("gauss_newton" in ms[0]["records"][0] for _, ms in groups)
    with plt.rc_context(PAPER_RC):
        fig, axes = plt.subplots(
            1, 2 if has_gn else 1, figsize=(WIDTH, 2.6), layout="constrained", squeeze=False
        )
        ax = axes[0, 0]
        for i, (activation, members) in enumerate(groups):
            style = plotting.series_style(i)
            steps, tr_h, _ = series(members, lambda r: r["hessian"]["trace"])
            (line,) = plotting.plot_trajectories(
                ax, steps, tr_h, label=f"{activation}: tr H", style=style
            )
            line.set_gid(f"trace/{activation}/H")
            if has_gn:
                _, tr_g, _ = series(members, lambda r: r["gauss_newton"]["trace"])
                thin = {**style, "markerfacecolor": "none", "linewidth": 0.7}
                (line,) = plotting.plot_trajectories(ax, steps, tr_g, style=thin)
                line.set_gid(f"trace/{activation}/G")
        ax.set_xlabel("training step")
        ax.set_ylabel("trace (Hutch++)")
        if has_gn:
            ax.set_title("thick, filled markers: tr H; thin, hollow: tr G (Gauss-Newton)")
        ax.legend(frameon=False)
        if has_gn:
            ax = axes[0, 1]
            for i, (activation, members) in enumerate(groups):
                steps, share, _ = series(members, lambda r: r["residual"]["relative_frobenius"])
                (line,) = plotting.plot_trajectories(
                    ax, steps, share, label=activation, style=plotting.series_style(i)
                )
                line.set_gid(f"residual/{activation}")
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
            for i, (activation, members) in enumerate(groups):
                style = plotting.series_style(i)
                steps, mean, per_seed = series(members, lambda r, k=key: r[k])
                for s, v in per_seed:
                    ax.plot(
                        s,
                        v,
                        color=style["color"],
                        linestyle=style["linestyle"],
                        linewidth=0.5,
                        alpha=0.5,
                    )
                (line,) = plotting.plot_trajectories(ax, steps, mean, label=activation, style=style)
                line.set_gid(f"{key}/{activation}")
            ax.set_xlabel("training step")
            ax.set_ylabel(ylabel)
        axes[0].set_yscale("log")
        axes[1].legend(frameon=False, loc="lower right")
    return fig


FIGURES = {
    "eigenvalues": eigenvalue_figure,
    "trace": trace_figure,
    "training": training_figure,
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
    workdir = pathlib.Path(workdir)
    run = report.load_run(workdir)
    if not any(m["records"] for m in run["members"].values()):
        return []
    folder = workdir / "figures"
    paths = []
    fig, drawn_sigma = density_figure(run, sigma=sigma)
    if fig is not None:
        paths += _save(fig, folder, "density")
        sigma = drawn_sigma
    for name, make in FIGURES.items():
        paths += _save(make(run), folder, name)
    paths += write_report(workdir, run, sigma)
    return paths


# --------------------------------------------------------------------------------------------
# The report.

REPORT_COLUMNS = [
    "loss",
    "test acc.",
    "λmax(H)",
    "tr H",
    "neg. mass",
    "‖R‖F/‖H‖F",
    "tr R",
    "η·λmax",
]


def write_report(workdir, run, sigma) -> list[pathlib.Path]:
    workdir = pathlib.Path(workdir)
    rows = report.summary_rows(run)
    config = run["config"]
    prov = (storage.read_json(workdir / "provenance.json", {}) or {}).get("invocations", [{}])[-1]
    figures = [
        (
            "density",
            f"Hessian spectral density at initialisation and at the last step; Gaussian kernel of standard deviation σ = {sigma or 0:.3g} on one grid for all activations; ticks: Ritz nodes.",
        ),
        (
            "eigenvalues",
            "Top-k and bottom-k (hollow markers) Hessian eigenvalues (Lanczos) against training step, "
            "mean over seeds; thin lines: each seed's largest eigenvalue"
            + (
                f"; dashed line or note: the edge of stability {_edge(config)[1]}."
                if _edge(config)[0]
                else "."
            ),
        ),
        (
            "trace",
            "Hessian trace and its Gauss-Newton part (Hutch++), and the relative size of the residual R = H − G.",
        ),
        ("training", "Training loss and test accuracy; thin lines: seeds, thick: mean."),
    ]
    title = f"curvature report: {workdir.name}"
    model = config["model"]
    arch = (
        f"width {model['width']}, depth {model['depth']}"
        if model["kind"] == "mlp"
        else f"channels {model['channels']}"
    )
    batch = config["train"]["batch_size"] or "full"
    setup = (
        f"{model['kind'].upper()} ({arch}) on {config['data']['source']}, "
        f"{config['train']['optimizer']} η = {config['train']['learning_rate']} (batch {batch}), "
        f"curvature on {config['measure']['num_examples'] or 'all'} {config['measure']['split']} examples, "
        f"{config['train']['steps']} steps, loss {config['train']['loss']}, seeds {config['seeds']}, dtype {config['dtype']}, "
        f"matmul precision {prov.get('matmul_precision', '?')}, jax {prov.get('packages', {}).get('jax', '?')}, "
        f"git {str((prov.get('git') or {}).get('revision'))[:10]}."
    )
    titles = ["activation", "seeds", "failed", "final step"] + REPORT_COLUMNS
    md = [f"# {title}", "", setup, "", "| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for row in rows:
        md.append("| " + " | ".join(report._fmt(row.get(t)) for t in titles) + " |")
    md += [
        "",
        "Mean ± standard deviation over seeds at the last step every seed reached (curvature and loss on the measurement set). neg. mass: SLQ spectral mass below −√eps·max|node| (negative eigenvalues; the exact zeros are not counted).",
        "",
    ]
    for name, caption in figures:
        if (workdir / "figures" / f"{name}.png").exists():
            md += [f"![{name}](figures/{name}.png)", "", f"*{caption}*", ""]
    md_path = workdir / "report.md"
    storage.atomic_write_bytes(md_path, "\n".join(md).encode())

    h = [
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #999;padding:2px 6px;text-align:right}img{max-width:100%}</style>",
        f"<h1>{html.escape(title)}</h1><p>{html.escape(setup)}</p><table><tr>"
        + "".join(f"<th>{html.escape(t)}</th>" for t in titles)
        + "</tr>",
    ]
    for row in rows:
        h.append(
            "<tr>"
            + "".join(f"<td>{html.escape(report._fmt(row.get(t)))}</td>" for t in titles)
            + "</tr>"
        )
    h.append("</table>")
    for name, caption in figures:
        if (workdir / "figures" / f"{name}.png").exists():
            h.append(
                f"<figure><img src='figures/{name}.png' alt='{name}'><figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    html_path = workdir / "report.html"
    storage.atomic_write_bytes(html_path, "\n".join(h).encode())
    return [md_path, html_path]


def compare(workdirs, out, *, sigma: float | None = None) -> list[pathlib.Path]:
    """Overlay several run directories: last-step densities and top eigenvalue trajectories."""
    plt = _pyplot()
    out = pathlib.Path(out)
    runs = [report.load_run(w) for w in workdirs]
    curves = []
    for run in runs:
        for activation, members in _groups(run):
            step = max(report.common_steps(members) or [0])
            curves.append(
                (f"{run['workdir'].name}: {activation}", members, pooled_density(members, step))
            )
    densities = [d for _, _, d in curves if d is not None]
    if not densities:
        raise ValueError("none of the run directories holds a measurement yet")
    sigma = sigma or default_sigma(densities)
    grid = plotting.density_grid(densities, sigma=sigma)
    with plt.rc_context(PAPER_RC):
        fig, axes = plt.subplots(1, 2, figsize=(WIDTH, 2.8), layout="constrained")
        for i, (label, members, d) in enumerate(curves):
            style = plotting.series_style(i)
            if d is not None:
                plotting.plot_density(axes[0], d, sigma=sigma, grid=grid, label=label, **style)
            steps, top, _ = series(members, lambda r: r["hessian"]["top"][0])
            plotting.plot_trajectories(axes[1], steps, top, label=label, style=style)
        axes[0].set_title(f"last step; σ = {sigma:.3g}")
        axes[1].set_xlabel("training step")
        axes[1].set_ylabel("λmax(H)")
        axes[1].legend(frameon=False, fontsize=6)
    paths = _save(fig, out, "compare")
    lines = ["# comparison", ""]
    for run in runs:
        lines += [f"## {run['workdir']}", "", report.summary_markdown(report.summary_rows(run))]
    lines += ["![compare](compare.png)", ""]
    path = out / "compare.md"
    storage.atomic_write_bytes(path, "\n".join(lines).encode())
    return paths + [path]

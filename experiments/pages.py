"""Pages from a run directory: ``report.md`` / ``report.html`` (the setup, the table, the
figures with their captions) and ``compare`` (several run directories overlaid)."""

from __future__ import annotations

import html
import pathlib

from curvature import plotting
from experiments import figures_optim, report, storage
from experiments.figures import (
    PAPER_RC,
    WIDTH,
    _edge,
    _groups,
    _pyplot,
    _save,
    series,
    sharpness_ratio_panel,
)
from experiments.figures_spectra import default_sigma, pooled_density
from experiments.load import load_run

CAPTIONS = {
    "density": "Hessian spectral density at initialisation and at the last step; Gaussian kernel "
    "of standard deviation σ = {sigma:.3g} on one grid for all groups; ticks: Ritz nodes.",
    "eigenvalues": "Top-k and bottom-k (hollow markers) Hessian eigenvalues (Lanczos) against "
    "training step, mean over seeds; thin lines: each seed's largest eigenvalue{edge}.",
    "trace": "Hessian trace and its Gauss-Newton part (Hutch++), and the relative size of the "
    "residual R = H − G.",
    "training": "Training loss and test accuracy; thin lines: seeds, thick: mean.",
    "edge_of_stability": "λmax over the edge of stability (η·λmax/2 for gradient descent) against "
    "step; dashed: 1, the edge; ×: eigenvalues whose Lanczos residual did not converge.",
    "spectrum": "Top Hessian (filled) and Gauss-Newton (hollow, dotted) eigenvalues against their "
    "index at initialisation and at the last step, mean over seeds.",
    "blocks": "Where the residual R = H − G lives (blocks measurement): (a) the share of ‖R‖F² in "
    "same-layer blocks, at initialisation and at the last step measured, the rest coupling "
    "different layers; (b) the same share of ‖H‖F², ‖G‖F² and ‖R‖F² at that step. Bars: mean "
    "over seeds; error bars: ± the standard error of that mean, from the estimators' own "
    "standard errors; dots: seeds. A piecewise-linear activation (ReLU) has no same-layer R: "
    "0 up to float round-off (e.g. 1e-09).",
    "optimizers": figures_optim.CAPTION,
    "activation_parameter": "Curvature at the last step against the activation's parameter, "
    "mean ± sd over seeds (one seed: ± the standard error); horizontal lines: the activations "
    "without a parameter (ReLU), with their ± sd band.",
}


def _setup_line(run) -> str:
    config = run.config
    prov = (run.provenance or {}).get("invocations", [{}])[-1]
    model = config.model
    arch = (
        f"width {model.width}, depth {model.depth}"
        if model.kind == "mlp"
        else f"channels {tuple(model.channels)}"
    )
    batch = config.train.batch_size or "full"
    swept = f" Swept: {', '.join(config.sweep)}." if config.sweep else ""
    return (
        f"{model.kind.upper()} ({arch}) on {config.data.source}, "
        f"{config.train.optimizer} η = {config.train.learning_rate} (batch {batch}), "
        f"curvature on {config.measure.num_examples or 'all'} {config.measure.split} examples "
        f"(plan: {', '.join(config.measure.quantities)}), "
        f"{config.train.steps} steps, loss {config.train.loss}, seeds {tuple(config.seeds)}, dtype {config.dtype}, "
        f"matmul precision {prov.get('matmul_precision', '?')}, jax {prov.get('packages', {}).get('jax', '?')}, "
        f"git {str((prov.get('git') or {}).get('revision'))[:10]}.{swept}"
    )


def write_report(workdir, run, sigma, drawn) -> list[pathlib.Path]:
    workdir = pathlib.Path(workdir)
    rows = report.summary_rows(run)
    edge, edge_label = _edge(_groups(run))
    captions = [
        (
            name,
            CAPTIONS[name].format(
                sigma=sigma or 0,
                edge=f"; dashed line or note: the edge of stability {edge_label}" if edge else "",
            ),
        )
        for name in drawn
    ]
    title = f"curvature report: {workdir.name}"
    setup = _setup_line(run)
    titles = ["group", "seeds", "failed", "final step"] + report.present_columns(rows)
    md = [f"# {title}", "", setup, "", "| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for row in rows:
        md.append("| " + " | ".join(report._fmt(row.get(t)) for t in titles) + " |")
    md += ["", report.LEGEND, ""] + report.notes(rows) + [""]
    for name, caption in captions:
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
    h += [f"<p>{html.escape(n)}</p>" for n in [report.LEGEND] + report.notes(rows)]
    for name, caption in captions:
        h.append(
            f"<figure><img src='figures/{name}.png' alt='{name}'><figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    html_path = workdir / "report.html"
    storage.atomic_write_bytes(html_path, "\n".join(h).encode())
    return [md_path, html_path]


def compare(workdirs, out, *, sigma: float | None = None) -> list[pathlib.Path]:
    """Overlay several run directories: last-step densities, λmax trajectories and, where the
    runs have an edge of stability, λmax / edge (η·λmax/2 for gradient descent)."""
    plt = _pyplot()
    out = pathlib.Path(out).expanduser()
    runs = [load_run(w) for w in workdirs]
    curves = []
    for run in runs:
        for group, members in _groups(run):
            curves.append((f"{run.workdir.name}: {group}", members))
    if not curves:
        from experiments.errors import RunDirError

        raise RunDirError("none of the run directories holds a measurement yet")
    densities = {}
    for label, members in curves:
        step = max(report.common_steps(members) or [0])
        densities[label] = pooled_density(members, step)
    found = [d for d in densities.values() if d is not None]
    has_ratio = any(
        r.sharpness_ratio is not None for _, ms in curves for m in ms for r in m.records
    )
    panels = int(bool(found)) + 1 + int(has_ratio)
    with plt.rc_context(PAPER_RC):
        fig, axes = plt.subplots(
            1, panels, figsize=(WIDTH, 2.8), layout="constrained", squeeze=False
        )
        axes = list(axes[0])
        if found:
            ax = axes.pop(0)
            sigma = sigma or default_sigma(found)
            grid = plotting.density_grid(found, sigma=sigma)
            for i, (label, _) in enumerate(curves):
                if densities[label] is not None:
                    style = plotting.series_style(i)
                    plotting.plot_density(
                        ax, densities[label], sigma=sigma, grid=grid, label=label, **style
                    )
            ax.set_title(f"last step; σ = {sigma:.3g}")
        ax = axes.pop(0)
        for i, (label, members) in enumerate(curves):
            steps, top, _ = series(
                members, lambda r: r.sharpness.values[0] if r.sharpness else None
            )
            (line,) = plotting.plot_trajectories(
                ax, steps, top, label=label, style=plotting.series_style(i)
            )
            line.set_gid(f"lambda_max/{label}")
        ax.set_xlabel("training step")
        ax.set_ylabel("λmax(H)")
        ax.legend(frameon=False, fontsize=5)
        if has_ratio:
            sharpness_ratio_panel(axes.pop(0), curves)
    paths = _save(fig, out, "compare")
    lines = ["# comparison", ""]
    for run in runs:
        lines += [f"## {run.workdir}", "", report.summary_markdown(report.summary_rows(run))]
    lines += ["![compare](compare.png)", ""]
    path = out / "compare.md"
    storage.atomic_write_bytes(path, "\n".join(lines).encode())
    return paths + [path]

"""Pages from a run directory: every figure (:func:`draw_all`), ``report.md`` / ``report.html``
(the setup, the table, the figures with their captions), ``compare`` (several run directories
overlaid) and a measurement against a swept value (:func:`draw_study`). Drawn from what is on
disk, never by re-measuring.

The figures are the general ones (:data:`GENERAL_FIGURES`) and those each measurement declares
(:mod:`experiments.measurements`), in the order of their ranks; each is drawn when the records
hold its quantity.
"""

from __future__ import annotations

import html
import pathlib

from curvature import plotting
from experiments import report, storage
from experiments.errors import RunDirError
from experiments.figures import common, optim, parameter, sharpness, spectra, study, training
from experiments.figures.common import Figure
from experiments.load import load_run
from experiments.measurements import MEASUREMENTS
from experiments.table import common_steps, markdown, text

# Figures of every run, whatever it measured.
GENERAL_FIGURES = (
    sharpness.EIGENVALUES,
    training.TRAINING,
    sharpness.EDGE_OF_STABILITY,
    parameter.ACTIVATION_PARAMETER,
    optim.OPTIMIZERS,
)


def figures() -> list[Figure]:
    """Every figure a report may hold, in its order: the general ones and every registered
    measurement's."""
    found = [*GENERAL_FIGURES, *(f for m in MEASUREMENTS.values() for f in m.figures)]
    return sorted(found, key=lambda f: f.rank)


def draw_all(workdir, *, sigma: float | None = None) -> list[pathlib.Path]:
    """Every figure and the report of ``workdir``; returns the written paths. ``sigma``: the
    density's kernel width (default: 1% of the spectrum's range)."""
    workdir = pathlib.Path(workdir).expanduser()
    run = load_run(workdir)
    groups = common.groups(run)
    if not groups:
        return []
    folder = workdir / "figures"
    facts = {"sigma": sigma}
    paths, drawn = [], []
    for figure in figures():
        if not common.has(groups, figure.when):
            continue
        fig = figure.draw(run, facts)
        if fig is None:
            continue
        paths += common.save(fig, folder, figure.name)
        drawn.append(figure)
    paths += write_report(workdir, run, facts, drawn)
    return paths


def _setup_line(run) -> str:
    config = run.config
    prov = (run.provenance or {}).get("invocations", [{}])[-1]
    model = config.model
    arch = {
        "mlp": lambda: f"width {model.width}, depth {model.depth}",
        "cnn": lambda: f"channels {tuple(model.channels)}, norm {model.get('norm', 'none')}",
        "transformer": lambda: (
            f"width {model.width}, depth {model.depth}, heads {model.get('heads', 4)}, "
            f"readout {model.get('readout', 'all')}"
        ),
    }.get(model.kind, lambda: model.kind)()
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


def write_report(workdir, run, facts: dict, drawn: list[Figure]) -> list[pathlib.Path]:
    """``report.md`` and ``report.html``: the setup, the summary table with its legend and notes,
    and the ``drawn`` figures with their captions (formatted with ``facts``)."""
    workdir = pathlib.Path(workdir)
    rows = report.summary_rows(run)
    edge, edge_label = common.edge(common.groups(run))
    captions = [
        (
            figure.name,
            figure.caption.format(
                sigma=facts.get("sigma") or 0,
                edge=f"; dashed line or note: the edge of stability {edge_label}" if edge else "",
            ),
        )
        for figure in drawn
    ]
    title = f"curvature report: {workdir.name}"
    setup = _setup_line(run)
    columns = report.present_columns(rows)
    titles = ["group", "seeds", "failed", "final step"] + columns
    legend = report.legend(columns)
    # Names, swept values and paths are the user's: escaped, so the rendered page shows them.
    md = [f"# {markdown(title)}", "", markdown(setup), ""]
    md += ["| " + " | ".join(map(markdown, titles)) + " |", "|" + "---|" * len(titles)]
    for row in rows:
        md.append("| " + " | ".join(markdown(text(row.get(t))) for t in titles) + " |")
    md += ["", markdown(legend), ""] + [markdown(n) for n in report.notes(rows)] + [""]
    for name, caption in captions:
        md += [f"![{name}](figures/{name}.png)", "", f"*{markdown(caption)}*", ""]
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
            "<tr>" + "".join(f"<td>{html.escape(text(row.get(t)))}</td>" for t in titles) + "</tr>"
        )
    h.append("</table>")
    h += [f"<p>{html.escape(n)}</p>" for n in [legend] + report.notes(rows)]
    for name, caption in captions:
        h.append(
            f"<figure><img src='figures/{name}.png' alt='{name}'><figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    html_path = workdir / "report.html"
    storage.atomic_write_bytes(html_path, "\n".join(h).encode())
    return [md_path, html_path]


def draw_study(
    workdir, against: str, measurement: str, *, step: int | None = None
) -> tuple[list[pathlib.Path], str]:
    """The figure of ``measurement`` against the swept field ``against``
    (:mod:`experiments.figures.study`) as ``figures/<measurement>_vs_<field>.png`` and
    ``.pdf``; returns the paths and its numbers as a markdown table."""
    workdir = pathlib.Path(workdir).expanduser()
    data = study.study(load_run(workdir), against, measurement, step=step)
    paths = common.save(study.study_figure(data), workdir / "figures", study.file_name(data))
    return paths, data.markdown()


def compare(workdirs, out, *, sigma: float | None = None) -> list[pathlib.Path]:
    """Overlay several run directories: last-step densities, λmax trajectories and, where the
    runs have an edge of stability, λmax / edge (η·λmax/2 for gradient descent)."""
    plt = common.pyplot()
    out = pathlib.Path(out).expanduser()
    runs = [load_run(w) for w in workdirs]
    curves = []
    for run in runs:
        for group, members in common.groups(run):
            curves.append((f"{run.workdir.name}: {group}", members))
    if not curves:
        raise RunDirError("none of the run directories holds a measurement yet")
    densities = {}
    for label, members in curves:
        step = max(common_steps(members) or [0])
        densities[label] = spectra.pooled_density(members, step)
    found = [d for d in densities.values() if d is not None]
    has_ratio = any(
        r.sharpness_ratio is not None for _, ms in curves for m in ms for r in m.records
    )
    panels = int(bool(found)) + 1 + int(has_ratio)
    with plt.rc_context(common.PAPER_RC):
        fig, axes = plt.subplots(
            1, panels, figsize=(common.WIDTH, 2.8), layout="constrained", squeeze=False
        )
        axes = list(axes[0])
        if found:
            ax = axes.pop(0)
            sigma = sigma or spectra.default_sigma(found)
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
            steps, top, _ = common.series(
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
            sharpness.sharpness_ratio_panel(axes.pop(0), curves)
    paths = common.save(fig, out, "compare")
    lines = ["# comparison", ""]
    for run in runs:
        lines += [f"## {markdown(run.workdir)}", ""]
        lines += [report.summary_markdown(report.summary_rows(run))]
    lines += ["![compare](compare.png)", ""]
    path = out / "compare.md"
    storage.atomic_write_bytes(path, "\n".join(lines).encode())
    return paths + [path]

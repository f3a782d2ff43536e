"""The summary of a run directory (``summary.md``, ``summary.csv``), computed from what is on disk
(never by re-measuring): per group (activation and swept values), the last step every seed
reached, one column per quantity. The columns are the general ones here and those each
measurement declares (:mod:`experiments.measurements`); cells carry their error bars
(:mod:`experiments.table`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import pathlib
import re

from experiments import storage
from experiments.figures import optim
from experiments.load import Run, load_run
from experiments.measurements import MEASUREMENTS
from experiments.record import Eigenvalues
from experiments.table import Cell, Column, cell, common_steps, markdown, text


def _sharpness_ratio(r) -> Eigenvalues | None:
    top, ratio = r.sharpness, r.sharpness_ratio
    if ratio is None:
        return None
    edge = r.edge_of_stability
    return Eigenvalues((ratio,), (top.residuals[0] / edge,), top.converged)


# Columns of every run, whatever it measured: training, and the sharpness (from lambda_max, or
# else the first of top_eigenvalues).
GENERAL_COLUMNS = (
    Column("loss", lambda r: r.train_loss, rank=10),
    Column("test acc.", lambda r: r.test_accuracy, rank=20),
    Column(
        "grad-eq.",
        lambda r: r.training.gradient_equivalents if r.training else None,
        rank=30,
        legend="grad-eq.: what training to that step cost in gradients of the training batch (1 "
        "a step for first-order methods; Hessian-free: its CG's curvature products and loss "
        "evaluations)",
    ),
    Column(
        "train s",
        lambda r: r.training.seconds if r.training else None,
        rank=40,
        legend="train s: its wall seconds, compilation excluded",
    ),
    Column("λmax(H)", lambda r: r.sharpness, rank=50),
    Column(
        "λmax/edge",
        _sharpness_ratio,
        rank=140,
        legend="λmax/edge: λmax over the edge of stability (2/η for gradient descent, so "
        "η·λmax/2; above 1 is past the edge)",
    ),
)

LEGEND_HEAD = (
    "Mean ± standard deviation over seeds (one seed: ± the estimator's standard error) at the "
    "last step every seed reached; loss and curvature on the measurement set."
)

# The operators' names, explained under a table whose column titles name them (rank: where among
# the column legends).
NOTATION = (("H", "H: loss Hessian"), ("G", "G: its Gauss-Newton part"), ("R", "R = H − G"))
_NOTATION_RANK = 45


def columns() -> list[Column]:
    """Every column of a summary, in the table's order: the general ones and every registered
    measurement's."""
    found = [*GENERAL_COLUMNS, *(c for m in MEASUREMENTS.values() for c in m.columns)]
    return sorted(found, key=lambda c: c.rank)


def legend(titles=None) -> str:
    """The paragraph under a table of the columns ``titles`` (default: every column): what its
    cells are, the legends of those columns in order, and the operators their titles name."""
    shown = {c.title for c in columns()} if titles is None else set(titles)
    parts = [(c.rank, c.legend) for c in columns() if c.legend and shown & {c.title, *c.explains}]
    symbols = {s for title in shown for s in re.findall(r"[A-Za-z]+", title)}
    parts += [(_NOTATION_RANK, text) for symbol, text in NOTATION if symbol in symbols]
    if not parts:
        return LEGEND_HEAD
    return f"{LEGEND_HEAD} {'; '.join(text for _, text in sorted(parts, key=lambda p: p[0]))}."


def summary_rows(run: Run) -> list[dict]:
    """Per group (activation and swept values): the cells at the last step every seed reached."""
    rows = []
    for group, members in run.groups().items():
        measured = [m for m in members if m.records]
        steps = common_steps(measured)
        final = steps[-1] if steps else None
        finals = [m.record(final) for m in measured] if steps else []
        row = {
            "group": group,
            "activation": members[0].activation,
            "overrides": members[0].overrides,
            "seeds": len(finals),
            "failed": sum(m.status.get("state") == "failed" for m in members),
            "final step": final,
            "reached": sorted({m.steps[-1] for m in measured}),
        }
        for column in columns():
            c = cell([_get(column, r) for r in finals])
            if column.coarse is not None and c is not None:
                c = dataclasses.replace(c, coarse=any(column.coarse(r) for r in finals))
            row[column.title] = c
        rows.append(row)
    return rows


def _get(column: Column, r):
    try:
        return column.get(r)
    except (AttributeError, IndexError, ZeroDivisionError):
        return None


def present_columns(rows: list[dict]) -> list[str]:
    return [c.title for c in columns() if any(row.get(c.title) is not None for row in rows)]


def notes(rows: list[dict]) -> list[str]:
    """The footnotes a table needs: unconverged values, unreadable estimates, uneven steps."""
    out = []
    worst = [
        (row["group"], title, row[title].unconverged)
        for row in rows
        for title in present_columns(rows)
        if isinstance(row.get(title), Cell) and row[title].unconverged is not None
    ]
    if worst:
        listed = ", ".join(f"{g} {t} ({res:.1e})" for g, t, res in worst[:6])
        out.append(
            "† not converged (Lanczos residual above sqrt(eps)·max|θ|; worst relative residual): "
            + listed
            + (" ..." if len(worst) > 6 else "")
        )
    if any(
        isinstance(row.get(t), Cell) and row[t].unreadable
        for row in rows
        for t in present_columns(rows)
    ):
        out.append(
            "≈0 (±x): the estimate lies within two standard errors (x) of zero: its sign and size "
            "cannot be read; more matvecs or probes would resolve it."
        )
    if any(isinstance(row.get(t), Cell) and row[t].coarse for row in rows for t in row):
        out.append(
            "coarse: fewer than 20 Lanczos nodes per SLQ probe; the negative mass is unreliable."
        )
    finals = {row["final step"] for row in rows if row["final step"] is not None}
    if len(finals) > 1:
        out.append(
            "Rows are at different steps (final step column): "
            + ", ".join(f"{row['group']} at {row['final step']}" for row in rows)
            + "; compare them with care."
        )
    failed = [r for r in rows if r["failed"]]
    if failed:
        out.append(
            "Stopped runs (divergence, a non-finite loss or a failed measurement; the reason is in "
            "their status.json): " + ", ".join(f"{r['group']} ({r['failed']})" for r in failed)
        )
    out += [
        f"{r['group']}: seeds reached steps {r['reached']}." for r in rows if len(r["reached"]) > 1
    ]
    return out


def summary_markdown(rows: list[dict]) -> str:
    columns = present_columns(rows)
    titles = ["group", "seeds", "failed", "final step"] + columns
    lines = ["| " + " | ".join(map(markdown, titles)) + " |", "|" + "---|" * len(titles)]
    for row in rows:
        lines.append("| " + " | ".join(markdown(text(row.get(t))) for t in titles) + " |")
    prose = [legend(columns), "", *notes(rows)]
    return "\n".join(lines + [""] + [markdown(p) for p in prose]) + "\n"


def write_summary(workdir) -> str:
    workdir = pathlib.Path(workdir).expanduser()
    run = load_run(workdir)
    rows = summary_rows(run)
    text = summary_markdown(rows)
    costs = optim.cost_table(run)  # runs of several optimizers: what each one cost
    if costs:
        text += "\n" + costs
    storage.atomic_write_bytes(workdir / "summary.md", text.encode())
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    columns = present_columns(rows)
    swept = sorted({p for row in rows for p in row["overrides"]})
    head = ["group", "activation", *swept, "seeds", "failed", "final step"]
    for t in columns:
        head += [t, f"{t} spread", f"{t} se", f"{t} flag"]
    writer.writerow(head)
    for row in rows:
        cells = [row["group"], row["activation"], *(row["overrides"].get(p, "") for p in swept)]
        cells += [row["seeds"], row["failed"], row["final step"]]
        for t in columns:
            c = row.get(t)
            if c is None:
                cells += ["", "", "", ""]
                continue
            flag = (
                "unconverged"
                if c.unconverged is not None
                else "unreadable"
                if c.unreadable
                else "coarse"
                if c.coarse
                else ""
            )
            cells += [
                c.mean,
                "" if c.spread is None else c.spread,
                "" if c.standard_error is None else c.standard_error,
                flag,
            ]
        writer.writerow(cells)
    storage.atomic_write_bytes(workdir / "summary.csv", buffer.getvalue().encode())
    return text

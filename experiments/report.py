"""Summaries of a run directory, computed from what is on disk (never by re-measuring)."""

from __future__ import annotations

import csv
import io
import pathlib

import numpy as np

from experiments import storage

# (column title, function of the final record); None where a record lacks the quantity.
COLUMNS = [
    ("loss", lambda r: r["train_loss"]),
    ("test acc.", lambda r: r["test_accuracy"]),
    ("λmax(H)", lambda r: r["hessian"]["top"][0]),
    ("λmin(H)", lambda r: r["hessian"]["bottom"][0] if "bottom" in r["hessian"] else None),
    ("tr H", lambda r: r["hessian"]["trace"]),
    ("λmax(G)", lambda r: r["gauss_newton"]["top"][0] if "gauss_newton" in r else None),
    ("tr G", lambda r: r["gauss_newton"]["trace"] if "gauss_newton" in r else None),
    ("tr R", lambda r: r["residual"]["trace"] if "residual" in r else None),
    ("‖R‖F/‖H‖F", lambda r: r["residual"]["relative_frobenius"] if "residual" in r else None),
    ("neg. mass", lambda r: r["hessian"]["negative_mass"]),
    ("η·λmax", lambda r: r["lr_times_top"]),
]


def load_run(workdir) -> dict:
    """``{"config", "members": {name: {"activation", "seed", "status", "records", "dir"}}}``."""
    workdir = pathlib.Path(workdir)
    config = storage.read_json(workdir / "config.json")
    if config is None:
        raise FileNotFoundError(f"{workdir} has no config.json: not a run directory")
    members = {}
    for activation in config["activations"]:
        for seed in config["seeds"]:
            member_dir = workdir / "members" / storage.member_name(activation, seed)
            if not member_dir.exists():
                continue
            records = sorted(
                storage.read_metrics(member_dir / "metrics.jsonl"), key=lambda r: r["step"]
            )
            members[member_dir.name] = {
                "activation": activation,
                "seed": seed,
                "status": storage.read_json(member_dir / "status.json", {}),
                "records": records,
                "dir": member_dir,
            }
    return {"config": config, "members": members, "workdir": workdir}


def by_activation(run: dict, *, with_records: bool = True) -> dict[str, list[dict]]:
    """Members grouped by activation, in the config's order (only those with records, unless
    ``with_records=False``)."""
    groups: dict[str, list[dict]] = {a: [] for a in run["config"]["activations"]}
    for member in run["members"].values():
        if member["records"] or not with_records:
            groups[member["activation"]].append(member)
    return groups


def common_steps(members) -> list[int]:
    """Steps measured in every one of ``members`` (seeds that stopped early cut this short)."""
    sets = [{r["step"] for r in m["records"]} for m in members]
    return sorted(set.intersection(*sets)) if sets else []


def summary_rows(run: dict) -> list[dict]:
    """Per activation: mean and spread over seeds at the last step that every seed reached."""
    rows = []
    everyone = by_activation(run, with_records=False)
    for activation, members in by_activation(run).items():
        steps = common_steps(members)
        final = steps[-1] if steps else None
        finals = (
            [next(r for r in m["records"] if r["step"] == final) for m in members] if steps else []
        )
        row = {
            "activation": activation,
            "seeds": len(finals),
            "final step": final if final is not None else "-",
        }
        row["failed"] = sum(m["status"].get("state") == "failed" for m in everyone[activation])
        reached = sorted({m["records"][-1]["step"] for m in members})
        row["note"] = f"seeds reached steps {reached}" if len(reached) > 1 else ""
        for title, get in COLUMNS:
            values = []
            for r in finals:
                try:
                    v = get(r)
                except (KeyError, IndexError):
                    v = None
                if v is not None:
                    values.append(v)
            row[title] = (
                (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None)
                if values
                else None
            )
        rows.append(row)
    return rows


def _fmt(cell) -> str:
    if cell is None:
        return "-"
    if isinstance(cell, tuple):
        mean, spread = cell
        text = f"{mean:.4g}"
        return text if spread is None else f"{text} ± {spread:.2g}"
    return str(cell)


def summary_markdown(rows: list[dict]) -> str:
    titles = ["activation", "seeds", "failed", "final step"] + [t for t, _ in COLUMNS]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(t)) for t in titles) + " |")
    notes = [
        "",
        "Mean ± standard deviation over seeds at the last step every seed reached; train loss and",
        "curvature on the measurement set. H: loss Hessian; G: its Gauss-Newton part; R = H - G. tr by Hutch++, ‖·‖F² from shared",
        "Rademacher probes, neg. mass: SLQ spectral mass below -sqrt(eps)·max|node| (exact zeros excluded); η·λmax > 2 is past the edge of",
        "stability of gradient descent.",
    ]
    failed = [r for r in rows if r.get("failed")]
    if failed:
        notes.append(
            "Stopped runs (non-finite loss): "
            + ", ".join(f"{r['activation']} ({r['failed']})" for r in failed)
        )
    notes += [f"{r['activation']}: {r['note']}." for r in rows if r.get("note")]
    return "\n".join(lines + notes) + "\n"


def write_summary(workdir) -> str:
    run = load_run(workdir)
    rows = summary_rows(run)
    text = summary_markdown(rows)
    storage.atomic_write_bytes(pathlib.Path(workdir) / "summary.md", text.encode())
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    titles = ["activation", "seeds", "failed", "final step"] + [t for t, _ in COLUMNS]
    writer.writerow(titles + [f"{t} sd" for t, _ in COLUMNS])
    for row in rows:
        cells = [row["activation"], row["seeds"], row["failed"], row["final step"]]
        cells += [row[t][0] if row[t] else "" for t, _ in COLUMNS]
        cells += [row[t][1] if row[t] and row[t][1] is not None else "" for t, _ in COLUMNS]
        writer.writerow(cells)
    storage.atomic_write_bytes(pathlib.Path(workdir) / "summary.csv", buffer.getvalue().encode())
    return text

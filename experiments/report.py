"""Tables of a run directory, computed from what is on disk (never by re-measuring).

Every cell carries its error bar or convergence: estimates print ``value ± SE`` for one seed and
``mean ± sd`` over seeds, or ``≈0 (±2SE)`` when the estimate cannot tell its value from zero;
eigenvalues whose Lanczos residual did not converge are marked ``†``; a density with too few
nodes to read a negative mass from is marked ``coarse``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import pathlib
from collections.abc import Callable

import numpy as np

from experiments import storage
from experiments.load import Member, Run, load_run
from experiments.record import Eigenvalues, Estimate, Record


@dataclasses.dataclass(frozen=True)
class Column:
    title: str
    get: Callable[[Record], Estimate | Eigenvalues | float | None]
    # Eigenvalues: which one of the tuple (0: the first).
    index: int = 0


def _relative_residual(r: Record) -> Estimate | None:
    """‖R‖F/‖H‖F with a delta-method error bar (shared probes make it conservative)."""
    if r.frobenius is None:
        return None
    h, res = r.frobenius.hessian, r.frobenius.residual
    ratio = r.frobenius.relative_residual
    if not (h.value > 0 and res.value > 0):
        return Estimate(ratio, math.nan)
    rel = 0.5 * math.hypot(res.standard_error / res.value, h.standard_error / h.value)
    return Estimate(ratio, ratio * rel)


def _sharpness_ratio(r: Record) -> Eigenvalues | None:
    top, ratio = r.sharpness, r.sharpness_ratio
    if ratio is None:
        return None
    edge = r.edge_of_stability
    return Eigenvalues((ratio,), (top.residuals[0] / edge,), top.converged)


OUTLIER_GAP = 1.2


def outlier_count(values) -> tuple[int, float] | None:
    """How many of the top eigenvalues stand apart from the rest: the ``k`` of the largest ratio
    ``λ_k / λ_{k+1}`` among positive top values (at least 10 of them), or 0 when that largest
    gap is under 20% (no eigenvalue stands apart); and the ratio."""
    v = np.asarray(values, float)
    if len(v) < 10 or not np.all(v > 0):
        return None
    ratios = v[:-1] / v[1:]
    k = int(np.argmax(ratios))
    return (k + 1 if ratios[k] >= OUTLIER_GAP else 0), float(ratios[k])


def _outliers(e: Eigenvalues | None) -> float | None:
    found = outlier_count(e.values) if e is not None else None
    return None if found is None else float(found[0])


COLUMNS = [
    Column("loss", lambda r: r.train_loss),
    Column("test acc.", lambda r: r.test_accuracy),
    Column("grad-eq.", lambda r: r.training.gradient_equivalents if r.training else None),
    Column("train s", lambda r: r.training.seconds if r.training else None),
    Column("λmax(H)", lambda r: r.sharpness),
    Column("λmin(H)", lambda r: r.bottom_eigenvalues),
    Column("tr H", lambda r: r.trace),
    Column("λmax(G)", lambda r: r.gauss_newton.top if r.gauss_newton else None),
    Column("tr G", lambda r: r.gauss_newton.trace if r.gauss_newton else None),
    Column("tr R", lambda r: r.gauss_newton.residual_trace if r.gauss_newton else None),
    Column("‖R‖F/‖H‖F", _relative_residual),
    Column("R same-layer", lambda r: r.blocks.same_layer_share("residual") if r.blocks else None),
    Column("neg. mass", lambda r: r.density.negative_mass if r.density else None),
    Column("λmax/edge", _sharpness_ratio),
    Column("outliers H", lambda r: _outliers(r.top_eigenvalues)),
    Column("outliers G", lambda r: _outliers(r.gauss_newton.top if r.gauss_newton else None)),
    Column("B_simple", lambda r: r.gradient_noise.simple_noise_scale if r.gradient_noise else None),
    Column(
        "ρ(ν, diag H)",
        lambda r: r.optimizer_state.second_moment.spearman if r.optimizer_state else None,
    ),
]


def _moment(which: str, curvature: str, stat: str) -> Callable[[Record], float | None]:
    """A correlation of the ``preconditioner`` measurement, over all parameters."""
    return lambda r: (
        getattr(getattr(r.preconditioner, which)[curvature].overall, stat)
        if r.preconditioner
        else None
    )


def _condition(which: str | None) -> Callable[[Record], float | None]:
    def get(r: Record):
        p = r.preconditioner
        if p is None:
            return None
        c = {"H": p.hessian, "P": p.preconditioned}.get(which) or p.references.get(which)
        return c.condition if c else None

    return get


for _short, _name in (("H", "hessian"), ("G", "gauss_newton"), ("F", "fisher")):
    COLUMNS += [
        Column(f"r(ν,{_short})", _moment("second_moment", _name, "pearson")),
        Column(f"r(√ν,{_short})", _moment("sqrt_second_moment", _name, "pearson")),
        Column(f"ρ(ν,{_short})", _moment("second_moment", _name, "spearman")),
    ]
COLUMNS += [
    Column("κ(H)", _condition("H")),
    Column("κ(P⁻½HP⁻½)", _condition("P")),
    Column("κ, P=√F", _condition("sqrt_fisher")),
    Column("κ, P=G", _condition("gauss_newton")),
]


@dataclasses.dataclass(frozen=True)
class Cell:
    """One table entry: the mean over seeds and its error bar, and what to warn about."""

    mean: float
    spread: float | None  # sd over seeds (>= 2 seeds) or the estimator's SE (one seed)
    standard_error: float | None  # of the mean, from the estimators' own SEs
    unconverged: float | None = None  # worst relative residual of an unconverged eigenvalue
    unreadable: bool = False  # the estimate is within 2 SE of zero
    coarse: bool = False  # a density with too few nodes

    def text(self) -> str:
        if not math.isfinite(self.mean):
            return "n/a"
        if self.unreadable:
            return f"≈0 (±{2 * self.standard_error:.2g})"
        out = f"{self.mean:.4g}"
        if self.spread is not None and math.isfinite(self.spread):
            out += f" ± {self.spread:.2g}"
        if self.unconverged is not None:
            out += "†"
        if self.coarse:
            out += " (coarse)"
        return out


def cell(values: list) -> Cell | None:
    """Aggregate one column's values of several seeds' records into a :class:`Cell`."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    first = values[0]
    if isinstance(first, Eigenvalues):
        x = np.array([v.values[0] for v in values], float)
        bad = [v.relative_residuals[0] for v in values if not v.converged[0]]
        spread = float(np.std(x, ddof=1)) if len(x) > 1 else None
        return Cell(float(np.mean(x)), spread, None, max(bad) if bad else None)
    if isinstance(first, Estimate):
        x = np.array([v.value for v in values], float)
        se = float(np.sqrt(np.sum(np.array([v.standard_error for v in values]) ** 2)) / len(x))
        spread = float(np.std(x, ddof=1)) if len(x) > 1 else se
        mean = float(np.mean(x))
        unreadable = math.isfinite(se) and abs(mean) < 2 * se
        return Cell(mean, spread, se, unreadable=unreadable)
    x = np.array(values, float)
    return Cell(float(np.mean(x)), float(np.std(x, ddof=1)) if len(x) > 1 else None, None)


def common_steps(members: list[Member]) -> list[int]:
    """Steps measured in every one of ``members`` (seeds that stopped early cut this short)."""
    sets = [set(m.steps) for m in members]
    return sorted(set.intersection(*sets)) if sets else []


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
        for column in COLUMNS:
            c = cell([_get(column, r) for r in finals])
            if column.title == "neg. mass" and c is not None:
                c = dataclasses.replace(c, coarse=any(r.density.coarse() for r in finals))
            row[column.title] = c
        rows.append(row)
    return rows


def _get(column: Column, r: Record):
    try:
        return column.get(r)
    except (AttributeError, IndexError, ZeroDivisionError):
        return None


def present_columns(rows: list[dict]) -> list[str]:
    return [c.title for c in COLUMNS if any(row.get(c.title) is not None for row in rows)]


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, Cell):
        return value.text()
    return str(value)


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
    if any(isinstance(row.get("neg. mass"), Cell) and row["neg. mass"].coarse for row in rows):
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
            "Stopped runs (divergence or non-finite loss): "
            + ", ".join(f"{r['group']} ({r['failed']})" for r in failed)
        )
    out += [
        f"{r['group']}: seeds reached steps {r['reached']}." for r in rows if len(r["reached"]) > 1
    ]
    return out


LEGEND = (
    "Mean ± standard deviation over seeds (one seed: ± the estimator's standard error) at the "
    "last step every seed reached; loss and curvature on the measurement set. grad-eq.: what "
    "training to that step cost in gradients of the training batch (1 a step for first-order "
    "methods; Hessian-free: its CG's curvature products and loss evaluations); train s: its "
    "wall seconds, compilation excluded. H: loss Hessian; "
    "G: its Gauss-Newton part; R = H − G. tr by Hutch++; ‖·‖F² from shared Rademacher probes; "
    "neg. mass: SLQ spectral mass below −√eps·max|node| (exact zeros excluded); λmax/edge: "
    "λmax over the edge of stability (2/η for gradient descent, so η·λmax/2; above 1 is past the "
    "edge); B_simple: tr Σ/|g|² of per-example gradients; ρ(ν, diag H): Spearman correlation of "
    "the optimizer's second moment with the Hessian diagonal; r(ν,H), ρ(ν,H): Pearson and "
    "Spearman correlation over the parameters of the second moment ν (√ν: its root, what the "
    "update divides by) with the exact diagonal of H (G; F: the empirical Fisher), entries where "
    "that diagonal is exactly 0 excluded; κ: λmax / mean eigenvalue of H and of P⁻½HP⁻½, P what "
    "the update divides by, or √diag F + ε, or diag G + δ; R same-layer: the share of ‖R‖F² in "
    "same-layer blocks (blocks of ‖·‖F² from probes on each layer; the rest couples different "
    "layers; 0 up to round-off for piecewise-linear activations such as ReLU); outliers: the k of "
    "the largest gap λk/λk+1 among the top eigenvalues (10 or more), 0 when no gap reaches 20%."
)


def summary_markdown(rows: list[dict]) -> str:
    titles = ["group", "seeds", "failed", "final step"] + present_columns(rows)
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(t)) for t in titles) + " |")
    return "\n".join(lines + ["", LEGEND] + [""] + notes(rows)) + "\n"


def write_summary(workdir) -> str:
    workdir = pathlib.Path(workdir).expanduser()
    run = load_run(workdir)
    rows = summary_rows(run)
    text = summary_markdown(rows)
    from experiments import figures_optim  # runs of several optimizers: what each one cost

    costs = figures_optim.cost_table(run)
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

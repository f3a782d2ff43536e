"""What every figure shares: the paper style, the data of a run by group (an activation and swept
values) and seed, and the declaration of a figure (:class:`Figure`)."""

from __future__ import annotations

import dataclasses
import io
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from experiments import storage

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
    # Text as written: a "$" in a run directory's or a group's name is not mathtext (matplotlib
    # raised on "$\\foo$"); no figure here writes a formula.
    "text.parse_math": False,
}
WIDTH = 7.0  # inches: a two-column paper's full width


@dataclasses.dataclass(frozen=True)
class Figure:
    """A figure of a run directory, saved as ``figures/<name>.png`` and ``.pdf``.

    ``draw(run, facts)`` returns a matplotlib figure, or ``None`` when the run holds nothing to
    draw; it is drawn when a record has ``when(record)`` (neither ``None`` nor ``False``);
    ``caption`` is formatted with ``facts`` (``sigma``: the density's kernel width, which the
    density figure sets; ``edge``: a note on the edge of stability); ``rank`` orders the figures
    of a report."""

    name: str
    draw: Callable[[Any, dict], Any]
    when: Callable[[Any], Any]
    caption: str
    rank: int


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def groups(run) -> list[tuple[str, list]]:
    """``(group, members with records)`` in sweep order; a group is an activation and swept values."""
    out = []
    for group, members in run.groups().items():
        measured = [m for m in members if m.records]
        if measured:
            out.append((group, measured))
    return out


def has(found_groups, get) -> bool:
    """Whether any record of ``groups`` has the quantity (``get`` is neither None nor False)."""
    return any(
        get(r) is not None and get(r) is not False
        for _, ms in found_groups
        for m in ms
        for r in m.records
    )


def series(members, get) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """``(steps, mean over seeds, per-seed (steps, values))`` of ``get(record)``, at the steps
    where every seed has a value."""
    by_step = [{r.step: get(r) for r in m.records if get(r) is not None} for m in members]
    per_seed = [(np.array(list(v)), np.array(list(v.values()), float)) for v in by_step]
    common = sorted(set.intersection(*(set(v) for v in by_step))) if by_step else []
    mean = np.array([np.mean([v[s] for v in by_step], axis=0) for s in common], float)
    return np.array(common), mean, per_seed


def edge(found_groups) -> tuple[float | None, str]:
    """The edge of stability recorded with the measurements (one value for all groups, or none)."""
    edges = {r.edge_of_stability for _, ms in found_groups for m in ms for r in m.records}
    if len(edges) != 1 or None in edges:
        return None, ""
    optimizer = found_groups[0][1][0].config.train.optimizer
    return edges.pop(), "(2+2β)/η" if optimizer == "momentum" else "2/η"


def panels(plt, count: int, height: float, *, sharex: bool):
    """A grid of up to three panels a row, one per group, the unused ones hidden."""
    cols = min(count, 3)
    rows = int(np.ceil(count / cols))
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(WIDTH, height * rows),
        sharex=sharex,
        sharey=True,
        layout="constrained",
        squeeze=False,
    )
    for ax in axes.ravel()[count:]:
        ax.set_visible(False)
    return fig, axes, cols


def save(fig, folder: pathlib.Path, name: str) -> list[pathlib.Path]:
    """``fig`` as ``folder/name.png`` and ``.pdf`` (atomic writes); closes it."""
    plt = pyplot()
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

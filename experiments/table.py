"""The cells and columns of the summary tables, computed from records (never by re-measuring).

Every cell carries its error bar or convergence: estimates print ``value ± SE`` for one seed and
``mean ± sd`` over seeds, or ``≈0 (±2SE)`` when the estimate cannot tell its value from zero;
eigenvalues whose Lanczos residual did not converge are marked ``†``; a density with too few
nodes to read a negative mass from is marked ``coarse``. A measurement declares its columns
(:class:`Column`); :mod:`experiments.report` lays them out.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from experiments.record import Eigenvalues, Estimate


@dataclasses.dataclass(frozen=True)
class Column:
    """A column of the summary: ``get(record)`` gives an :class:`Estimate`, :class:`Eigenvalues`
    (the first one is shown), a number or ``None``; ``rank`` orders the columns (the table's
    order since release 0.1); ``legend`` explains it under a table that shows it, or shows one
    of the columns titled in ``explains`` (a legend shared by a family of columns);
    ``coarse(record)`` marks a cell ``coarse``."""

    title: str
    get: Callable[[Any], Estimate | Eigenvalues | float | None]
    rank: int
    legend: str = ""
    coarse: Callable[[Any], bool] | None = None
    explains: tuple[str, ...] = ()


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


def text(value) -> str:
    """A table entry as printed: a :class:`Cell`'s text, ``-`` for nothing."""
    if value is None:
        return "-"
    if isinstance(value, Cell):
        return value.text()
    return str(value)


def markdown(value) -> str:
    """``value`` as text for a markdown page: HTML's special characters escaped (a name or a
    swept value such as ``<script>`` is shown, not run, where the page is rendered) and so is
    ``|`` (which would end a table cell)."""
    return html.escape(str(value), quote=False).replace("|", "\\|")


def common_steps(members) -> list[int]:
    """Steps measured in every one of ``members`` (seeds that stopped early cut this short)."""
    sets = [set(m.steps) for m in members]
    return sorted(set.intersection(*sets)) if sets else []

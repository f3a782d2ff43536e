"""A measurement against a swept value (``study``): λmax against the learning rate or the width,
the test accuracy against the depth, a user measurement against anything swept, one point per
value at the last step every seed reached (or at a chosen step), mean ± sd over seeds as error
bars (one seed: ± the estimator's standard error), one series per activation and other swept
values. From the command line::

    python -m experiments plot --workdir=runs/x --against=train.learning_rate \
                               --measurement=lambda_max [--step=600]

:func:`study` returns the numbers, :func:`study_figure` draws them; both read only the records.

A measurement is named as a record holds it: a field (``lambda_max``, ``trace``,
``train_loss``, ``test_accuracy``, ``sharpness``, ``sharpness_ratio``), a user measurement's name
(``record.extra``), and a dotted path into either (``gauss_newton.trace``,
``density.negative_mass``, ``my_quantity.value``; an index picks an eigenvalue:
``top_eigenvalues.1`` is the second largest). Eigenvalues give their first value, estimates
their value with its standard error.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from curvature import plotting
from experiments.errors import RequestError
from experiments.figures import common
from experiments.record import Eigenvalues, Estimate
from experiments.table import Cell, cell, markdown

ACTIVATION = "activation"  # --against=activation: one point per activation


@dataclasses.dataclass(frozen=True)
class Series:
    """One line of a study: the members that share everything but the swept value and the
    seed. Point ``i`` is at ``x[i]`` and aggregates ``seeds[i]`` members at ``steps[i]``."""

    label: str  # the activation and the other swept values
    x: tuple  # the swept values: numbers ascending, or in sweep order
    cells: tuple[Cell, ...]  # mean, error bar, convergence, as in the summary tables
    seeds: tuple[int, ...]
    steps: tuple[int, ...]

    @property
    def mean(self) -> np.ndarray:
        return np.array([c.mean for c in self.cells], float)

    @property
    def spread(self) -> np.ndarray:
        """Standard deviation over seeds (one seed: the estimator's standard error; NaN: none)."""
        return np.array([np.nan if c.spread is None else c.spread for c in self.cells], float)


@dataclasses.dataclass(frozen=True)
class Study:
    """The data behind the figure: ``measurement`` against the swept field ``against``."""

    against: str
    measurement: str
    step: int | None  # None: each group's last step every seed reached
    series: tuple[Series, ...]

    @property
    def numeric(self) -> bool:
        """Whether every swept value is a number (else the axis holds categories)."""
        return all(_is_number(x) for s in self.series for x in s.x)

    @property
    def label(self) -> str:
        return self.against.split(".")[-1]

    def where(self) -> str:
        return "the last step every seed reached" if self.step is None else f"step {self.step}"

    def markdown(self) -> str:
        """The numbers as a markdown table, with a line saying what they are."""
        head = ["series", self.label, self.measurement, "seeds", "step"]
        lines = [
            f"{markdown(self.measurement)} against {markdown(self.against)} at {self.where()}: "
            "mean ± sd over seeds (one seed: ± the estimator's standard error; † not converged)",
            "",
            "| " + " | ".join(map(markdown, head)) + " |",
            "|" + "---|" * len(head),
        ]
        for s in self.series:
            for x, c, n, step in zip(s.x, s.cells, s.seeds, s.steps, strict=True):
                row = [s.label, _text(x), c.text(), n, step]
                lines.append("| " + " | ".join(markdown(v) for v in row) + " |")
        return "\n".join(lines) + "\n"


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _text(x) -> str:
    if isinstance(x, list | tuple):
        return "x".join(map(_text, x))
    return f"{x:g}" if _is_number(x) else str(x)


def swept_fields(run) -> list[str]:
    """The fields a run swept, in the order its members name them."""
    out: list[str] = []
    for member in run.members.values():
        out += [p for p in member.overrides if p not in out]
    return out


def resolve_field(run, against: str) -> str:
    """The swept field ``against`` names: its path, or an unambiguous end of one
    (``learning_rate`` for ``train.learning_rate``), or ``activation``."""
    if against == ACTIVATION:
        return ACTIVATION
    fields = swept_fields(run)
    if against in fields:
        return against
    matches = [f for f in fields if f.endswith(f".{against}")]
    if len(matches) == 1:
        return matches[0]
    swept = ", ".join(fields) or "nothing"
    why = f"it names {' and '.join(matches)}" if matches else "the run swept no such field"
    raise RequestError(f"--against={against}: {why}; swept: {swept} (or {ACTIVATION})")


def value(record, measurement: str):
    """``measurement`` of ``record`` (see the module docstring): an :class:`Estimate`, an
    :class:`Eigenvalues` of one value, a float, or ``None`` when the record does not hold it.
    :class:`RequestError` when it names something that is not a number."""
    first, *rest = measurement.split(".")
    extra = record.extra or {}
    if first in extra:
        found = extra[first]
    elif not first.startswith("_") and hasattr(record, first):
        found = getattr(record, first)
    else:
        return None
    path = first
    for part in rest:
        if found is None:
            return None
        found = _part(found, part, measurement, path)
        path = f"{path}.{part}"
    return _number(found, measurement)


def _part(found, part: str, measurement: str, path: str):
    if isinstance(found, Eigenvalues) and part.isdigit():
        i = int(part)
        if i >= len(found.values):
            return None
        return Eigenvalues(
            found.values[i : i + 1], found.residuals[i : i + 1], found.converged[i : i + 1]
        )
    if isinstance(found, dict) and part in found:
        return found[part]
    if isinstance(found, list | tuple) and part.isdigit():
        return found[int(part)] if int(part) < len(found) else None
    if dataclasses.is_dataclass(found) and part in {f.name for f in dataclasses.fields(found)}:
        return getattr(found, part)
    raise RequestError(
        f"--measurement={measurement}: {path} has no {part!r}; {_choices(found, path)}"
    )


def _number(found, measurement: str):
    if found is None or isinstance(found, Estimate):
        return found
    if isinstance(found, Eigenvalues):
        return found if found.values else None
    if isinstance(found, dict) and {"value", "standard_error"} <= set(found):  # a user's Estimate
        return Estimate(float(found["value"]), float(found["standard_error"]))
    if _is_number(found):
        return float(found)
    raise RequestError(
        f"--measurement={measurement} is a {type(found).__name__}, not a number; "
        f"{_choices(found, measurement)}"
    )


def _choices(found, path: str) -> str:
    """What a path into ``found`` may name: its numbers."""
    if dataclasses.is_dataclass(found):
        items = {f.name: getattr(found, f.name) for f in dataclasses.fields(found)}
    elif isinstance(found, dict):
        items = found
    elif isinstance(found, list | tuple) and found:
        last = f" to {path}.{len(found) - 1}" if len(found) > 1 else ""
        return f"choose an entry: {path}.0{last}"
    else:
        return "it holds no numbers"
    names = [
        f"{path}.{k}"
        for k, v in items.items()
        if isinstance(v, Estimate | Eigenvalues | dict | list | tuple) or _is_number(v)
    ]
    return f"choose one of {', '.join(names)}" if names else "it holds no numbers"


def recorded(run) -> list[str]:
    """The names a run's records hold a value for (their first component)."""
    names: list[str] = []
    for member in run.members.values():
        for r in member.records[-1:]:
            fields = [f.name for f in dataclasses.fields(r)]
            skip = {"step", "member", "fingerprint", "format", "extra", "timings"}
            names += [f for f in fields if f not in skip and getattr(r, f) is not None]
            if r.sharpness is not None:
                names.append("sharpness")
            names += list(r.extra)
    return list(dict.fromkeys(names))


def study(run, against: str, measurement: str, *, step: int | None = None) -> Study:
    """``measurement`` against the swept field ``against`` (see the module docstring).
    :class:`RequestError` when the run did not sweep ``against``, holds no ``measurement``, or
    no member reached ``step``."""
    field = resolve_field(run, against)
    lines: dict[str, dict] = {}  # label -> {x key: (x, members)}
    for member in run.members.values():
        if not member.records:
            continue
        others = [
            f"{p.split('.')[-1]}={_text(v)}" for p, v in member.overrides.items() if p != field
        ]
        if field == ACTIVATION:
            x, label = member.activation, "-".join(others) or "all"
        else:
            x = member.overrides.get(field)
            label = "-".join([member.activation, *others])
        points = lines.setdefault(label, {})
        points.setdefault(repr(x), (x, []))[1].append(member)
    series = []
    for label, points in lines.items():
        xs, cells, seeds, steps = [], [], [], []
        for x, members in points.values():
            # {member: {step: value}} at the steps where the member holds the measurement
            held = [
                {r.step: v for r in m.records if (v := value(r, measurement)) is not None}
                for m in members
            ]
            if step is None:  # the last step every seed reached with this measurement
                common = set.intersection(*(set(h) for h in held))
                if not common:
                    continue
                at = max(common)
            else:
                at = step
            found = [h[at] for h in held if at in h]
            if not found:
                continue
            xs.append(x)
            cells.append(cell(found))
            seeds.append(len(found))
            steps.append(at)
        if not xs:
            continue
        order = range(len(xs))
        if all(_is_number(x) for x in xs):
            order = sorted(order, key=lambda i: xs[i])
        series.append(
            Series(
                label,
                tuple(xs[i] for i in order),
                tuple(cells[i] for i in order),
                tuple(seeds[i] for i in order),
                tuple(steps[i] for i in order),
            )
        )
    if not series:
        records = [r for m in run.members.values() for r in m.records]
        held = sorted({r.step for r in records if value(r, measurement) is not None})
        if held:  # at other steps
            raise RequestError(f"--step={step}: no member recorded {measurement} there; at {held}")
        held = recorded(run)
        hint = ""
        if measurement.split(".")[0] == "lambda_max" and "sharpness" in held:
            hint = (
                " (lambda_max is the lambda_max measurement's; sharpness is the largest "
                "eigenvalue from it or from top_eigenvalues)"
            )
        raise RequestError(
            f"--measurement={measurement}: no record of {run.workdir} holds it{hint}; recorded: "
            f"{', '.join(held) or 'nothing yet'}"
        )
    return Study(field, measurement, step, tuple(series))


def study_figure(data: Study):
    """The figure of :func:`study`: one series per line with its error bars, the swept values
    on a log axis when they are positive numbers spanning a factor of 10 or more."""
    plt = common.pyplot()
    categories = (
        [] if data.numeric else list(dict.fromkeys(_text(x) for s in data.series for x in s.x))
    )
    with plt.rc_context(common.PAPER_RC):
        fig, ax = plt.subplots(figsize=(common.WIDTH / 2, 2.6), layout="constrained")
        for i, s in enumerate(data.series):
            x = (
                np.array(s.x, float)
                if data.numeric
                else np.array([categories.index(_text(v)) for v in s.x], float)
            )
            style = plotting.series_style(i)
            container = ax.errorbar(
                x,
                s.mean,
                yerr=np.nan_to_num(s.spread),
                label=s.label,
                markersize=3,
                capsize=1.5,
                elinewidth=0.7,
                **style,
            )
            container.lines[0].set_gid(f"study/{s.label}")
            container.lines[2][0].set_gid(f"study/{s.label}/error")
        if data.numeric:
            xs = np.array([x for s in data.series for x in s.x], float)
            if np.all(xs > 0) and xs.max() >= 10 * xs.min():
                ax.set_xscale("log")
            ticks = np.unique(xs)
            if len(ticks) <= 8:
                ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
                ax.minorticks_off()
        else:
            ax.set_xticks(range(len(categories)), categories)
        ax.set_xlabel(data.against)
        ax.set_ylabel(data.measurement)
        # Two short lines: one line overran the half-width figure.
        one_seed = all(n <= 1 for series in data.series for n in series.seeds)
        bars = "± the estimator's standard error" if one_seed else "mean ± sd over seeds"
        ax.set_title(f"at {data.where()}\n{bars}", fontsize=6.5)
        if len(data.series) > 1 or data.series[0].label:
            ax.legend(frameon=False, fontsize=5.5)
    return fig


def file_name(data: Study) -> str:
    """``lambda_max_vs_learning_rate`` (``_step600`` at a chosen step)."""
    safe = re.compile(r"[^A-Za-z0-9._=+-]")
    name = f"{safe.sub('_', data.measurement)}_vs_{safe.sub('_', data.label)}"
    return name + ("" if data.step is None else f"_step{data.step}")

"""``fisher``: the empirical Fisher (the mean of per-example gradient outer products,
``curvature.empirical_fisher``) on the measurement set: its top eigenvalues and its trace."""

from __future__ import annotations

import dataclasses

import curvature as cv
from experiments.measurements.base import (
    Context,
    Measurement,
    at_least,
    eigenvalues,
    estimate,
    steps_check,
)
from experiments.record import Eigenvalues, Estimate


@dataclasses.dataclass(frozen=True)
class Fisher:
    """The empirical Fisher (mean of per-example gradient outer products): top eigenvalues and
    Hutch++ trace."""

    top: Eigenvalues
    trace: Estimate


def fisher(ctx: Context) -> Fisher:
    """The empirical Fisher (``curvature.empirical_fisher``) on the measurement set: its top
    eigenvalues (Lanczos) and its trace (Hutch++)."""
    s = ctx.settings
    F = ctx.empirical_fisher()
    top = cv.eigsh(F, k=s.k, which="LA", num_steps=s.num_steps, key=ctx.key_for("fisher"))
    trace = cv.trace(F, num_matvecs=s.num_matvecs, key=ctx.key_for("fisher_trace"))
    return Fisher(eigenvalues(top), estimate(trace))


FISHER = Measurement(
    "fisher",
    fisher,
    defaults={"k": 5, "num_steps": 40, "num_matvecs": 30},
    check=lambda s, info: steps_check()(s, info) or at_least(4, "num_matvecs")(s, info),
    record_type=Fisher,
    renamed={"lanczos_steps": "num_steps", "trace_matvecs": "num_matvecs"},
)

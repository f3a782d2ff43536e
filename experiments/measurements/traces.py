"""Traces: ``trace`` (tr H by Hutch++, Meyer et al. 2021) and ``gauss_newton`` (the Gauss-Newton
part G of the Hessian: its top eigenvalues, and the traces of G and of the residual R = H - G on
one shared Hutch++ sketch and probes, so that tr R = tr H - tr G exactly)."""

from __future__ import annotations

import dataclasses

import numpy as np

import curvature as cv
from experiments.figures import structure
from experiments.measurements.base import (
    Context,
    Measurement,
    at_least,
    eigenvalues,
    estimate,
    finite,
    steps_check,
)
from experiments.measurements.eigenvalues import outliers
from experiments.record import Eigenvalues, Estimate
from experiments.table import Column


@dataclasses.dataclass(frozen=True)
class GaussNewton:
    """The Gauss-Newton part G of the Hessian and the residual R = H - G."""

    top: Eigenvalues
    trace: Estimate
    residual_trace: Estimate


def _traces(ctx: Context, num_matvecs: int) -> tuple[Estimate, Estimate, Estimate]:
    """tr H, tr G and tr R = tr(H - G) by Hutch++ on one sketch (of H) and shared probes, once
    per measurement (``curvature.trace`` of the three together). For a sketch fixed before the
    probes are drawn, Hutch++ is linear in the operator, so tr R = tr H - tr G up to round-off
    and each is unbiased, with a standard error from its own probe samples; tr H is the number
    ``cv.trace(H, key=key)`` gives alone. Cost: ``num_matvecs`` products with H and two thirds as
    many with G (R's are their difference)."""

    def run():
        H, G = ctx.hessian(), ctx.gauss_newton()
        parts = cv.trace((H, G, H - G), num_matvecs=num_matvecs, key=ctx.key_for("trace"))
        return tuple(finite(estimate(t), "trace") for t in parts)

    return ctx.cached(("traces", num_matvecs), run)


def trace(ctx: Context) -> Estimate:
    """tr H by Hutch++ (Meyer et al. 2021), with its standard error. With gauss_newton in the
    plan and the same num_matvecs, it comes from their shared run (the same number)."""
    m = ctx.settings.num_matvecs
    if "gauss_newton" in ctx.plan and ctx.section("gauss_newton").num_matvecs == m:
        return _traces(ctx, m)[0]
    return estimate(cv.trace(ctx.hessian(), num_matvecs=m, key=ctx.key_for("trace")))


def gauss_newton(ctx: Context) -> GaussNewton:
    """The Gauss-Newton part G: its top eigenvalues (Lanczos), and the traces of G and of
    R = H - G by Hutch++ with one shared sketch and probes (tr R = tr H - tr G exactly)."""
    s = ctx.settings
    top = cv.eigsh(
        ctx.gauss_newton(), k=s.k, which="LA", num_steps=s.num_steps, key=ctx.key_for("eig")
    )
    ctx.spectra["gauss_newton_top"] = np.asarray(top.eigenvalues)
    _, trace_g, trace_r = _traces(ctx, s.num_matvecs)
    return GaussNewton(eigenvalues(top), trace_g, trace_r)


def _check_trace(settings, info):
    message = at_least(4, "num_matvecs")(settings, info)
    m = settings.num_matvecs
    if message is None and m // 3 > info.get("num_params", m):
        return (
            f"num_matvecs={m}: the Hutch++ sketch (a third) exceeds the "
            f"{info['num_params']} parameters"
        )
    return message


def _check_gauss_newton(settings, info):
    return steps_check()(settings, info) or at_least(4, "num_matvecs")(settings, info)


def _gauss_newton_part(get):
    return lambda r: get(r.gauss_newton) if r.gauss_newton else None


TRACE = Measurement(
    "trace",
    trace,
    defaults={"num_matvecs": 60},
    check=_check_trace,
    record_type=Estimate,
    columns=(
        Column(
            "tr H", lambda r: r.trace, rank=70, legend="tr by Hutch++", explains=("tr G", "tr R")
        ),
    ),
    figures=(structure.TRACES,),
    renamed={"matvecs": "num_matvecs"},
)
GAUSS_NEWTON = Measurement(
    "gauss_newton",
    gauss_newton,
    defaults={"k": 5, "num_steps": 60, "num_matvecs": 60},
    check=_check_gauss_newton,
    record_type=GaussNewton,
    columns=(
        Column("λmax(G)", _gauss_newton_part(lambda g: g.top), rank=80),
        Column("tr G", _gauss_newton_part(lambda g: g.trace), rank=90),
        Column("tr R", _gauss_newton_part(lambda g: g.residual_trace), rank=100),
        Column(
            "outliers G",
            lambda r: outliers(r.gauss_newton.top if r.gauss_newton else None),
            rank=160,
        ),
    ),
    spectra=True,
    cost=1,
    renamed={"lanczos_steps": "num_steps", "trace_matvecs": "num_matvecs"},
)

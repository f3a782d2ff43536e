"""The ends of the Hessian spectrum by Lanczos: ``lambda_max`` (the sharpness, k = 1),
``top_eigenvalues`` and ``bottom_eigenvalues`` (one Lanczos run for both ends when a plan asks
for both), with recomputed residuals and converged flags."""

from __future__ import annotations

import numpy as np

import curvature as cv
from experiments.figures import spectra
from experiments.measurements.base import Context, Measurement, eigenvalues, steps_check
from experiments.record import Eigenvalues
from experiments.table import Column


def _keep_vectors(ctx: Context, vectors) -> None:
    """The top ``measure.save_eigenvectors`` Ritz vectors, largest first, for the step's file."""
    keep = ctx.config.measure.save_eigenvectors
    if keep:
        ctx.spectra["eigenvectors"] = np.asarray(vectors[:, :keep])


def _ends(ctx: Context):
    """Top and bottom eigenvalues from one Lanczos run when the plan asks for both ends."""
    top, bottom = ctx.section("top_eigenvalues"), ctx.section("bottom_eigenvalues")
    both = "top_eigenvalues" in ctx.plan and "bottom_eigenvalues" in ctx.plan

    def run():
        H = ctx.hessian()
        if both:
            k_end = max(top.k, bottom.k)
            steps = max(top.num_steps, bottom.num_steps)
            out = cv.eigsh(H, k=2 * k_end, which="BE", num_steps=steps, key=ctx.key_for("eig"))
            _keep_vectors(ctx, out.eigenvectors)
            # "BE": ceil(k/2) from the top, descending, then floor(k/2) from the bottom,
            # descending; the bottom is reported smallest first.
            k = np.arange(k_end)
            return eigenvalues(out, k[: top.k]), eigenvalues(out, (2 * k_end - 1 - k)[: bottom.k])
        upper = None
        if "top_eigenvalues" in ctx.plan:
            out = cv.eigsh(H, k=top.k, which="LA", num_steps=top.num_steps, key=ctx.key_for("eig"))
            _keep_vectors(ctx, out.eigenvectors)
            upper = eigenvalues(out)
        lower = None
        if "bottom_eigenvalues" in ctx.plan:
            out = cv.eigsh(
                H, k=bottom.k, which="SA", num_steps=bottom.num_steps, key=ctx.key_for("eig")
            )
            lower = eigenvalues(out)
        return upper, lower

    return ctx.cached("ends", run)


def lambda_max(ctx: Context) -> Eigenvalues:
    """The largest Hessian eigenvalue (sharpness), with its residual: Lanczos, k = 1."""
    out = cv.eigsh(
        ctx.hessian(), k=1, which="LA", num_steps=ctx.settings.num_steps, key=ctx.key_for("eig")
    )
    if "top_eigenvalues" not in ctx.plan:
        _keep_vectors(ctx, out.eigenvectors)
    return eigenvalues(out)


def top_eigenvalues(ctx: Context) -> Eigenvalues:
    """The k largest Hessian eigenvalues (Lanczos; shares its run with bottom_eigenvalues)."""
    top = _ends(ctx)[0]
    ctx.spectra["top"] = np.asarray(top.values)
    ctx.spectra["top_residuals"] = np.asarray(top.residuals)
    return top


def bottom_eigenvalues(ctx: Context) -> Eigenvalues:
    """The k smallest Hessian eigenvalues, smallest first."""
    bottom = _ends(ctx)[1]
    ctx.spectra["bottom"] = np.asarray(bottom.values)
    return bottom


def _check_top(settings, info):
    message = steps_check()(settings, info)
    if message is None and "bottom_eigenvalues" in info.get("plan", ()):
        bottom = info["measure"].bottom_eigenvalues
        k_end = max(settings.k, bottom.k)
        steps = max(settings.num_steps, bottom.num_steps)
        if steps < 2 * k_end:
            return (
                f"num_steps={steps} (the larger of top's and bottom's) is smaller than "
                f"2 * max(top k, bottom k) = {2 * k_end} (both ends come from one Lanczos run)"
            )
    return message


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


def outliers(e: Eigenvalues | None) -> float | None:
    """:func:`outlier_count` of recorded eigenvalues, as a table cell."""
    found = outlier_count(e.values) if e is not None else None
    return None if found is None else float(found[0])


LAMBDA_MAX = Measurement(
    "lambda_max",
    lambda_max,
    defaults={"num_steps": 20},
    check=steps_check(k_key=None),
    record_type=Eigenvalues,
    renamed={"lanczos_steps": "num_steps"},
)
TOP_EIGENVALUES = Measurement(
    "top_eigenvalues",
    top_eigenvalues,
    defaults={"k": 5, "num_steps": 60},
    check=_check_top,
    record_type=Eigenvalues,
    columns=(
        Column(
            "outliers H",
            lambda r: outliers(r.top_eigenvalues),
            rank=150,
            legend="outliers: the k of the largest gap λk/λk+1 among the top eigenvalues (10 or "
            "more), 0 when no gap reaches 20%",
            explains=("outliers G",),
        ),
    ),
    figures=(spectra.SPECTRUM,),
    spectra=True,
    renamed={"lanczos_steps": "num_steps"},
)
BOTTOM_EIGENVALUES = Measurement(
    "bottom_eigenvalues",
    bottom_eigenvalues,
    defaults={"k": 3, "num_steps": 60},
    check=steps_check(),
    record_type=Eigenvalues,
    columns=(Column("λmin(H)", lambda r: r.bottom_eigenvalues, rank=60),),
    spectra=True,
    renamed={"lanczos_steps": "num_steps"},
)

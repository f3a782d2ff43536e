"""The built-in measurements, each registered in :data:`experiments.measure.MEASUREMENTS` with
its defaults and checks: ``lambda_max``, ``top_eigenvalues``, ``bottom_eigenvalues``, ``trace``,
``gauss_newton``, ``frobenius`` and ``density`` (the diagnostics ``diagonal``, ``fisher``,
``blocks``, ``optimizer_state`` and ``gradient_noise`` are in :mod:`experiments.diagnostics`,
``preconditioner`` in :mod:`experiments.second_moment`).
Each is a function of a :class:`Context` returning
the value of the record field of its name."""

from __future__ import annotations

import numpy as np

import curvature as cv
from experiments.measure import Context, register_measurement
from experiments.record import (
    Density,
    Eigenvalues,
    Estimate,
    Frobenius,
    GaussNewton,
)


def _eigen(result: cv.EigshResult, index=slice(None)) -> Eigenvalues:
    return Eigenvalues(
        tuple(float(v) for v in np.asarray(result.eigenvalues)[index]),
        tuple(float(v) for v in np.asarray(result.residual_norms)[index]),
        tuple(bool(c) for c in np.asarray(result.converged)[index]),
        int(result.num_matvecs),
    )


def _estimate(result) -> Estimate:
    return Estimate(float(result.value), float(result.standard_error), int(result.num_matvecs))


def _at_least(minimum: int, what: str):
    def check(settings, info):
        for key in what.split(","):
            value = settings[key]
            if not isinstance(value, int) or value < minimum:
                return f"{key}={value!r} must be an integer >= {minimum}"
        return None

    return check


def _steps_check(*, k_key: str | None = "k", steps_key: str = "lanczos_steps"):
    def check(settings, info):
        k = settings[k_key] if k_key else 1
        steps = settings[steps_key]
        if not isinstance(k, int) or k < 1:
            return f"{k_key}={k!r} must be an integer >= 1"
        if not isinstance(steps, int) or steps < k:
            return f"{steps_key}={steps!r} must be an integer >= {k_key}={k}"
        if "num_params" in info and steps > info["num_params"]:
            return f"{steps_key}={steps} exceeds the {info['num_params']} parameters"
        return None

    return check


# --------------------------------------------------------------------------------------------
# The built-in measurements.


def _ends(ctx: Context):
    """Top and bottom eigenvalues from one Lanczos run when the plan asks for both ends."""
    top, bottom = ctx.section("top_eigenvalues"), ctx.section("bottom_eigenvalues")
    both = "top_eigenvalues" in ctx.plan and "bottom_eigenvalues" in ctx.plan

    def run():
        H = ctx.hessian()
        if both:
            k_end = max(top.k, bottom.k)
            steps = max(top.lanczos_steps, bottom.lanczos_steps)
            out = cv.eigsh(H, k=2 * k_end, which="BE", num_steps=steps, key=ctx.key_for("eig"))
            _keep_vectors(ctx, out.eigenvectors)
            # "BE": ceil(k/2) from the top, descending, then floor(k/2) from the bottom,
            # descending; the bottom is reported smallest first.
            k = np.arange(k_end)
            return _eigen(out, k[: top.k]), _eigen(out, (2 * k_end - 1 - k)[: bottom.k])
        upper = None
        if "top_eigenvalues" in ctx.plan:
            out = cv.eigsh(
                H, k=top.k, which="LA", num_steps=top.lanczos_steps, key=ctx.key_for("eig")
            )
            _keep_vectors(ctx, out.eigenvectors)
            upper = _eigen(out)
        return (
            upper,
            _eigen(
                cv.eigsh(
                    H,
                    k=bottom.k,
                    which="SA",
                    num_steps=bottom.lanczos_steps,
                    key=ctx.key_for("eig"),
                )
            )
            if "bottom_eigenvalues" in ctx.plan
            else None,
        )

    return ctx.cached("ends", run)


def _keep_vectors(ctx: Context, vectors) -> None:
    """The top ``measure.save_eigenvectors`` Ritz vectors, largest first, for the step's file."""
    keep = ctx.config.measure.save_eigenvectors
    if keep:
        ctx.spectra["eigenvectors"] = np.asarray(vectors[:, :keep])


@register_measurement("lambda_max", defaults={"lanczos_steps": 20}, check=_steps_check(k_key=None))
def _lambda_max(ctx: Context) -> Eigenvalues:
    """The largest Hessian eigenvalue (sharpness), with its residual: Lanczos, k = 1."""
    s = ctx.settings
    out = cv.eigsh(
        ctx.hessian(), k=1, which="LA", num_steps=s.lanczos_steps, key=ctx.key_for("eig")
    )
    if "top_eigenvalues" not in ctx.plan:
        _keep_vectors(ctx, out.eigenvectors)
    return _eigen(out)


@register_measurement(
    "top_eigenvalues", defaults={"k": 5, "lanczos_steps": 60}, check=_steps_check()
)
def _top(ctx: Context) -> Eigenvalues:
    """The k largest Hessian eigenvalues (Lanczos; shares its run with bottom_eigenvalues)."""
    top = _ends(ctx)[0]
    ctx.spectra["top"] = np.asarray(top.values)
    ctx.spectra["top_residuals"] = np.asarray(top.residuals)
    return top


@register_measurement(
    "bottom_eigenvalues", defaults={"k": 3, "lanczos_steps": 60}, check=_steps_check()
)
def _bottom(ctx: Context) -> Eigenvalues:
    """The k smallest Hessian eigenvalues, smallest first."""
    bottom = _ends(ctx)[1]
    ctx.spectra["bottom"] = np.asarray(bottom.values)
    return bottom


def _traces(ctx: Context, matvecs: int) -> tuple[Estimate, Estimate, Estimate]:
    """tr H, tr G and tr R = tr(H - G) by Hutch++ on one sketch (of H) and shared probes, once
    per measurement (``curvature.trace`` of the three together). For a sketch basis fixed before
    the probes are drawn, Hutch++ is linear in the operator, so tr R = tr H - tr G up to
    round-off and each is unbiased, with a standard error from its own probe samples; tr H is
    the number ``cv.trace(H, key=key)`` gives alone. Cost: ``matvecs`` products with H and two
    thirds as many with G (R's are their difference)."""

    def run():
        H, G = ctx.hessian(), ctx.gauss_newton()
        parts = cv.trace((H, G, H - G), num_matvecs=matvecs, key=ctx.key_for("trace"))
        return tuple(
            _finite(Estimate(float(t.value), float(t.standard_error), matvecs), "trace")
            for t in parts
        )

    return ctx.cached(("traces", matvecs), run)


def _finite(estimate: Estimate, name: str) -> Estimate:
    if not np.isfinite(estimate.value):
        raise FloatingPointError(f"{name}: a matvec returned NaN or inf")
    return estimate


def _trace_check(settings, info):
    message = _at_least(4, "matvecs")(settings, info)
    if message is None and settings.matvecs // 3 > info.get("num_params", settings.matvecs):
        return f"matvecs={settings.matvecs}: the Hutch++ sketch (a third) exceeds the {info['num_params']} parameters"
    return message


@register_measurement("trace", defaults={"matvecs": 60}, check=_trace_check)
def _trace(ctx: Context) -> Estimate:
    """tr H by Hutch++ (Meyer et al. 2021), with its standard error. With gauss_newton in the
    plan and the same matvecs, it comes from their shared run (the same number)."""
    m = ctx.settings.matvecs
    if "gauss_newton" in ctx.plan and ctx.section("gauss_newton").trace_matvecs == m:
        return _traces(ctx, m)[0]
    return _estimate(cv.trace(ctx.hessian(), num_matvecs=m, key=ctx.key_for("trace")))


@register_measurement(
    "gauss_newton",
    defaults={"k": 5, "lanczos_steps": 60, "trace_matvecs": 60},
    check=lambda s, info: _steps_check()(s, info) or _at_least(4, "trace_matvecs")(s, info),
)
def _gauss_newton(ctx: Context) -> GaussNewton:
    """The Gauss-Newton part G: its top eigenvalues (Lanczos), and the traces of G and of
    R = H - G by Hutch++ with one shared sketch and probes (tr R = tr H - tr G exactly)."""
    s = ctx.settings
    top = cv.eigsh(
        ctx.gauss_newton(), k=s.k, which="LA", num_steps=s.lanczos_steps, key=ctx.key_for("eig")
    )
    ctx.spectra["gauss_newton_top"] = np.asarray(top.eigenvalues)
    _, trace_g, trace_r = _traces(ctx, s.trace_matvecs)
    return GaussNewton(_eigen(top), trace_g, trace_r)


@register_measurement("frobenius", defaults={"probes": 16}, check=_at_least(2, "probes"))
def _frobenius(ctx: Context) -> Frobenius:
    """‖H‖F², ‖G‖F², ‖R‖F² from shared Rademacher probes, so their ratios are tight (two
    matvecs a probe: R z = H z - G z)."""
    m = ctx.settings.probes
    H, G = ctx.hessian(), ctx.gauss_newton()
    parts = cv.frobenius_norm_squared((H, G, H - G), num_matvecs=m, key=ctx.key_for("fro"))
    return Frobenius(
        *(_finite(Estimate(float(f.value), float(f.standard_error), m), "frobenius") for f in parts)
    )


def _density_check(s, info):
    if not isinstance(s.probes, int) or s.probes < 1:
        return f"probes={s.probes!r} must be an integer >= 1"
    return _steps_check(k_key=None)(s, info) or (
        None if s.lanczos_steps >= 2 else "lanczos_steps must be >= 2"
    )


@register_measurement(
    "density",
    # probe_batch_size: probes run together (vmapped); 0: one after another (least memory).
    defaults={"probes": 4, "lanczos_steps": 60, "probe_batch_size": 4},
    check=_density_check,
)
def _density(ctx: Context) -> Density:
    """SLQ spectral density (Ubaru, Chen & Saad 2017): nodes and weights saved per probe, and the
    negative spectral mass (below -sqrt(eps)·max|node|, so exact zeros do not count)."""
    s = ctx.settings
    slq = cv.spectral_density(
        ctx.hessian(),
        num_probes=s.probes,
        num_steps=s.lanczos_steps,
        key=ctx.key_for("slq"),
        probe_batch_size=s.probe_batch_size or None,
    )
    ctx.spectra.update(
        slq_nodes=np.asarray(slq.nodes),
        slq_weights=np.asarray(slq.weights),
        dimension=np.asarray(ctx.hessian().size),
    )
    mass, se = slq.mass_below()
    return Density(
        Estimate(float(mass), float(se), s.probes * s.lanczos_steps), s.probes, s.lanczos_steps
    )


from experiments import diagnostics as _diagnostics  # noqa: E402, F401  (registers the rest)
from experiments import second_moment as _second_moment  # noqa: E402, F401  (preconditioner)

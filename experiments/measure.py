"""Measurements: a registry of named curvature quantities, each with its own accuracy settings,
and the function that takes one measurement of a member at one step.

A config's ``measure.quantities`` is the plan: the names to measure at every scheduled step, e.g.
``("lambda_max",)`` for an edge-of-stability run (its cost is its Lanczos steps), or the full set
of the default comparison. Each measurement's settings are the config section of its name
(``measure.top_eigenvalues.k``), with defaults declared once, at registration.

A user registers a measurement from their config file::

    from experiments import measure

    @measure.register_measurement("gradient_norm_ratio", defaults={"scale": 1.0})
    def gradient_norm_ratio(ctx):  # ctx: model, loss, params, data, key, settings, ...
        ...
        return {"ratio": value}  # numbers, Estimate / Eigenvalues, or a dict of them

and adds its name to ``measure.quantities``; its value lands in ``record.extra[name]``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import curvature as cv
from curvature.operators import apply_rows
from experiments import train
from experiments.errors import ConfigError
from experiments.record import (
    Blocks,
    Correlation,
    Density,
    Diagonal,
    Eigenvalues,
    Estimate,
    Fisher,
    Frobenius,
    GaussNewton,
    GradientNoise,
    OptimizerState,
    Record,
)
from experiments.registry import Registry


class MeasurementFailed(RuntimeError):
    """A measurement could not be taken (a non-finite loss or matvec); the member stops."""


@dataclasses.dataclass(frozen=True)
class Measurement:
    """``fn(ctx)`` returns the value of record field ``field`` (``None``: a user measurement,
    kept in ``record.extra``); ``defaults`` are its settings; ``check(settings, ctx_info)``
    returns an error message for settings that cannot run, or ``None``."""

    fn: Callable[[Context], Any]
    defaults: dict
    check: Callable[[Any, dict], str | None] | None = None
    field: str | None = None
    doc: str = ""


MEASUREMENTS: Registry[Measurement] = Registry("measurement", "measure.quantities")


def register_measurement(
    name: str,
    fn: Callable | None = None,
    *,
    defaults: dict | None = None,
    check: Callable | None = None,
    replace: bool = True,
):
    """Register ``fn(ctx)`` as measurement ``name`` (usable as a decorator).

    ``defaults`` become the config section ``measure.<name>`` of configs made afterwards by
    :func:`experiments.config.base_config` (register before calling it). A user measurement may be
    registered again (a config file loaded twice), replacing the first."""

    def add(fn):
        field = name if name in _RECORD_FIELDS else None
        MEASUREMENTS.register(
            name,
            Measurement(fn, dict(defaults or {}), check, field, (fn.__doc__ or "").strip()),
            replace=replace,
        )
        return fn

    return add if fn is None else add(fn)


_RECORD_FIELDS = {f.name for f in dataclasses.fields(Record)}


def measurement_key(seed: int, step: int, name: str) -> jax.Array:
    """The PRNG key of measurement ``name`` at ``step``: a function of the seed, the step and the
    name alone, so members that share a seed share their probes, a resumed run draws the same
    ones, and ``trace`` and ``gauss_newton`` (which asks for the ``"trace"`` key) share probes."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 2), step)
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


@dataclasses.dataclass
class Context:
    """What a measurement sees: the member's pure ``model(params, batch)`` and
    ``loss(params, batch)``, its ``params`` and ``opt_state`` at this step, the measurement set
    ``data`` (with its ``activation`` column), the member's resolved ``config``, this measurement's
    ``settings``, the plan, and ``key_for(name)``. ``spectra`` collects arrays saved in the step's
    spectra file; ``hessian()`` / ``gauss_newton()`` build the operators once per measurement."""

    model: Callable
    loss: Callable
    params: Any
    opt_state: Any
    data: dict
    config: Any
    seed: int
    step: int
    plan: tuple[str, ...]
    settings: Any = None
    spectra: dict = dataclasses.field(default_factory=dict)
    _cache: dict = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> jax.Array:
        return self.key_for(self._name)

    _name: str = ""

    def key_for(self, name: str) -> jax.Array:
        return measurement_key(self.seed, self.step, name)

    @property
    def batch_size(self) -> int | None:
        return self.config.measure.batch_size or None

    def cached(self, name: str, make: Callable):
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]

    def hessian(self) -> cv.LinearOperator:
        return self.cached(
            "H",
            lambda: cv.hessian(
                self.loss, self.params, self.data, batch_size=self.batch_size, check=False
            ),
        )

    def gauss_newton(self) -> cv.LinearOperator:
        from experiments import models

        output_loss = models.LOSSES.get(self.config.train.loss).gauss_newton
        return self.cached(
            "G",
            lambda: cv.gauss_newton(
                self.model,
                self.params,
                self.data,
                loss=output_loss,
                batch_size=self.batch_size,
                check=False,
            ),
        )

    def section(self, name: str):
        return getattr(self.config.measure, name)


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


@functools.partial(jax.jit, static_argnames="num_matvecs")
def _shared_traces(H, G, key, *, num_matvecs):
    """Hutch++ traces of H, G and R = H - G that share one sketch (of H) and one set of probes.

    For a sketch basis Q fixed before the probes are drawn, Hutch++ is linear in the operator,
    so the three estimates satisfy tr R = tr H - tr G exactly and each is unbiased, with a
    standard error from its own probe samples. tr H is the number ``cv.trace(H, key=key)``
    gives (the same sketch and probes). Cost: ``num_matvecs`` products with H and two thirds
    as many with G, where three separate runs would take twice as many of each.
    """
    H, G = H.prepared(), G.prepared()
    n, dtype = H.size, H.dtype
    sketch = num_matvecs // 3
    key_s, key_g = jax.random.split(key)
    s = cv.rademacher(key_s, (sketch, n), dtype)
    q, _ = jnp.linalg.qr(apply_rows(H, s).T)  # (n, sketch): the top of H's range
    exact_h, exact_g = (jnp.sum(q.T * apply_rows(op, q.T)) for op in (H, G))
    g = cv.rademacher(key_g, (num_matvecs - 2 * sketch, n), dtype)
    g = g - (g @ q) @ q.T
    samples_h = jnp.sum(g * apply_rows(H, g), axis=1)
    samples_g = jnp.sum(g * apply_rows(G, g), axis=1)
    parts = ((exact_h, samples_h), (exact_g, samples_g), (exact_h - exact_g, samples_h - samples_g))
    return [(exact + jnp.mean(x), jnp.std(x, ddof=1) / jnp.sqrt(x.shape[0])) for exact, x in parts]


def _traces(ctx: Context, matvecs: int) -> tuple[Estimate, Estimate, Estimate]:
    """tr H, tr G, tr R from :func:`_shared_traces`, once per measurement."""

    def run():
        parts = _shared_traces(
            ctx.hessian(), ctx.gauss_newton(), ctx.key_for("trace"), num_matvecs=matvecs
        )
        return tuple(_finite(Estimate(float(v), float(se), matvecs), "trace") for v, se in parts)

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


@functools.partial(jax.jit, static_argnames="num_probes")
def _shared_frobenius(H, G, key, *, num_probes):
    # The probes of cv.frobenius_norm_squared(op, key=key), so the same numbers; R z = H z - G z
    # reuses the two products instead of paying for both again.
    H, G = H.prepared(), G.prepared()
    z = cv.rademacher(key, (num_probes, H.size), H.dtype)
    hz, gz = apply_rows(H, z), apply_rows(G, z)
    out = []
    for products in (hz, gz, hz - gz):
        sq = jnp.sum(products**2, axis=1)
        out.append((jnp.mean(sq), jnp.std(sq, ddof=1) / jnp.sqrt(num_probes)))
    return out


@register_measurement("frobenius", defaults={"probes": 16}, check=_at_least(2, "probes"))
def _frobenius(ctx: Context) -> Frobenius:
    """‖H‖F², ‖G‖F², ‖R‖F² from shared Rademacher probes, so their ratios are tight (two
    matvecs a probe: R z = H z - G z)."""
    m = ctx.settings.probes
    parts = _shared_frobenius(ctx.hessian(), ctx.gauss_newton(), ctx.key_for("fro"), num_probes=m)
    return Frobenius(*(_finite(Estimate(float(v), float(se), m), "frobenius") for v, se in parts))


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


@functools.partial(jax.jit, static_argnames="num_matvecs")
def _diagonal_and_mean(H, key, *, num_matvecs):
    # The probes and numbers of cv.diagonal(H, key=key), and the per-probe means z^T H z / n for
    # the error bar of the diagonal's mean (its entries share probes, so they are correlated).
    H = H.prepared()
    z = cv.rademacher(key, (num_matvecs, H.size), H.dtype)
    products = z * apply_rows(H, z)
    per_probe = jnp.mean(products, axis=1)
    root_m = jnp.sqrt(num_matvecs)
    return (
        jnp.mean(products, axis=0),
        jnp.std(products, axis=0, ddof=1) / root_m,
        jnp.mean(per_probe),
        jnp.std(per_probe, ddof=1) / root_m,
    )


def _hessian_diagonal(ctx: Context, matvecs: int, exact: bool):
    """``(diagonal, per-entry SE, Estimate of its mean)``, once per measurement and settings."""

    def run():
        H = ctx.hessian()
        if exact:  # n matvecs with the unit vectors, never the n x n matrix
            diag = np.asarray(cv.diagonal(H, method="exact").diagonal)
            return diag, np.zeros(H.size), Estimate(float(diag.mean()), 0.0, H.size)
        d, se, mean, mean_se = _diagonal_and_mean(H, ctx.key_for("diagonal"), num_matvecs=matvecs)
        if not np.all(np.isfinite(np.asarray(d))):
            raise FloatingPointError("diagonal: a matvec returned NaN or inf")
        return np.asarray(d), np.asarray(se), Estimate(float(mean), float(mean_se), matvecs)

    return ctx.cached(("diagonal", matvecs, exact), run)


@register_measurement(
    "diagonal", defaults={"matvecs": 100, "exact": False}, check=_at_least(2, "matvecs")
)
def _diagonal(ctx: Context) -> Diagonal:
    """The Hessian diagonal: Bekas et al.'s estimator with per-entry standard errors, or with
    ``exact=True`` the exact diagonal (``curvature.diagonal(H, method="exact")``: n matvecs;
    small networks)."""
    s = ctx.settings
    diag, se, mean = _hessian_diagonal(ctx, s.matvecs, s.exact)
    ctx.spectra.update(diagonal=diag, diagonal_standard_error=se)
    negative = float(np.mean(diag < -2 * se)) if not s.exact else float(np.mean(diag < 0))
    return Diagonal(mean, negative, bool(s.exact))


@register_measurement(
    "fisher",
    defaults={"k": 5, "lanczos_steps": 40, "trace_matvecs": 30},
    check=lambda s, info: _steps_check()(s, info) or _at_least(4, "trace_matvecs")(s, info),
)
def _fisher(ctx: Context) -> Fisher:
    """The empirical Fisher (``curvature.empirical_fisher``) on the measurement set: its top
    eigenvalues (Lanczos) and its trace (Hutch++)."""
    s = ctx.settings
    F = ctx.cached(
        "F",
        lambda: cv.empirical_fisher(
            ctx.loss, ctx.params, ctx.data, batch_size=ctx.batch_size, check=False
        ),
    )
    top = cv.eigsh(F, k=s.k, which="LA", num_steps=s.lanczos_steps, key=ctx.key_for("fisher"))
    trace = cv.trace(F, num_matvecs=s.trace_matvecs, key=ctx.key_for("fisher_trace"))
    return Fisher(_eigen(top), _estimate(trace))


@register_measurement(
    "blocks", defaults={"probes": 16, "trace_matvecs": 30}, check=_at_least(2, "probes")
)
def _blocks(ctx: Context) -> Blocks:
    """The curvature by layer (``curvature.block_summary`` of H, G and R = H - G, layers from
    ``curvature.layer_groups``): per-layer traces, and the squared Frobenius norm of every
    same-layer and cross-layer block, with standard errors."""
    s = ctx.settings
    H, G = ctx.hessian(), ctx.gauss_newton()
    out = {}
    for name, op in (("hessian", H), ("gauss_newton", G), ("residual", H - G)):
        out[name] = cv.block_summary(
            op,
            key=ctx.key_for("blocks"),
            probes=s.probes,
            trace_matvecs=s.trace_matvecs,
            lanczos_steps=0,
            params=ctx.params,
        )
    first = out["hessian"]

    def table(x):
        return tuple(tuple(float(v) for v in row) for row in np.asarray(x))

    return Blocks(
        names=tuple(first.names),
        sizes=tuple(int(v) for v in first.sizes),
        trace={k: tuple(float(v) for v in b.trace) for k, b in out.items()},
        trace_se={k: tuple(float(v) for v in b.trace_se) for k, b in out.items()},
        frobenius_sq={k: table(b.frobenius_sq) for k, b in out.items()},
        frobenius_sq_se={k: table(b.frobenius_sq_se) for k, b in out.items()},
    )


def _correlation(a: np.ndarray, b: np.ndarray, zero: np.ndarray) -> Correlation:
    from scipy import stats

    keep = ~zero
    if keep.sum() < 3:
        return Correlation(float("nan"), float("nan"), int(keep.sum()), int(zero.sum()))
    pearson = float(np.corrcoef(a[keep], b[keep])[0, 1])
    spearman = float(stats.spearmanr(a[keep], b[keep]).statistic)
    return Correlation(pearson, spearman, int(keep.sum()), int(zero.sum()))


def _optimizer_state_check(settings, info):
    optimizer = info.get("optimizer")
    if optimizer is not None and train.OPTIMIZERS.get(optimizer).second_moment is None:
        adaptive = [n for n, o in train.OPTIMIZERS.items() if o.second_moment is not None]
        return f"needs an optimizer with a second moment ({', '.join(adaptive)}), not {optimizer!r}"
    return _at_least(2, "diagonal_matvecs")(settings, info)


@register_measurement(
    "optimizer_state",
    defaults={"diagonal_matvecs": 100, "exact": False},
    check=_optimizer_state_check,
)
def _optimizer_state(ctx: Context) -> OptimizerState | None:
    """Adam / RMSProp's bias-corrected second moment ν against the Hessian diagonal: Pearson and
    Spearman over parameters (exact zeros of the diagonal excluded and counted), overall and per
    layer; and √ν, what the update divides by, against |diag H|."""
    s = ctx.settings
    if ctx.step == 0:
        return None  # no gradient seen yet: the bias-corrected moment is 0/0
    nu_tree = train.OPTIMIZERS.get(ctx.config.train.optimizer).second_moment(ctx.opt_state)
    diag, _, _ = _hessian_diagonal(ctx, s.diagonal_matvecs, s.exact)
    layout = cv.Layout.of(ctx.params)
    nu = np.asarray(layout.ravel(nu_tree))
    zero = diag == 0.0
    ctx.spectra["second_moment"] = nu
    per_layer = {}
    offset = 0
    paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(ctx.params)[0]
    ]
    for path, size in zip(paths, layout.sizes, strict=True):
        part = slice(offset, offset + size)
        per_layer[path] = _correlation(nu[part], diag[part], zero[part])
        offset += size
    return OptimizerState(
        _correlation(nu, diag, zero),
        _correlation(np.sqrt(nu), np.abs(diag), zero),
        per_layer,
    )


@register_measurement(
    "gradient_noise",
    defaults={"num_examples": 256, "chunk": 32},
    check=_at_least(2, "num_examples,chunk"),
)
def _gradient_noise(ctx: Context) -> GradientNoise:
    """Per-example gradient noise on the first ``num_examples`` of the measurement set:
    ``tr Σ`` (unbiased) and B_simple = tr Σ / |ḡ|² (McCandlish et al. 2018)."""
    s = ctx.settings
    m = min(s.num_examples, len(ctx.data["y"]))
    sums = _per_example_sums(ctx.loss, s.chunk)(
        ctx.params, jax.tree_util.tree_map(lambda v: v[:m], ctx.data)
    )
    total, squares = (np.asarray(x, np.float64) for x in sums)
    mean = total / m
    mean_sq = float(mean @ mean)
    trace_cov = float((squares - m * mean_sq) / (m - 1))
    return GradientNoise(
        trace_cov, mean_sq, trace_cov / mean_sq if mean_sq > 0 else float("inf"), m
    )


_PER_EXAMPLE: dict = {}


def _per_example_sums(loss, chunk: int):
    """A compiled ``(params, data) -> (Σ g_i, Σ |g_i|²)`` over examples, ``chunk`` at a time."""
    if (loss, chunk) in _PER_EXAMPLE:
        return _PER_EXAMPLE[(loss, chunk)]

    def one(params, example):
        g = jax.grad(loss)(params, jax.tree_util.tree_map(lambda v: v[None], example))
        return cv.Layout.of(params).ravel(g)

    @jax.jit
    def sums(params, data):
        m = len(data["y"])
        full, rest = divmod(m, chunk)
        per = jax.vmap(one, in_axes=(None, 0))

        def body(carry, block):
            g = per(params, block)
            return (carry[0] + g.sum(0), carry[1] + jnp.sum(g * g)), None

        n = cv.Layout.of(params).size
        dtype = cv.Layout.of(params).dtype
        wide = jnp.promote_types(dtype, jnp.float32)
        init = (jnp.zeros(n, wide), jnp.zeros((), wide))
        carry = init
        if full:
            blocks = jax.tree_util.tree_map(
                lambda v: v[: full * chunk].reshape((full, chunk) + v.shape[1:]), data
            )
            carry, _ = jax.lax.scan(body, init, blocks)
        if rest:
            carry, _ = body(carry, jax.tree_util.tree_map(lambda v: v[full * chunk :], data))
        return carry

    _PER_EXAMPLE[(loss, chunk)] = sums
    return sums


# --------------------------------------------------------------------------------------------
# One measurement.


def check_plan(config, info: dict) -> None:
    """Raise :class:`ConfigError` for an unknown name in the plan or settings that cannot run.
    ``info`` may hold ``num_params`` and ``optimizer``."""
    plan = tuple(config.measure.quantities)
    for name in plan:
        entry = MEASUREMENTS.get(name)
        if entry.check is None:
            continue
        settings = getattr(config.measure, name, None)
        message = entry.check(settings, info)
        if message:
            raise ConfigError(f"config key measure.{name}: {message}")
    if len(set(plan)) != len(plan):
        raise ConfigError(f"config key measure.quantities: duplicates in {plan}")


def measure(ctx: Context, *, test_data: dict, member: str, fingerprint: str) -> tuple[Record, dict]:
    """Every quantity of the plan at ``ctx.step``: ``(record, spectra arrays)``.

    Raises :class:`MeasurementFailed` when the loss on the measurement set is not finite or an
    estimator meets a non-finite matvec."""
    timings = {}
    t0 = time.perf_counter()
    evaluate = train.evaluator(ctx.loss, ctx.model)
    loss, accuracy, grad_norm = jax.block_until_ready(evaluate(ctx.params, ctx.data))
    test_loss, test_accuracy, _ = evaluate(ctx.params, test_data)
    timings["evaluate"] = time.perf_counter() - t0
    if not np.isfinite(float(loss)):
        raise MeasurementFailed(f"the loss on the measurement set is {float(loss)}")
    fields, extra = {}, {}
    for name in ctx.plan:
        entry = MEASUREMENTS.get(name)
        ctx.settings = getattr(ctx.config.measure, name, None)
        ctx._name = name
        t0 = time.perf_counter()
        try:
            value = jax.block_until_ready(entry.fn(ctx))
        except FloatingPointError as err:
            raise MeasurementFailed(f"{name}: {err}") from None
        except Exception as err:  # noqa: BLE001
            if entry.field is not None:
                raise  # a built-in measurement's error is a bug to see whole
            raise MeasurementFailed(
                f"the registered measurement {name!r} raised {type(err).__name__}: {err}"
            ) from err
        timings[name] = time.perf_counter() - t0
        if entry.field is not None:
            fields[entry.field] = value
        else:
            extra[name] = _plain(value)
    train_cfg = ctx.config.train
    record = Record(
        step=ctx.step,
        member=member,
        fingerprint=fingerprint,
        train_loss=float(loss),
        train_accuracy=float(accuracy),
        test_loss=float(test_loss),
        test_accuracy=float(test_accuracy),
        grad_norm=float(grad_norm),
        learning_rate=float(train_cfg.learning_rate),
        edge_of_stability=train.edge_of_stability(train_cfg),
        extra=extra,
        timings=timings,
        **fields,
    )
    return record, dict(ctx.spectra)


def warm_up(
    make_context: Callable[[], Context],
    plan: tuple[str, ...],
    workers: int,
    extra: tuple[Callable[[], Any], ...] = (),
    *,
    x64: bool = False,
) -> None:
    """Compile every measurement of ``plan`` at once, one measurement a thread, by taking it on
    ``make_context()`` and discarding the result. XLA compiles distinct programs in parallel
    (it releases the GIL), where the members' first measurements would compile them one after
    another; the members then find every program compiled."""
    import concurrent.futures

    def one(name):
        ctx = make_context()
        ctx.plan, ctx._name = plan, name
        ctx.settings = getattr(ctx.config.measure, name, None)
        jax.block_until_ready(MEASUREMENTS.get(name).fn(ctx))

    def guarded(fn, *args):
        # x64 is per thread; an error here is the members' to report, with their step and name.
        with jax.enable_x64(x64):
            try:
                fn(*args)
            except Exception:  # noqa: BLE001
                pass

    # The costliest first, so that the threads finish together.
    order = sorted(plan, key=lambda n: n not in ("gauss_newton", "density", "frobenius"))
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(guarded, one, name) for name in order]
        futures += [pool.submit(guarded, f) for f in extra]
        for f in futures:
            f.result()


def _plain(value):
    """A user measurement's value as JSON: numbers, arrays as lists, dataclasses as dicts."""
    if dataclasses.is_dataclass(value):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray | jax.Array | np.generic):
        array = np.asarray(value)
        return array.item() if array.ndim == 0 else array.tolist()
    return value

"""The ``approximations`` measurement: how close the usual curvature approximations come to the
Hessian H and to its Gauss-Newton part G along training (issue 18, item 6).

A ReLU network's residual R = H − G has no same-layer part, a smooth network's has most of it
within layers; a block-diagonal approximation of G (K-FAC) therefore misses none of a ReLU
network's same-layer curvature beyond its Kronecker factorisation, and R's same-layer part of
a smooth one's. At each measured step every approximation Â in ``which`` is compared with H
and with G, with the numbers of :func:`curvature.compare` (its keys, so equal to what
``compare(A, Â, key=key_for("approximations"), ...)`` returns, up to round-off): the overlap
of the top-``k`` eigenspaces (mean squared cosine of the principal angles: 1 the same, k/n at
random), the relative Frobenius error ‖A − Â‖F / ‖A‖F with its standard error, and, for the
approximations in ``conditioned``, the condition number λmax / λmin of
(Â + λI)^-1/2 (G + λI) (Â + λI)^-1/2 (how well Â + λI preconditions G + λI; 1 is perfect) next
to that of G + λI alone, λ = ``damping`` × λmax(G). H is indefinite: no conditioning against
it. All approximations share the probes and start vectors, and so do members that share a seed.

The approximations (:data:`BUILDERS`, by name: a list to extend):

* ``kfac``: K-FAC of G (Martens & Grosse 2015), :func:`curvature.kfac` with the run's output
  loss and its exact Hessian; ``kfac_mc``: with ``num_samples`` Monte Carlo targets per
  example; ``ekfac``: K-FAC's eigenbases with refitted eigenvalues (George et al. 2018,
  :func:`curvature.ekfac`);
* ``empirical_fisher``: the empirical Fisher F = J^T J / N of the measurement set, from its
  per-example gradients J (N × n floats, formed once a step);
* ``diagonal_ggn``: the exact diagonal of G;
* ``second_moment``: the optimizer's second moment ν̂ (bias-corrected for Adam) times the
  training batch size B (the measurement set's size for full-batch training), diag(B ν̂): the
  running mean of squared minibatch gradients scaled to one example's, which estimates the
  empirical Fisher's diagonal where the mean gradient is small against its spread. Only for an
  optimizer with a second moment (Adam, RMSProp) and after step 0 (ν̂ is 0/0 before the first
  gradient); elsewhere it is left out of the record, not an error (a ``which`` of it alone is
  refused for other optimizers). Full-batch training has no minibatch noise: its B ν̂ is a
  running N g², no curvature estimate (the overlap, which is scale-free, still reads).

``low_rank_plus_diagonal`` (a top eigenspace plus a diagonal) is not in the library yet.

K-FAC needs the model's dense layers, which :func:`curvature.kfac` finds in its computation. A
run that shares one compiled program among its activations picks the activation with a
``lax.switch``, inside which they are not found: K-FAC sees the member's activation alone (the
same network, the branch the switch takes). The approximations with an eigendecomposition by
structure (Kronecker eigenbases, diagonals) give their top eigenpairs exactly; the empirical
Fisher's come from Lanczos.

Cost per step: building the approximations (K-FAC: a forward and, per output, a backward pass
per example; EK-FAC twice that; G's diagonal as many; the empirical Fisher one gradient per
example), two Lanczos runs of H and G (``num_steps + k + check_steps`` matvecs each),
``num_matvecs`` products of H and G on the shared probes, and for the conditioning one Lanczos
run of G per approximation in ``conditioned`` plus one (``2 condition_steps + 2`` matvecs
each). The approximations' own products cost no pass over the data. About 4 s a step with the
defaults on the 3,466 parameters and 1,348 digits of ``configs/approximations.py`` (6 s with
its 100 probes and two conditionings), on one core of a shared 2-core CPU; the compiled
programs serve every member of a run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

import curvature as cv
from experiments import models
from experiments.figures import approximations as figure
from experiments.measurements.base import Context, Measurement, at_least, steps_check
from experiments.optimizers import OPTIMIZERS
from experiments.record import Eigenvalues, Estimate
from experiments.table import Column


@dataclasses.dataclass(frozen=True)
class Match:
    """An approximation Â against a reference A (``curvature.compare``): ``overlap`` of their
    top-k eigenspaces (1 the same, k/n at random), ``relative_error`` ‖A − Â‖F / ‖A‖F with its
    standard error; against G, for an approximation in ``conditioned``, ``condition`` = λmax /
    λmin of (Â + λI)^-1/2 (G + λI) (Â + λI)^-1/2 (1: a perfect preconditioner) and ``ends``,
    those two eigenvalues with their residuals and convergence (else ``None``)."""

    overlap: float
    relative_error: Estimate
    condition: float | None = None
    ends: Eigenvalues | None = None


@dataclasses.dataclass(frozen=True)
class Approximation:
    """One approximation: its own top-k eigenvalues, its match with H and with G, and the dense
    layers that K-FAC found (empty for the others)."""

    top: Eigenvalues
    hessian: Match
    gauss_newton: Match
    layers: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Approximations:
    """The approximations of one step against H and G (``approximations`` by name, in the order
    of the setting ``which``), the references' top-k eigenvalues, the damping λ of the
    conditioning (``damping`` × λmax(G)) and the condition number of G + λI alone, with its
    ends."""

    hessian: Eigenvalues
    gauss_newton: Eigenvalues
    damping: float
    reference_condition: float | None  # None: none conditioned
    reference_ends: Eigenvalues | None
    approximations: dict[str, Approximation]


# --------------------------------------------------------------------------------------------
# The approximations, by name: each builds its operator at this step, or None where it does not
# exist (the second moment of a method without one).


_MODELS: dict = {}


def _member_model(ctx: Context) -> Callable:
    """The member's model with its activation alone. A run that shares one compiled program
    among its activations picks the activation with a ``lax.switch``, inside which
    ``curvature.kfac`` finds no dense layer: K-FAC sees the same network (the same parameters,
    the branch the switch would take) without it. Built once per architecture and activation."""
    cfg = ctx.config
    first = {k: v[:1] for k, v in ctx.data.items()}
    outputs = jax.eval_shape(ctx.model, ctx.params, first).shape[-1]
    shape = tuple(ctx.data["x"].shape[1:])
    found = (cfg.model.to_json_best_effort(), tuple(cfg.activations), shape, outputs)
    if found not in _MODELS:
        build = models.MODELS.get(cfg.model.kind)
        model_cfg = models.resolved(cfg.model, ctx.data["y"].ndim)
        # Its structure alone (nnx.eval_shape: no parameters drawn): they are the member's.
        module = nnx.eval_shape(
            lambda: build(model_cfg, tuple(cfg.activations), shape, outputs, nnx.Rngs(params=0))
        )
        graphdef, _, rest = nnx.split(module, nnx.Param, ...)
        rest = jax.tree_util.tree_structure(rest)
        _MODELS[found] = models.pure_functions(graphdef, rest, cfg.train.loss)[0]
    return _MODELS[found]


def _kfac(fisher: str, eigenvalue_corrected: bool = False):
    def build(ctx: Context):
        s = ctx.settings
        make = cv.ekfac if eigenvalue_corrected else cv.kfac
        return make(
            _member_model(ctx),
            ctx.params,
            ctx.data,
            loss=models.LOSSES.get(ctx.config.train.loss).gauss_newton,
            batch_size=ctx.batch_size,
            fisher=fisher,
            num_samples=s.num_samples,
            key=ctx.key_for("approximations/kfac_mc") if fisher == "mc" else None,
            check=False,
        )

    return build


def _empirical_fisher(ctx: Context):
    """F = J^T J / N from the per-example gradients J (N x n floats, formed once a step): a
    product is two matrix products, and one compiled program serves every member."""
    per_example = cv.per_example_gradients(ctx.loss, ctx.params, ctx.data)
    gradients = jax.vmap(lambda g: ravel_pytree(g)[0])(per_example)

    def fisher(v):
        flat, unravel = ravel_pytree(v)
        return unravel(gradients.T @ (gradients @ flat) / gradients.shape[0])

    return cv.from_function(fisher, like=ctx.params)


def _diagonal_ggn(ctx: Context):
    G = ctx.gauss_newton()
    return cv.from_diagonal(cv.diagonal(G, method="exact").diagonal, like=G)


def _second_moment(ctx: Context):
    moment = OPTIMIZERS.get(ctx.config.train.optimizer).second_moment
    if moment is None or ctx.step == 0:
        return None
    nu = ctx.hessian().ravel(moment(ctx.opt_state))
    scale = ctx.config.train.batch_size or len(ctx.data["y"])
    return cv.from_diagonal(scale * nu, like=ctx.hessian())


BUILDERS: dict[str, Callable[[Context], cv.LinearOperator | None]] = {
    "kfac": _kfac("exact"),
    "kfac_mc": _kfac("mc"),
    "ekfac": _kfac("exact", eigenvalue_corrected=True),
    "empirical_fisher": _empirical_fisher,
    "diagonal_ggn": _diagonal_ggn,
    "second_moment": _second_moment,
}
"""``name -> build(ctx)``: the operator of an approximation at this step, or ``None`` where it
does not exist there (``second_moment`` of a method without one, or at step 0)."""

PRECONDITIONERS = ("kfac", "kfac_mc", "ekfac", "diagonal_ggn", "second_moment")
"""The approximations with an exact damped inverse square root (Kronecker eigenbases,
diagonals), whose conditioning of G the setting ``conditioned`` may ask for."""


def _structured(op: cv.LinearOperator, scale=1.0) -> cv.LinearOperator:
    """``scale · op`` in a form whose compiled programs every approximation of its kind shares:
    K-FAC in its Kronecker eigenbasis (the Monte Carlo one and EK-FAC too: their static labels
    differ; and without where the layers sat in the model's computation, which differs between
    activations), diagonals under one name. Scaling by 1 / λmax(G) makes the relative damping the same
    number at every step: K-FAC's damped powers name their damping in their static label, and
    would compile anew for every damping."""
    if isinstance(op, cv.KFAC):
        op = op.eigen()
    if isinstance(op, cv.KroneckerEigen):
        # Where each layer sat in the model's computation differs between activations (a GELU
        # has more equations than a ReLU) and is static: products need only the weights' places.
        layers = tuple(dataclasses.replace(layer, dot=(), output=()) for layer in op.layers)
        return cv.KroneckerEigen(
            op.bases,
            tuple(v * scale for v in op.values),
            op.diagonal * scale,
            op.layout,
            layers,
            op.rest_leaves,
        )
    if isinstance(op, cv.Diagonal):
        return cv.from_diagonal(op.exact_diagonal() * scale, like=op)
    return op if scale == 1.0 else op * scale


def _exact_top(op: cv.LinearOperator, k: int):
    """``(values, projector)`` for an operator whose structure gives its eigendecomposition
    (:func:`_structured`'s Kronecker eigenbases, a diagonal): its ``k`` largest eigenvalues,
    exactly, and the orthogonal projector onto their eigenvectors, as an operator of its own
    kind; ``None`` for other operators (Lanczos finds theirs). No Lanczos run to compile."""
    if isinstance(op, cv.KroneckerEigen):
        pieces = [*op.values, op.diagonal]
    elif isinstance(op, cv.Diagonal):
        pieces = [op.exact_diagonal()]
    else:
        return None
    values = np.concatenate([np.asarray(v, np.float64).ravel() for v in pieces])
    order = np.argsort(-values, kind="stable")[:k]
    chosen = np.zeros(values.size, op.dtype)
    chosen[order] = 1.0
    parts = np.split(chosen, np.cumsum([np.size(v) for v in pieces])[:-1])
    parts = [jnp.asarray(part.reshape(np.shape(v))) for part, v in zip(parts, pieces, strict=True)]
    if isinstance(op, cv.Diagonal):
        return values[order], cv.from_diagonal(parts[0], like=op)
    projector = cv.KroneckerEigen(
        op.bases, tuple(parts[:-1]), parts[-1], op.layout, op.layers, op.rest_leaves
    )
    return values[order], projector


def _eigenvalues(result: cv.EigshResult, scale: float = 1.0) -> Eigenvalues:
    """The record of Ritz pairs of ``op / scale`` from those of ``op``."""
    return Eigenvalues(
        tuple(float(v) / scale for v in np.asarray(result.eigenvalues)),
        tuple(float(v) / scale for v in np.asarray(result.residual_norms)),
        tuple(bool(c) for c in np.asarray(result.converged)),
        int(result.num_matvecs),
    )


@cv.operator_type
class _Congruence(cv.LinearOperator):
    """``S A S``: ``A`` preconditioned by ``S = (Â + λI)^-1/2`` (as ``curvature.compare``)."""

    root: cv.LinearOperator
    inner: cv.LinearOperator

    @property
    def layout(self) -> cv.Layout:
        return self.inner.layout

    def apply(self, v):
        return self.root.apply(self.inner.apply(self.root.apply(v)))

    def prepared(self):
        return _Congruence(self.root.prepared(), self.inner.prepared())


def _relative_error(difference, reference) -> Estimate:
    """``sqrt(‖A − Â‖F² / ‖A‖F²)`` with ``curvature.compare``'s delta-method standard error."""
    d, d_se = float(difference.value), float(difference.standard_error)
    a, a_se = float(reference.value), float(reference.standard_error)
    if not (math.isfinite(d) and math.isfinite(a) and a > 0):
        raise FloatingPointError(f"approximations: ‖A‖F² estimated at {a}, ‖A − Â‖F² at {d}")
    error = math.sqrt(max(d, 0.0) / a)
    if d > 0:
        se = 0.5 * error * math.hypot(d_se / d, a_se / a)
    else:
        se = math.sqrt(d_se / a)
    return Estimate(error, se, int(difference.num_matvecs))


def _ratio(ends: cv.EigshResult) -> float:
    top, bottom = float(ends.eigenvalues[0]), float(ends.eigenvalues[-1])
    return top / bottom if bottom > 0 else math.nan


def _finite_top(result: cv.EigshResult, what: str) -> cv.EigshResult:
    if not np.all(np.isfinite(np.asarray(result.eigenvalues))):
        raise FloatingPointError(
            f"approximations: the Lanczos run of {what} met a non-finite matvec"
        )
    return result


def approximations(ctx: Context) -> Approximations | None:
    """Each approximation in ``which`` (K-FAC, its Monte Carlo and eigenvalue-corrected forms,
    the empirical Fisher, G's diagonal, the optimizer's second moment) against H and G, with
    ``curvature.compare``'s numbers (its keys, from ``key_for("approximations")``): the
    overlap of the top-k eigenspaces, the relative Frobenius error ± SE, and for those in
    ``conditioned`` the condition number of G + λI preconditioned by Â + λI, λ = damping ×
    λmax(G). Every approximation on the same start vectors and probes. ``None`` when none
    exists at this step (only ``second_moment`` asked for, at step 0).
    Cost: the approximations' construction, two Lanczos runs (H, G), num_matvecs products of
    each, and 2 condition_steps products of G per conditioned approximation, plus as many once;
    about 4 s a step with the defaults on the study's 3,466-parameter MLP and 1,348 digits."""
    s = ctx.settings
    ops = {name: BUILDERS[name](ctx) for name in s.which}
    ops = {name: op for name, op in ops.items() if op is not None}
    if not ops:
        return None  # only the second moment asked for, and none yet
    key = ctx.key_for("approximations")
    H, G = ctx.hessian(), ctx.gauss_newton()
    forms = {name: _structured(op) for name, op in ops.items()}
    names = tuple(forms)
    # curvature.compare's keys: folded with 0 the reference's Lanczos run, 1 the
    # approximation's, 2 the Frobenius probes, 3 and 4 the ends of the conditioning.
    lanczos = {"k": s.k, "num_steps": s.num_steps}
    top_h = _finite_top(cv.eigsh(H, key=jax.random.fold_in(key, 0), **lanczos), "H")
    top_g = _finite_top(cv.eigsh(G, key=jax.random.fold_in(key, 0), **lanczos), "G")
    # The references' top eigenspaces, orthonormal: overlaps are squared norms of projections.
    bases = jnp.concatenate([jnp.linalg.qr(t.eigenvectors)[0] for t in (top_h, top_g)], axis=1)
    tops, overlaps = {}, {}
    for name, op in forms.items():
        exact = _exact_top(op, s.k)
        if exact is None:
            found = cv.eigsh(op, key=jax.random.fold_in(key, 1), **lanczos)
            tops[name] = _eigenvalues(_finite_top(found, name))
            overlaps[name] = tuple(
                float(cv.subspace_overlap(t.eigenvectors, found.eigenvectors))
                for t in (top_h, top_g)
            )
        else:
            values, projector = exact
            tops[name] = Eigenvalues(
                tuple(float(v) for v in values), (0.0,) * len(values), (True,) * len(values)
            )
            projected = np.asarray(projector @ bases, np.float64) ** 2
            overlaps[name] = (
                float(projected[:, : s.k].sum() / s.k),
                float(projected[:, s.k :].sum() / s.k),
            )
    norms = cv.frobenius_norm_squared(
        (*(H - forms[n] for n in names), H, *(G - forms[n] for n in names), G),
        num_matvecs=s.num_matvecs,
        key=jax.random.fold_in(key, 2),
    )
    on_h, on_g = norms[: len(names) + 1], norms[len(names) + 1 :]
    # The conditioning at unit scale, λmax(G) = 1, so that the damping is the same number at
    # every step (K-FAC's damped powers name it in their static label: compiled once).
    lam = float(top_g.eigenvalues[0])
    if not lam > 0:
        raise FloatingPointError(f"approximations: λmax(G) is {lam}; nothing to damp against")
    unit = G * jnp.asarray(1.0 / lam, G.dtype)
    shifted = unit + cv.from_diagonal(jnp.full((G.size,), s.damping, G.dtype), like=G)
    ends = {"k": 2, "which": "BE", "num_steps": s.condition_steps}
    roots = {
        n: _structured(op, 1.0 / lam).damped_power(s.damping, -0.5)
        for n, op in ops.items()
        if n in s.conditioned
    }
    reference = None
    if roots:
        reference = _finite_top(cv.eigsh(shifted, key=jax.random.fold_in(key, 4), **ends), "G")
    out = {}
    for i, name in enumerate(names):
        condition, preconditioned = None, None
        if name in roots:
            preconditioned = cv.eigsh(
                _Congruence(roots[name], shifted), key=jax.random.fold_in(key, 3), **ends
            )
            condition = _ratio(_finite_top(preconditioned, f"G preconditioned by {name}"))
            preconditioned = _eigenvalues(preconditioned)
        out[name] = Approximation(
            top=tops[name],
            hessian=Match(overlaps[name][0], _relative_error(on_h[i], on_h[-1])),
            gauss_newton=Match(
                overlaps[name][1],
                _relative_error(on_g[i], on_g[-1]),
                condition,
                preconditioned,
            ),
            layers=tuple(layer.name for layer in getattr(ops[name], "layers", ())),
        )
    return Approximations(
        hessian=_eigenvalues(top_h),
        gauss_newton=_eigenvalues(top_g),
        damping=s.damping * lam,
        reference_condition=None if reference is None else _ratio(reference),
        reference_ends=None if reference is None else _eigenvalues(reference, 1.0 / lam),
        approximations=out,
    )


def _check(settings, info):
    which = settings.which
    if isinstance(which, str) or not isinstance(which, tuple | list) or not which:
        return f"which={which!r} must be a non-empty tuple of names: {', '.join(BUILDERS)}"
    unknown = [name for name in which if name not in BUILDERS]
    if unknown:
        return f"which: unknown approximation {unknown[0]!r}; known: {', '.join(BUILDERS)}"
    if len(set(which)) != len(which):
        return f"which={tuple(which)} has duplicates"
    optimizer = info.get("optimizer")
    if tuple(which) == ("second_moment",) and optimizer is not None:
        if OPTIMIZERS.get(optimizer).second_moment is None:
            return (
                f"which=('second_moment',) needs an optimizer with a second moment (adam, "
                f"rmsprop), not {optimizer!r}; with others it is left out of the record"
            )
    conditioned = settings.conditioned
    if isinstance(conditioned, str) or not isinstance(conditioned, tuple | list):
        return f"conditioned={conditioned!r} must be a tuple of names (empty: none)"
    for name in conditioned:
        if name not in PRECONDITIONERS:
            return (
                f"conditioned: {name!r} has no exact damped inverse square root; these have: "
                f"{', '.join(PRECONDITIONERS)}"
            )
        if name not in which:
            return f"conditioned: {name!r} is not among which={tuple(which)}"
    for check in (
        steps_check(),
        steps_check(k_key=None, steps_key="condition_steps"),
        at_least(2, "num_matvecs"),  # a standard error needs two probes
        at_least(1, "num_samples"),
    ):
        message = check(settings, info)
        if message:
            return message
    damping = settings.damping
    if not isinstance(damping, int | float) or isinstance(damping, bool) or not damping > 0:
        return f"damping={damping!r} must be a number > 0 (relative to λmax(G))"
    return None


def _get(name: str, what: Callable) -> Callable:
    def get(r):
        found = r.approximations.approximations.get(name) if r.approximations else None
        return None if found is None else what(found)

    return get


_SHORT = {
    "kfac": "K-FAC",
    "kfac_mc": "K-FAC MC",
    "ekfac": "EK-FAC",
    "empirical_fisher": "F",
    "diagonal_ggn": "diag G",
    "second_moment": "Bν",
}
_COLUMNS = [
    ("err(K-FAC,H)", _get("kfac", lambda a: a.hessian.relative_error)),
    ("err(K-FAC,G)", _get("kfac", lambda a: a.gauss_newton.relative_error)),
    ("ov(K-FAC,H)", _get("kfac", lambda a: a.hessian.overlap)),
    ("ov(K-FAC,G)", _get("kfac", lambda a: a.gauss_newton.overlap)),
    ("κ(K-FAC)", _get("kfac", lambda a: a.gauss_newton.condition)),
    ("κ(G+λI)", lambda r: r.approximations.reference_condition if r.approximations else None),
]
for _name, _short in _SHORT.items():
    if _name != "kfac":
        _COLUMNS += [
            (f"err({_short},H)", _get(_name, lambda a: a.hessian.relative_error)),
            (f"err({_short},G)", _get(_name, lambda a: a.gauss_newton.relative_error)),
        ]
_LEGEND = (
    "err(Â,H): ‖H − Â‖F/‖H‖F ± SE (shared Rademacher probes; G likewise), ov: the mean squared "
    "cosine of the principal angles between the top-k eigenspaces, κ: λmax/λmin of G + λI "
    "preconditioned by Â + λI (λ = damping × λmax(G)) and of G + λI alone; Â: K-FAC (MC: "
    "Monte Carlo targets; EK-FAC: eigenvalue-corrected), F the empirical Fisher, diag G, Bν "
    "the optimizer's second moment times the batch size (approximations measurement)"
)

APPROXIMATIONS = Measurement(
    "approximations",
    approximations,
    defaults={
        "which": tuple(BUILDERS),
        "k": 5,
        "num_steps": 40,
        "num_matvecs": 32,
        "damping": 1e-3,  # relative to λmax(G)
        # Whose conditioning of G: two Lanczos runs of G of condition_steps each (the first one
        # with G + λI alone), so one by default.
        "conditioned": ("kfac",),
        # Lanczos steps of the conditioning's ends: the smallest eigenvalue of a preconditioned
        # G converges slowly (ReLU, step 600 of the study: 40 steps gave κ = 1,234, 200 gave
        # 7,051, 400 gave 7,079).
        "condition_steps": 200,
        "num_samples": 1,  # Monte Carlo targets per example (kfac_mc)
    },
    check=_check,
    record_type=Approximations,
    columns=tuple(
        Column(
            title,
            get,
            rank=200 + i,
            legend=_LEGEND if i == 0 else "",
            explains=tuple(t for t, _ in _COLUMNS[1:]) if i == 0 else (),
        )
        for i, (title, get) in enumerate(_COLUMNS)
    ),
    figures=(figure.APPROXIMATIONS,),
    cost=2,
)

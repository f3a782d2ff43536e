"""Hessian-free optimisation (Martens 2010; Martens & Sutskever 2011, 2012) as an optax
transformation, and the conjugate-gradient solver behind it.

Each update solves the damped quadratic model of the batch loss $f$ at $\\theta$,

$$\\min_d\\ q(d) = g^T d + \\tfrac12 d^T (C + \\lambda I) d,$$

by truncated conjugate gradient (:func:`conjugate_gradient`) on $(C + \\lambda I) d = -g$, with
matrix-free curvature products: $C$ the generalised Gauss-Newton matrix (positive semi-definite;
the default, as Martens recommends) or the Hessian. Then, following Martens (2010):

* CG starts from the previous update's last CG iterate times ``warm_start`` (0.95);
* it stops by the relative-progress rule ($\\phi$ gained less than ``progress_tol`` = 5e-4 per step
  over the last $\\max(10, 0.1 i)$ steps), at ``max_cg_steps``, at ``||r|| <= cg_tol ||g||``, or
  at negative curvature (an indefinite Hessian), keeping the iterate before it; the state records
  why (``state.cg_stop``, and ``state.cg_stops`` counts every reason over the updates);
* negative curvature met at CG's first step from zero gives the preconditioned gradient
  direction $M^{-1} (-g)$, scaled to the minimum along it of the quadratic with the absolute
  curvature (the truncated-Newton rule, Nocedal & Wright 2006, Algorithm 7.1), instead of no step:
  the line search then sizes it, so undamped Hessian steps (``damping=0``) make progress at a
  saddle as well;
* backtracking: the iterates at steps $\\lceil 1.3^j \\rceil$ are kept, and from the last iterate
  backwards the first one whose predecessor has a higher batch loss is taken (one loss evaluation
  per candidate, usually two in all);
* Levenberg-Marquardt damping: with $\\rho = (f(\\theta + d) - f(\\theta)) / (q_0(d) - q_0(0))$, the
  actual over the predicted change of the *undamped* model $q_0$ (Martens & Sutskever 2012,
  section 8.5), $\\lambda$ is multiplied by ``boost`` (3/2) when $\\rho < 1/4$ and by ``drop``
  (2/3) when $\\rho > 3/4$;
* a diagonal preconditioner $M = (\\mathrm{diag} + \\lambda)^{0.75}$, with the exact Gauss-Newton
  diagonal or Adam's bias-corrected second moment of the gradients (a stand-in for Martens'
  empirical Fisher diagonal);
* an Armijo line search on the step's length (Martens & Sutskever 2012; on by default), which
  also rejects a step that does not decrease the batch loss, and a learning rate.

With ``curvature="hessian"``, ``damping=0`` and ``max_cg_steps >= n`` an update is a Newton step:
exact on a quadratic, quadratically convergent near a strict minimum.

Cost per update: the CG steps' curvature products (about 1.5 gradients each for Gauss-Newton, 2
for the Hessian; the forward pass and linearisation are shared), one more for $\\rho$, and two or
three batch losses (more when the line search shortens the step). Memory: about
``len(martens_schedule(max_cg_steps)) + 10`` vectors of length n (13 saved iterates for 50 steps).

Example:
  >>> import jax, jax.numpy as jnp, optax, curvature.optim
  >>> model = lambda w, batch: batch["x"] @ w
  >>> batch = {"x": jnp.array([[1.0, 0.0], [1.0, 2.0], [0.0, 1.0]]), "y": jnp.array([1.0, 3.0, 3.0])}
  >>> tx = curvature.optim.hessian_free(model, "mse", curvature="hessian", damping=0.0)
  >>> params = jnp.zeros(2)
  >>> state = tx.init(params)
  >>> grads = jax.grad(lambda w: 0.5 * jnp.mean((model(w, batch) - batch["y"]) ** 2))(params)
  >>> updates, state = tx.update(grads, state, params, batch=batch)
  >>> optax.apply_updates(params, updates).round(4)  # the least-squares solution, in one step
  Array([0.3333, 1.6667], dtype=float32)
  >>> int(state.cg_steps), round(float(state.reduction_ratio), 4), float(state.damping)
  (2, 1.0, 0.0)
  >>> state.cg_stop  # why CG stopped: converged, max_steps, progress, negative_curvature, ...
  'converged'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

try:
    import optax
except ImportError as error:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "curvature.optim needs optax, which `import curvature` does not: pip install optax"
    ) from error

from curvature import _cg
from curvature._cg import STOP_REASONS, CGResult, conjugate_gradient
from curvature._checks import (
    check_finite_params,
    check_float_params,
    flag,
    is_traced,
    positive_int,
    real,
)
from curvature.builders import gauss_newton, hessian
from curvature.linear_operator import Layout, LinearOperator
from curvature.losses import OutputLoss, output_loss
from curvature.stochastic_trace import diagonal

__all__ = [
    "STOP_REASONS",
    "CGResult",
    "HessianFreeState",
    "conjugate_gradient",
    "hessian_free",
]

PyTree = Any
_CURVATURES = ("gauss_newton", "hessian")
_PRECONDITIONERS = (None, "gauss_newton_diagonal", "second_moment")


class HessianFreeState(NamedTuple):
    """The state of :func:`hessian_free` (flat vectors have the raveled parameters' length n).

    Attributes:
      count: updates done.
      damping: $\\lambda$ for the next update (already adapted by the last one).
      direction: ``(n,)`` the last update's final CG iterate; the next CG starts from it times
        ``warm_start``.
      cg_steps: CG iterations in the last update.
      reduction_ratio: $\\rho$ of the last update (0 before the first).
      loss: the batch loss (with the ``l2`` penalty) at the parameters the last update started
        from.
      step_size: the line search's step of the last update (1 without a line search; 0 before
        the first update and for a rejected step).
      second_moment: ``(n,)`` Adam's EMA of squared gradients (``preconditioner="second_moment"``),
        else ``None``.
      cg_stop_reason: why the last update's CG stopped, an index into :data:`STOP_REASONS`
        (``"converged"``, ``"max_steps"``, ``"progress"``, ``"negative_curvature"``,
        ``"non_finite"``); -1 before the first update. :attr:`cg_stop` names it.
      cg_stop_counts: ``(len(STOP_REASONS),)`` how many updates' CG stopped for each reason
        (:attr:`cg_stops` as a dict): CG at ``max_cg_steps`` on every update says the budget is
        too small for the damping.
    """

    count: jax.Array
    damping: jax.Array
    direction: jax.Array
    cg_steps: jax.Array
    reduction_ratio: jax.Array
    loss: jax.Array
    step_size: jax.Array
    second_moment: jax.Array | None
    cg_stop_reason: jax.Array
    cg_stop_counts: jax.Array

    @property
    def cg_stop(self) -> str | None:
        """The last update's CG stop reason by name (``None`` before the first update)."""
        code = int(self.cg_stop_reason)
        return None if code < 0 else STOP_REASONS[code]

    @property
    def cg_stops(self) -> dict[str, int]:
        """``{reason: updates}`` over all updates so far, e.g. ``{"max_steps": 12, ...}``."""
        return dict(zip(STOP_REASONS, (int(c) for c in self.cg_stop_counts), strict=True))


@dataclasses.dataclass(frozen=True)
class _Config:
    model: Callable
    loss: OutputLoss
    curvature: str | Callable
    preconditioner: str | None
    max_cg_steps: int
    cg_tol: float | None
    progress_tol: float
    warm_start: float
    boost: float
    drop: float
    backtracking: bool
    line_search: bool
    learning_rate: float
    l2: float
    exponent: float
    beta2: float


def hessian_free(
    model: Callable[[PyTree, PyTree], jax.Array],
    loss: str | Callable[[jax.Array, PyTree], jax.Array] = "cross_entropy",
    *,
    damping: float = 1e-3,
    max_cg_steps: int = 50,
    curvature: str | Callable[[PyTree, PyTree], LinearOperator] = "gauss_newton",
    targets: str | int | Callable[[PyTree], jax.Array] | None = None,
    preconditioner: str | None = None,
    cg_tol: float | None = None,
    progress_tol: float = 5e-4,
    warm_start: float = 0.95,
    boost: float = 1.5,
    drop: float = 2 / 3,
    backtracking: bool = True,
    line_search: bool = True,
    learning_rate: float = 1.0,
    l2: float = 0.0,
    preconditioner_exponent: float = 0.75,
    second_moment_decay: float = 0.999,
    check: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Hessian-free optimisation (Martens 2010) as an optax transformation; see the module docstring.

    ``update(grads, state, params, batch=batch, curvature_batch=None)`` takes the gradients of the
    batch-mean loss (any earlier transformation in a chain may have changed them) and returns the
    step; ``batch`` is required: the curvature products and the losses that backtracking and
    $\\rho$ compare are evaluated on it (the curvature on ``curvature_batch`` if given, e.g. a
    smaller one, as Martens does). The whole update is one compiled program, also inside
    ``jax.jit``.

    Args:
      model: ``model(params, batch) -> outputs``; loss, targets: as for
        :func:`curvature.gauss_newton` (``"mse"``, ``"cross_entropy"`` or ``loss(outputs, batch)``).
      damping: the initial $\\lambda$ (0 stays 0: undamped Newton or Gauss-Newton steps).
      max_cg_steps: CG iterations per update, at most.
      curvature: ``"gauss_newton"`` or ``"hessian"`` (may be indefinite: CG stops at negative
        curvature, a first step along the gradient direction if it meets it at once, and the
        damping grows when the step does worse than predicted), or your own: a function ``(params, batch) ->`` a
        :class:`~curvature.LinearOperator` on the parameters' whole layout (e.g. built with
        :func:`~curvature.from_function`, or a combination of builders' operators), called
        inside the compiled update.
      preconditioner: ``None``, ``"gauss_newton_diagonal"`` (exact, from per-example Jacobians:
        memory of a batch's Jacobians) or ``"second_moment"``; $M = (\\mathrm{diag} + l_2 +
        \\lambda)^{\\alpha}$ with $\\alpha$ = ``preconditioner_exponent``.
      cg_tol: stop CG at ``||r|| <= cg_tol ||g||``; default ten machine epsilons (solved).
      progress_tol: Martens' relative-progress stopping rule for CG (see the module docstring).
      warm_start: CG starts from this multiple of the previous direction (``0`` starts at zero).
      boost: the damping is multiplied by ``boost`` when the reduction ratio is below 1/4.
      drop: the damping is multiplied by ``drop`` when the reduction ratio is above 3/4.
      backtracking: choose among CG's iterates the one with the lowest loss (see the module
        docstring).
      line_search: Armijo backtracking on the step size from 1 by factors 0.8 (constant 0.01, at
        most 20 tries; no acceptable step gives a zero step).
      learning_rate: scales the step.
      l2: the objective is the loss plus $\\tfrac{l_2}{2} ||\\theta||^2$: $l_2 \\theta$ is added to
        the gradients passed in, $l_2 I$ to the curvature, the penalty to the compared losses.
      second_moment_decay: Adam's $\\beta_2$ for ``preconditioner="second_moment"``.
      check: outside ``jax.jit``, check that params and gradients are finite (one device sync per
        update).

    Every setting is checked here, with an error that names it: ``max_cg_steps`` a positive
    integer; ``damping``, ``l2``, ``progress_tol``, ``cg_tol`` and ``preconditioner_exponent``
    finite and >= 0; ``learning_rate`` finite and > 0; ``warm_start`` in [0, 1]; ``boost`` >= 1;
    ``drop`` in (0, 1]; ``second_moment_decay`` in [0, 1) (1 would divide 0 by 0);
    ``backtracking``, ``line_search`` and ``check`` booleans.

    Dtypes: the solve runs in the parameters' dtype, at least float32 (float64 for float64
    parameters under ``jax.enable_x64``).
    """
    if not callable(curvature) and curvature not in _CURVATURES:
        raise ValueError(
            f"curvature must be one of {_CURVATURES} or a function (params, batch) -> operator, "
            f"got {curvature!r}"
        )
    if preconditioner not in _PRECONDITIONERS:
        raise ValueError(
            f"preconditioner must be one of {_PRECONDITIONERS}, got {preconditioner!r}"
        )
    out_loss = output_loss(loss, targets)
    if not callable(model):
        raise TypeError(f"model must be a function model(params, batch), got {model!r}")
    name = "hessian_free: "
    max_cg_steps = positive_int(max_cg_steps, name + "max_cg_steps")
    damping = real(damping, name + "damping", low=0)
    l2 = real(l2, name + "l2", low=0)
    learning_rate = real(learning_rate, name + "learning_rate", low=0, low_open=True)
    if cg_tol is not None:
        cg_tol = real(cg_tol, name + "cg_tol", low=0)
    progress_tol = real(progress_tol, name + "progress_tol", low=0)
    warm_start = real(warm_start, name + "warm_start", low=0, high=1)
    boost = real(boost, name + "boost", low=1)
    drop = real(drop, name + "drop", low=0, high=1, low_open=True)
    exponent = real(preconditioner_exponent, name + "preconditioner_exponent", low=0)
    beta2 = real(second_moment_decay, name + "second_moment_decay", low=0, high=1, high_open=True)
    backtracking = flag(backtracking, name + "backtracking")
    line_search = flag(line_search, name + "line_search")
    check = flag(check, name + "check")
    config = _Config(
        model, out_loss, curvature, preconditioner, max_cg_steps, cg_tol, progress_tol,
        warm_start, boost, drop, backtracking, line_search, learning_rate, l2, exponent, beta2,
    )  # fmt: skip

    def init_fn(params):
        check_float_params(params)
        layout = Layout.of(params)
        dtype = layout.dtype
        zero = jnp.zeros((), dtype)
        return HessianFreeState(
            count=jnp.zeros((), jnp.int32),
            damping=jnp.asarray(damping, dtype),
            direction=jnp.zeros(layout.size, dtype),
            cg_steps=jnp.zeros((), jnp.int32),
            reduction_ratio=zero,
            loss=zero,
            step_size=zero,
            second_moment=jnp.zeros(layout.size, dtype)
            if preconditioner == "second_moment"
            else None,
            cg_stop_reason=jnp.int32(-1),
            cg_stop_counts=jnp.zeros(len(STOP_REASONS), jnp.int32),
        )

    def update_fn(updates, state, params=None, *, batch=None, curvature_batch=None, **extra_args):
        del extra_args  # meant for other transformations in a chain
        if params is None:
            raise ValueError(
                "hessian_free needs params: tx.update(grads, state, params, batch=batch)"
            )
        if batch is None:
            raise TypeError(
                "hessian_free needs the batch its curvature and losses are evaluated on: "
                "tx.update(grads, state, params, batch=batch)"
            )
        n = Layout.of(params).size
        if state.direction.shape != (n,):
            raise ValueError(
                f"the state's direction has shape {state.direction.shape}, the parameters n={n}: "
                "a state from tx.init of other parameters"
            )
        if check and not is_traced((params, updates)):
            check_finite_params(params)
            try:
                check_finite_params(updates)
            except ValueError as error:
                raise ValueError(str(error).replace("params leaf", "gradient leaf")) from None
        return _compiled_update(config, updates, state, params, batch, curvature_batch)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _update(config: _Config, grads, state: HessianFreeState, params, batch, curvature_batch):
    layout = Layout.of(params)
    dtype = layout.dtype
    theta = layout.ravel(params)
    g = layout.ravel(grads) + config.l2 * theta
    lam = state.damping.astype(dtype)
    model, out_loss = config.model, config.loss

    def objective(p, b):
        return out_loss.value(model(p, b), b)

    def loss_at(step):  # batch loss (+ penalty) at theta + step; NaN or inf counts as +inf
        point = theta + step
        value = objective(layout.unravel(point), batch).astype(dtype)
        value = value + 0.5 * config.l2 * (point @ point)
        return jnp.where(jnp.isfinite(value), value, jnp.inf)

    data = batch if curvature_batch is None else curvature_batch
    if callable(config.curvature):
        op = config.curvature(params, data)
        if not isinstance(op, LinearOperator) or op.layout != layout:
            raise TypeError(
                "hessian_free(curvature=f): f(params, batch) must return a LinearOperator on the "
                f"parameters' layout (n={layout.size}); got {op!r}"
            )
    elif config.curvature == "gauss_newton":
        op = gauss_newton(
            model, params, data, loss=out_loss.fn, targets=out_loss.targets, check=False
        )
    else:
        op = hessian(objective, params, data, check=False)
    linear = op.prepared()

    def matvec(v):
        return linear.apply(v) + config.l2 * v

    second_moment, diag = state.second_moment, None
    if config.preconditioner == "second_moment":
        b2 = config.beta2
        second_moment = b2 * second_moment + (1 - b2) * g**2
        diag = second_moment / (1 - b2 ** (state.count + 1).astype(dtype))
    elif config.preconditioner == "gauss_newton_diagonal":
        ggn = op if config.curvature == "gauss_newton" else gauss_newton(
            model, params, data, loss=out_loss.fn, targets=out_loss.targets, check=False
        )  # fmt: skip
        diag = jnp.maximum(diagonal(ggn, method="exact").diagonal, 0)
    precond = None if diag is None else (diag + config.l2 + lam) ** config.exponent
    if precond is not None:  # zero diagonal and zero damping: no scaling there
        precond = jnp.where(precond > 0, precond, 1)

    schedule = _cg.martens_schedule(config.max_cg_steps) if config.backtracking else ()
    result = _cg.solve(
        matvec,
        -g,
        config.warm_start * state.direction.astype(dtype),
        damping=lam,
        max_steps=config.max_cg_steps,
        tol=10 * jnp.finfo(dtype).eps if config.cg_tol is None else config.cg_tol,
        progress_tol=config.progress_tol,
        preconditioner=precond,
        save_at=schedule,
        restart=True,
        descend=True,
    )
    step, new_loss = _cg.backtrack(loss_at, result, schedule)
    f0 = loss_at(jnp.zeros_like(theta))
    predicted = g @ step + 0.5 * step @ matvec(step)  # the undamped model q_0(d) - q_0(0)
    actual = new_loss - f0
    rho = jnp.where(predicted < 0, actual / jnp.where(predicted < 0, predicted, -1), 0)
    factor = jnp.where(rho > 0.75, config.drop, jnp.where(rho >= 0.25, 1.0, config.boost))
    alpha = jnp.ones((), dtype)
    if config.line_search:
        alpha = _cg.armijo(loss_at, step, f0, new_loss, g @ step)
    new_state = HessianFreeState(
        count=state.count + 1,
        damping=(lam * factor).astype(state.damping.dtype),
        direction=result.x.astype(state.direction.dtype),
        cg_steps=result.num_steps,
        reduction_ratio=rho.astype(state.reduction_ratio.dtype),
        loss=f0.astype(state.loss.dtype),
        step_size=alpha.astype(state.step_size.dtype),
        second_moment=second_moment,
        cg_stop_reason=result.stop_reason,
        cg_stop_counts=state.cg_stop_counts.at[result.stop_reason].add(1),
    )
    return layout.unravel(config.learning_rate * alpha * step), new_state


# Keyed by the configuration (compared by value, the model by identity): transformations built
# again with the same settings and model share compiled programs.
_compiled_update = jax.jit(_update, static_argnums=0)

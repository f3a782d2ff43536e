"""Truncated, preconditioned conjugate gradient on a damped system, as Hessian-free optimisation
uses it (Martens 2010, section 4).

CG minimises the quadratic $\\phi(x) = \\tfrac12 x^T (A + \\lambda I) x - b^T x$ over growing Krylov
spaces; its minimiser solves $(A + \\lambda I) x = b$. With a diagonal preconditioner ``M`` it runs
on $M^{-1/2} (A + \\lambda I) M^{-1/2}$ without forming it (Hestenes & Stiefel 1952; Nocedal &
Wright 2006, Algorithm 5.3). $\\phi(x_i) = -\\tfrac12 x_i^T (r_i + b)$ with the residual
$r_i = b - (A + \\lambda I) x_i$ costs no matvec, so every iterate's value is recorded.

It stops at the first of

* ``max_steps`` iterations;
* ``||r_i|| <= tol ||b||`` (the only stop that counts as converged);
* Martens' relative-progress rule: with $k = \\max(10, \\lfloor 0.1\\, i \\rfloor)$, stop when
  $i > k$, $\\phi(x_i) < 0$ and $(\\phi(x_i) - \\phi(x_{i-k})) / \\phi(x_i) < k\\,\\epsilon$ (``progress_tol``):
  the quadratic gained less than a fraction $\\epsilon$ per step over the last ``k`` steps;
* a breakdown: $p^T (A + \\lambda I) p \\le 0$ (negative curvature, e.g. an indefinite Hessian with
  too little damping) or a non-finite value; the iterate before it is kept. With ``descend``
  (:func:`curvature.optim.hessian_free`'s solves), negative curvature met before any step from
  zero gives the first search direction instead, $x = (r^T M^{-1} r / |p^T (A + \\lambda I) p|)\\,
  p$ with $p = M^{-1} b$: a descent direction (the truncated-Newton rule, Nocedal & Wright 2006,
  Algorithm 7.1), scaled to the minimum of the quadratic with the curvature's absolute value.

Why it stopped is ``CGResult.stop_reason``, an index into :data:`STOP_REASONS`.

Iterates ``x_i`` at the static steps ``save_at`` are written into a preallocated ``(len(save_at),
n)`` array (Martens' geometric schedule for backtracking, :func:`martens_schedule`). The solve
is a program of :mod:`curvature._driver`: one ``lax.while_loop`` in compiled code, a host loop
of compiled steps for a streamed operator.

Here: :func:`solve` (inside compiled code), the public :func:`conjugate_gradient` (exported as
``curvature.optim.conjugate_gradient``), and the choice of :func:`curvature.optim.hessian_free`'s
step among the iterates (:func:`backtrack`) and of its length (:func:`armijo`). No optax here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvature import _driver
from curvature._checks import check_real_vector, positive_int
from curvature.linear_operator import LinearOperator

__all__ = [
    "STOP_REASONS",
    "CGResult",
    "armijo",
    "backtrack",
    "conjugate_gradient",
    "martens_schedule",
    "solve",
]

#: Why a solve stopped (``CGResult.stop_reason`` indexes this): ``||r|| <= tol ||b||``;
#: ``max_steps`` iterations; Martens' relative-progress rule; negative (or zero) curvature
#: ``p^T (A + lambda I) p <= 0``; a non-finite value.
STOP_REASONS = ("converged", "max_steps", "progress", "negative_curvature", "non_finite")
CONVERGED, MAX_STEPS, PROGRESS, NEGATIVE_CURVATURE, NON_FINITE = range(len(STOP_REASONS))


class CGResult(NamedTuple):
    """A conjugate-gradient solve of $(A + \\lambda I) x = b$.

    Attributes:
      x: ``(n,)`` the last iterate.
      num_steps: iterations taken (matvecs, besides one for the residual of a nonzero ``x0``).
      values: ``(max_steps + 1,)`` $\\phi(x_i)$ for ``i = 0 .. num_steps`` (``x_0`` the start),
        NaN after ``num_steps``. Non-increasing in exact arithmetic.
      residual_norm: ``||b - (A + lambda I) x||`` (the recurred residual).
      converged: whether ``||r|| <= tol ||b||``.
      saved: ``(len(save_at), n)`` the iterates at the steps ``save_at``; zero rows for steps not
        reached.
      stop_reason: why it stopped, an index into :data:`STOP_REASONS` (``"converged"``,
        ``"max_steps"``, ``"progress"``, ``"negative_curvature"``, ``"non_finite"``);
        ``STOP_REASONS[int(result.stop_reason)]`` names it.
    """

    x: jax.Array
    num_steps: jax.Array
    values: jax.Array
    residual_norm: jax.Array
    converged: jax.Array
    saved: jax.Array
    stop_reason: jax.Array | None = None


def martens_schedule(max_steps: int, gamma: float = 1.3) -> tuple[int, ...]:
    """The steps ``ceil(gamma^j) <= max_steps`` (Martens 2010 keeps these iterates to backtrack
    over): ``1, 2, 3, 4, 5, 7, 9, 11, 14, 18, 24, 31, 40`` for 50 steps, about
    ``log(max_steps) / log(gamma)`` of them."""
    steps, j = [], 0
    while (s := math.ceil(gamma**j - 1e-9)) <= max_steps:
        if not steps or s != steps[-1]:
            steps.append(s)
        j += 1
    return tuple(steps)


def solve(
    matvec: Callable[[jax.Array], jax.Array],
    b: jax.Array,
    x0: jax.Array | None,
    *,
    damping: jax.Array | float,
    max_steps: int,
    tol: jax.Array | float = 0.0,
    progress_tol: jax.Array | float = 0.0,
    preconditioner: jax.Array | None = None,
    save_at: tuple[int, ...] = (),
    restart: bool = False,
    descend: bool = False,
) -> CGResult:
    """CG on ``(matvec + damping I) x = b`` inside compiled code (see the module docstring).

    ``preconditioner`` is the diagonal ``M`` (positive, ``(n,)``): each step applies
    ``M^{-1} r = r / M``. ``restart``: start from zero instead of an ``x0`` with
    $\\phi(x_0) > 0 = \\phi(0)$ (a warm start worse than none). ``descend``: negative curvature
    before any step from zero gives the scaled first direction (module docstring), counted as a
    step. ``max_steps``, ``save_at``, ``restart`` and ``descend`` are static; the rest may be
    traced.
    """
    program = _program(max_steps, tuple(save_at), restart, x0 is not None, descend)
    args = (b, x0, damping, tol, progress_tol, preconditioner)
    return _driver.inline(program, (_Matvec(matvec, b.shape[0], b.dtype),), *args)


class _Matvec:
    """A function ``v -> A v`` as the operator of a program traced into compiled code."""

    def __init__(self, fn: Callable[[jax.Array], jax.Array], n: int, dtype):
        self.apply, self.shape, self.dtype = fn, (n, n), dtype


@functools.cache
def _program(
    max_steps: int, save_at: tuple[int, ...], restart: bool, has_x0: bool, descend: bool = False
):
    """The CG iteration as a program: the residual of ``x0`` (one product), then a
    ``while_loop`` of steps, each one product ``A p``."""
    num_saved = len(save_at)
    slot_of = np.full(max_steps + 1, -1, np.int32)
    for j, s in enumerate(save_at):
        slot_of[s] = j

    def init(specs, b, x0, damping, tol, progress_tol, preconditioner):
        dtype = b.dtype
        state = {
            "b": b,
            "damping": jnp.asarray(damping, dtype),
            "threshold": jnp.asarray(tol, dtype) * jnp.linalg.norm(b),
            "progress_tol": jnp.asarray(progress_tol, dtype),
            "preconditioner": None if preconditioner is None else preconditioner.astype(dtype),
        }
        if has_x0:
            state["x"] = x0.astype(dtype)
        else:
            state["x"], state["r"] = jnp.zeros_like(b), b
        return state

    def residual(state, i, ax):  # r = b - (A + lambda I) x0
        b, x = state["b"], state["x"]
        r = b - (ax + state["damping"] * x)
        if restart:
            worse = -0.5 * x @ (r + b) > 0
            x, r = jnp.where(worse, 0, x), jnp.where(worse, b, r)
        return {**state, "x": x, "r": r}

    def precondition(state, r):
        m = state["preconditioner"]
        return r if m is None else r / m

    def start(state, i):
        b, x, r = state["b"], state["x"], state["r"]
        y = precondition(state, r)
        values = jnp.zeros(max_steps + 1, b.dtype).at[0].set(-0.5 * x @ (r + b))
        saved = jnp.zeros((num_saved, b.shape[0]), b.dtype)
        small = jnp.linalg.norm(r) <= state["threshold"]
        reason = jnp.where(small, CONVERGED, MAX_STEPS).astype(jnp.int32)
        loop = (jnp.int32(0), x, r, y, r @ y, values, saved, small, small, reason)
        return {**{k: v for k, v in state.items() if k not in ("x", "r")}, "loop": loop}

    def going(state):
        i, done = state["loop"][0], state["loop"][7]
        return (~done) & (i < max_steps)

    def step(state, _, product):
        i, x, r, p, ry, values, saved, _, _, _ = state["loop"]
        b, progress_tol = state["b"], state["progress_tol"]
        ap = product + state["damping"] * p
        pap = p @ ap
        finite = jnp.isfinite(pap)
        ok = (pap > 0) & (ry > 0) & finite
        alpha = jnp.where(ok, ry / jnp.where(ok, pap, 1), 0)
        x_new, r_new = x + alpha * p, r - alpha * ap
        finite &= jnp.all(jnp.isfinite(x_new))
        ok &= finite
        turn = jnp.bool_(False)
        if descend:  # negative curvature before any step from zero: along p, scaled
            turn = (pap < 0) & (ry > 0) & finite & (i == 0) & ~jnp.any(x != 0)
            t = ry / jnp.where(turn, -pap, 1)
            turn &= jnp.all(jnp.isfinite(t * p))
            x_new = jnp.where(turn, t * p, x_new)
            r_new = jnp.where(turn, r - t * ap, r_new)
        y = precondition(state, r_new)
        ry_new = r_new @ y
        p_new = y + jnp.where(ok, ry_new / jnp.where(ok, ry, 1), 0) * p
        # A breakdown keeps the last good iterate and ends the loop without counting a step
        # (a turn along p at negative curvature counts one, and ends it too).
        moved = ok | turn
        x, r, p, ry = jax.tree_util.tree_map(
            lambda new, old: jnp.where(moved, new, old),
            (x_new, r_new, p_new, ry_new),
            (x, r, p, ry),
        )
        i = i + moved.astype(jnp.int32)
        phi = -0.5 * x @ (r + b)
        values = values.at[i].set(phi)
        if num_saved:
            slot = jnp.asarray(slot_of)[i]
            row = jnp.maximum(slot, 0)
            saved = saved.at[row].set(jnp.where((slot >= 0) & moved, x, saved[row]))
        small = jnp.linalg.norm(r) <= state["threshold"]
        k = jnp.maximum(10, i // 10)
        previous = values[jnp.maximum(i - k, 0)]
        stalled = (i > k) & (phi < 0) & ((phi - previous) / phi < k * progress_tol)
        reason = jnp.select(
            [~finite, ~ok, small, stalled],
            [NON_FINITE, NEGATIVE_CURVATURE, CONVERGED, PROGRESS],
            MAX_STEPS,
        ).astype(jnp.int32)
        done = small | stalled | ~ok
        return {**state, "loop": (i, x, r, p, ry, values, saved, done, small, reason)}

    def finish(state, specs, *args):
        i, x, r, _, _, values, saved, _, converged, reason = state["loop"]
        values = jnp.where(jnp.arange(max_steps + 1) <= i, values, jnp.nan)
        return CGResult(x, i, values, jnp.linalg.norm(r), converged, saved, reason)

    steps = []
    if has_x0:
        steps.append(_driver.Apply(lambda state, i: state["x"], residual))
    steps += [
        _driver.Map(start),
        _driver.While(going, _driver.Apply(lambda state, i: state["loop"][3], step)),
    ]
    return _driver.Program(init, _driver.Seq(*steps), finish, name="conjugate_gradient")


# --------------------------------------------------------------------------------------------
# The public solver (curvature.optim.conjugate_gradient).


def conjugate_gradient(
    op: LinearOperator | Callable[[jax.Array], jax.Array],
    b: jax.Array,
    x0: jax.Array | None = None,
    /,
    *,
    damping: float | jax.Array = 0.0,
    max_steps: int,
    tol: float | jax.Array = 0.0,
    progress_tol: float | jax.Array = 0.0,
    preconditioner: jax.Array | None = None,
) -> CGResult:
    """Solve $(A + \\lambda I) x = b$ by (preconditioned) conjugate gradient, minimising
    $\\phi(x) = \\tfrac12 x^T (A + \\lambda I) x - b^T x$.

    Args:
      op: a :class:`~curvature.LinearOperator` (positive semi-definite, or made definite by
        ``damping``) or a function ``v -> A v`` on flat vectors ``(n,)``.
      b: ``(n,)`` right-hand side; ``x0``: the start (default zero).
      damping: $\\lambda$. max_steps: at most this many iterations (matvecs).
      tol: stop when ``||r|| <= tol ||b||`` (``converged``). progress_tol: Martens' relative-
        progress $\\epsilon$ (0 disables it; :func:`hessian_free` uses 5e-4).
      preconditioner: the positive diagonal ``M`` ``(n,)``; each step divides the residual by it.

    Checked: ``max_steps`` a positive integer, ``b`` and ``x0`` real and, for an operator, of
    shape ``(n,)``.

    Returns:
      a :class:`~curvature._cg.CGResult`: the solution ``x``, ``num_steps``, the quadratic's
      ``values`` $\\phi(x_i)$, the ``residual_norm``, ``converged`` and ``stop_reason``.

    Examples:
      >>> import jax.numpy as jnp, curvature, curvature.optim
      >>> a = curvature.from_matrix(jnp.array([[2.0, 1.0], [1.0, 3.0]]))
      >>> result = curvature.optim.conjugate_gradient(a, jnp.array([1.0, 2.0]), max_steps=2)
      >>> [round(float(v), 5) for v in result.x], int(result.num_steps)  # exact in n = 2 steps
      ([0.2, 0.6], 2)
    """
    max_steps = positive_int(max_steps, "conjugate_gradient: max_steps")
    for name, v in (("b", b), ("x0", x0)):
        check_real_vector(v, f"conjugate_gradient: {name}")
    if isinstance(op, LinearOperator):
        b = jnp.asarray(b, op.dtype)
        for name, v in (("b", b), ("x0", x0)):
            if v is not None and jnp.shape(v) != (op.size,):
                raise ValueError(f"{name} must have shape ({op.size},), got {jnp.shape(v)}")
        program = _program(max_steps, (), False, x0 is not None)
        args = (b, x0, damping, tol, progress_tol, preconditioner)
        return _driver.run(program, (op,), *jax.tree_util.tree_map(jnp.asarray, args))
    if not callable(op):
        raise TypeError(f"op must be a LinearOperator or a function v -> A v, got {op!r}")
    b = jnp.asarray(b)
    b = b.astype(jnp.promote_types(b.dtype, jnp.float32))
    return _solve(op, b, x0, damping, tol, progress_tol, preconditioner, max_steps)


def _solve(matvec, b, x0, damping, tol, progress_tol, preconditioner, max_steps):
    kwargs = dict(damping=damping, max_steps=max_steps, tol=tol, progress_tol=progress_tol)
    return solve(matvec, b, x0, preconditioner=preconditioner, **kwargs)


# --------------------------------------------------------------------------------------------
# Choosing the step among CG iterates, and its length (for curvature.optim.hessian_free).


def backtrack(loss_at, result: CGResult, schedule: tuple[int, ...]):
    """Martens' backtracking: from the last CG iterate back through the saved ones, while the
    batch loss keeps decreasing. Returns the chosen step and its loss."""
    last, last_loss = result.x, loss_at(result.x)
    if not schedule:
        return last, last_loss
    steps = jnp.asarray(schedule)
    start = jnp.sum(steps < result.num_steps) - 1  # the latest saved iterate before the last

    def cond(carry):
        j, _, _, stop = carry
        return (j >= 0) & ~stop

    def body(carry):
        j, best, best_loss, _ = carry
        candidate = result.saved[j]
        value = loss_at(candidate)
        better = value < best_loss
        best = jnp.where(better, candidate, best)
        return j - 1, best, jnp.minimum(value, best_loss), ~better

    _, best, best_loss, _ = jax.lax.while_loop(
        cond, body, (start, last, last_loss, jnp.bool_(False))
    )
    return best, best_loss


def armijo(loss_at, step, f0, loss_full, slope, *, c=1e-2, shrink=0.8, tries=20):
    """The largest ``0.8^j`` (``j < 20``) with ``f(theta + a d) <= f0 + c a g^T d``, else 0 (also
    when ``d`` is not a descent direction, ``g^T d >= 0``). Changes of the loss below its
    round-off (``4 eps |f0|``) are accepted: near a minimum they decide nothing, and Newton's
    last steps are kept whole."""
    slack = 4 * jnp.finfo(step.dtype).eps * jnp.abs(f0)

    def accepted(a, value):
        return value <= f0 + c * a * slope + slack

    def cond(carry):
        j, a, value = carry
        return (j < tries) & ~accepted(a, value)

    def body(carry):
        j, a, _ = carry
        a = a * shrink
        return j + 1, a, loss_at(a * step)

    one = jnp.ones((), step.dtype)
    _, a, value = jax.lax.while_loop(cond, body, (jnp.int32(0), one, loss_full))
    return jnp.where(accepted(a, value) & (slope < 0), a, 0)

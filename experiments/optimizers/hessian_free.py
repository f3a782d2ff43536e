"""Hessian-free optimisation as ``train.optimizer="hessian_free"``: :func:`curvature.optim.hessian_free`
(Martens 2010) with the settings of the config section ``train.hessian_free``, its per-step
diagnostics and what a step costs in gradient-equivalents.

``train.learning_rate`` scales the step (Martens' step is 1), from the optimizer state: members
of a learning-rate sweep share the compiled trainer, as the first-order methods' do; so does the
initial damping, which lives in the state too.
"""

from __future__ import annotations

import math

import numpy as np
import optax

import curvature.optim
from experiments.optimizers.base import Optimizer

# The config section train.hessian_free: the arguments of curvature.optim.hessian_free, with its
# defaults. "none" is no preconditioner; cg_tol 0 is the library's default (ten machine epsilons).
DEFAULTS = {
    "damping": 1e-3,  # the initial λ; Levenberg-Marquardt adapts it every step
    "max_cg_steps": 50,
    "curvature": "gauss_newton",  # or "hessian"
    "preconditioner": "none",  # or "gauss_newton_diagonal", "second_moment"
    "cg_tol": 0.0,
    "progress_tol": 5e-4,
    "warm_start": 0.95,
    "boost": 1.5,
    "drop": 2 / 3,
    "backtracking": True,
    "line_search": True,
    "l2": 0.0,
    "preconditioner_exponent": 0.75,
    "second_moment_decay": 0.999,
}
CHOICES = {
    "curvature": ("gauss_newton", "hessian"),
    "preconditioner": ("none", "gauss_newton_diagonal", "second_moment"),
}
# Gradient-equivalents of one curvature product (see experiments.train.gradient_equivalents).
PRODUCT_COST = {"gauss_newton": 1.5, "hessian": 2.0}
LOSS_COST = 0.5  # one loss evaluation: a forward pass
ARMIJO_SHRINK, ARMIJO_TRIES = 0.8, 20  # curvature.optim's line search


def check(s) -> list[tuple[str, str]]:
    """``(key, message)`` for every bad value of the section ``train.hessian_free``."""
    bad = []

    def number(name, ok, text):
        value = s[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            bad.append((name, f"{value!r} is not a number"))
        elif not (math.isfinite(value) and ok(value)):
            bad.append((name, f"{value!r} {text}"))

    for name in set(s) - set(DEFAULTS):
        bad.append((name, f"does not exist; known: {', '.join(DEFAULTS)}"))
    for name, choices in CHOICES.items():
        if s[name] not in choices:
            bad.append((name, f"{s[name]!r} is not one of {', '.join(choices)}"))
    steps = s.max_cg_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        bad.append(("max_cg_steps", f"{steps!r} is not an integer >= 1"))
    for name in ("damping", "cg_tol", "progress_tol", "l2", "preconditioner_exponent"):
        number(name, lambda v: v >= 0, "must be >= 0")
    number("warm_start", lambda v: 0 <= v <= 1, "must lie in [0, 1] (0: CG starts at zero)")
    number("boost", lambda v: v >= 1, "must be >= 1 (λ grows by it after a poor step)")
    number("drop", lambda v: 0 < v <= 1, "must lie in (0, 1] (λ shrinks by it after a good step)")
    number("second_moment_decay", lambda v: 0 <= v < 1, "must lie in [0, 1)")
    for name in ("backtracking", "line_search"):
        if not isinstance(s[name], bool):
            bad.append((name, f"{s[name]!r} is not True or False"))
    return bad


def _no_model(params, batch):
    raise RuntimeError("this Hessian-free transformation was made without a model: init only")


def make(t, model=None, output_loss="cross_entropy"):
    s = t.hessian_free
    hf = curvature.optim.hessian_free(
        model if model is not None else _no_model,
        output_loss,
        damping=s.damping,
        max_cg_steps=s.max_cg_steps,
        curvature=s.curvature,
        preconditioner=None if s.preconditioner == "none" else s.preconditioner,
        cg_tol=s.cg_tol or None,
        progress_tol=s.progress_tol,
        warm_start=s.warm_start,
        boost=s.boost,
        drop=s.drop,
        backtracking=s.backtracking,
        line_search=s.line_search,
        l2=s.l2,
        preconditioner_exponent=s.preconditioner_exponent,
        second_moment_decay=s.second_moment_decay,
        check=False,
    )
    # train.learning_rate scales the step, from the state: a learning-rate sweep shares the trainer.
    return optax.chain(hf, optax.inject_hyperparams(optax.scale)(step_size=t.learning_rate))


def static(t) -> tuple:
    # The initial damping lives in the state (a placeholder here); the rest is compiled in.
    settings = {**t.hessian_free, "damping": DEFAULTS["damping"]}
    return tuple(sorted(settings.items()))


def diagnostics(state) -> dict:
    hf = state[0]
    return {
        "damping": hf.damping,  # λ after this step's adaptation
        "cg_steps": hf.cg_steps,
        "reduction_ratio": hf.reduction_ratio,
        "step_size": hf.step_size,
    }


def cost(t, log: dict, num_outputs: int) -> np.ndarray:
    s = t.hessian_free
    cg = np.asarray(log["cg_steps"], float)
    products = cg + 2  # CG's, the warm start's residual, and ρ's
    losses = 2 + ((cg >= 2) & s.backtracking)  # f(θ), the last iterate, one earlier iterate
    if s.line_search:
        a = np.asarray(log["step_size"], float)
        with np.errstate(divide="ignore", invalid="ignore"):
            tries = np.where(a > 0, np.rint(np.log(a) / math.log(ARMIJO_SHRINK)), ARMIJO_TRIES)
        losses = losses + tries
    total = 1 + PRODUCT_COST[s.curvature] * products + LOSS_COST * losses
    if s.preconditioner == "gauss_newton_diagonal":
        total = total + num_outputs
    return total


HESSIAN_FREE = Optimizer(
    "hessian_free",  # Martens (2010), curvature.optim.hessian_free
    make,
    needs_model=True,
    section="hessian_free",
    defaults=DEFAULTS,
    check=check,
    static=static,
    diagnostics=diagnostics,
    cost=cost,
)

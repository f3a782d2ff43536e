"""Training: the config section ``train``, the edge of stability, the compiled trainer and what
a step costs.

Hyperparameters (learning rate, momentum) live in the optimizer state (``optax.inject_hyperparams``),
so members of a learning-rate sweep share one compiled trainer.

Optimizers (``train.optimizer``, :mod:`experiments.optimizers`): ``sgd``, ``momentum`` (heavy
ball, ``train.momentum``), ``adam``, ``rmsprop`` and ``hessian_free``
(:func:`curvature.optim.hessian_free`, Martens 2010: truncated CG on the damped Gauss-Newton
system, with the settings of the config section ``train.hessian_free``; ``train.learning_rate``
scales its step, and Martens' step is 1).

Every step is logged (:func:`trainer`): the training-batch loss, and for Hessian-free the damping,
the CG steps, the reduction ratio and the line search's step. :func:`gradient_equivalents` turns
the log into the cost of each step in gradients of the training batch, the unit that compares a
first-order method with a second-order one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import curvature as cv
from experiments import models
from experiments.errors import require
from experiments.optimizers import OPTIMIZERS


def section() -> ml_collections.ConfigDict:
    """The config section ``train``, with each optimizer's own section at its defaults."""
    s = ml_collections.ConfigDict()
    s.loss = "cross_entropy"  # cross_entropy | mse on one-hot labels (models.LOSSES)
    s.optimizer = "sgd"  # sgd | momentum | adam | rmsprop | hessian_free (OPTIMIZERS)
    s.learning_rate = 0.1  # Hessian-free: scales its step (Martens: 1.0)
    s.momentum = 0.9
    for entry in OPTIMIZERS.values():
        if entry.section:  # e.g. train.hessian_free (experiments.optimizers.hessian_free)
            s[entry.section] = ml_collections.ConfigDict(entry.defaults)
    s.steps = 1000
    s.batch_size = 0  # 0: full batch
    # Stop a member whose training loss exceeds this multiple of its initial loss (0: never).
    s.divergence_factor = 10.0
    return s


def check(config) -> None:
    """Raise :class:`~experiments.errors.ConfigError` for the first bad key of ``train``."""
    t = config.train
    models.LOSSES.get(t.loss)
    OPTIMIZERS.get(t.optimizer)
    lr = t.learning_rate
    require(
        math.isfinite(lr) and lr > 0, "train.learning_rate", f"{lr} is not a finite positive number"
    )
    require(t.steps >= 0, "train.steps", "must be >= 0")
    require(t.batch_size >= 0, "train.batch_size", "must be >= 0 (0: full batch)")
    factor = t.divergence_factor
    require(
        factor == 0 or (math.isfinite(factor) and factor > 1),
        "train.divergence_factor",
        f"{factor} must be > 1 (or 0: never stop)",
    )
    require(0.0 <= t.momentum < 1.0, "train.momentum", f"{t.momentum} is not in [0, 1)")
    # Every optimizer's own section is checked, whichever optimizer runs: it is in the config.
    for entry in OPTIMIZERS.values():
        if entry.section:
            for key, message in entry.check(t[entry.section]):
                require(False, f"train.{entry.section}.{key}", message)


def make_optimizer(train_cfg, model=None, output_loss=None) -> optax.GradientTransformation:
    """``train.optimizer`` by name, with the config's hyperparameters in its state. A method that
    evaluates the model (Hessian-free) gets ``model(params, batch) -> outputs`` and the output
    loss (``models.LOSSES[train.loss].gauss_newton``); without them it can only ``init``."""
    entry = OPTIMIZERS.get(train_cfg.optimizer)
    if not entry.needs_model:
        return entry.make(train_cfg)
    if output_loss is None:
        output_loss = models.LOSSES.get(train_cfg.loss).gauss_newton
    return entry.make(train_cfg, model, output_loss)


def gradient_equivalents(train_cfg, log: dict, num_outputs: int) -> np.ndarray:
    """The cost of each logged step (``log`` from :func:`trainer`) in gradient-equivalents: units
    of one gradient of the training loss on the training batch (a forward and a backward pass).

    * First-order methods (SGD, momentum, Adam, RMSProp): 1 a step, the gradient.
    * Hessian-free: 1 for the gradient; 1.5 for each Gauss-Newton product (2 for a Hessian
      product: a Jacobian-vector product and a vector-Jacobian product over the linearised
      forward pass), counting the CG steps (``cg_steps``), the residual of CG's warm start and
      the product for the reduction ratio ρ, so ``cg_steps + 2`` products; 0.5 for each batch
      loss: at θ, at the last CG iterate, at one earlier iterate when backtracking has one
      (``cg_steps >= 2``; Martens' backtracking usually stops there: further candidates are not
      in the state and are not counted, so this is a lower bound by 0.5 per extra candidate),
      and one per shortening of the Armijo line search (``log(step_size) / log(0.8)``; 20, the
      most, for a rejected step); plus ``num_outputs`` for the exact Gauss-Newton diagonal
      preconditioner (one backward pass per output), none for the second-moment one.

    Per step: 1 + 1.5 (cg_steps + 2) + 0.5 (2 + [cg_steps >= 2] + tries) for the defaults.
    """
    cost = OPTIMIZERS.get(train_cfg.optimizer).cost
    if cost is None:
        return np.ones(len(log["loss"]))
    return np.asarray(cost(train_cfg, log, num_outputs), float)


def edge_of_stability(train_cfg) -> float | None:
    """The sharpness above which full-batch training's quadratic model diverges: 2/η for gradient
    descent, (2 + 2β)/η for heavy-ball momentum β; ``None`` for minibatches and adaptive methods."""
    if train_cfg.batch_size != 0:
        return None
    return OPTIMIZERS.get(train_cfg.optimizer).edge(train_cfg)


# Why a compiled stretch of training stopped early.
OK, NON_FINITE, DIVERGED = 0, 1, 2


def trainer(loss_fn, train_cfg, num_train: int, model_fn=None):
    """A compiled ``train(params, opt_state, start, stop, x, y, key, activation, limit, log)``.

    Steps ``start .. stop - 1`` run in one ``while_loop``. It stops early at the first non-finite
    loss or gradient (keeping the last finite parameters) or at a loss above ``limit`` (divergence),
    and returns ``(params, opt_state, step, reason, loss, log)``. Minibatch ``i`` of epoch ``e`` is
    slice ``i`` of ``permutation(fold_in(key, e))``, so the data order depends on the step alone.
    ``log`` (from :func:`new_log`): arrays of length ``train.steps``, entry ``i`` written by step
    ``i``: ``loss``, the training-batch loss at the parameters step ``i`` starts from, and the
    optimizer's diagnostics after it (Hessian-free: ``damping``, ``cg_steps``,
    ``reduction_ratio``, ``step_size``). ``model_fn(params, batch)``: for methods that evaluate
    the model themselves (Hessian-free); its batch is the training batch.
    One compiled program per loss and model (compared by structure, as curvature's operators
    compare them), optimizer kind and compiled-in settings, batch size and data size:
    activations and hyperparameters are arguments.
    """
    entry = OPTIMIZERS.get(train_cfg.optimizer)
    if entry.needs_model and model_fn is None:
        raise ValueError(f"train.optimizer={train_cfg.optimizer!r} needs the model function")
    loss = cv.closure(loss_fn)
    model = cv.closure(model_fn) if entry.needs_model else None
    optimizer = (train_cfg.optimizer, train_cfg.loss, entry.static(train_cfg))
    return functools.partial(_train, optimizer, train_cfg.batch_size, num_train, loss, model)


def new_log(train_cfg, dtype, opt_state) -> dict:
    """Empty per-step log arrays (NaN) for :func:`trainer`, one per logged quantity."""
    names = ["loss", *OPTIMIZERS.get(train_cfg.optimizer).diagnostics(opt_state)]
    return {name: jnp.full((train_cfg.steps,), jnp.nan, dtype) for name in names}


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _train(
    optimizer: tuple,
    batch_size: int,
    num_train: int,
    loss: cv.Closure,
    model: cv.Closure | None,
    params,
    opt_state,
    start,
    stop,
    x,
    y,
    key,
    activation,
    limit,
    log,
):
    loss_fn = loss.bind()
    model_fn = None if model is None else model.bind()
    full_batch = batch_size == 0 or batch_size >= num_train
    steps_per_epoch = 1 if full_batch else max(1, num_train // batch_size)

    def epoch_order(step, key):
        return jax.random.permutation(jax.random.fold_in(key, step // steps_per_epoch), num_train)

    def minibatch(x, y, step, order, activation):
        if not full_batch:
            idx = jax.lax.dynamic_slice(
                order, ((step % steps_per_epoch) * batch_size,), (batch_size,)
            )
            x, y = x[idx], y[idx]
        return {"x": x, "y": y, "activation": jnp.full((len(y),), activation, jnp.int32)}

    # The update function reads its hyperparameters from the state (inject_hyperparams), so
    # building it here with placeholder values changes nothing.
    name, loss_name, static = optimizer
    entry = OPTIMIZERS.get(name)
    if entry.needs_model:
        placeholder = types.SimpleNamespace(
            **dataclasses.asdict(_PLACEHOLDER),
            **{entry.section: types.SimpleNamespace(**dict(static))},
        )
        output_loss = models.LOSSES.get(loss_name).gauss_newton
        update = entry.make(placeholder, model_fn, output_loss).update
    else:
        update = entry.make(_PLACEHOLDER).update

    def cond(carry):
        return (carry[2] < stop) & (carry[3] == OK)

    def body(carry):
        params, opt_state, step, _, _, order, log = carry
        if not full_batch:  # a new permutation only when an epoch starts
            order = jax.lax.cond(
                step % steps_per_epoch == 0, lambda: epoch_order(step, key), lambda: order
            )
        batch = minibatch(x, y, step, order, activation)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        finite = jnp.isfinite(loss) & jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)])
        )
        reason = jnp.where(finite, jnp.where(loss > limit, DIVERGED, OK), NON_FINITE)
        if entry.needs_model:
            updates, new_state = update(grads, opt_state, params, batch=batch)
        else:
            updates, new_state = update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = functools.partial(jnp.where, reason == OK)
        params = jax.tree_util.tree_map(keep, new_params, params)
        opt_state = jax.tree_util.tree_map(keep, new_state, opt_state)
        logged = {"loss": loss, **entry.diagnostics(new_state)}
        log = {k: v.at[step].set(logged[k].astype(v.dtype)) for k, v in log.items()}
        step = step + (reason == OK).astype(step.dtype)
        return params, opt_state, step, reason, loss, order, log

    order = epoch_order(start, key) if not full_batch else jnp.zeros((), jnp.int32)
    init = (params, opt_state, start, jnp.asarray(OK), jnp.asarray(0.0, limit.dtype), order, log)
    params, opt_state, step, reason, loss, _, log = jax.lax.while_loop(cond, body, init)
    return params, opt_state, step, reason, loss, log


@dataclasses.dataclass(frozen=True)
class _Placeholder:
    learning_rate: float = 1.0
    momentum: float = 0.5


_PLACEHOLDER = _Placeholder()


def evaluator(loss_fn, model_fn):
    """A compiled ``evaluate(params, batch) -> (loss, accuracy, gradient norm)``: one program per
    pair of functions, compared by structure."""
    return functools.partial(_evaluate, cv.closure(loss_fn), cv.closure(model_fn))


@jax.jit
def _evaluate(loss: cv.Closure, model: cv.Closure, params, batch):
    loss_fn, model_fn = loss.bind(), model.bind()
    value, grad = jax.value_and_grad(loss_fn)(params, batch)
    accuracy = jnp.mean(jnp.argmax(model_fn(params, batch), axis=-1) == batch["y"])
    grad_norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(grad)))
    return value, accuracy, grad_norm

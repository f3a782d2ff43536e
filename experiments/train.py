"""Training: the optimizer registry, the edge of stability, and the compiled trainer.

Hyperparameters (learning rate, momentum) live in the optimizer state (``optax.inject_hyperparams``),
so members of a learning-rate sweep share one compiled trainer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from curvature._closures import Canonical, canonical
from experiments.registry import Registry


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """``make(train_cfg)``: the optax transformation; ``edge(train_cfg)``: the sharpness above
    which its quadratic model diverges (``None`` where no such line holds); ``second_moment(state)``:
    the bias-corrected second-moment pytree of an adaptive method (``None`` for others)."""

    make: Callable[..., optax.GradientTransformation]
    edge: Callable = lambda train_cfg: None
    second_moment: Callable | None = None


def _nu(state, bias_corrected: bool, b2: float):
    nu = optax.tree_utils.tree_get(state, "nu")
    if not bias_corrected:
        return nu
    count = optax.tree_utils.tree_get(state.inner_state, "count")
    return jax.tree_util.tree_map(lambda v: v / (1.0 - b2 ** count.astype(v.dtype)), nu)


OPTIMIZERS: Registry[Optimizer] = Registry("optimizer", "train.optimizer")
OPTIMIZERS.register(
    "sgd",  # plain gradient descent
    Optimizer(
        lambda t: optax.inject_hyperparams(optax.sgd)(learning_rate=t.learning_rate),
        edge=lambda t: 2.0 / t.learning_rate,
    ),
)
OPTIMIZERS.register(
    "momentum",  # heavy ball
    Optimizer(
        lambda t: optax.inject_hyperparams(optax.sgd)(
            learning_rate=t.learning_rate, momentum=t.momentum
        ),
        edge=lambda t: (2.0 + 2.0 * t.momentum) / t.learning_rate,
    ),
)
OPTIMIZERS.register(
    "adam",
    Optimizer(
        lambda t: optax.inject_hyperparams(optax.adam)(learning_rate=t.learning_rate),
        second_moment=lambda state: _nu(state, True, 0.999),
    ),
)
OPTIMIZERS.register(
    "rmsprop",  # optax's RMSProp: decay 0.9, no bias correction
    Optimizer(
        lambda t: optax.inject_hyperparams(optax.rmsprop)(learning_rate=t.learning_rate),
        second_moment=lambda state: _nu(state, False, 0.9),
    ),
)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    """``train.optimizer`` by name, with the config's hyperparameters in its state."""
    return OPTIMIZERS.get(train_cfg.optimizer).make(train_cfg)


def edge_of_stability(train_cfg) -> float | None:
    """The sharpness above which full-batch training's quadratic model diverges: 2/η for gradient
    descent, (2 + 2β)/η for heavy-ball momentum β; ``None`` for minibatches and adaptive methods."""
    if train_cfg.batch_size != 0:
        return None
    return OPTIMIZERS.get(train_cfg.optimizer).edge(train_cfg)


# Why a compiled stretch of training stopped early.
OK, NON_FINITE, DIVERGED = 0, 1, 2


def trainer(loss_fn, optimizer: str, batch_size: int, num_train: int):
    """A compiled ``train(params, opt_state, start, stop, x, y, key, activation, limit)``.

    Steps ``start .. stop - 1`` run in one ``while_loop``. It stops early at the first non-finite
    loss or gradient (keeping the last finite parameters) or at a loss above ``limit`` (divergence),
    and returns ``(params, opt_state, step, reason, loss)``. Minibatch ``i`` of epoch ``e`` is slice
    ``i`` of ``permutation(fold_in(key, e))``, so the data order depends on the step alone.
    One compiled program per loss (compared by structure, as curvature's operators compare it),
    optimizer kind and data size: activations and hyperparameters are arguments.
    """
    static, captured, _ = canonical(loss_fn)
    return functools.partial(_train, static, optimizer, batch_size, num_train, captured)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _train(
    loss: Canonical,
    optimizer: str,
    batch_size: int,
    num_train: int,
    captured,
    params,
    opt_state,
    start,
    stop,
    x,
    y,
    key,
    activation,
    limit,
):
    loss_fn = loss.bind(captured)
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
    update = OPTIMIZERS.get(optimizer).make(_PLACEHOLDER).update

    def cond(carry):
        return (carry[2] < stop) & (carry[3] == OK)

    def body(carry):
        params, opt_state, step, _, _, order = carry
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
        updates, new_state = update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = functools.partial(jnp.where, reason == OK)
        params = jax.tree_util.tree_map(keep, new_params, params)
        opt_state = jax.tree_util.tree_map(keep, new_state, opt_state)
        step = step + (reason == OK).astype(step.dtype)
        return params, opt_state, step, reason, loss, order

    order = epoch_order(start, key) if not full_batch else jnp.zeros((), jnp.int32)
    init = (params, opt_state, start, jnp.asarray(OK), jnp.asarray(0.0, x.dtype), order)
    params, opt_state, step, reason, loss, _ = jax.lax.while_loop(cond, body, init)
    return params, opt_state, step, reason, loss


@dataclasses.dataclass(frozen=True)
class _Placeholder:
    learning_rate: float = 1.0
    momentum: float = 0.5


_PLACEHOLDER = _Placeholder()


def evaluator(loss_fn, model_fn):
    """A compiled ``evaluate(params, batch) -> (loss, accuracy, gradient norm)``: one program per
    pair of functions, compared by structure."""
    loss, loss_arrays, _ = canonical(loss_fn)
    model, model_arrays, _ = canonical(model_fn)
    return functools.partial(_evaluate, loss, model, (loss_arrays, model_arrays))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _evaluate(loss: Canonical, model: Canonical, captured, params, batch):
    loss_fn, model_fn = loss.bind(captured[0]), model.bind(captured[1])
    value, grad = jax.value_and_grad(loss_fn)(params, batch)
    accuracy = jnp.mean(jnp.argmax(model_fn(params, batch), axis=-1) == batch["y"])
    grad_norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(grad)))
    return value, accuracy, grad_norm

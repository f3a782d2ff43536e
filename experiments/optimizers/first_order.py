"""The first-order methods: ``sgd`` (plain gradient descent), ``momentum`` (heavy ball, with
``train.momentum``), ``adam`` and ``rmsprop``, as optax makes them, with their learning rate (and
momentum) in the optimizer state (``optax.inject_hyperparams``): members of a learning-rate sweep
share one compiled trainer."""

from __future__ import annotations

import jax
import optax

from experiments.optimizers.base import Optimizer


def _nu(state, bias_corrected: bool, b2: float):
    nu = optax.tree_utils.tree_get(state, "nu")
    if not bias_corrected:
        return nu
    count = optax.tree_utils.tree_get(state.inner_state, "count")
    return jax.tree_util.tree_map(lambda v: v / (1.0 - b2 ** count.astype(v.dtype)), nu)


SGD = Optimizer(
    "sgd",  # plain gradient descent
    lambda t: optax.inject_hyperparams(optax.sgd)(learning_rate=t.learning_rate),
    edge=lambda t: 2.0 / t.learning_rate,
)
MOMENTUM = Optimizer(
    "momentum",  # heavy ball
    lambda t: optax.inject_hyperparams(optax.sgd)(
        learning_rate=t.learning_rate, momentum=t.momentum
    ),
    edge=lambda t: (2.0 + 2.0 * t.momentum) / t.learning_rate,
)
ADAM = Optimizer(
    "adam",
    lambda t: optax.inject_hyperparams(optax.adam)(learning_rate=t.learning_rate),
    second_moment=lambda state: _nu(state, True, 0.999),
)
RMSPROP = Optimizer(
    "rmsprop",  # optax's RMSProp: decay 0.9, no bias correction
    lambda t: optax.inject_hyperparams(optax.rmsprop)(learning_rate=t.learning_rate),
    second_moment=lambda state: _nu(state, False, 0.9),
)

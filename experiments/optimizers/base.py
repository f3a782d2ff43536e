"""The declaration of an optimizer (``train.optimizer``): how to make it, and what the experiments
read from it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import optax


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """``make(train_cfg)``: the optax transformation; ``edge(train_cfg)``: the sharpness above
    which its quadratic model diverges (``None`` where no such line holds); ``second_moment(state)``:
    the bias-corrected second-moment pytree of an adaptive method (``None`` for others).

    A method with settings of its own declares them as the config section ``train.<section>``:
    ``defaults`` and ``check(settings) -> [(key, message)]`` for every bad value (keys relative to
    the section). A method that evaluates the model itself (``needs_model``, e.g. Hessian-free) is
    made as ``make(train_cfg, model, output_loss)`` and updated with ``batch=``;
    ``static(train_cfg)``: the settings compiled into the trainer (``(key, value)`` pairs;
    hyperparameters in its state hold placeholders there); ``diagnostics(state)``: scalars logged
    after every step; ``cost(train_cfg, log, num_outputs)``: each step's cost in
    gradient-equivalents from the log (default: 1 a step)."""

    name: str
    make: Callable[..., optax.GradientTransformation]
    edge: Callable = lambda train_cfg: None
    second_moment: Callable | None = None
    needs_model: bool = False
    section: str | None = None
    defaults: dict = dataclasses.field(default_factory=dict)
    check: Callable = lambda settings: []
    static: Callable = lambda train_cfg: ()
    diagnostics: Callable = lambda state: {}
    cost: Callable | None = None

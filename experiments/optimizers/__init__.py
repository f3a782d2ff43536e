"""Optimizers by name (``train.optimizer``), each one declaration (:class:`Optimizer`): how to
make it, the edge of stability of its quadratic model, its second moment, and for a method with
settings of its own its config section ``train.<section>`` with defaults and checks.

The built-ins are listed in :data:`BUILTINS` (``first_order``: sgd, momentum, adam, rmsprop;
``hessian_free``); adding one is a declaration and a line there, or ``OPTIMIZERS.register``.
"""

from __future__ import annotations

from experiments.optimizers import first_order, hessian_free
from experiments.optimizers.base import Optimizer
from experiments.registry import Registry

BUILTINS = (
    first_order.SGD,
    first_order.MOMENTUM,
    first_order.ADAM,
    first_order.RMSPROP,
    hessian_free.HESSIAN_FREE,
)
"""The built-in optimizer declarations, registered in :data:`OPTIMIZERS` at import."""

OPTIMIZERS: Registry[Optimizer] = Registry("optimizer", "train.optimizer")
"""Optimizers by name (``train.optimizer``), each an :class:`Optimizer` declaration with its config
section and checks; ``BUILTINS`` are registered at import."""
for _entry in BUILTINS:
    OPTIMIZERS.register(_entry.name, _entry)

__all__ = ["BUILTINS", "OPTIMIZERS", "Optimizer"]

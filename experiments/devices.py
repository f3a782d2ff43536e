"""Data-parallel measurement (``measure.devices``): how many devices, and a member's measurement
set sharded over them."""

from __future__ import annotations

import dataclasses

import jax

import curvature.sharding as cvs
from experiments.errors import ConfigError
from experiments.lifecycle import Setup


def measure_devices(setting, num_examples: int, available: int) -> int:
    """How many devices ``measure.devices`` (an integer or ``"all"``) shards ``num_examples``
    measurement examples over, of ``available``. Shards are equal (each device's part of the
    mean has the same weight, and no example is dropped or padded): an integer must divide the
    examples; ``"all"`` is the largest count up to ``available`` that does."""
    if setting == "all":
        return max(d for d in range(1, available + 1) if num_examples % d == 0)
    if setting > available:
        raise ConfigError(
            f"config key measure.devices: {setting} devices asked for, but jax.device_count() "
            f"is {available}"
        )
    if num_examples % setting:
        raise ConfigError(
            f"config key measure.devices: the {num_examples} measurement examples do not split "
            f"evenly over {setting} devices; set measure.num_examples to a multiple of "
            f"{setting}, measure.devices to a divisor of {num_examples}, or measure.devices='all'"
        )
    return setting


def on_mesh(setup_: Setup, setting) -> Setup:
    """``setup_`` for data-parallel measurement (``measure.devices``): the measurement set
    sharded along its example axis over a one-axis mesh of the first devices, the test set
    replicated on them. One device: ``setup_`` itself, unchanged."""
    count = measure_devices(setting, len(setup_.measure_data["y"]), jax.device_count())
    if count == 1:
        return setup_
    mesh = cvs.data_mesh(devices=jax.devices()[:count])
    return dataclasses.replace(
        setup_,
        measure_data=cvs.shard_data(setup_.measure_data, mesh),
        test_data=cvs.replicate(setup_.test_data, mesh),
        mesh=mesh,
    )

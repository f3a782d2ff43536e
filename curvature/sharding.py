"""Curvature on many devices and many hosts, through JAX's own sharding.

Nothing here changes the operators or the estimators: an operator built from arrays that are
sharded over a :class:`jax.sharding.Mesh` is partitioned by XLA (GSPMD) when an estimator is
compiled. With the data sharded along the example axis, each device runs the model on its own
examples and one all-reduce of the ``n``-vector (a tuple over the parameter leaves) sums the
per-device parts of each product ``A v``; the Krylov vectors, the probes and the small dense
algebra are replicated. With the parameters sharded along a model axis, the flat vectors and the
Lanczos basis follow them (sharded along ``n``).

* :func:`data_mesh`: a one-axis mesh over every device (of every process), in the ``Auto`` mode
  that automatic partitioning needs.
* :func:`shard_data`: data (a pytree with a leading example axis) sharded along that axis, from
  the whole data set on one process or from each process's own examples on many.
* :func:`replicate`: parameters (or any pytree) copied to every device of a mesh.
* :func:`collective_counts`: the collectives in the compiled program of one matvec, to check
  that a sharding does what it should (one all-reduce, no all-gather of the data).

Many hosts: call :func:`jax.distributed.initialize` first (it reads SLURM's and other clusters'
variables when given no arguments), then build the same mesh on every process; every process
runs the same program on the global arrays and gets the same, replicated results.
"""

from __future__ import annotations

import collections
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from curvature._checks import num_examples
from curvature.linear_operator import LinearOperator

__all__ = ["collective_counts", "data_mesh", "replicate", "shard_data"]

PyTree = Any

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def data_mesh(axis: str = "data", *, devices=None) -> Mesh:
    """A one-axis mesh named ``axis`` over ``devices`` (default: all devices of all processes).

    The axis is of type ``Auto``: XLA decides the shardings of intermediate values. Under an
    ``Explicit`` axis (``jax.make_mesh``'s default in recent JAX) the user's model would have to
    say how to shard the backward pass of every product that contracts the example axis (JAX
    raises ``ShardingTypeError: Contracting dimensions are sharded``).
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (axis,), axis_types=(AxisType.Auto,))


def _check_auto(mesh: Mesh, axis: str) -> None:
    if axis not in mesh.axis_names:
        raise ValueError(f"the mesh has axes {mesh.axis_names}, not {axis!r}")
    kind = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))[axis]
    if kind != AxisType.Auto:
        raise ValueError(
            f"mesh axis {axis!r} is {kind}; curvature's operators need an Auto axis so that XLA "
            "partitions the model's backward pass: use curvature.sharding.data_mesh(), or "
            "jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Auto, ...))"
        )


def shard_data(
    data: PyTree, mesh: Mesh, axis: str = "data", *, process_local: bool = False
) -> PyTree:
    """``data`` (a pytree whose leaves share a leading example axis) sharded along ``axis``.

    Args:
      data: on one process, the whole data set (NumPy or JAX arrays). With
        ``process_local=True``, this process's own examples: the global array is their
        concatenation in process order (:func:`jax.make_array_from_process_local_data`), and every
        process must pass the same number of examples.
      mesh: a mesh whose ``axis`` is of type ``Auto`` (e.g. :func:`data_mesh`).
      axis: the mesh axis that indexes examples.

    The number of examples must be a multiple of the axis size (equal shards: each device's part
    of the mean has the same weight). Drop or pad examples before sharding otherwise.
    """
    _check_auto(mesh, axis)
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    size = mesh.shape[axis]
    local = num_examples(data)
    total = local * jax.process_count() if process_local else local
    if total % size:
        raise ValueError(
            f"{total} examples do not split evenly over the {size} devices of mesh axis {axis!r}; "
            f"use a multiple of {size} examples"
        )
    if process_local:
        return jax.tree_util.tree_map(
            lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), data
        )
    return jax.device_put(data, sharding)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every array of ``tree`` copied to every device of ``mesh`` (e.g. the parameters, when the
    data are sharded). On many processes, every process must pass the same values."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def collective_counts(op: LinearOperator, vector: jax.Array | None = None) -> dict[str, int]:
    """How many collective operations of each kind the compiled program of one matvec
    ``op @ vector`` contains (``{"all-reduce": 1, "all-gather": 0, ...}``).

    Counts operations in the optimised HLO text, not executions: an all-reduce inside the loop
    over data chunks (``batch_size``) is counted once and runs once per chunk. ``vector``
    defaults to a replicated vector of ones.
    """
    if vector is None:
        vector = jnp.ones((op.size,), op.dtype)
    text = jax.jit(_apply).lower(op, vector).compile().as_text()
    counts = collections.Counter(
        match.group(1)
        for match in re.finditer(r"\s(" + "|".join(_COLLECTIVES) + r")(?:-start)?\(", text)
    )
    return {name: counts.get(name, 0) for name in _COLLECTIVES}


def _apply(op: LinearOperator, vector: jax.Array) -> jax.Array:
    return op.apply(vector)

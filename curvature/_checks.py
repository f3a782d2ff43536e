"""Input checks shared by every builder and estimator: one place, one wording.

Host-side checks run once, before a compiled program, and are skipped for traced values, so every
builder and estimator can itself be called inside ``jax.jit``. None of them runs inside a loop.
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def positive_int(value, name: str) -> int:
    """``value`` as a Python int if it is a positive integer (numpy integers too), else an error."""
    try:
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if out < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return out


def check_key(key) -> None:
    if key is None:
        raise TypeError("a PRNG key is required: pass key=jax.random.key(seed)")


def check_steps(op, num_steps: int) -> int:
    num_steps = positive_int(num_steps, "num_steps")
    if num_steps > op.size:
        raise ValueError(
            f"num_steps={num_steps} exceeds the operator's dimension n={op.size}; a Krylov basis "
            "has at most n vectors"
        )
    return num_steps


def require_square(op, what: str) -> None:
    """A clear error for an off-diagonal block given to an estimator that needs a square,
    symmetric operator."""
    m, k = op.shape
    if m != k:
        raise ValueError(
            f"{what} needs a square, symmetric operator; this is an off-diagonal block of shape "
            f"({m}, {k}) from restrict(op, rows, cols): use restrict(op, rows) for a diagonal "
            "block, or frobenius_norm_squared / dense / @ for this one"
        )


def check_finite_result(values: jax.Array, name: str) -> None:
    """One host sync after a whole run (never inside one); skipped under tracing."""
    if isinstance(values, jax.core.Tracer):
        return
    if not bool(jnp.all(jnp.isfinite(values))):
        raise FloatingPointError(
            f"{name} produced non-finite values {values}: the operator's matvec returned NaN or "
            "inf (check the loss and the data for non-finite values, or use float64)"
        )


def is_traced(tree) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def _name(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def _check_nnx_variables(params: PyTree, what: str) -> None:
    """Flax NNX state (``nnx.state(model)``) holds every variable of the model: batch statistics,
    RNG keys and counts, caches. Only ``nnx.Param`` variables are parameters; a float
    ``BatchStat`` would be differentiated as one without an error. Checked only when flax NNX is
    already imported (``curvature`` never imports it)."""
    nnx = sys.modules.get("flax.nnx")
    variable = getattr(nnx, "Variable", None)
    if variable is None:
        return
    leaves = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, variable)
    )[0]
    for path, x in leaves:
        if isinstance(x, variable) and not isinstance(x, nnx.Param):
            raise TypeError(
                f"{what} leaf {_name(path)} is a flax nnx.{type(x).__name__}, not an nnx.Param: "
                "curvature would differentiate it as a parameter (BatchNorm's running statistics, "
                "say). Pass only the parameters, nnx.state(model, nnx.Param), and merge the rest "
                "back in the loss (graphdef, params, rest = nnx.split(model, nnx.Param, ...)); or "
                "build the operator with curvature.flax, which does this"
            )


def check_float_params(params: PyTree, what: str = "params") -> None:
    """Every parameter leaf must be a floating-point array: only those can be differentiated.
    Flax NNX variables other than ``nnx.Param`` (batch statistics, RNG state) are refused."""
    _check_nnx_variables(params, what)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves:
        raise ValueError(f"{what} has no array leaves")
    for path, x in leaves:
        dtype = getattr(x, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            hint = (
                " (a PRNG key: with flax NNX pass only the nnx.Param state, or build the operator "
                "with curvature.flax, which differentiates the parameters and carries the rest)"
                if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
                else ""
            )
            raise TypeError(
                f"{what} leaf {_name(path)} has dtype {dtype or type(x).__name__}; curvature "
                f"differentiates floating-point leaves only{hint}"
            )


@jax.jit
def _leaves_finite(params):
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(params)])


def check_finite_params(params: PyTree) -> None:
    if is_traced(params) or bool(np.all(_leaves_finite(params))):  # one device sync
        return
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        arr = np.asarray(x)
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise ValueError(
                f"params leaf {_name(path)} has {bad} non-finite value(s) (NaN or inf) out of "
                f"{arr.size}"
            )


def check_scalar(fn: Callable, args: tuple, what: str) -> None:
    out = jax.eval_shape(fn, *args)
    shape = getattr(out, "shape", None)
    if shape != ():
        raise ValueError(
            f"{what} must return a scalar (the mean over its batch); it returned "
            f"{'shape ' + str(shape) if shape is not None else type(out).__name__}"
        )


def check_finite_value(value: jax.Array, what: str) -> None:
    if isinstance(value, jax.core.Tracer):
        return
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{what} is not finite at the given parameters: {v}")


def num_examples(data: PyTree) -> int:
    """The common leading (example) size of every data leaf, or an error listing them."""
    leaves = jax.tree_util.tree_flatten_with_path(data)[0]
    if not leaves:
        raise ValueError("data has no array leaves")
    sizes = {}
    for path, x in leaves:
        if np.ndim(x) == 0:
            raise ValueError(
                f"data leaf {_name(path)} is a scalar; every data leaf needs a leading axis that "
                "indexes examples"
            )
        sizes[_name(path)] = np.shape(x)[0]
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(f"data leaves have different leading (example) sizes: {listing}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError("data has zero examples")
    return n

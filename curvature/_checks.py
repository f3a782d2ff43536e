"""Input checks shared by every builder and estimator: one place, one wording.

Host-side checks run once, before a compiled program, and are skipped for traced values, so every
builder and estimator can itself be called inside ``jax.jit``. None of them runs inside a loop.
"""

from __future__ import annotations

import functools
import math
import operator
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


# Counts (steps, matvecs, probes) are int32 inside compiled code.
_MAX_COUNT = 2**31 - 1


def positive_int(value, name: str) -> int:
    """``value`` as a Python int if it is a positive integer (numpy integers too) that fits the
    32-bit counters of compiled code, else an error naming ``name``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if out < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if out > _MAX_COUNT:
        raise ValueError(
            f"{name}={out} is too large: counts are 32-bit integers in compiled code (at most "
            f"2**31 - 1 = {_MAX_COUNT})"
        )
    return out


def real(
    value,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a Python float if it is a finite real number within the bounds (``low <=``
    or ``low <``, ``<= high`` or ``< high``), else an error naming ``name`` and the bounds."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    wanted = f"{name} must be a finite number{' ' + ' and '.join(bounds) if bounds else ''}"
    if isinstance(value, bool | str) or value is None:
        raise TypeError(f"{wanted}, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{wanted}, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{wanted}, got {value!r}")
    if low is not None and (out < low or (low_open and out == low)):
        raise ValueError(f"{wanted}, got {value!r}")
    if high is not None and (out > high or (high_open and out == high)):
        raise ValueError(f"{wanted}, got {value!r}")
    return out


def flag(value, name: str) -> bool:
    """``value`` if it is a bool (numpy's too), else an error naming ``name``."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


@functools.cache
def _raw_key_shape(impl) -> tuple[int, ...]:
    """The shape of a raw ``uint32`` key (``jax.random.PRNGKey``) of the default implementation."""
    return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape


def check_key(key) -> None:
    """``key`` must be one PRNG key: ``jax.random.key(seed)`` (a typed key of shape ``()``) or a
    raw ``uint32`` key of the default implementation (``jax.random.PRNGKey(seed)``). A seed, a
    float or integer array, or a batch of keys gets an error that says what to pass."""
    if key is None:
        raise TypeError("a PRNG key is required: pass key=jax.random.key(seed)")
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape != ():
            raise ValueError(
                f"key must be a single PRNG key; got an array of {math.prod(shape)} keys of "
                f"shape {shape} (pass one of them)"
            )
        return
    if dtype == np.uint32 and shape == _raw_key_shape(jax.config.jax_default_prng_impl):
        return  # a raw key, jax.random.PRNGKey(seed)
    got = (
        f"an array of shape {shape} and dtype {dtype}"
        if dtype is not None and shape is not None
        else f"the {type(key).__name__} {key!r:.40}"
    )
    raise TypeError(
        f"key must be a PRNG key, key=jax.random.key(seed); got {got}"
        + (f" (for seed {key}: key=jax.random.key({key}))" if isinstance(key, int) else "")
    )


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
    check_x64(op.layout, f"{what}: the operator")


def check_finite_result(values: jax.Array, name: str) -> None:
    """One host sync after a whole run (never inside one); skipped under tracing."""
    if isinstance(values, jax.core.Tracer):
        return
    if not bool(jnp.all(jnp.isfinite(values))):
        raise FloatingPointError(
            f"{name} produced non-finite values {values}: the operator's matvec returned NaN or "
            "inf (check the loss and the data for non-finite values, or use float64)"
        )


def check_x64(layout, what: str = "this operator") -> None:
    """A float64 operator (parameters built under ``jax.enable_x64(True)``; ``layout`` holds
    their dtypes) used where 64-bit types are off: JAX would compute in float32 beside its
    float64 arrays and fail deep inside the loss. Checked when a product is set up (at trace
    time: free inside compiled code)."""
    if jax.config.jax_enable_x64:
        return
    wide = [np.dtype(d) for d in layout.dtypes if np.dtype(d).itemsize >= 8]
    if wide:
        raise TypeError(
            f"{what} is {wide[0].name} (built under jax.enable_x64(True)), and 64-bit types are "
            "off here: use it inside `with jax.enable_x64(True):` as well, or build it from "
            "float32 parameters"
        )


def check_real_vector(x, what: str) -> None:
    """Operators here are real: a complex vector would lose its imaginary part without a word."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(
            f"{what} is complex ({dtype}); operators here are real: apply them to the real and "
            "imaginary parts separately (A @ v.real + 1j * (A @ v.imag))"
        )


def check_product_input(op, x, what: str) -> None:
    """What ``op @ x`` needs beside shapes: a real ``x``, and 64-bit types on for a float64
    operator."""
    check_real_vector(x, what)
    check_x64(op.layout)


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
    """``fn(*args)`` (traced once, nothing computed) must return a floating-point JAX scalar: not
    an array of another shape, not an integer, and not a Python or numpy number, which is a
    constant that no derivative sees."""
    returned = []

    def traced(*a):
        returned.append(fn(*a))
        return returned[-1]

    out = jax.eval_shape(traced, *args)
    raw = returned[0] if returned else None
    if isinstance(raw, bool | int | float | complex | np.ndarray | np.generic):
        raise TypeError(
            f"{what} returned the constant {raw!r:.40} ({type(raw).__name__}), not a JAX scalar "
            "computed from its arguments: compute the loss with jax.numpy"
        )
    shape = getattr(out, "shape", None)
    if shape != ():
        raise ValueError(
            f"{what} must return a scalar (the mean over its batch); it returned "
            f"{'shape ' + str(shape) if shape is not None else type(out).__name__}"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(
            f"{what} returned a scalar of dtype {out.dtype}; a loss must be floating point"
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

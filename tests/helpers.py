"""Shared test helpers: small ReLU / tanh MLPs, their data and losses, and dense references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh}


def init_mlp(key, sizes, dtype=jnp.float64):
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        kw, kb = jax.random.split(jax.random.fold_in(key, i))
        params.append(
            {
                "w": (jax.random.normal(kw, (a, b)) / np.sqrt(a)).astype(dtype),
                "b": (0.1 * jax.random.normal(kb, (b,))).astype(dtype),
            }
        )
    return params


def mlp(activation):
    act = ACTIVATIONS[activation]

    def apply(params, x):
        for layer in params[:-1]:
            x = act(x @ layer["w"] + layer["b"])
        return x @ params[-1]["w"] + params[-1]["b"]

    return apply


def make_problem(activation, loss_name, *, num_examples=13, sizes=(4, 6, 5, 3), seed=0, dtype=None):
    """See :func:`_make_problem`; ``dtype`` defaults to float64 under x64 and float32 otherwise."""
    if dtype is None:
        dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    return _make_problem(activation, loss_name, num_examples, tuple(sizes), seed, jnp.dtype(dtype))


@functools.cache
def _make_problem(activation, loss_name, num_examples, sizes, seed, dtype):
    """An MLP with two hidden layers, data and the user-facing functions for both builders.

    Cached, so that tests share the same function objects and hence JAX's compilation caches.
    Call it inside ``jax.enable_x64(True)`` for float64 (the default dtype).
    """
    key = jax.random.key(seed)
    params = init_mlp(key, sizes, dtype)
    x = jax.random.normal(jax.random.fold_in(key, 100), (num_examples, sizes[0])).astype(dtype)
    if loss_name == "cross_entropy":
        y = jax.random.randint(jax.random.fold_in(key, 101), (num_examples,), 0, sizes[-1])
    else:
        y = jax.random.normal(jax.random.fold_in(key, 101), (num_examples, sizes[-1])).astype(dtype)
    data = {"x": x, "y": y}
    net = mlp(activation)

    def model(p, batch):
        return net(p, batch["x"])

    def output_loss(out, batch):
        if loss_name == "cross_entropy":
            logz = jax.nn.logsumexp(out, axis=-1)
            return jnp.mean(logz - jnp.take_along_axis(out, batch["y"][:, None], -1)[:, 0])
        return 0.5 * jnp.mean(jnp.sum((out - batch["y"]) ** 2, axis=-1))

    def loss(p, batch):
        return output_loss(model(p, batch), batch)

    return params, data, model, loss, output_loss


def dense_hessian(loss, params, data):
    flat, unravel = ravel_pytree(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    layout = (loss, treedef, tuple((x.shape, jnp.result_type(x)) for x in leaves))
    if layout not in _HESSIAN_PROGRAMS:
        # ``unravel`` depends on the layout alone: the first one serves every later call.
        _HESSIAN_PROGRAMS[layout] = jax.jit(jax.hessian(lambda w, d: loss(unravel(w), d)))
    return _HESSIAN_PROGRAMS[layout](flat, data)


#: One jitted ``jax.hessian`` per loss and parameter layout, so that the tests of a module
#: compile each dense reference once (a fresh lambda on every call compiled it again).
_HESSIAN_PROGRAMS = {}


def sym_eigh(matrix):
    return np.linalg.eigh(np.asarray(matrix, np.float64))


def hessian_problem(activation, loss_name="cross_entropy"):
    """The chunked Hessian operator of a small MLP and its dense float64 reference."""
    import curvature as cv

    params, data, _, loss, _ = make_problem(activation, loss_name)
    op = cv.hessian(loss, params, data, batch_size=5)
    return op, np.asarray(dense_hessian(loss, params, data))


def assert_eigs_close(got, want, scale, rtol):
    # Relative per eigenvalue, with a floor for eigenvalues near zero.
    err = np.abs(np.asarray(got) - np.asarray(want))
    assert np.all(err <= rtol * np.maximum(np.abs(want), 1e-3 * scale)), (got, want)


def rel_err(a, b):
    """``||a - b|| / ||b||``."""
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def compiled_cache_sizes() -> list[int]:
    """The number of compiled programs of every jitted entry point of the library: the driver's
    (each estimator's whole run is one), the builders' checks and preparation outside jit, and
    products and diagonals from the host."""
    from curvature import _checks, _driver, builders, linear_operator, stochastic_trace

    jitted = (
        _driver._run_compiled,
        linear_operator._host_rows,
        linear_operator._host_diagonal,
        stochastic_trace.probe_rows,
        builders._mean_loss,
        builders._mean_output_loss,
        builders._pull,
        _checks._leaves_finite,
    )
    return [f._cache_size() for f in jitted]


#: The first line of a Python child that a test interrupts with SIGINT: Python's KeyboardInterrupt
#: handler, which it does not install when it starts with SIGINT ignored (a suite started in the
#: background by a non-interactive shell ignores SIGINT, and children inherit that). Set here
#: rather than in a ``preexec_fn``, which would fork a multithreaded JAX process.
SIGINT_HANDLER = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"

"""A second call with the same shapes compiles nothing; each run is one compiled program."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from conftest import make_problem

import curvature as cv
from curvature import density, krylov, operators, power, stochastic_trace


def cache_sizes():
    fns = (
        krylov._eigsh,
        krylov._lanczos,
        power._power,
        stochastic_trace._trace,
        stochastic_trace._diagonal,
        density._slq,
        operators._matvec,
        operators._mean_loss,
    )
    return [f._cache_size() for f in fns]


def run_everything(op, key):
    cv.eigsh(op, k=3, num_steps=10, key=key)
    cv.lanczos(op, num_steps=10, key=key)
    cv.power_iteration(op, k=2, key=key, max_iters=5)
    cv.trace(op, num_matvecs=6, key=key)
    cv.diagonal(op, num_matvecs=4, key=key)
    cv.spectral_density(op, num_probes=2, num_steps=5, key=key)
    op @ jnp.ones(op.size, op.dtype)


def test_new_parameters_with_same_shapes_do_not_recompile():
    params, data, _, loss, _ = make_problem("relu", "mse", dtype=jnp.float32)
    run_everything(cv.hessian(loss, params, data, batch_size=4), jax.random.key(0))
    before = cache_sizes()
    # Training moves the parameters; the measurement must reuse the compiled programs.
    moved = jax.tree_util.tree_map(lambda p: p * 0.9 + 0.01, params)
    run_everything(cv.hessian(loss, moved, data, batch_size=4), jax.random.key(1))
    assert cache_sizes() == before


@dataclasses.dataclass(frozen=True)
class CountingMatvec:
    """A matvec that counts how often JAX traces it."""

    counter: list

    def __call__(self, matrix, v):
        self.counter.append(1)
        return matrix @ v


def test_matvec_traced_once_per_program_whatever_the_step_count():
    traces = {}
    for steps in (20, 100):
        counter = []
        op = cv.LinearOperator(
            CountingMatvec(counter), jnp.eye(120), cv.from_matrix(jnp.eye(120)).layout
        )
        cv.lanczos(op, num_steps=steps, key=jax.random.key(0))
        traces[steps] = len(counter)
    # A Python loop over steps would trace the matvec once per step.
    assert traces[20] == traces[100] <= 2, traces
    counter = []
    op = cv.LinearOperator(
        CountingMatvec(counter), jnp.eye(120), cv.from_matrix(jnp.eye(120)).layout
    )
    cv.trace(op, num_matvecs=60, key=jax.random.key(0), method="hutchinson")
    cv.power_iteration(op, k=3, key=jax.random.key(0), max_iters=50)
    assert len(counter) <= 4  # once per program: trace (1), power loop (1) and residual check (1)


def test_eigsh_is_a_single_while_loop_program():
    op = cv.from_matrix(jnp.asarray(np.diag(np.arange(30.0))))
    text = krylov._eigsh.lower(
        op,
        jax.random.key(0),
        jnp.float32(1e-3),
        k=2,
        which="LA",
        num_steps=25,
        reorthogonalize=True,
        probe_batch_size=None,
    ).as_text()
    assert text.count("stablehlo.while") >= 1
    assert (
        "stablehlo.custom_call" not in text
        or "host" not in text.lower().split("custom_call")[1][:80]
    )

"""A second call with the same shapes compiles nothing; each run is one compiled program."""

import dataclasses

import jax
import jax.numpy as jnp
from conftest import make_problem

import curvature as cv
from curvature import density, krylov, operators, power, stochastic_trace

JITTED = (
    krylov._eigsh,
    krylov._lanczos,
    power._power,
    stochastic_trace._trace,
    stochastic_trace._diagonal,
    stochastic_trace._frobenius,
    density._slq,
    operators._matvec,
    operators._matmat,
    operators._dense,
    operators._mean_loss,
    operators._mean_output_loss,
    operators._leaves_finite,
)


def cache_sizes():
    return [f._cache_size() for f in JITTED]


def run_everything(op, key):
    cv.eigsh(op, k=3, num_steps=10, key=key)
    cv.lanczos(op, num_steps=10, key=key)
    cv.power_iteration(op, k=2, key=key, max_iters=5)
    cv.trace(op, num_matvecs=6, key=key)
    cv.diagonal(op, num_matvecs=4, key=key)
    cv.frobenius_norm_squared(op, num_matvecs=4, key=key)
    cv.spectral_density(op, num_probes=2, num_steps=5, key=key)
    op @ jnp.ones(op.size, op.dtype)
    op @ jnp.ones((op.size, 2), op.dtype)


def build_all(params, data, model, loss):
    h = cv.hessian(loss, params, data, batch_size=4)
    g = cv.gauss_newton(model, params, data, loss="mse", batch_size=4)
    return h, g, h - g


def test_new_parameters_with_same_shapes_do_not_recompile():
    params, data, model, loss, _ = make_problem("relu", "mse", dtype=jnp.float32)
    for op in build_all(params, data, model, loss):
        run_everything(op, jax.random.key(0))
    cv.dense(build_all(params, data, model, loss)[2])
    before = cache_sizes()
    # Training moves the parameters; the measurement must reuse the compiled programs.
    moved = jax.tree_util.tree_map(lambda p: p * 0.9 + 0.01, params)
    for op in build_all(moved, data, model, loss):
        run_everything(op, jax.random.key(1))
    cv.dense(build_all(moved, data, model, loss)[2])
    cv.power_iteration(
        build_all(moved, data, model, loss)[0], k=2, key=jax.random.key(1), max_iters=7
    )
    assert cache_sizes() == before


@dataclasses.dataclass(frozen=True)
class CountingMatvec:
    """A matvec that counts how often JAX traces it."""

    counter: list

    def __call__(self, matrix, v):
        self.counter.append(1)
        return matrix @ v


def counting_operator(n=120):
    counter = []
    return cv.LinearOperator(
        CountingMatvec(counter), jnp.eye(n), cv.from_matrix(jnp.eye(n)).layout
    ), counter


def test_matvec_traced_once_per_program_whatever_the_step_count():
    # A Python loop over steps would trace the matvec once per step; a compiled loop traces it
    # once per program, whatever the number of steps.
    for run in (
        lambda op, s: cv.lanczos(op, num_steps=s, key=jax.random.key(0)),
        lambda op, s: cv.eigsh(op, k=2, num_steps=s, key=jax.random.key(0)),
        lambda op, s: cv.spectral_density(op, num_probes=3, num_steps=s, key=jax.random.key(0)),
        lambda op, s: cv.trace(op, num_matvecs=s, key=jax.random.key(0), method="hutchinson"),
        lambda op, s: cv.trace(op, num_matvecs=s, key=jax.random.key(0)),
        lambda op, s: cv.power_iteration(op, k=3, key=jax.random.key(0), max_iters=s),
    ):
        counts = []
        for steps in (20, 100):
            op, counter = counting_operator()
            run(op, steps)
            counts.append(len(counter))
        # eigsh: Lanczos body + residual check; Hutch++: sketch, exact part, residual probes.
        assert counts[0] == counts[1] <= 3, counts

"""Every estimator is one compiled program: a second call with the same shapes compiles nothing,
the matvec is traced once per program whatever the step count, and estimators run inside jit."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compiled_cache_sizes, make_problem

import curvature as cv


def run_everything(op, key):
    cv.eigsh(op, k=3, num_steps=10, key=key)
    cv.lanczos(op, num_steps=10, key=key)
    cv.power_iteration(op, k=2, key=key, max_steps=5)
    cv.trace(op, num_matvecs=6, key=key)
    cv.diagonal(op, num_matvecs=4, key=key)
    cv.frobenius_norm_squared(op, num_matvecs=4, key=key)
    cv.spectral_density(op, num_probes=2, num_steps=5, key=key)
    op @ jnp.ones(op.size, op.dtype)
    op @ jnp.ones((op.size, 2), op.dtype)


def build_all(params, data, model, loss):
    # The Hessian, and the residual H - G (which holds the Gauss-Newton matvec too).
    h = cv.hessian(loss, params, data, batch_size=4)
    g = cv.gauss_newton(model, params, data, loss="mse", batch_size=4)
    return h, h - g


def test_new_parameters_with_same_shapes_do_not_recompile():
    # One hidden layer: what is compiled (or not) does not depend on the depth, and each of the
    # twenty programs compiles a third faster than with two.
    params, data, model, loss, _ = make_problem("relu", "mse", dtype=jnp.float32, sizes=(4, 6, 3))
    for op in build_all(params, data, model, loss):
        run_everything(op, jax.random.key(0))
    cv.dense(build_all(params, data, model, loss)[1])
    before = compiled_cache_sizes()
    # Training moves the parameters; the measurement must reuse the compiled programs.
    moved = jax.tree_util.tree_map(lambda p: p * 0.9 + 0.01, params)
    for op in build_all(moved, data, model, loss):
        run_everything(op, jax.random.key(1))
    cv.dense(build_all(moved, data, model, loss)[1])
    cv.power_iteration(
        build_all(moved, data, model, loss)[0], k=2, key=jax.random.key(1), max_steps=7
    )
    assert compiled_cache_sizes() == before


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
        lambda op, s: cv.power_iteration(op, k=3, key=jax.random.key(0), max_steps=s),
    ):
        counts = []
        for steps in (20, 100):
            op, counter = counting_operator()
            run(op, steps)
            counts.append(len(counter))
        # eigsh: Lanczos body + residual check; Hutch++: sketch, exact part, residual probes.
        assert counts[0] == counts[1] <= 3, counts


def test_estimators_run_inside_jit(x64):
    params, data, _, loss, _ = make_problem("tanh", "mse")
    key = jax.random.key(0)

    @jax.jit
    def measure(p):
        op = cv.hessian(loss, p, data)
        return (
            cv.eigsh(op, k=2, num_steps=20, key=key).eigenvalues,
            cv.trace(op, num_matvecs=12, key=key).value,
            cv.power_iteration(op, k=1, key=key, max_steps=50).eigenvalues,
            cv.spectral_density(op, num_probes=2, num_steps=10, key=key).nodes,
        )

    top, tr, _, _ = measure(params)
    eager = cv.hessian(loss, params, data)
    assert np.allclose(top, cv.eigsh(eager, k=2, num_steps=20, key=key).eigenvalues, rtol=1e-10)
    assert float(tr) == pytest.approx(
        float(cv.trace(eager, num_matvecs=12, key=key).value), rel=1e-10
    )


def test_streamed_estimators_compile_each_step_once_and_never_switch_jit_off(x64):
    # Host-driven: the loops run in Python, every step between two products is a compiled
    # program compiled once; a second run compiles nothing, and nothing in the library turns
    # jit off globally.
    import pathlib

    from curvature import _driver

    params, data, _, loss, _ = make_problem("tanh", "mse")
    op = cv.hessian(loss, params, lambda: [data])
    key = jax.random.key(0)

    def run():
        cv.eigsh(op, k=2, num_steps=6, key=key)
        cv.trace((op, 2.0 * op), num_matvecs=6, key=key)
        cv.power_iteration(op, k=1, key=key, max_steps=4)

    run()
    steps = list(_driver._COMPILED.values())
    sizes = [f._cache_size() for f in steps]
    run()
    assert list(_driver._COMPILED.values()) == steps
    assert [f._cache_size() for f in steps] == sizes
    source = pathlib.Path(cv.__file__).parent
    assert not [p.name for p in source.glob("*.py") if "disable_jit" in p.read_text()]

"""A second call with the same shapes compiles nothing; each run is one compiled program."""

import dataclasses

import jax
import jax.numpy as jnp
from helpers import make_problem

import curvature as cv
from curvature import _checks, _driver, builders, linear_operator, stochastic_trace

# Every compiled program of the library: the driver's (each estimator's whole run is one), the
# builders' checks and preparation outside jit, and products and diagonals from the host.
JITTED = (
    _driver._run_compiled,
    linear_operator._host_rows,
    linear_operator._host_diagonal,
    stochastic_trace.probe_rows,
    builders._mean_loss,
    builders._mean_output_loss,
    builders._pull,
    _checks._leaves_finite,
)


def cache_sizes():
    return [f._cache_size() for f in JITTED]


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
    params, data, model, loss, _ = make_problem("relu", "mse", dtype=jnp.float32)
    for op in build_all(params, data, model, loss):
        run_everything(op, jax.random.key(0))
    cv.dense(build_all(params, data, model, loss)[1])
    before = cache_sizes()
    # Training moves the parameters; the measurement must reuse the compiled programs.
    moved = jax.tree_util.tree_map(lambda p: p * 0.9 + 0.01, params)
    for op in build_all(moved, data, model, loss):
        run_everything(op, jax.random.key(1))
    cv.dense(build_all(moved, data, model, loss)[1])
    cv.power_iteration(
        build_all(moved, data, model, loss)[0], k=2, key=jax.random.key(1), max_steps=7
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
        lambda op, s: cv.power_iteration(op, k=3, key=jax.random.key(0), max_steps=s),
    ):
        counts = []
        for steps in (20, 100):
            op, counter = counting_operator()
            run(op, steps)
            counts.append(len(counter))
        # eigsh: Lanczos body + residual check; Hutch++: sketch, exact part, residual probes.
        assert counts[0] == counts[1] <= 3, counts


def _mse(p, batch, scale):
    return scale * jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2)


def test_fresh_lambdas_and_partials_reuse_the_compiled_programs():
    # A loss rebuilt on every call (a lambda inside a loop, a functools.partial) must not
    # recompile: the operator's static part compares functions by structure, and the arrays a
    # loss captures are operands.
    import functools
    import warnings

    key = jax.random.key(3)
    x = jax.random.normal(key, (12, 5))
    data = {"x": x, "y": x[:, :2] @ jnp.ones((2, 3))}
    params = {"w": jax.random.normal(jax.random.fold_in(key, 1), (5, 3))}
    weights = jnp.linspace(0.5, 1.5, 12)

    def build(i):
        shift = jnp.full((3,), 0.1 * i)  # a fresh captured array each time, same shape
        loss = lambda p, b: _mse(p, b, 1.0) + jnp.mean(weights) * jnp.sum((p["w"] - shift) ** 2)  # noqa: E731
        partial = functools.partial(_mse, scale=2.0)
        return (
            cv.hessian(loss, params, data),
            cv.hessian(partial, params, data, batch_size=5),
            cv.gauss_newton(lambda p, b: b["x"] @ p["w"], params, data, loss="mse"),
        )

    def run(ops):
        return [cv.eigsh(op, k=2, num_steps=8, key=jax.random.key(0)).eigenvalues for op in ops]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no growth warning either
        first = run(build(0))
        before = cache_sizes()
        for i in range(1, 4):
            values = run(build(i))
        assert cache_sizes() == before
    # The captured arrays are live operands, not stale constants: the quadratic term's shift
    # does not change the Hessian, but a captured scale must.
    for a, b in zip(first, values, strict=True):
        assert jnp.allclose(a, b, rtol=1e-5)
    scaled = [
        cv.eigsh(
            cv.hessian(lambda p, b, s=s: _mse(p, b, s), params, data),
            k=1,
            num_steps=8,
            key=jax.random.key(0),
        ).eigenvalues[0]
        for s in (1.0, 3.0)
    ]
    assert jnp.allclose(scaled[1], 3 * scaled[0], rtol=1e-5)


def test_a_cache_that_keeps_growing_warns_once_with_the_fix():
    import pytest

    class Model:  # no structural equality: compared by identity
        def __call__(self, p, batch):
            return batch["x"] @ p

    data = {"x": jnp.ones((4, 3))}
    params = jnp.ones(3)
    with pytest.warns(UserWarning, match="captures Model compared by identity") as record:
        models = [Model() for _ in range(12)]  # alive, as the compiled programs keep them
        for model in models:
            cv.hessian(lambda p, b, m=model: jnp.mean(m(p, b) ** 2), params, data, check=False)
    assert sum("captures Model" in str(w.message) for w in record) == 1

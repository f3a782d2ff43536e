"""Compiled programs survive closures: fresh lambdas and partials capturing new arrays reuse them,
and a cache that keeps growing warns once with the fix."""

import jax
import jax.numpy as jnp
from helpers import compiled_cache_sizes

import curvature as cv


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
        before = compiled_cache_sizes()
        for i in range(1, 4):
            values = run(build(i))
        assert compiled_cache_sizes() == before
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

"""The vocabulary's old names still work, warn once with the new name, and give the same
numbers as the new names."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_problem

import curvature as cv
from curvature import _deprecations


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(_deprecations, "_WARNED", set())


def test_power_iteration_max_iters_and_a_missing_k(key):
    op = cv.from_matrix(jnp.diag(jnp.array([3.0, -2.0, 1.0, 0.5])))
    new = cv.power_iteration(op, k=2, key=key, max_steps=500)
    with pytest.warns(FutureWarning, match="max_iters= is deprecated; it is now called max_steps="):
        old = cv.power_iteration(op, k=2, key=key, max_iters=500)
    np.testing.assert_array_equal(old.eigenvalues, new.eigenvalues)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        cv.power_iteration(op, k=2, key=key, max_iters=500)
    with pytest.raises(TypeError, match="pass max_steps= only"):
        cv.power_iteration(op, k=2, key=key, max_steps=10, max_iters=10)
    with pytest.warns(FutureWarning, match="power_iteration: k will be required"):
        alone = cv.power_iteration(op, key=key)
    np.testing.assert_array_equal(
        alone.eigenvalues, cv.power_iteration(op, k=1, key=key).eigenvalues
    )


def test_block_summary_preconditioned_and_conditioning_old_names(x64, key):
    params, data, _, loss, _ = make_problem("tanh", "mse")
    H = cv.hessian(loss, params, data)
    new = cv.block_summary(H, key=key, num_matvecs=8, num_steps=0)
    with pytest.warns(FutureWarning) as record:
        old = cv.block_summary(H, key=key, probes=8, lanczos_steps=0, trace_matvecs=30)
    messages = " ".join(str(w.message) for w in record)
    assert "probes= is deprecated; it is now called num_matvecs=" in messages
    assert "lanczos_steps= is deprecated; it is now called num_steps=" in messages
    assert "trace_matvecs= is deprecated and ignored" in messages
    for a, b in zip(old, new, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    p = jnp.linspace(0.5, 2.0, H.size)
    with pytest.warns(
        FutureWarning, match="diagonal= is deprecated; it is now called preconditioner="
    ):
        old = cv.preconditioned(H, diagonal=p)
    np.testing.assert_array_equal(cv.dense(old), cv.dense(cv.preconditioned(H, p)))
    with pytest.warns(FutureWarning, match="conditioning: k will be required"):
        c = cv.conditioning(H, num_steps=20, key=key)
    assert c.eigenvalues.shape == (6,)  # the old default, k = 3 from each end


def test_apply_rows_function_renamed_map_rows(x64):
    from curvature import operators

    op = cv.from_matrix(jnp.diag(jnp.arange(1.0, 4.0)))
    rows = jnp.eye(3)
    with pytest.warns(FutureWarning, match="use curvature.linear_operator.map_rows"):
        old = jax.jit(lambda r: operators.apply_rows(op, r))(rows)
    np.testing.assert_array_equal(old, jnp.diag(jnp.arange(1.0, 4.0)))


def test_a_new_name_given_at_its_default_value_still_counts(key):
    # Both names given is an error, also when the new one is given its default value.
    op = cv.from_matrix(jnp.diag(jnp.arange(1.0, 7.0)))
    with pytest.raises(TypeError, match="pass num_matvecs= only"):
        cv.block_summary(op, key=key, num_matvecs=16, probes=8, num_steps=0)
    with pytest.raises(TypeError, match="pass max_steps= only"):
        cv.power_iteration(op, k=1, key=key, max_steps=1000, max_iters=2)

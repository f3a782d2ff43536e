"""Bad input gets a clear error that names the problem, before any work: non-finite parameters
and losses, shapes, arguments, non-float leaves, a non-finite matvec."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_problem

import curvature as cv


@pytest.fixture(scope="module")
def problem():
    return make_problem("relu", "mse", dtype=jnp.float32)


def test_nonfinite_loss(problem):
    params, data, _, loss, _ = problem
    bad = dict(data, x=np.asarray(data["x"]).copy())
    bad["x"][3, 1] = np.nan
    with pytest.raises(ValueError, match="mean loss is not finite"):
        cv.hessian(loss, params, bad)


def test_nonfinite_parameters_name_the_leaf(problem):
    params, data, _, loss, _ = problem
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad[1] = dict(bad[1], w=bad[1]["w"].at[0, 0].set(jnp.inf))
    with pytest.raises(ValueError, match=r"params leaf \[1\]\['w'\] has 1 non-finite"):
        cv.hessian(loss, bad, data)


def test_nonscalar_loss(problem):
    params, data, model, _, _ = problem

    def per_example(p, batch):
        return jnp.sum((model(p, batch) - batch["y"]) ** 2, axis=-1)

    with pytest.raises(ValueError, match=r"must return a scalar.*shape \(13,\)"):
        cv.hessian(per_example, params, data)
    with pytest.raises(ValueError, match=r"must return a scalar.*shape \(4,\)"):
        cv.hessian(per_example, params, data, batch_size=4)


def test_data_leading_sizes_differ(problem):
    params, data, _, loss, _ = problem
    with pytest.raises(ValueError, match=r"different leading.*\['x'\]: 13.*\['y'\]: 12"):
        cv.hessian(loss, params, dict(data, y=data["y"][:12]))


def test_bad_batch_size(problem):
    params, data, _, loss, _ = problem
    with pytest.raises(ValueError, match="batch_size"):
        cv.hessian(loss, params, data, batch_size=0)


def test_solver_arguments(problem):
    params, data, _, loss, _ = problem
    op = cv.hessian(loss, params, data)
    key = jax.random.key(0)
    with pytest.raises(
        ValueError, match=f"k={op.size + 1} exceeds the operator's dimension n={op.size}"
    ):
        cv.eigsh(op, k=op.size + 1, key=key)
    with pytest.raises(ValueError, match="num_steps=3 is smaller than k=5"):
        cv.eigsh(op, k=5, num_steps=3, key=key)
    with pytest.raises(ValueError, match="exceeds the operator's dimension"):
        cv.lanczos(op, num_steps=op.size + 1, key=key)
    with pytest.raises(ValueError, match="which must be one of"):
        cv.eigsh(op, k=2, which="largest", key=key)
    with pytest.raises(ValueError, match="k=.*exceeds"):
        cv.power_iteration(op, k=op.size + 1, key=key)
    with pytest.raises(ValueError, match="hutch\\+\\+ needs num_matvecs >= 4"):
        cv.trace(op, num_matvecs=3, key=key)
    with pytest.raises(ValueError, match="method must be one of"):
        cv.trace(op, num_matvecs=10, key=key, method="hutch")
    with pytest.raises(TypeError, match="PRNG key is required"):
        cv.trace(op, num_matvecs=10, key=None)
    with pytest.raises(ValueError, match=f"shape \\({op.size},\\)"):
        op @ jnp.ones(op.size + 1)


def test_gauss_newton_arguments(problem):
    params, data, model, _, _ = problem
    with pytest.raises(ValueError, match="unknown output loss 'l2'"):
        cv.gauss_newton(model, params, data, loss="l2")
    with pytest.raises(ValueError, match="integer labels"):
        cv.gauss_newton(model, params, data, loss="cross_entropy")
    with pytest.raises(TypeError, match="needs targets"):
        cv.gauss_newton(lambda p, b: model(p, {"x": b}), params, data["x"], loss="mse")
    both = {**data, "target": data["y"]}
    with pytest.raises(ValueError, match=r"several target keys \['y', 'target'\]"):
        cv.gauss_newton(model, params, both, loss="mse")
    with pytest.raises(ValueError, match="targets='label': the batch has no such entry"):
        cv.gauss_newton(model, params, data, loss="mse", targets="label")
    with pytest.raises(ValueError, match="targets= applies to the named losses"):
        cv.gauss_newton(model, params, data, loss=lambda o, b: jnp.mean(o), targets="y")


def test_non_float_parameters_are_named():
    params = {"w": jnp.ones(3), "rng": jax.random.key(0)}
    loss = lambda p, b: jnp.mean(b @ p["w"])  # noqa: E731
    with pytest.raises(
        TypeError, match=r"params leaf \['rng'\] has dtype key<fry>.*curvature.flax"
    ):
        cv.hessian(loss, params, jnp.ones((2, 3)))
    with pytest.raises(TypeError, match=r"params leaf \['n'\] has dtype int32"):
        cv.hessian(loss, {"w": jnp.ones(3), "n": jnp.ones(2, jnp.int32)}, jnp.ones((2, 3)))


def test_nonfinite_matvec_is_reported():
    op = cv.from_matrix(jnp.array([[1.0, jnp.nan], [jnp.nan, 1.0]]))
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        cv.eigsh(op, k=1, num_steps=2, key=jax.random.key(0))


def test_a_loss_must_return_a_floating_jax_scalar(problem):
    params, data, _, _, _ = problem
    for constant in (1.0, 1):  # no derivative sees a constant: refused, not 'float has no astype'
        with pytest.raises(TypeError, match=f"returned the constant {constant} .*jax.numpy"):
            cv.hessian(lambda p, b, c=constant: c, params, data)
    with pytest.raises(TypeError, match="dtype int32; a loss must be floating point"):
        cv.hessian(lambda p, b: jnp.sum(b["x"] > 0), params, data)
    with pytest.raises(ValueError, match=r"per_example_gradients: .*scalar.*shape \(1, 3\)"):
        cv.per_example_gradients(lambda p, b: b["y"] * p[0]["b"][0], params, data)


def test_keys_counts_and_vectors_are_checked(problem):
    params, data, _, loss, _ = problem
    op = cv.hessian(loss, params, data)
    for key, got in [
        (0, r"the int 0 \(for seed 0: key=jax.random.key\(0\)\)"),
        (jnp.zeros(2), r"shape \(2,\) and dtype float32"),
        (jnp.zeros(3, jnp.uint32), r"shape \(3,\) and dtype uint32"),
    ]:
        with pytest.raises(TypeError, match=f"key must be a PRNG key.*{got}"):
            cv.trace(op, num_matvecs=10, key=key)
    with pytest.raises(ValueError, match="a single PRNG key; got an array of 2 keys"):
        cv.eigsh(op, k=1, key=jax.random.split(jax.random.key(0)))
    with pytest.raises(ValueError, match=r"num_matvecs=2147483648 is too large.*32-bit"):
        cv.trace(op, num_matvecs=2**31, key=jax.random.key(0), method="hutchinson")
    with pytest.raises(
        ValueError, match=r"diagonal P must be a flat vector of length n=83.*\(84,\)"
    ):
        cv.preconditioned(op, jnp.ones(84))
    with pytest.raises(TypeError, match="complex .*real and imaginary parts"):
        op @ (jnp.ones(op.size) + 1j * jnp.ones(op.size))


def test_data_that_is_not_one_pytree_of_examples(problem):
    params, data, _, loss, _ = problem
    with pytest.raises(TypeError, match="list of 2 batches: pass a loader, `lambda: batches`"):
        cv.hessian(loss, params, [data, data])
    ce_params, ce_data, model, _, _ = make_problem("relu", "cross_entropy", dtype=jnp.float32)
    unlabelled = dict(ce_data, y=ce_data["y"].at[4].set(-1))
    with pytest.raises(ValueError, match="1 label.* outside 0 .. 2.*the first -1 at example 4"):
        cv.gauss_newton(model, ce_params, unlabelled, loss="cross_entropy")


def test_a_float64_operator_outside_x64():
    with jax.enable_x64(True):
        params, data, _, loss, _ = make_problem("tanh", "mse", dtype=jnp.float64)
        op = cv.hessian(loss, params, data)
    with pytest.raises(TypeError, match=r"float64 \(built under jax.enable_x64\(True\)\)"):
        op @ np.ones(op.size, np.float32)
    # The estimators reach the check when they compile, without a JAX warning first.
    for estimate in (
        lambda: cv.trace(op, num_matvecs=4, key=jax.random.key(0)),
        lambda: cv.eigsh(op, k=1, num_steps=5, key=jax.random.key(0)),
        lambda: cv.dense(op),
    ):
        with pytest.raises(TypeError, match=r"built under jax.enable_x64\(True\)"):
            estimate()

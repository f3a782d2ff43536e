"""Operator types: bring-your-own operators (from_function) through every estimator against the
dense float64 Hessian, their compiled programs reused for fresh closures, and what every operator
knows (its layout: restrict needs no parameters)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import dense_hessian, make_problem, rel_err

import curvature as cv
import curvature.optim
from curvature import _driver


def user_hessian(loss, params, data):
    """A user's own Hessian-vector product on parameter pytrees, as an operator."""
    grad = jax.grad(loss)
    return cv.from_function(lambda v: jax.jvp(lambda p: grad(p, data), (params,), (v,))[1], params)


def within(estimate, error, exact, z=4.0, floor=1e-10):
    return abs(float(estimate) - exact) <= z * float(error) + floor


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_from_function_through_every_estimator(x64, key, activation):
    params, data, model, loss, _ = make_problem(activation, "cross_entropy")
    op = user_hessian(loss, params, data)
    h = np.asarray(dense_hessian(loss, params, data))
    eigs = np.linalg.eigvalsh(h)
    n = h.shape[0]
    assert isinstance(op, cv.FunctionOperator) and op.shape == (n, n)
    np.testing.assert_allclose(cv.dense(op), h, rtol=1e-10, atol=1e-12)
    v = jax.random.normal(key, (n,))
    np.testing.assert_allclose(op @ v, h @ v, rtol=1e-10, atol=1e-12)
    # Eigenvalues: Lanczos (both ends), its exactness, and power iteration.
    ends = cv.eigsh(op, k=4, which="BE", num_steps=40, key=key)
    np.testing.assert_allclose(ends.eigenvalues, [*eigs[::-1][:2], eigs[1], eigs[0]], rtol=1e-7)
    if activation == "relu":  # the operator is the dense Hessian; the rest once (tanh)
        return
    run = cv.lanczos(op, num_steps=12, key=key)
    basis = np.asarray(run.basis)
    np.testing.assert_allclose(basis @ h @ basis.T, cv.tridiagonal(run), atol=1e-10)
    top = cv.power_iteration(op, k=1, key=key, max_steps=3000, tol=1e-9)
    assert abs(float(top.eigenvalues[0])) == pytest.approx(np.abs(eigs).max(), rel=1e-6)
    # Traces, diagonals, Frobenius norms: within their own error bars; exact where exact.
    for method in ("hutch++", "hutchinson"):
        t = cv.trace(op, num_matvecs=30, key=key, method=method)
        assert within(t.value, t.standard_error, np.trace(h)), method
    np.testing.assert_allclose(cv.diagonal(op, method="exact").diagonal, np.diag(h), atol=1e-12)
    d = cv.diagonal(op, num_matvecs=200, key=key)
    z = np.abs(np.asarray(d.diagonal) - np.diag(h)) / (np.asarray(d.standard_error) + 1e-12)
    assert np.mean(z < 3) > 0.9
    f = cv.frobenius_norm_squared(op, num_matvecs=100, key=key)
    assert within(f.value, f.standard_error, np.sum(h**2))
    density = cv.spectral_density(op, num_probes=3, num_steps=n, key=key)
    hutch = cv.trace(op, num_matvecs=3, key=key, method="hutchinson")
    np.testing.assert_allclose(density.trace()[0], hutch.value, rtol=1e-8)
    np.testing.assert_allclose(np.sort(density.nodes[0])[-1], eigs[-1], rtol=1e-6)
    # Combinations, blocks and preconditioning of it.
    g = cv.gauss_newton(model, params, data, loss="cross_entropy")
    np.testing.assert_allclose(cv.dense(op - g), h - cv.dense(g), atol=1e-10)
    first = [{"b": i == 0, "w": i == 0} for i in range(len(params))]
    rows = np.arange(params[0]["b"].size + params[0]["w"].size)
    np.testing.assert_allclose(cv.dense(cv.restrict(op, first)), h[np.ix_(rows, rows)], atol=1e-12)
    p = jnp.linspace(0.5, 2.0, n)
    s = np.diag(np.asarray(1 / np.sqrt(p)))
    np.testing.assert_allclose(cv.dense(cv.preconditioned(op, p)), s @ h @ s, atol=1e-10)
    summary = cv.block_summary(op, key=key, num_matvecs=64, num_steps=0)
    assert summary.frobenius_sq.sum() == pytest.approx(
        np.sum(h**2), abs=4 * np.sqrt(np.sum(summary.frobenius_sq_se**2))
    )
    # Conjugate gradient on (A + lambda I) x = b.
    b = jax.random.normal(jax.random.fold_in(key, 1), (n,))
    damping = 1.0 + max(0.0, -eigs[0])
    x = curvature.optim.conjugate_gradient(op, b, damping=damping, max_steps=n, tol=1e-12).x
    np.testing.assert_allclose(x, np.linalg.solve(h + damping * np.eye(n), b), rtol=1e-7)


def test_from_function_curvature_in_hessian_free(x64):
    # A least-squares problem: a Newton step with the user's Hessian (from_function) is the
    # same step as with curvature="hessian", and lands on the solution.
    x = jnp.array([[1.0, 0.0], [1.0, 2.0], [0.0, 1.0]])
    batch = {"x": x, "y": jnp.array([1.0, 3.0, 3.0])}

    def model(w, b):
        return b["x"] @ w

    def mine(w, b):
        gram = b["x"].T @ b["x"] / b["x"].shape[0]  # the Hessian of 0.5 mean squared error
        return cv.from_function(lambda v: gram @ v, w)

    params = jnp.zeros(2)
    grads = jax.grad(lambda w: 0.5 * jnp.mean((model(w, batch) - batch["y"]) ** 2))(params)
    steps = []
    for choice in ("hessian", mine):
        tx = curvature.optim.hessian_free(model, "mse", curvature=choice, damping=0.0)
        updates, _ = tx.update(grads, tx.init(params), params, batch=batch)
        steps.append(optax.apply_updates(params, updates))
    np.testing.assert_allclose(steps[1], steps[0], rtol=1e-12)
    np.testing.assert_allclose(steps[1], np.linalg.lstsq(x, batch["y"], rcond=None)[0], rtol=1e-8)
    with pytest.raises(TypeError, match="must return a LinearOperator"):
        tx = curvature.optim.hessian_free(model, "mse", curvature=lambda w, b: None)
        tx.update(grads, tx.init(params), params, batch=batch)


def test_from_function_reuses_compiled_programs_for_fresh_closures(key):
    # A new lambda capturing new arrays of the same shapes compiles nothing: the function is
    # compared by structure and its arrays are operands.
    def build(scale):
        d = jnp.linspace(1.0, 2.0, 50) * scale  # a fresh captured array each time
        w = {"a": jnp.zeros(20), "b": jnp.zeros((5, 6))}
        return cv.from_function(
            lambda v: jax.tree_util.tree_map(lambda x, e: x * e, v, split(d)), w
        )

    def split(d):
        return {"a": d[:20], "b": d[20:].reshape(5, 6)}

    def run(op):
        return [
            cv.eigsh(op, k=2, num_steps=50, key=key).eigenvalues,  # n steps: exact
            cv.trace(op, num_matvecs=9, key=key).value,
            cv.spectral_density(op, num_probes=2, num_steps=6, key=key).nodes,
        ]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = run(build(1.0))
        before = _driver._run_compiled._cache_size()
        second = run(build(3.0))
        assert _driver._run_compiled._cache_size() == before
    # The captured arrays are live operands: a scale of 3 scales every eigenvalue.
    np.testing.assert_allclose(second[0], 3 * first[0], rtol=1e-5)
    np.testing.assert_allclose(first[0], [2.0, 2.0 - 1 / 49], rtol=1e-4)


def test_from_function_refuses_what_is_not_an_operator():
    like = {"w": jnp.zeros((3, 2))}
    with pytest.raises(ValueError, match="must return a pytree shaped like its input"):
        cv.from_function(lambda v: v["w"].sum(), like)
    with pytest.raises(ValueError, match="matvec failed on a pytree shaped like `like`"):
        cv.from_function(lambda v: v["missing"], like)
    with pytest.raises(TypeError, match="matvec must be a function"):
        cv.from_function(jnp.eye(6), like)
    with pytest.raises(TypeError, match="floating-point leaves only"):
        cv.from_function(lambda v: v, {"w": jnp.zeros(3, jnp.int32)})
    # Shapes alone are enough for `like`.
    op = cv.from_function(lambda v: v * 2.0, jax.ShapeDtypeStruct((4,), jnp.float32))
    np.testing.assert_allclose(op @ jnp.ones(4), 2.0 * np.ones(4))


def test_every_operator_knows_its_layout_so_restrict_needs_no_parameters(x64):
    params, data, model, loss, _ = make_problem("tanh", "mse")
    h = cv.hessian(loss, params, data)
    g = cv.gauss_newton(model, params, data, loss="mse")
    layer = lambda path, leaf: path[0].idx == 1  # noqa: E731 (leaf: a ShapeDtypeStruct)
    full = np.asarray(cv.dense(h - g))
    start = params[0]["b"].size + params[0]["w"].size  # layer 1's entries follow layer 0's
    rows = np.arange(start, start + params[1]["b"].size + params[1]["w"].size)
    for op, scale in (
        (h - g, 1.0),
        (2.0 * (h - g), 2.0),
        (cv.preconditioned(h - g, 4.0 * jnp.ones(h.size)), 0.25),
    ):
        block = cv.restrict(op, layer)
        assert block.layout == cv.restrict(op, layer, params=params).layout
        np.testing.assert_allclose(
            cv.dense(block), scale * full[np.ix_(rows, rows)], rtol=1e-10, atol=1e-12
        )
    assert cv.restrict(h, lambda path, leaf: leaf.ndim == 2).size == sum(
        p["w"].size for p in params
    )


def test_the_low_level_constructor_still_builds_an_operator():
    class Scale:  # hashable: the static part of the operator
        def __call__(self, operands, v):
            return operands * v

    op = cv.LinearOperator(Scale(), jnp.arange(1.0, 4.0), cv.Layout.of(jnp.zeros(3)))
    assert isinstance(op, cv.LinearOperator)
    np.testing.assert_allclose(cv.dense(op), np.diag([1.0, 2.0, 3.0]))


def test_unravel_roundtrip_and_matmat(x64):
    params, data, _, loss, _ = make_problem("tanh", "mse")
    op = cv.hessian(loss, params, data)
    v = jax.random.normal(jax.random.key(3), (op.size,))
    tree = op.unravel(v)
    assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(params)
    assert jnp.array_equal(op.ravel(tree), v)
    block = jax.random.normal(jax.random.key(4), (op.size, 3))
    assert rel_err(op @ block, jnp.stack([op @ block[:, i] for i in range(3)], 1)) < 1e-12


def test_from_matrix_rejects_what_lanczos_cannot_use():
    with pytest.raises(ValueError, match="symmetric"):
        cv.from_matrix(jnp.array([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(TypeError, match="complex"):
        cv.from_matrix(jnp.eye(2) * (1 + 1j))


def test_a_users_own_operator_type_with_a_fast_diagonal(x64, key):
    # A type of one's own: array fields are leaves, static() fields static; it overrides what
    # it does better (its exact diagonal) and inherits the rest.
    @cv.operator_type
    class Diagonal(cv.LinearOperator):
        d: jax.Array
        layout: cv.Layout = cv.static()
        has_fast_diagonal = True

        def apply(self, v):
            return self.d * v

        def exact_diagonal(self):
            return self.d

    d = jnp.array([4.0, -1.0, 2.5, 0.5, 3.0])
    op = Diagonal(d, cv.Layout.of(d))
    np.testing.assert_allclose(cv.dense(op), np.diag(d))
    np.testing.assert_allclose(cv.eigsh(op, k=2, key=key).eigenvalues, [4.0, 3.0], rtol=1e-10)
    exact = cv.diagonal(op, method="exact")
    np.testing.assert_array_equal(exact.diagonal, d)
    assert int(exact.num_matvecs) == 0  # its own diagonal, no products
    both = cv.diagonal(cv.restrict(2.0 * op - op, lambda path, leaf: True), method="exact")
    np.testing.assert_allclose(both.diagonal, d)  # combinations and blocks compose it
    t = cv.trace(op, num_matvecs=15, key=key)  # a sketch of n = 5 vectors: exact
    assert float(t.value) == pytest.approx(float(jnp.sum(d)), rel=1e-10)


def test_operators_that_are_not_what_they_claim_are_refused_clearly():
    class Plain(cv.LinearOperator):  # no @operator_type: not a pytree
        layout = cv.Layout.of(jnp.zeros(3))

        def apply(self, v):
            return v

    with pytest.raises(TypeError, match="not a pytree: declare an operator type with"):
        cv.dense(Plain())
    with pytest.raises(TypeError, match="needs a Layout"):
        cv.LinearOperator(lambda ops, v: v, jnp.zeros(3))
    with pytest.raises(TypeError, match="like leaf .* has dtype int32"):
        cv.from_function(lambda v: v, {"w": jnp.zeros(3, jnp.int32)})
    with pytest.raises(ValueError, match="like has no entries"):
        cv.from_function(lambda v: v, jnp.zeros(0))

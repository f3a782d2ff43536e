"""curvature.optim: conjugate gradient against dense solves, Newton where it is exact (a quadratic
in one step, quadratic convergence on softmax regression, a single ReLU neuron), the damping
adaptation, backtracking, preconditioners, optax chaining and compilation."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_problem
from jax.flatten_util import ravel_pytree

import curvature as cv

optax = pytest.importorskip("optax")
import curvature.optim as co  # noqa: E402
from curvature import _cg  # noqa: E402


@functools.cache
def jitted_grad(loss):
    return jax.jit(jax.grad(loss))


def run(tx, loss, params, batch, steps):
    """``steps`` updates of ``tx`` with the gradients of ``loss``; the params and states after
    each update."""
    state, history, grad = tx.init(params), [], jitted_grad(loss)
    for _ in range(steps):
        updates, state = tx.update(grad(params, batch), state, params, batch=batch)
        params = optax.apply_updates(params, updates)
        history.append((params, state))
    return history


def linear_regression(dtype=jnp.float64, outputs=2):
    key = jax.random.key(1)
    x = jax.random.normal(key, (30, 4), dtype)
    y = jax.random.normal(jax.random.fold_in(key, 1), (30, outputs), dtype)
    params = {"w": jnp.zeros((4, outputs), dtype), "b": jnp.ones(outputs, dtype)}

    def model(p, batch):
        return batch["x"] @ p["w"] + p["b"]

    def loss(p, batch):
        return 0.5 * jnp.mean(jnp.sum((model(p, batch) - batch["y"]) ** 2, -1))

    return params, {"x": x, "y": y}, model, loss


# --------------------------------------------------------------------------------------------
# Conjugate gradient.


@pytest.mark.parametrize("preconditioned", [False, True])
def test_cg_matches_a_dense_solve(x64, preconditioned):
    params, data, model, _, _ = make_problem("tanh", "cross_entropy")
    op = cv.gauss_newton(model, params, data, loss="cross_entropy")
    g, n, lam = np.asarray(cv.dense(op)), op.size, 0.05
    b = jax.random.normal(jax.random.key(2), (n,), jnp.float64)
    exact = jnp.linalg.solve(g + lam * np.eye(n), b)
    m = (np.diag(g) + lam) ** 0.75 if preconditioned else None
    result = co.conjugate_gradient(op, b, damping=lam, max_steps=3 * n, tol=1e-12, preconditioner=m)
    assert bool(result.converged)
    assert np.abs(result.x - exact).max() < 1e-9 * np.abs(exact).max()
    assert float(result.residual_norm) <= 1e-12 * float(jnp.linalg.norm(b))
    steps = int(result.num_steps)
    values = np.asarray(result.values)
    # phi(x_i) = 0.5 x^T A x - b^T x, non-increasing, down to its minimum -0.5 b^T x*.
    assert values[0] == 0 and np.isnan(values[steps + 1 :]).all()
    assert np.all(np.diff(values[: steps + 1]) <= 1e-12)
    np.testing.assert_allclose(values[steps], -0.5 * b @ exact, rtol=1e-10)
    # The same solve through a plain function; a warm start at the solution takes no step.
    dense = co.conjugate_gradient(
        lambda v: jnp.asarray(g) @ v, b, damping=lam, max_steps=3 * n, tol=1e-12, preconditioner=m
    )
    np.testing.assert_allclose(dense.x, exact, rtol=1e-8, atol=1e-10)
    warm = co.conjugate_gradient(op, b, exact, damping=lam, max_steps=5, tol=1e-8)
    assert int(warm.num_steps) == 0 and bool(warm.converged)
    assert [co.STOP_REASONS[int(r.stop_reason)] for r in (result, warm)] == ["converged"] * 2


def test_cg_says_why_it_stopped():
    indefinite = cv.from_matrix(jnp.diag(jnp.array([2.0, 1.0, -4.0])))  # b^T A b < 0
    definite = cv.from_matrix(jnp.diag(jnp.array([2.0, 1.0, 3.0])))
    b = jnp.ones(3)
    stops = {
        "negative_curvature": co.conjugate_gradient(indefinite, b, max_steps=3),  # keeps x = 0
        "max_steps": co.conjugate_gradient(definite, b, max_steps=1),
        "non_finite": co.conjugate_gradient(definite, b.at[0].set(jnp.nan), max_steps=3),
    }
    for reason, result in stops.items():
        assert co.STOP_REASONS[int(result.stop_reason)] == reason, reason
    with pytest.raises(ValueError, match="max_steps must be a positive integer, got None"):
        co.conjugate_gradient(definite, b, max_steps=None)
    with pytest.raises(TypeError, match="b is complex"):
        co.conjugate_gradient(definite, b + 1j * b, max_steps=3)
    assert int(stops["negative_curvature"].num_steps) == 0
    assert not np.any(stops["negative_curvature"].x)


def test_cg_relative_progress_rule(x64):
    # An ill-conditioned diagonal system: CG crawls, and Martens' rule stops it exactly at the
    # first step i with i > k and (phi_i - phi_{i-k}) / phi_i < k eps, k = max(10, i // 10).
    spectrum = jnp.logspace(-3, 0, 400)
    a, b, eps = cv.from_matrix(jnp.diag(spectrum)), spectrum, 5e-4
    result = co.conjugate_gradient(a, b, max_steps=400, progress_tol=eps)
    values, stop = np.asarray(result.values), int(result.num_steps)

    def rule(i):
        k = max(10, i // 10)
        return i > k and values[i] < 0 and (values[i] - values[i - k]) / values[i] < k * eps

    assert 11 <= stop < 100 and not bool(result.converged)  # measured: 21 steps
    assert co.STOP_REASONS[int(result.stop_reason)] == "progress"
    assert rule(stop) and not any(rule(i) for i in range(1, stop))
    optimum = -0.5 * float(jnp.sum(b**2 / spectrum))  # phi at the solution
    assert 0 < 1 - values[stop] / optimum < 5e-3  # measured: 0.13% short of the minimum


def test_martens_schedule_and_backtracking():
    assert _cg.martens_schedule(50) == (1, 2, 3, 4, 5, 7, 9, 11, 14, 18, 24, 31, 40)
    saved = jnp.arange(1.0, 5.0)[:, None] * jnp.ones((1, 2))  # iterates 1..4 at steps 1..4
    result = _cg.CGResult(6 * jnp.ones(2), jnp.int32(6), None, None, None, saved)
    # From the last iterate (6) back while the loss decreases: 4, 3, 2; then 1 is worse.
    step, value = _cg.backtrack(lambda v: (v[0] - 2.2) ** 2, result, (1, 2, 3, 4))
    assert float(step[0]) == 2.0 and float(value) == pytest.approx(0.04)
    # The walk stops at the first increase, as Martens' does: losses 5 (at 6), 3 (at 4), then 4
    # (at 3) stop it, though the iterate 1 has loss 0.
    table = jnp.array([9.0, 0.0, 2.0, 4.0, 3.0, 9.0, 5.0])
    step, value = _cg.backtrack(lambda v: table[v[0].astype(int)], result, (1, 2, 3, 4))
    assert float(step[0]) == 4.0 and float(value) == 3.0
    # Iterates saved at or after the last step are not candidates.
    early = result._replace(num_steps=jnp.int32(3))
    step, _ = _cg.backtrack(lambda v: (v[0] - 2.2) ** 2, early, (1, 2, 3, 4))
    assert float(step[0]) == 2.0


# --------------------------------------------------------------------------------------------
# Newton where it is exact.


def test_one_newton_step_solves_a_quadratic(x64):
    params, data, model, loss = linear_regression()
    tx = co.hessian_free(model, "mse", curvature="hessian", damping=0.0, max_cg_steps=10)
    ((new, state),) = run(tx, loss, params, data, 1)
    design = np.hstack([np.asarray(data["x"]), np.ones((30, 1))])
    solution = np.linalg.lstsq(design, np.asarray(data["y"]), rcond=None)[0]
    assert np.abs(new["w"] - solution[:4]).max() < 1e-13
    assert np.abs(new["b"] - solution[4]).max() < 1e-13
    assert new["w"].dtype == jnp.float64 and state.damping.dtype == jnp.float64
    assert 1 <= int(state.cg_steps) <= 10  # n = 10 in exact arithmetic
    assert float(state.reduction_ratio) == pytest.approx(1.0, abs=1e-10)  # the model is exact
    # With the curvature of another batch (Martens' smaller curvature batch) CG solves
    # H_sub d = -g: H from that batch, g from the gradients passed in (the state keeps CG's
    # solution; the step taken is chosen by the losses on the batch).
    half = jax.tree_util.tree_map(lambda a: a[:12], data)
    grads = jax.grad(loss)(params, data)
    _, state = tx.update(grads, tx.init(params), params, batch=data, curvature_batch=half)
    h_sub = cv.dense(cv.hessian(loss, params, half))
    expected = -np.linalg.solve(h_sub, ravel_pytree(grads)[0])
    np.testing.assert_allclose(state.direction, expected, rtol=1e-10, atol=1e-12)


def test_newton_converges_quadratically_on_softmax_regression(x64):
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.fold_in(key, 1), (60, 4))
    logits = x @ jax.random.normal(jax.random.fold_in(key, 2), (4, 3))
    y = jnp.argmax(logits + jax.random.gumbel(jax.random.fold_in(key, 3), (60, 3)), -1)
    batch, l2 = {"x": x, "y": y}, 1e-2

    def model(p, b):
        return b["x"] @ p["w"] + p["b"]

    def loss(p, b):  # the data term; hessian_free adds the L2 term (l2=...)
        out = model(p, b)
        return jnp.mean(
            jax.nn.logsumexp(out, -1) - jnp.take_along_axis(out, b["y"][:, None], -1)[:, 0]
        )

    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    flat, unravel = ravel_pytree(params)
    objective = lambda w: loss(unravel(w), batch) + 0.5 * l2 * w @ w  # noqa: E731
    newton = jax.jit(
        lambda w: w - jnp.linalg.solve(jax.hessian(objective)(w), jax.grad(objective)(w))
    )
    minimiser = flat
    for _ in range(30):  # dense Newton, the reference
        minimiser = newton(minimiser)
    tx = co.hessian_free(
        model, "cross_entropy", curvature="hessian", damping=0.0, max_cg_steps=45,
        progress_tol=0.0, l2=l2,
    )  # fmt: skip
    errors = [float(jnp.linalg.norm(flat - minimiser))]
    errors += [
        float(jnp.linalg.norm(ravel_pytree(p)[0] - minimiser))
        for p, _ in run(tx, loss, params, batch, 6)
    ]
    # Measured: 2.0, 0.74, 0.20, 1.5e-2, 9.1e-5, 3.5e-9, 2.4e-15 (round-off).
    errors = np.array(errors)
    assert errors[-1] < 1e-13, errors
    phase = np.flatnonzero((errors[:-1] < 0.05) & (errors[1:] > 1e-13))
    assert len(phase) >= 2, errors  # at least two steps of the quadratic phase
    for k in phase:
        assert errors[k + 1] <= 0.6 * errors[k] ** 2, errors  # e_{k+1} <= C e_k^2, C ~ 0.4
        assert np.log(errors[k + 1]) <= 1.8 * np.log(errors[k]), errors  # digits about double


def test_single_relu_neuron_second_derivative_and_newton(x64):
    key = jax.random.key(3)
    x = jax.random.normal(key, (40,))
    y = jax.nn.relu(1.5 * x) + 0.1 * jax.random.normal(jax.random.fold_in(key, 1), (40,))
    batch = {"x": x, "y": y}
    model = lambda w, b: jax.nn.relu(w * b["x"])  # noqa: E731
    loss = lambda w, b: 0.5 * jnp.mean((model(w, b) - b["y"]) ** 2)  # noqa: E731
    second = jax.jit(jax.hessian(loss))
    for w in (0.7, -0.4):
        w = jnp.asarray(w)
        # relu'' = 0, yet f''(w) = mean over examples of x^2 [w x > 0]: the curvature of the
        # active pieces, not zero.
        formula = float(jnp.mean(jnp.where(w * x > 0, x**2, 0.0)))
        assert formula > 0.3
        dense = float(cv.dense(cv.hessian(loss, w, batch))[0, 0])
        assert dense == pytest.approx(formula, rel=1e-12)
        assert float(second(w, batch)) == pytest.approx(formula, rel=1e-12)
    active = x > 0
    best = float(jnp.sum(x[active] * y[active]) / jnp.sum(x[active] ** 2))  # the minimiser
    assert abs(float(jax.grad(loss)(best, batch))) < 1e-15
    tx = co.hessian_free(model, "mse", curvature="hessian", damping=0.0, max_cg_steps=1)
    # The loss is quadratic on each active set: Newton lands on the minimiser in one step from
    # the right side; from the left in two (first to the left piece's minimiser, 0.0206 > 0).
    right = [float(p) for p, _ in run(tx, loss, jnp.asarray(0.7), batch, 2)]
    left = [float(p) for p, _ in run(tx, loss, jnp.asarray(-0.4), batch, 3)]
    assert abs(right[0] - best) < 1e-14 and abs(right[1] - best) < 1e-14
    negative = x < 0
    assert left[0] == pytest.approx(
        float(jnp.sum(x[negative] * y[negative]) / jnp.sum(x[negative] ** 2))
    )
    assert abs(left[1] - best) < 1e-14 and abs(left[2] - best) < 1e-14


# --------------------------------------------------------------------------------------------
# Damping, preconditioners, optax.


def square_model(w, batch):  # f(w) = 0.5 (w^2 - 1)^2 with mse against y = 1
    return w**2 * batch["x"]


def test_damping_adaptation(x64):
    batch = {"x": jnp.ones(1), "y": jnp.ones(1)}
    loss = lambda w, b: 0.5 * jnp.mean((square_model(w, b) - b["y"]) ** 2)  # noqa: E731

    def one_update(w0, lam, **kwargs):
        tx = co.hessian_free(
            square_model, "mse", damping=lam, max_cg_steps=5, line_search=False, **kwargs
        )
        ((w, state),) = run(tx, loss, jnp.asarray(w0), batch, 1)
        # The Gauss-Newton step and rho against the undamped model, by hand.
        g, gn = (w0**2 - 1) * 2 * w0, (2 * w0) ** 2
        d = -g / (gn + lam)
        rho = (0.5 * ((w0 + d) ** 2 - 1) ** 2 - 0.5 * (w0**2 - 1) ** 2) / (g * d + 0.5 * gn * d**2)
        assert float(w) == pytest.approx(w0 + d, rel=1e-12)
        assert float(state.reduction_ratio) == pytest.approx(rho, rel=1e-10)
        return rho, float(state.damping)

    # Gauss-Newton from w = 0.1 overshoots to 5.05 (loss 0.49 -> 300): rho < 1/4 raises lambda.
    rho, lam = one_update(0.1, 1e-6)
    assert rho < 0 and lam == pytest.approx(1.5e-6, rel=1e-14)
    rho, lam = one_update(0.1, 1e-6, boost=2.0)
    assert lam == pytest.approx(2e-6, rel=1e-14)
    # With the (default) Armijo line search the overshoot is cut to the largest 0.8^j that
    # decreases the loss enough; lambda is still raised, from rho of the full step.
    tx = co.hessian_free(square_model, "mse", damping=1e-6, max_cg_steps=5)
    ((w, state),) = run(tx, loss, jnp.asarray(0.1), batch, 1)
    g, d = (0.01 - 1) * 0.2, 0.198 / (0.04 + 1e-6)
    f = lambda w: 0.5 * (w**2 - 1) ** 2  # noqa: E731
    alpha = next(0.8**j for j in range(20) if f(0.1 + 0.8**j * d) <= f(0.1) + 1e-2 * 0.8**j * g * d)
    assert float(state.step_size) == pytest.approx(alpha, rel=1e-12) and alpha < 0.5
    assert float(w) == pytest.approx(0.1 + alpha * d, rel=1e-12)
    assert float(state.damping) == pytest.approx(1.5e-6, rel=1e-14)
    # From 0.5: rho = 0.44, between 1/4 and 3/4: lambda stays.
    rho, lam = one_update(0.5, 1e-3)
    assert 0.25 < rho < 0.75 and lam == 1e-3
    # A quadratic is its own model: rho = 1 > 3/4 lowers lambda by 2/3.
    params, data, model, loss_q = linear_regression()
    tx = co.hessian_free(model, "mse", damping=0.5, max_cg_steps=10)
    ((_, state),) = run(tx, loss_q, params, data, 1)
    assert float(state.reduction_ratio) == pytest.approx(1.0, abs=1e-10)
    assert float(state.damping) == pytest.approx(0.5 * 2 / 3, rel=1e-14)


@pytest.mark.parametrize("preconditioner", ["gauss_newton_diagonal", "second_moment"])
def test_preconditioned_training_decreases_the_loss(preconditioner):
    params, data, model, loss, _ = make_problem("relu", "cross_entropy", num_examples=32)
    tx = co.hessian_free(model, damping=1e-2, max_cg_steps=20, preconditioner=preconditioner)
    history = run(tx, loss, params, data, 4)
    value = jax.jit(loss)
    losses = [float(value(params, data))] + [float(value(p, data)) for p, _ in history]
    # The line search makes every step a decrease; measured 1.14 -> 0.92 (Gauss-Newton
    # diagonal) and 0.81 (second moment) in four steps.
    assert np.all(np.diff(losses) < 0) and losses[-1] < 0.85 * losses[0], losses
    assert history[0][1].direction.dtype == jnp.float32
    second = history[0][1].second_moment
    if preconditioner == "second_moment":  # Adam's EMA after one step: (1 - 0.999) g^2
        g = ravel_pytree(jax.grad(loss)(params, data))[0]
        np.testing.assert_allclose(second, 1e-3 * g**2, rtol=1e-5)
    else:
        assert second is None


def test_chains_with_optax_and_compiles_once(x64):
    traces = []
    params, data, model, loss = linear_regression()

    def counting_model(p, batch):
        traces.append(1)
        return model(p, batch)

    hf = co.hessian_free(counting_model, "mse", damping=1e-2, max_cg_steps=8)
    tx = optax.chain(optax.clip_by_global_norm(1e3), hf, optax.scale(0.5))

    @jax.jit
    def step(params, state, batch):
        updates, state = tx.update(jax.grad(loss)(params, batch), state, params, batch=batch)
        return optax.apply_updates(params, updates), state, updates

    state, p = tx.init(params), params
    for i in range(3):
        new, state, updates = step(p, state, data)
        if i == 0:  # half the plain transformation's update
            plain, _ = hf.update(jax.grad(loss)(p, data), hf.init(p), p, batch=data)
            for a, b in zip(
                jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(plain), strict=True
            ):
                np.testing.assert_allclose(a, 0.5 * b, rtol=1e-10, atol=1e-12)
        p = new
    assert step._cache_size() == 1
    hf_state = state[1]
    assert int(hf_state.count) == 3 and int(hf_state.cg_steps) >= 1
    assert float(loss(p, data)) < float(loss(params, data))
    # Eager updates compile once too: after the first, the model is not traced again.
    hf_state, grads = hf.init(params), jax.grad(loss)(params, data)
    _, hf_state = hf.update(grads, hf_state, params, batch=data)
    before = len(traces)
    for _ in range(2):
        _, hf_state = hf.update(grads, hf_state, params, batch=data)
    assert before > 0 and len(traces) == before and int(hf_state.count) == 3


def test_errors():
    params, data, model, loss = linear_regression(jnp.float32)
    tx = co.hessian_free(model, "mse")
    state, grads = tx.init(params), jax.grad(loss)(params, data)
    with pytest.raises(TypeError, match="needs the batch"):
        tx.update(grads, state, params)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(grads, state, batch=data)
    bad = {**params, "b": params["b"].at[0].set(jnp.nan)}
    with pytest.raises(ValueError, match=r"params leaf \['b'\] has 1 non-finite"):
        tx.update(grads, state, bad, batch=data)
    with pytest.raises(ValueError, match=r"gradient leaf \['w'\]"):
        tx.update({**grads, "w": grads["w"] * jnp.inf}, state, params, batch=data)
    with pytest.raises(ValueError, match="state from tx.init of other parameters"):
        tx.update(grads, tx.init({"w": params["w"]}), params, batch=data)
    with pytest.raises(ValueError, match="curvature must be one of"):
        co.hessian_free(model, "mse", curvature="fisher")
    with pytest.raises(ValueError, match="preconditioner must be one of"):
        co.hessian_free(model, "mse", preconditioner="adam")
    with pytest.raises(ValueError, match="unknown output loss"):
        co.hessian_free(model, "l2")


@pytest.mark.parametrize(
    "setting, value, error",
    [
        ("damping", float("nan"), "damping must be a finite number >= 0, got nan"),
        ("damping", float("inf"), "damping must be a finite number >= 0, got inf"),
        ("learning_rate", -1, "learning_rate must be a finite number > 0, got -1"),
        ("learning_rate", float("nan"), "learning_rate must be a finite number > 0"),
        ("max_cg_steps", None, "max_cg_steps must be a positive integer, got None"),
        ("second_moment_decay", 1.0, "second_moment_decay must be a finite number >= 0 and < 1"),
        ("warm_start", 1.5, "warm_start must be a finite number >= 0 and <= 1"),
        ("cg_tol", -1e-3, "cg_tol must be a finite number >= 0"),
        ("l2", float("nan"), "l2 must be a finite number >= 0"),
        ("line_search", "yes", "line_search must be True or False"),
    ],
)
def test_every_setting_is_checked(setting, value, error):
    with pytest.raises((ValueError, TypeError), match=f"hessian_free: {error}"):
        co.hessian_free(square_model, "mse", **{setting: value})


def test_undamped_hessian_steps_make_progress_at_negative_curvature(x64):
    # f(w) = 0.5 (w^2 - 1)^2 from w = 0.1, where f'' = 3 w^2 - 1 < 0: CG meets negative curvature
    # at once. It took no step, and with damping 0 the damping never grew: stuck for good.
    batch = {"x": jnp.ones(1), "y": jnp.ones(1)}
    loss = lambda w, b: 0.5 * jnp.mean((square_model(w, b) - b["y"]) ** 2)  # noqa: E731
    tx = co.hessian_free(square_model, "mse", curvature="hessian", damping=0.0, max_cg_steps=5)
    history = run(tx, loss, jnp.asarray(0.1), batch, 3)
    losses = [float(loss(0.1, batch))] + [float(loss(w, batch)) for w, _ in history]
    assert np.all(np.diff(losses) < -0.02), losses  # measured 0.490, 0.460, 0.415, 0.359
    state = history[-1][1]
    assert state.cg_stop == "negative_curvature"
    assert state.cg_stops == {
        "converged": 0, "max_steps": 0, "progress": 0, "negative_curvature": 3, "non_finite": 0
    }  # fmt: skip
    assert tx.init(jnp.asarray(0.1)).cg_stop is None


def test_optax_is_needed_only_by_curvature_optim():
    code = (
        "import sys; sys.modules['optax'] = None\n"
        "import curvature\n"
        "try:\n    import curvature.optim\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install optax" in out.stdout


def test_conjugate_gradient_casts_a_wider_preconditioner(x64):
    # A float64 diagonal preconditioner for a float32 operator: CG runs in the operator's dtype.
    a = cv.from_matrix(jnp.array([[3.0, 1.0], [1.0, 2.0]], jnp.float32))
    b = jnp.array([1.0, 1.0], jnp.float32)
    m = jnp.array([3.0, 2.0], jnp.float64)
    x = co.conjugate_gradient(a, b, max_steps=2, preconditioner=m).x
    assert x.dtype == jnp.float32
    np.testing.assert_allclose(x, [0.2, 0.4], rtol=1e-5)

"""The ``approximations`` measurement (K-FAC, the empirical Fisher and G's diagonal against H and
G) against dense float64 algebra on a small run, its settings, and its figure."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvature as cv

pytest.importorskip("flax")
from helpers import dense_hessian  # noqa: E402
from workbench_helpers import load_config, quiet  # noqa: E402

import experiments  # noqa: E402
from experiments import config as config_lib  # noqa: E402
from experiments import models, report, train  # noqa: E402
from experiments import run as run_lib  # noqa: E402
from experiments.errors import ConfigError  # noqa: E402
from experiments.figures import approximations as figure  # noqa: E402
from experiments.measurements import Context, Record  # noqa: E402
from experiments.measurements import approximations as measurement  # noqa: E402
from experiments.record import Estimate  # noqa: E402


def _dense_references(member, step):
    """H, G, K-FAC, the empirical Fisher and diag G of ``member`` at ``step``, dense float64,
    built independently of the measurement (K-FAC on a model of the member's activation
    alone, the network that the run's shared program switches to)."""
    params, data = member.params(step), member.measure_data
    flat, unravel = ravel_pytree(params)
    with jax.enable_x64(True):
        wide = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
        hessian = np.asarray(dense_hessian(member.loss, wide, data))
        wide_flat = flat.astype(jnp.float64)
        out = member.model(unravel(wide_flat), data)
        jac = jax.jacobian(lambda w: member.model(unravel(w), data))(wide_flat)
        p = jax.nn.softmax(out)
        lam = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
        ggn = np.asarray(jnp.einsum("ncw,ncd,ndv->wv", jac, lam, jac) / out.shape[0])
        grads = jax.vmap(
            lambda x, y: ravel_pytree(jax.grad(member.loss)(wide, {"x": x[None], "y": y[None]}))[0]
        )(data["x"], data["y"])
        fisher = np.asarray(grads.T @ grads / grads.shape[0])
    cfg = member.config
    graphdef, _, rest = models.build(cfg.model, (member.activation,), data["x"].shape[1:], 10, 0)
    alone, _ = models.pure_functions(graphdef, jax.tree_util.tree_structure(rest), cfg.train.loss)
    kfac = cv.kfac(alone, params, models.with_activation(data, 0), loss="cross_entropy")
    assert [layer.name for layer in kfac.layers] == ["hidden/0", "hidden/1", "readout"]
    dense_kfac = np.asarray(kfac @ jnp.eye(flat.size), np.float64)
    return {
        "H": hessian,
        "G": ggn,
        "kfac": dense_kfac,
        "empirical_fisher": fisher,
        "diagonal_ggn": np.diag(np.diag(ggn)),
    }


def _top(matrix, k):
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return values[::-1][:k], vectors[:, ::-1][:, :k]


def _condition(matrix):
    values = np.linalg.eigvalsh((matrix + matrix.T) / 2)
    return values[-1] / values[0]


def test_approximations_against_dense_algebra(tmp_path):
    config = load_config()
    with config.unlocked():
        config.activations = ("tanh",)  # H and G differ within layers too
        config.model.width = 4  # 330 parameters
        config.train.steps = 0  # measured at initialisation only
        config.measure.quantities = ("approximations",)
        s = config.measure.approximations
        s.which = ("kfac", "empirical_fisher", "diagonal_ggn", "second_moment")
        s.k, s.num_steps, s.num_matvecs = 3, 30, 64
        s.condition_steps = 330  # the whole space: the ends are exact
    run_lib.run(config, tmp_path, progress=quiet())
    run = experiments.load_run(tmp_path)
    member = run.members["tanh-seed0"]
    r = member.record(0)
    assert isinstance(r.approximations.approximations["kfac"].hessian.relative_error, Estimate)
    assert Record.from_json(r.to_json()) == r
    # Plain gradient descent has no second moment: left out, not an error.
    assert list(r.approximations.approximations) == ["kfac", "empirical_fisher", "diagonal_ggn"]
    assert r.approximations.approximations["kfac"].layers == ("hidden/0", "hidden/1", "readout")
    got = member.record(0).approximations
    dense = _dense_references(member, 0)
    k = 3
    top_h, vectors_h = _top(dense["H"], k)
    top_g, vectors_g = _top(dense["G"], k)
    np.testing.assert_allclose(got.hessian.values, top_h, rtol=1e-3)
    np.testing.assert_allclose(got.gauss_newton.values, top_g, rtol=1e-3)
    assert all(got.hessian.converged) and all(got.gauss_newton.converged)
    lam = got.damping
    assert lam == pytest.approx(1e-3 * top_g[0], rel=1e-3)
    eye = np.eye(len(dense["G"]))
    assert got.reference_condition == pytest.approx(_condition(dense["G"] + lam * eye), rel=1e-3)
    for approx in ("kfac", "empirical_fisher", "diagonal_ggn"):
        a = got.approximations[approx]
        values, vectors = _top(dense[approx], k)
        np.testing.assert_allclose(a.top.values, values, rtol=1e-3)
        for reference, (matrix, ref_vectors) in {
            "hessian": (dense["H"], vectors_h),
            "gauss_newton": (dense["G"], vectors_g),
        }.items():
            match = getattr(a, reference)
            overlap = np.sum((ref_vectors.T @ vectors) ** 2) / k
            assert match.overlap == pytest.approx(overlap, abs=2e-3)
            error = np.linalg.norm(matrix - dense[approx]) / np.linalg.norm(matrix)
            estimate = match.relative_error
            assert abs(estimate.value - error) <= 4 * estimate.standard_error
            assert 0 < estimate.standard_error < 0.1 * estimate.value
        if approx == "kfac":  # the setting conditioned's default
            shifted = dense[approx] + lam * eye
            w, q = np.linalg.eigh((shifted + shifted.T) / 2)
            root = q @ np.diag(w**-0.5) @ q.T
            want = _condition(root @ (dense["G"] + lam * eye) @ root)
            assert a.gauss_newton.condition == pytest.approx(want, rel=1e-3)
            assert all(a.gauss_newton.ends.converged)
        else:
            assert a.gauss_newton.condition is None and a.gauss_newton.ends is None
    # The summary's columns and the figure.
    rows = report.summary_rows(run)
    assert {"err(K-FAC,H)", "κ(K-FAC)", "err(F,G)"} <= set(report.present_columns(rows))
    fig = figure.approximations_figure(run)
    gids = {line.get_gid() for ax in fig.axes for line in ax.lines if line.get_gid()}
    assert (
        "relative_error/hessian/kfac/tanh" in gids
        and "overlap/gauss_newton/diagonal_ggn/tanh" in gids
    )
    bars = {p.get_gid() for ax in fig.axes for p in ax.patches if p.get_gid()}
    assert "answer/‖H − K‖F/‖H‖F (K-FAC vs H)/tanh" in bars


def test_kfac_sees_the_dense_layers_behind_the_switch_between_activations():
    # A run of several activations shares one program that picks the activation with a
    # lax.switch, inside which curvature.kfac finds no dense layer; the measurement's K-FAC sees
    # the member's activation alone, the same network: for one example, K-FAC is G's
    # same-layer blocks exactly (G of the shared program).
    config = load_config()
    with config.unlocked():
        config.model.width = 4
    graphdef, params, rest = models.build(config.model, ("relu", "tanh"), (64,), 10, 0)
    shared, loss = models.pure_functions(
        graphdef, jax.tree_util.tree_structure(rest), "cross_entropy"
    )
    x = jax.random.normal(jax.random.key(0), (1, 64))
    one = models.with_activation({"x": x, "y": jnp.array([3])}, 1)  # tanh
    with pytest.warns(UserWarning, match="no dense layer"):
        assert cv.kfac(shared, params, one, loss="cross_entropy").layers == ()
    with config.unlocked():
        config.activations = ("tanh",)  # a member's resolved config: its activation
    ctx = Context(shared, loss, params, None, one, config, 0, 0, ("approximations",))
    kfac = measurement.BUILDERS["kfac"](ctx.taking("approximations", config.measure.approximations))
    assert [layer.name for layer in kfac.layers] == ["hidden/0", "hidden/1", "readout"]
    eye = jnp.eye(kfac.size)
    ggn = np.asarray(cv.gauss_newton(shared, params, one, loss="cross_entropy") @ eye)
    layer_of = np.concatenate(
        [np.full(np.size(leaf), i // 2) for i, leaf in enumerate(jax.tree_util.tree_leaves(params))]
    )  # each layer's bias and kernel, in the flat order
    same_layer = layer_of[:, None] == layer_of[None, :]
    np.testing.assert_allclose(
        np.asarray(kfac @ eye), ggn * same_layer, atol=1e-6 * np.abs(ggn).max()
    )


def test_the_second_moment_is_the_optimizers_times_the_batch_size():
    config = load_config()
    with config.unlocked():
        config.train.optimizer, config.train.batch_size = "adam", 32
    params = {"w": jnp.arange(1.0, 4.0)}
    gradient = {"w": jnp.array([0.5, -1.0, 2.0])}
    optimizer = train.make_optimizer(config.train)
    state = optimizer.init(params)
    _, state = optimizer.update(gradient, state, params)
    data = {"x": jnp.ones((5, 3)), "y": jnp.zeros(5, jnp.int32)}

    def context(step, cfg):
        return Context(
            model=lambda p, b: b["x"] * p["w"],
            loss=lambda p, b: jnp.mean(b["x"] @ p["w"]),
            params=params,
            opt_state=state,
            data=data,
            config=cfg,
            seed=0,
            step=step,
            plan=("approximations",),
        )

    build = measurement.BUILDERS["second_moment"]
    # One Adam step: the bias-corrected ν̂ is g², times the batch size.
    diagonal = build(context(1, config)).exact_diagonal()
    np.testing.assert_allclose(diagonal, 32 * np.array([0.25, 1.0, 4.0]), rtol=1e-5)
    assert build(context(0, config)) is None  # no gradient seen yet: ν̂ is 0/0
    sgd = load_config()
    assert build(context(1, sgd)) is None  # gradient descent has no second moment


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("which", ("kfac", "low_rank_plus_diagonal"), "which: unknown approximation 'low_rank_p"),
        ("which", ("kfac", "kfac"), "which=('kfac', 'kfac') has duplicates"),
        ("which", ("second_moment",), "which=('second_moment',) needs an optimizer with a"),
        ("conditioned", ("empirical_fisher",), "conditioned: 'empirical_fisher' has no exact"),
        ("conditioned", ("ekfac",), "conditioned: 'ekfac' is not among which=('kfac',)"),
        ("damping", 0.0, "damping=0.0 must be a number > 0"),
        ("num_matvecs", 1, "num_matvecs=1 must be an integer >= 2"),
        ("num_steps", 2, "num_steps=2 must be an integer >= k=5"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(key, value, message):
    config = load_config()
    with config.unlocked():
        config.measure.quantities = ("approximations",)
        if key == "conditioned" and value == ("ekfac",):
            config.measure.approximations.which = ("kfac",)
        config.measure.approximations[key] = value
    with pytest.raises(ConfigError, match=re.escape(f"measure.approximations: {message}")):
        config_lib.validate(config)

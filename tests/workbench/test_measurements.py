"""The built-in measurements against dense algebra and their own settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvature as cv

pytest.importorskip("flax")
from workbench_helpers import (  # noqa: E402
    load_config,
    quiet,
)
from workbench_helpers import smoke_run as run_smoke_once  # noqa: E402

import experiments  # noqa: E402
from experiments import (  # noqa: E402
    measure,
    train,
)
from experiments import run as run_lib  # noqa: E402


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    return run_smoke_once(tmp_path_factory)


def test_relu_residual_has_zero_trace(smoke_run):
    # R = H - G has a zero diagonal for ReLU networks, so tr R = 0: the estimate sits within its
    # error bar of zero. For tanh the same-layer terms make it clearly non-zero.
    _, workdir, _ = smoke_run
    run = experiments.load_run(workdir)
    for r in run.members["relu-seed0"].records:
        tr = r.gauss_newton.residual_trace
        assert abs(tr.value) <= 4 * tr.standard_error + 1e-6
        assert r.frobenius.relative_residual > 0.01  # yet R itself is not small
    last = run.members["tanh-seed0"].records[-1].gauss_newton.residual_trace
    assert abs(last.value) > 4 * last.standard_error


def test_a_lambda_max_plan_costs_its_lanczos_steps(tmp_path):
    config = load_config()
    with config.unlocked():
        config.activations = ("tanh",)
        config.measure.quantities = ("lambda_max",)
        config.measure.lambda_max.num_steps = 12
        config.measure.save_eigenvectors = 1
    run_lib.run(config, tmp_path, progress=quiet())
    member = experiments.load_run(tmp_path).members["tanh-seed0"]
    for r in member.records:
        # 12 Lanczos steps, 1 residual check, 12 steps of the rank check
        assert r.lambda_max.num_matvecs == 25
        assert r.trace is None and r.top_eigenvalues is None and r.density is None
        assert set(r.timings) == {"evaluate", "lambda_max"}
        assert r.sharpness.values == r.lambda_max.values
    # The saved eigenvector is the one of the recorded eigenvalue.
    vector = member.eigenvectors(20)[:, 0]
    H = cv.hessian(member.loss, member.params(20), member.measure_data)
    assert member.eigenvectors(20).shape == (H.size, 1)
    rayleigh = float(vector @ (H @ jnp.asarray(vector)))
    assert rayleigh == pytest.approx(member.records[-1].lambda_max.values[0], rel=1e-4)
    assert not (member.dir / "spectra").exists()  # nothing else to keep


def test_diagonal_optimizer_state_and_gradient_noise_against_exact_values(tmp_path):
    config = load_config()
    with config.unlocked():
        config.activations = ("tanh",)
        config.train.optimizer, config.train.learning_rate = "adam", 0.01
        config.train.steps, config.measure.every = 10, 10
        config.measure.quantities = ("diagonal", "optimizer_state", "gradient_noise")
        config.measure.diagonal.exact = True
        config.measure.optimizer_state.exact = True
        config.measure.gradient_noise.num_examples = 40
        config.measure.gradient_noise.batch_size = 16
    run_lib.run(config, tmp_path, progress=quiet())
    member = experiments.load_run(tmp_path).members["tanh-seed0"]
    record = member.records[-1]
    params = member.params(10)
    H = cv.hessian(member.loss, params, member.measure_data)
    diag = np.diag(np.asarray(cv.dense(H)))
    spectra = member.spectra(10)
    assert np.allclose(spectra["diagonal"], diag, rtol=1e-5, atol=1e-7)
    assert record.diagonal.exact and record.diagonal.mean.value == pytest.approx(
        diag.mean(), rel=1e-5
    )
    # Adam's bias-corrected second moment, against the exact diagonal.
    nu_tree = train.OPTIMIZERS.get("adam").second_moment(member.opt_state(10))
    nu = np.asarray(H.ravel(nu_tree))
    assert np.allclose(spectra["second_moment"], nu)
    keep = diag != 0
    assert record.optimizer_state.second_moment.num_zeros == int((~keep).sum())
    want = np.corrcoef(nu[keep], diag[keep])[0, 1]
    assert record.optimizer_state.second_moment.pearson == pytest.approx(want, rel=1e-6)
    assert set(record.optimizer_state.per_layer) == {
        "['hidden'][0]['bias'].value",
        "['hidden'][0]['kernel'].value",
        "['hidden'][1]['bias'].value",
        "['hidden'][1]['kernel'].value",
        "['readout']['bias'].value",
        "['readout']['kernel'].value",
    }
    # Per-example gradients directly: tr of their covariance and B_simple.
    data = {k: v[:40] for k, v in member.measure_data.items()}
    per = jax.vmap(
        lambda x, y: H.ravel(jax.grad(member.loss)(params, {"x": x[None], "y": y[None]}))
    )(data["x"], data["y"])
    per = np.asarray(per, np.float64)
    mean = per.mean(0)
    trace_cov = np.sum((per - mean) ** 2) / 39
    noise = record.gradient_noise
    assert noise.num_examples == 40
    assert noise.trace_covariance == pytest.approx(trace_cov, rel=1e-3)
    assert noise.simple_noise_scale == pytest.approx(trace_cov / (mean @ mean), rel=1e-3)


def test_diagonal_settings_are_their_own_and_its_mean_has_an_honest_error_bar(tmp_path):
    config = load_config()
    with config.unlocked():
        config.activations = ("relu",)
        config.train.optimizer, config.train.learning_rate = "adam", 0.01
        config.train.steps, config.measure.every = 10, 10
        config.measure.quantities = ("optimizer_state", "diagonal")
        config.measure.optimizer_state.exact = True
        config.measure.diagonal.num_matvecs = 12
    run_lib.run(config, tmp_path, progress=quiet())
    member = experiments.load_run(tmp_path).members["relu-seed0"]
    assert member.records[0].optimizer_state is None  # no gradient seen yet at step 0
    record = member.records[-1]
    assert not record.diagonal.exact and record.diagonal.mean.num_matvecs == 12
    # The diagonal's mean is tr H / n: its error bar is Hutchinson's with the same probes
    # (entries that share probes are correlated, so it is not sqrt(sum se_i^2) / n).
    H = cv.hessian(member.loss, member.params(10), member.measure_data)
    tr = cv.trace(
        H, num_matvecs=12, key=measure.measurement_key(0, 10, "diagonal"), method="hutchinson"
    )
    assert record.diagonal.mean.value == pytest.approx(float(tr.value) / H.size, rel=1e-4)
    assert record.diagonal.mean.standard_error == pytest.approx(
        float(tr.standard_error) / H.size, rel=1e-4
    )
    exact = np.diag(np.asarray(cv.dense(H)))
    assert np.allclose(member.spectra(10)["diagonal"], exact, atol=20 * exact.std())
    assert record.optimizer_state.second_moment.num_parameters > 0


def test_fisher_and_blocks_measurements_against_dense(tmp_path):
    config = load_config()
    with config.unlocked():
        config.train.steps, config.measure.every = 20, 20
        config.measure.quantities = ("fisher", "blocks")
        config.measure.fisher.k, config.measure.fisher.num_steps = 2, 30
        config.measure.blocks.num_matvecs = 24
    run_lib.run(config, tmp_path, progress=quiet())
    run = experiments.load_run(tmp_path)
    shares = {}
    for member in run.members.values():
        record = member.records[-1]
        params = member.params(20)
        F = cv.empirical_fisher(member.loss, params, member.measure_data)
        exact = np.linalg.eigvalsh(np.asarray(cv.dense(F), np.float64))[::-1]
        assert np.allclose(record.fisher.top.values, exact[:2], rtol=1e-3)
        assert abs(record.fisher.trace.value - exact.sum()) < 4 * record.fisher.trace.standard_error
        blocks = record.blocks
        assert blocks.names == ("hidden/0", "hidden/1", "readout")
        assert sum(blocks.sizes) == F.size
        H = cv.hessian(member.loss, params, member.measure_data)
        G = cv.gauss_newton(member.model, params, member.measure_data, loss="cross_entropy")
        R = np.asarray(cv.dense(H - G), np.float64)
        edges = np.cumsum((0,) + blocks.sizes)
        for i in range(3):
            for j in range(3):
                want = np.sum(R[edges[i] : edges[i + 1], edges[j] : edges[j + 1]] ** 2)
                got = blocks.frobenius_sq["residual"][i][j]
                assert abs(got - want) <= 4 * blocks.frobenius_sq_se["residual"][i][j] + 1e-9
            block_trace = np.trace(R[edges[i] : edges[i + 1], edges[i] : edges[i + 1]])
            se = blocks.trace_se["residual"][i]
            assert abs(blocks.trace["residual"][i] - block_trace) <= 4 * se + 1e-6
        shares[member.activation] = blocks.same_layer_share("residual")
    # The question this project started from: a ReLU network's residual R = H - G has no
    # same-layer curvature at all (each layer enters piecewise linearly); tanh's has.
    assert shares["relu"].value < 1e-9
    assert shares["tanh"].value > 4 * shares["tanh"].standard_error > 0

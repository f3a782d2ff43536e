"""The ``preconditioner`` measurement (Adam / RMSProp's second moment against the exact curvature
diagonals, and the preconditioned Hessian's conditioning) against dense algebra on a small run."""

import jax
import numpy as np
import pytest

import curvature as cv

pytest.importorskip("flax")
from workbench_helpers import (  # noqa: E402
    load_config,
    quiet,
)

import experiments  # noqa: E402
from experiments import config as config_lib  # noqa: E402
from experiments import (  # noqa: E402
    models,
    report,
    train,
)
from experiments import run as run_lib  # noqa: E402
from experiments.errors import ConfigError  # noqa: E402
from experiments.figures import preconditioner as preconditioner_figures  # noqa: E402


def _per_example_gradients(loss, params, data, ravel):
    def one(x, y):
        return ravel(jax.grad(loss)(params, {"x": x[None], "y": y[None]}))

    return jax.vmap(one)(data["x"], data["y"])


def test_preconditioner_measurement_against_dense_algebra(tmp_path):
    config = load_config()
    with config.unlocked():
        config.activations = ("tanh",)
        config.sweep = ("train.optimizer=adam,rmsprop",)
        config.train.optimizer, config.train.learning_rate = "adam", 0.01
        config.train.steps, config.measure.every = 10, 10
        config.measure.quantities = ("preconditioner",)
        config.measure.preconditioner.num_steps = 30
    run_lib.run(config, tmp_path, progress=quiet())
    run = experiments.load_run(tmp_path)
    for optimizer in ("adam", "rmsprop"):
        member = run.members[f"tanh-optimizer={optimizer}-seed0"]
        assert member.records[0].preconditioner is None  # step 0: no gradient seen yet
        p = member.records[-1].preconditioner
        params, data = member.params(10), member.measure_data
        H = cv.hessian(member.loss, params, data)
        dense = np.asarray(cv.dense(H), np.float64)
        diag_h = np.diag(dense)
        G = cv.gauss_newton(
            member.model, params, data, loss=models.LOSSES.get("cross_entropy").gauss_newton
        )
        diag_g = np.diag(np.asarray(cv.dense(G), np.float64))
        per = _per_example_gradients(member.loss, params, data, H.ravel)
        diag_f = np.mean(np.asarray(per, np.float64) ** 2, axis=0)
        nu = np.asarray(
            H.ravel(train.OPTIMIZERS.get(optimizer).second_moment(member.opt_state(10)))
        )
        spectra = member.spectra(10)
        np.testing.assert_allclose(spectra["preconditioner_nu"], nu, rtol=1e-6)
        np.testing.assert_allclose(spectra["diagonal_hessian"], diag_h, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(spectra["diagonal_gauss_newton"], diag_g, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(spectra["diagonal_fisher"], diag_f, rtol=1e-4, atol=1e-9)
        # Correlations over the entries where each exact diagonal is nonzero, zeros counted: the
        # weights on the digits' constant pixels are zero in all three diagonals and in ν.
        for name in ("hessian", "gauss_newton", "fisher"):
            exact = spectra[f"diagonal_{name}"].astype(np.float64)
            keep = exact != 0
            got = p.second_moment[name].overall
            assert got.num_zeros == int((~keep).sum()) > 0
            assert got.num_both_zero == int(np.sum(~keep & (nu == 0)))
            assert got.pearson == pytest.approx(np.corrcoef(nu[keep], exact[keep])[0, 1], rel=1e-6)
            root = np.corrcoef(np.sqrt(nu[keep]), exact[keep])[0, 1]
            assert p.sqrt_second_moment[name].overall.pearson == pytest.approx(root, rel=1e-6)
            assert p.sqrt_second_moment[name].overall.spearman == pytest.approx(got.spearman)
            assert set(p.second_moment[name].per_layer) == {"hidden/0", "hidden/1", "readout"}
            assert sum(c.num_zeros for c in p.second_moment[name].per_layer.values()) == (
                got.num_zeros
            )
        # P^-1/2 H P^-1/2 with P what the update divides by: its top and mean eigenvalue.
        divisor = np.sqrt(nu) + 1e-8 if optimizer == "adam" else np.sqrt(nu + 1e-8)
        scaled = dense / np.sqrt(np.outer(divisor, divisor))
        for got, matrix in ((p.hessian, dense), (p.preconditioned, scaled)):
            assert got.top.converged[0]
            top = np.linalg.eigvalsh(matrix)[-1]
            assert got.top.values[0] == pytest.approx(top, rel=1e-3)
            nonzero = np.diag(matrix) != 0
            assert got.mean == pytest.approx(np.trace(matrix) / nonzero.sum(), rel=1e-4)
            assert got.condition == pytest.approx(got.top.values[0] / got.mean)
            assert len(got.top.values) == len(got.bottom.values) == 3
            assert list(got.bottom.values) == sorted(got.bottom.values)
        assert set(p.references) == {"sqrt_fisher", "gauss_newton"}
    # The summary's columns and the figure.
    rows = report.summary_rows(run)
    assert {"r(ν,H)", "ρ(ν,F)", "κ(H)", "κ(P⁻½HP⁻½)", "κ, P=G"} <= set(report.present_columns(rows))
    fig = preconditioner_figures.preconditioner_figure(run)
    gids = {line.get_gid() for ax in fig.axes for line in ax.lines if line.get_gid()}
    assert "corr/hessian/second_moment/tanh-optimizer=adam" in gids
    assert "condition/P/tanh-optimizer=rmsprop" in gids


def test_preconditioner_needs_an_adaptive_optimizer():
    config = load_config()
    with config.unlocked():
        config.measure.quantities = ("preconditioner",)
    with pytest.raises(
        ConfigError, match="measure.preconditioner: needs an optimizer with a second"
    ):
        config_lib.validate(config)
    with config.unlocked():
        config.train.optimizer = "rmsprop"
        config.measure.preconditioner.k, config.measure.preconditioner.num_steps = 5, 8
    with pytest.raises(ConfigError, match="num_steps=8 is smaller than 2 k = 10"):
        config_lib.validate(config)

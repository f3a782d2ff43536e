"""Optimizers in the experiments: Hessian-free as ``train.optimizer`` beside a first-order method
(fields swept together), the per-step training log and its gradient-equivalents, and settings
that are refused by their config key."""

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")
from workbench_helpers import (  # noqa: E402
    load_config,
    quiet,
)

import experiments  # noqa: E402
from experiments import config as config_lib  # noqa: E402
from experiments import run as run_lib  # noqa: E402
from experiments import (  # noqa: E402
    train,
)
from experiments.errors import ConfigError  # noqa: E402
from experiments.figures import optim  # noqa: E402

HF = "relu-optimizer=hessian_free-learning_rate=1.0-seed0"


SGD = "relu-optimizer=sgd-learning_rate=0.2-seed0"


def test_hessian_free_trains_beside_sgd_and_logs_what_each_step_cost(tmp_path):
    config = load_config()
    with config.unlocked():
        config.activations = ("relu",)
        config.sweep = ("train.optimizer+train.learning_rate=(sgd,0.2),(hessian_free,1.0)",)
        config.train.steps = 6
        config.train.hessian_free.damping = 1.0
        config.train.hessian_free.max_cg_steps = 10
        config.measure.every = 3
        config.measure.quantities = ("lambda_max",)
    statuses = run_lib.run(config, tmp_path, progress=quiet())
    assert {s["state"] for s in statuses.values()} == {"done"}
    run = experiments.load_run(tmp_path)
    hf, sgd = run.members[HF], run.members[SGD]
    curves = hf.training()
    assert list(curves.step) == list(range(6))
    assert np.all(np.diff(curves.loss) < 0)  # every Hessian-free step lowered the batch loss
    assert hf.records[-1].train_loss < curves.loss[-1] < curves.loss[0]
    # Gradient-equivalents from the CG steps and line search, as the docstring counts them.
    cg = curves.diagnostics["cg_steps"]
    assert np.all((cg >= 1) & (cg <= 10))
    tries = np.rint(np.log(curves.diagnostics["step_size"]) / np.log(0.8))
    want = 1 + 1.5 * (cg + 2) + 0.5 * (2 + (cg >= 2) + tries)
    assert np.allclose(curves.cost, want)
    assert curves.gradient_equivalents[0] == 0
    assert np.allclose(np.diff(curves.gradient_equivalents), want[:-1])
    record = hf.record(3)
    assert record.training.gradient_equivalents == pytest.approx(want[:3].sum())
    assert record.training.seconds == pytest.approx(curves.seconds[3])
    assert 0 < record.training.seconds < hf.records[-1].training.seconds
    assert hf.opt_state(6)[0].cg_steps == cg[-1]  # the optimizer state reloads
    # A first-order step costs one gradient; its learning rate is its own.
    assert np.all(sgd.training().cost == 1) and sgd.records[-1].training.gradient_equivalents == 6
    assert sgd.records[-1].learning_rate == 0.2 and hf.records[-1].learning_rate == 1.0
    # The comparison: a figure (loss against steps, cost and seconds) and a table in the summary.
    fig = optim.optimizer_figure(run)
    gids = {line.get_gid() for ax in fig.axes for line in ax.lines}
    assert {f"{x}/{g}/0" for x in ("step", "gradient_equivalents", "seconds") for g in (
        "relu-optimizer=hessian_free-learning_rate=1.0", "relu-optimizer=sgd-learning_rate=0.2"
    )} <= gids  # fmt: skip
    summary = (tmp_path / "summary.md").read_text()
    assert "## Optimizers" in summary and "Hessian-free (gauss-newton)" in summary


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("curvature", "fisher", "train.hessian_free.curvature: 'fisher' is not one of"),
        ("preconditioner", "adam", "train.hessian_free.preconditioner: 'adam' is not one of"),
        ("max_cg_steps", 0, "train.hessian_free.max_cg_steps: 0 is not an integer >= 1"),
        ("damping", -1.0, "train.hessian_free.damping: -1.0 must be >= 0"),
        ("drop", 1.5, r"train.hessian_free.drop: 1.5 must lie in \(0, 1\]"),
        ("warm_start", float("nan"), r"train.hessian_free.warm_start: nan must lie in \[0, 1\]"),
    ],
)
def test_bad_hessian_free_settings_name_their_key(key, value, match):
    config = load_config()
    with config.unlocked():
        config.train.optimizer = "hessian_free"
        config.train.hessian_free[key] = value
    with pytest.raises(ConfigError, match=f"config key {match}"):
        config_lib.validate(config)


def test_gradient_equivalents_count_preconditioner_curvature_and_line_search():
    config = load_config()
    log = {"loss": np.zeros(3), "cg_steps": np.array([1.0, 5.0, 50.0])}
    log["step_size"] = np.array([1.0, 0.64, 0.0])  # 0, 2 shortenings; a rejected step: 20
    with config.unlocked():
        config.train.optimizer = "hessian_free"
    base = 1 + 1.5 * (log["cg_steps"] + 2) + 0.5 * (np.array([2, 3, 3]) + [0, 2, 20])
    assert np.allclose(train.gradient_equivalents(config.train, log, 10), base)
    with config.unlocked():
        config.train.hessian_free.curvature = "hessian"
        config.train.hessian_free.preconditioner = "gauss_newton_diagonal"
        config.train.hessian_free.line_search = False
    want = 1 + 2.0 * (log["cg_steps"] + 2) + 0.5 * np.array([2, 3, 3]) + 10
    assert np.allclose(train.gradient_equivalents(config.train, log, 10), want)
    with config.unlocked():
        config.train.optimizer = "adam"
    assert np.all(train.gradient_equivalents(config.train, log, 10) == 1)

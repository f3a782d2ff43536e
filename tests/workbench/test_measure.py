"""Taking measurements: schedules and plans, the measurement set, a user's own measurement."""

import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

import curvature as cv

pytest.importorskip("flax")
from workbench_helpers import (  # noqa: E402
    ROOT,
    cli,
    load_config,
    quiet,
)

import experiments  # noqa: E402
from experiments import data as data_lib  # noqa: E402
from experiments import measure  # noqa: E402
from experiments import run as run_lib  # noqa: E402


def test_schedule_and_per_measurement_plans():
    config = load_config()
    with config.unlocked():
        config.train.steps = 100
        config.measure.every = 25
        config.measure.density.steps = (0, 60)
        config.measure.trace.every = 50
    assert measure.schedule(config) == [0, 25, 50, 60, 75, 100]
    assert "density" in measure.plan_at(config, 60) and "trace" not in measure.plan_at(config, 60)
    assert "top_eigenvalues" not in measure.plan_at(config, 60)
    assert "density" in measure.plan_at(config, 100)  # the last step always
    assert "trace" in measure.plan_at(config, 50) and "trace" not in measure.plan_at(config, 25)


def test_curvature_can_be_measured_on_a_named_subset_of_the_test_split(tmp_path):
    config = load_config()
    with config.unlocked():
        config.activations, config.train.steps, config.measure.every = ("relu",), 0, 1
        config.measure.split, config.measure.num_examples = "test", 50
        config.measure.quantities = ("top_eigenvalues",)
    run_lib.run(config, tmp_path, progress=quiet())
    member = experiments.load_run(tmp_path).members["relu-seed0"]
    record = member.records[0]
    dataset = data_lib.load(config.data)
    subset = {"x": jnp.asarray(dataset.x_test[:50]), "y": jnp.asarray(dataset.y_test[:50])}
    assert np.array_equal(member.measure_data["x"], subset["x"])
    params = member.params(0)
    assert record.train_loss == pytest.approx(float(member.loss(params, subset)), rel=1e-6)
    exact = np.linalg.eigvalsh(
        np.asarray(cv.dense(cv.hessian(member.loss, params, subset)), np.float64)
    )
    assert record.top_eigenvalues.values[0] == pytest.approx(exact[-1], rel=1e-3)


def test_a_users_measurement_registered_in_the_config_file(tmp_path):
    config_file = tmp_path / "mine.py"
    config_file.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(ROOT / "configs")!r})
            import jax, jax.numpy as jnp
            import curvature as cv
            from experiments import measure
            from smoke import get_config as smoke

            @measure.register_measurement("hessian_diagonal_sum", defaults={{"scale": 2.0}})
            def diagonal_sum(ctx):
                H = cv.hessian(ctx.loss, ctx.params, ctx.data)
                d = cv.diagonal(H, num_matvecs=8, key=ctx.key)
                return {{"value": ctx.settings.scale * float(d.diagonal.sum()), "n": H.size}}

            def get_config():
                c = smoke()
                c.activations = ("relu",)
                c.train.steps = 10
                c.measure.quantities = ("lambda_max", "hessian_diagonal_sum")
                return c
            """
        )
    )
    out = cli("run", f"--config={config_file}", f"--workdir={tmp_path / 'run'}", "--quiet")
    assert out.returncode == 0, out.stderr
    run = experiments.load_run(tmp_path / "run")
    member = run.members["relu-seed0"]
    assert member.config.measure.hessian_diagonal_sum.scale == 2.0
    for r in member.records:
        assert set(r.extra) == {"hessian_diagonal_sum"}
        assert r.extra["hessian_diagonal_sum"]["n"] == 682
        H = cv.hessian(member.loss, member.params(r.step), member.measure_data)
        exact = 2.0 * float(jnp.trace(cv.dense(H)))
        assert r.extra["hessian_diagonal_sum"]["value"] == pytest.approx(exact, rel=0.5)

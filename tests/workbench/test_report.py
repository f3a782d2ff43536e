"""Summaries: every cell carries its error bar or convergence."""

import pytest

pytest.importorskip("flax")
from workbench_helpers import (  # noqa: E402
    load_config,
    quiet,
)

import experiments  # noqa: E402
from experiments import run as run_lib  # noqa: E402
from experiments import (  # noqa: E402
    table,  # noqa: E402
)
from experiments.record import Eigenvalues, Estimate  # noqa: E402


def test_summary_marks_unconverged_values_and_unreadable_estimates(tmp_path):
    config = load_config()
    with config.unlocked():
        config.activations = ("tanh",)
        config.train.steps = 10
        config.measure.quantities = ("top_eigenvalues", "bottom_eigenvalues", "trace", "density")
        config.measure.top_eigenvalues.num_steps = 6  # too few to converge
        config.measure.bottom_eigenvalues.num_steps = 6  # both ends: one run of 6 steps
        config.measure.trace.num_matvecs = 4
        config.measure.density.num_steps = 4
    run_lib.run(config, tmp_path, progress=quiet())
    record = experiments.load_run(tmp_path).members["tanh-seed0"].records[-1]
    assert not all(record.top_eigenvalues.converged)
    text = (tmp_path / "summary.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| tanh"))
    assert "†" in row and "(coarse)" in row
    assert "† not converged" in text and "coarse: fewer than 20 Lanczos nodes" in text
    assert "nan" not in text.lower().replace("n/a", "")


def test_cells_carry_their_error_bars():
    # One seed: ± the estimator's standard error; an estimate within 2 SE of zero is not a number.
    assert table.cell([Estimate(7.3, 0.1)]).text() == "7.3 ± 0.1"
    assert table.cell([Estimate(0.007, 0.006)]).text() == "≈0 (±0.012)"
    assert table.cell([Estimate(1.0, 0.1), Estimate(3.0, 0.1)]).text() == "2 ± 1.4"
    unconverged = Eigenvalues((2.0,), (0.1,), (False,))
    assert table.cell([unconverged]).text() == "2†"
    assert table.cell([unconverged]).unconverged == pytest.approx(0.05)
    assert table.cell([float("nan")]).text() == "n/a"

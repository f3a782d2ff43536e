"""A measurement against a swept value (``plot --against``): the numbers, the figure that draws
them, the command line. The run directories here are written from chosen records (no
training)."""

import re

import numpy as np
import pytest
from absl import app

pytest.importorskip("matplotlib")
pytest.importorskip("flax")
from workbench_helpers import main, write_swept_run  # noqa: E402

import experiments  # noqa: E402
from experiments import pages  # noqa: E402
from experiments.errors import RequestError  # noqa: E402
from experiments.figures import study  # noqa: E402
from experiments.record import Eigenvalues  # noqa: E402


def top(spec, step):
    """λmax = 10 η + seed + step / 10, + 0.5 for tanh; tanh at η = 0.4, seed 2 stops at step 10."""
    lr = spec.config.train.learning_rate
    if spec.name == "tanh-learning_rate=0.4-seed2" and step > 10:
        return None
    value = 10 * lr + spec.seed + step / 10 + 0.5 * (spec.activation == "tanh")
    return {
        "lambda_max": Eigenvalues((value,), (1e-7,), (True,)),
        "extra": {"mine": {"value": 2 * lr, "label": "x"}},
    }


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    workdir = write_swept_run(
        tmp_path_factory.mktemp("swept"),
        top,
        sweep=("train.learning_rate=0.4,0.1,0.2",),
        quantities=("lambda_max",),
        seeds=(0, 1, 2),
    )
    return workdir, experiments.load_run(workdir)


def test_a_measurement_against_the_swept_value_with_seeds_as_error_bars(swept):
    _, run = swept
    data = study.study(run, "learning_rate", "lambda_max")
    assert data.against == "train.learning_rate" and data.numeric
    relu, tanh = data.series
    assert relu.label == "relu" and relu.x == (0.1, 0.2, 0.4)  # ascending, not in sweep order
    # At the last step every seed reached: 20, except tanh at 0.4, where seed 2 stopped at 10.
    np.testing.assert_allclose(relu.mean, [1 + 1 + 2, 2 + 1 + 2, 4 + 1 + 2])
    np.testing.assert_allclose(relu.spread, [1.0, 1.0, 1.0])  # sd of seeds 0, 1, 2
    assert relu.seeds == (3, 3, 3) and relu.steps == (20, 20, 20)
    np.testing.assert_allclose(tanh.mean, [4.5, 5.5, 4 + 1 + 1 + 0.5])
    assert tanh.steps == (20, 20, 10)
    # At a chosen step, a member that did not reach it is left out.
    at_20 = study.study(run, "train.learning_rate", "lambda_max", step=20).series[1]
    assert at_20.seeds == (3, 3, 2) and at_20.steps == (20, 20, 20)
    np.testing.assert_allclose(at_20.mean[-1], 4 + 0.5 + 2 + 0.5)
    np.testing.assert_allclose(at_20.spread[-1], np.std([0, 1], ddof=1))
    # The figure draws these numbers: points and error bars.
    fig = study.study_figure(data)
    lines = {line.get_gid(): line for line in fig.axes[0].lines if line.get_gid()}
    for s in data.series:
        np.testing.assert_allclose(lines[f"study/{s.label}"].get_xdata(), s.x)
        np.testing.assert_allclose(lines[f"study/{s.label}"].get_ydata(), s.mean)
        (bars,) = [c for c in fig.axes[0].collections if c.get_gid() == f"study/{s.label}/error"]
        np.testing.assert_allclose(
            [seg[1, 1] - seg[0, 1] for seg in bars.get_segments()], 2 * s.spread
        )
    # A user measurement by its path; another axis: the activation.
    mine = study.study(run, "learning_rate", "mine.value").series[0]
    np.testing.assert_allclose(mine.mean, [0.2, 0.4, 0.8])
    by_activation = study.study(run, "activation", "lambda_max", step=0)
    assert [s.label for s in by_activation.series] == [
        "learning_rate=0.4",
        "learning_rate=0.1",
        "learning_rate=0.2",
    ]
    assert by_activation.series[0].x == ("relu", "tanh") and not by_activation.numeric


@pytest.mark.parametrize(
    "against, measurement, step, message",
    [
        (
            "width",
            "lambda_max",
            None,
            "--against=width: the run swept no such field; swept: "
            "train.learning_rate (or activation)",
        ),
        ("learning_rate", "density", None, "--measurement=density: no record of "),
        (
            "learning_rate",
            "lambda_max",
            5,
            "--step=5: no member recorded lambda_max there; at [0, 10, 20]",
        ),
        (
            "learning_rate",
            "mine",
            None,
            "--measurement=mine is a dict, not a number; choose one of mine.value",
        ),
        (
            "learning_rate",
            "lambda_max.residuals",
            None,
            "--measurement=lambda_max.residuals is a tuple, not a number; choose an entry: "
            "lambda_max.residuals.0",
        ),
    ],
)
def test_a_study_the_run_cannot_answer_names_what_it_holds(
    swept, against, measurement, step, message
):
    _, run = swept
    with pytest.raises(RequestError, match=re.escape(message)):
        study.study(run, against, measurement, step=step)


def test_plot_against_from_the_command_line(swept, capsys):
    workdir, _ = swept
    args = ["plot", f"--workdir={workdir}", "--against=learning_rate", "--measurement=lambda_max"]
    assert main(*args, "--step=20") == 0
    out = capsys.readouterr().out
    assert "| relu | 0.1 | 4 ± 1 | 3 | 20 |" in out
    assert "| tanh | 0.4 | 7 ± 0.71 | 2 | 20 |" in out
    for ext in ("png", "pdf"):
        path = workdir / "figures" / f"lambda_max_vs_learning_rate_step20.{ext}"
        assert f"wrote {path}" in out and path.stat().st_size > 0
    assert not (workdir / "report.md").exists()  # only the figure asked for
    assert main(*args, "--step=5") == 2
    error = "error: --step=5: no member recorded lambda_max there; at [0, 10, 20]\n"
    assert capsys.readouterr().err == error
    with pytest.raises(app.UsageError, match="--measurement and --step choose what --against="):
        main("plot", f"--workdir={workdir}", "--measurement=lambda_max")
    with pytest.raises(app.UsageError, match="--against, --measurement and --step go with plot"):
        main("compare", f"--runs={workdir}", f"--workdir={workdir}", "--against=width")


def test_swept_values_with_html_or_dollars_are_shown_as_written(tmp_path):
    workdir = write_swept_run(
        tmp_path,
        top,
        sweep=("data.path=<script>alert(1)</script>,$\\foo$",),
        quantities=("lambda_max",),
        activations=("relu",),
    )
    # Mathtext would raise on "$\foo$" in a tick label; the table escapes HTML.
    paths, numbers = pages.draw_study(workdir, "data.path", "lambda_max")
    assert [p.name for p in paths] == ["lambda_max_vs_path.png", "lambda_max_vs_path.pdf"]
    assert "| relu | &lt;script&gt;alert(1)&lt;/script&gt; | 4 | 1 | 20 |" in numbers
    assert "| relu | $\\foo$ | 4 | 1 | 20 |" in numbers


def test_lambda_max_of_a_run_that_measured_top_eigenvalues_points_to_sharpness(tmp_path):
    """A run that measured ``top_eigenvalues`` but not ``lambda_max`` has λmax as ``sharpness``
    (as its summary does): the error for ``lambda_max`` says so, and ``sharpness`` plots."""

    def tops(spec, step):
        value = 10 * spec.config.train.learning_rate + step / 10
        return {"top_eigenvalues": Eigenvalues((value, 0.5), (1e-7, 1e-7), (True, True))}

    workdir = write_swept_run(
        tmp_path,
        tops,
        sweep=("train.learning_rate=0.1,0.2",),
        quantities=("top_eigenvalues",),
        seeds=(0,),
    )
    run = experiments.load_run(workdir)
    assert "sharpness" in study.recorded(run)
    with pytest.raises(RequestError, match="sharpness is the largest eigenvalue from it or"):
        study.study(run, "learning_rate", "lambda_max")
    relu = study.study(run, "learning_rate", "sharpness").series[0]
    np.testing.assert_allclose(relu.mean, [1 + 2, 2 + 2])  # at step 20

"""Pages from a run directory show names as written and explain what they show: HTML in a name
or swept value is escaped in markdown, matplotlib's mathtext is off ("$\\foo$" in a run's name
is text), and a table's legend covers its columns only. The run directories here are written
from chosen records (no training)."""

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("flax")

from workbench_helpers import write_swept_run  # noqa: E402

import experiments  # noqa: E402
from experiments import pages, report  # noqa: E402
from experiments.record import Eigenvalues  # noqa: E402


def top(spec, step):
    value = 10 * spec.config.train.learning_rate + spec.seed + step / 10
    return {"lambda_max": Eigenvalues((value,), (1e-7,), (True,))}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    workdir = write_swept_run(
        tmp_path_factory.mktemp("swept"),
        top,
        sweep=("train.learning_rate=0.1,0.2",),
        quantities=("lambda_max",),
    )
    return workdir, experiments.load_run(workdir)


def test_summaries_explain_only_the_columns_they_show(swept):
    workdir, run = swept
    summary = report.summary_markdown(report.summary_rows(run))
    pages.write_report(workdir, run, {}, [])
    for text in (summary, (workdir / "report.md").read_text()):
        assert "λmax(H)" in text and "H: loss Hessian" in text
        for absent in (
            "tr by Hutch++",
            "neg. mass:",
            "G: its Gauss-Newton",
            "grad-eq.:",
            "λmax/edge",
        ):
            assert absent not in text


def test_names_with_html_or_dollars_are_shown_as_written(tmp_path):
    workdir = write_swept_run(
        tmp_path / "run $\\foo$ <b>",
        top,
        sweep=("data.path=<script>alert(1)</script>,$\\foo$",),
        quantities=("lambda_max",),
        activations=("relu",),
    )
    paths = pages.draw_all(workdir)
    assert workdir / "figures" / "eigenvalues.png" in paths
    text = (workdir / "report.md").read_text()
    assert "Swept: data.path=&lt;script&gt;alert(1)&lt;/script&gt;,$\\foo$." in text
    assert "<script" not in text and "<b>" not in text
    # Mathtext would raise on "$\\foo$" in the legend's run names.
    pages.compare([workdir, workdir], tmp_path / "cmp")
    compared = (tmp_path / "cmp" / "compare.md").read_text()
    assert "## " + str(workdir).replace("<b>", "&lt;b&gt;") in compared

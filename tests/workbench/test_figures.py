"""Figures drawn from a small saved run: the drawn data equals the stored numbers."""

import shutil

import jax
import numpy as np
import pytest

import curvature as cv

pytest.importorskip("matplotlib")
pytest.importorskip("flax")
from workbench_helpers import (  # noqa: E402
    cli,
    load_config,
    quiet,
)

import experiments  # noqa: E402
from curvature import plotting  # noqa: E402
from experiments import (  # noqa: E402
    pages,
    report,
    storage,
)
from experiments import run as run_lib  # noqa: E402
from experiments.figures import parameter, sharpness, spectra, structure  # noqa: E402
from experiments.figures import training as training_curves  # noqa: E402


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("figs")
    config = load_config()
    with config.unlocked():
        config.seeds = (0, 1)
        config.activations = ("relu", "softplus:4")
        # The curvature by layer at the first and last steps only (the main job's plan).
        config.measure.quantities = (*config.measure.quantities, "blocks")
        config.measure.blocks.steps = (0, 20)
        config.measure.blocks.num_matvecs = 8
    run_lib.run(config, workdir, progress=quiet())
    return workdir, experiments.load_run(workdir)


def lines_by_gid(fig):
    return {line.get_gid(): line for ax in fig.axes for line in ax.lines if line.get_gid()}


def test_eigenvalue_lines_equal_the_metrics(saved_run):
    _, run = saved_run
    fig = sharpness.eigenvalue_figure(run)
    lines = lines_by_gid(fig)
    for activation, members in run.groups().items():
        records = [m.records for m in members]
        steps = [r.step for r in records[0]]
        for j in range(3):
            want = np.mean(
                [[r.top_eigenvalues.values[j] for r in recs] for recs in records], axis=0
            )
            line = lines[f"eig/{activation}/top{j}"]
            assert np.array_equal(line.get_xdata(), steps)
            assert np.allclose(line.get_ydata(), want, rtol=1e-12)
        bottom = lines[f"eig/{activation}/bottom0"].get_ydata()
        assert np.allclose(
            bottom,
            np.mean([[r.bottom_eigenvalues.values[0] for r in recs] for recs in records], axis=0),
        )
    # Plain gradient descent: 2/eta = 10 lies far above these eigenvalues, so it is stated in
    # words on each panel rather than squashing the curves.
    edges = [
        t.get_text() for ax in fig.axes for t in ax.texts if t.get_gid() == "edge_of_stability"
    ]
    assert edges == ["2/η = 10 (above)"] * 2


def test_trace_and_training_lines_equal_the_metrics(saved_run):
    _, run = saved_run
    trace = lines_by_gid(structure.trace_figure(run))
    training = lines_by_gid(training_curves.training_figure(run))
    ratio = lines_by_gid(sharpness.sharpness_figure(run))
    for activation, members in run.groups().items():
        recs = [m.records for m in members]
        assert np.allclose(
            trace[f"trace/{activation}/H"].get_ydata(),
            np.mean([[r.trace.value for r in x] for x in recs], 0),
        )
        assert np.allclose(
            trace[f"trace/{activation}/G"].get_ydata(),
            np.mean([[r.gauss_newton.trace.value for r in x] for x in recs], 0),
        )
        assert np.allclose(
            trace[f"residual/{activation}"].get_ydata(),
            np.mean([[r.frobenius.relative_residual for r in x] for x in recs], 0),
        )
        assert np.allclose(
            training[f"train_loss/{activation}"].get_ydata(),
            np.mean([[r.train_loss for r in x] for x in recs], 0),
        )
        # eta * lambda_max / 2 for gradient descent, against the line at 1.
        assert np.allclose(
            ratio[f"ratio/{activation}"].get_ydata(),
            np.mean([[0.2 * r.top_eigenvalues.values[0] / 2 for r in x] for x in recs], 0),
        )


def test_density_integrates_to_one_on_the_shared_grid(saved_run):
    workdir, run = saved_run
    fig, sigma = spectra.density_figure(run)
    drawn = fig._curvature_density
    grid = drawn["grid"]
    assert sigma == pytest.approx(drawn["sigma"]) and sigma > 0
    assert len(drawn["values"]) == 4  # two activations, two panels
    for values in drawn["values"].values():
        assert np.trapezoid(values, grid) == pytest.approx(1.0, abs=1e-3)
    # The drawn curve is the stored SLQ measure, pooled over seeds and smoothed.
    with (
        np.load(workdir / "members" / "relu-seed0" / "spectra" / "step_000000.npz") as a,
        np.load(workdir / "members" / "relu-seed1" / "spectra" / "step_000000.npz") as b,
    ):
        pooled = cv.SpectralDensity(
            np.concatenate([a["slq_nodes"], b["slq_nodes"]]),
            np.concatenate([a["slq_weights"], b["slq_weights"]]),
            a["dimension"],
        )
    _, want = pooled.density(grid, sigma=sigma)
    assert np.allclose(drawn["values"][("initialisation (step 0)", "relu")], want)
    line = lines_by_gid(fig)["density/initialisation (step 0)/relu"]
    assert np.allclose(line.get_ydata(), np.maximum(want, 1e-5))
    assert fig.axes[0].get_yscale() == "log" and "σ" in fig._suptitle.get_text()


def test_figures_are_legible_at_paper_size(saved_run):
    _, run = saved_run
    for make in (
        sharpness.eigenvalue_figure,
        structure.trace_figure,
        training_curves.training_figure,
        sharpness.sharpness_figure,
        spectra.spectrum_figure,
        structure.blocks_figure,
        lambda r: spectra.density_figure(r)[0],
    ):
        fig = make(run)
        width, _ = fig.get_size_inches()
        assert width <= 7.0
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            # Axes are labelled: every panel of the first column on y, every panel with no
            # visible panel below it on x (shared axes label the outer panels only).
            spec = ax.get_subplotspec()
            below = [
                b
                for b in fig.axes
                if b.get_visible()
                and b.get_subplotspec().colspan == spec.colspan
                and b.get_subplotspec().rowspan.start == spec.rowspan.stop
            ]
            if spec.is_first_col():
                assert ax.get_ylabel(), ax.get_title()
            if not below:
                assert ax.get_xlabel(), ax.get_title()
            assert ax.xaxis.label.get_fontsize() >= 7
            # No two tick labels of an axis overlap.
            boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
            assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
        # Every data series differs from the others of its panel in line style, marker, fill or
        # width, not only in colour: greyscale printing keeps them apart. (The top-k lines of
        # one activation are one series, and so are its bottom-k lines.)
        for ax in fig.axes:
            series = [
                line
                for line in ax.lines
                if line.get_gid()
                and not line.get_gid()[-1:].isdigit()
                or (line.get_gid() or "").endswith(("top0", "bottom0"))
            ]
            styles = [
                (
                    line.get_linestyle(),
                    line.get_marker(),
                    line.get_markerfacecolor() == "none",
                    line.get_linewidth(),
                )
                for line in series
            ]
            assert len(styles) == len(set(styles)), [line.get_gid() for line in series]


def test_draw_all_writes_png_pdf_and_report(saved_run):
    workdir, _ = saved_run
    paths = pages.draw_all(workdir)
    names = {p.name for p in paths}
    for stem in ("density", "eigenvalues", "trace", "training", "edge_of_stability", "blocks"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
        assert (workdir / "figures" / f"{stem}.png").stat().st_size > 10_000
    text = (workdir / "report.md").read_text()
    assert "![density](figures/density.png)" in text and "| relu | 2 | 0 | 20 |" in text
    assert "<img src='figures/eigenvalues.png'" in (workdir / "report.html").read_text()


def test_block_figure_draws_the_recorded_same_layer_shares(saved_run):
    _, run = saved_run
    fig = structure.blocks_figure(run)
    bars = {p.get_gid(): p for ax in fig.axes for p in ax.patches if p.get_gid()}
    for group, members in run.groups().items():
        assert [r.step for r in members[0].records if r.blocks] == [0, 20]  # its own schedule
        for step, panel in ((0, "R/step 0"), (20, "R/step 20"), (20, "step 20/‖R‖F²")):
            shares = [m.record(step).blocks.same_layer_share("residual") for m in members]
            bar = bars[f"blocks/{panel}/{group}"]
            assert bar.get_width() == pytest.approx(np.mean([e.value for e in shares]))
        for operator, label in (("hessian", "H"), ("gauss_newton", "G")):
            shares = [m.record(20).blocks.same_layer_share(operator) for m in members]
            width = bars[f"blocks/step 20/‖{label}‖F²/{group}"].get_width()
            assert width == pytest.approx(np.mean([e.value for e in shares]))
    # Error bars: ± the standard error of the seeds' mean, from the estimators' own SEs.
    shares = [m.record(20).blocks.same_layer_share("residual") for m in run.groups()["softplus_4"]]
    se = np.sqrt(sum(e.standard_error**2 for e in shares)) / 2
    segments = [
        seg
        for c in fig.axes[0].collections
        for seg in c.get_segments()
        if np.isclose(seg[1, 0] - seg[0, 0], 2 * se)
    ]
    assert segments, "no error bar of the softplus share at step 20"
    # ReLU's residual couples only different layers: no same-layer share beyond round-off;
    # softplus has one, and H itself keeps same-layer curvature for ReLU too.
    assert bars["blocks/R/step 20/relu"].get_width() < 1e-6
    assert bars["blocks/R/step 20/softplus_4"].get_width() > 0.05
    assert bars["blocks/step 20/‖H‖F²/relu"].get_width() > 0.05
    # The summary prints the share with its error bar.
    rows = {row["group"]: row for row in report.summary_rows(run)}
    assert rows["softplus_4"]["R same-layer"].mean == pytest.approx(
        np.mean([e.value for e in shares])
    )
    assert " ± " in rows["softplus_4"]["R same-layer"].text()


def test_parameter_figure_draws_each_value_against_the_reference():
    from experiments.table import Cell

    def row(group, activation, **cells):
        return {"group": group, "activation": activation, "overrides": {}, **cells}

    rows = [
        row("relu", "relu", **{"λmax(H)": Cell(0.6, 0.05, None), "tr H": Cell(7.0, 0.2, 0.01)}),
        *(
            row(
                f"softplus_{b}",
                f"softplus:{b}",
                **{"λmax(H)": Cell(0.6 + 1 / b, 0.1, None), "tr H": Cell(7.0 + 5 / b, 0.3, 0.01)},
            )
            for b in (20, 2, 5)
        ),
        row("tanh", "tanh", **{"λmax(H)": Cell(0.4, 0.01, None)}),
    ]
    base, series, references = parameter.parameter_series(rows)
    assert base == "softplus" and [p for p, _ in series] == [2.0, 5.0, 20.0]
    assert [r["group"] for r in references] == ["relu", "tanh"]
    fig = parameter.parameter_panels(base, series, references)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 2  # λmax and trace: present
    lines = lines_by_gid(fig)
    assert np.allclose(lines["param/λmax(H)/λmax(H)"].get_xdata(), [2, 5, 20])
    assert np.allclose(lines["param/λmax(H)/λmax(H)"].get_ydata(), [1.1, 0.8, 0.65])
    assert np.allclose(lines["param/λmax(H)/λmax(H)/relu"].get_ydata(), 0.6)
    assert "param/λmax(H)/λmax(H)/tanh" in lines and "param/trace/tr H/tanh" not in lines
    for ax in fig.axes:  # every series of a panel differs in more than colour
        drawn = [x for x in ax.lines if x.get_gid()]  # not the error bars' caps
        styles = [(x.get_linestyle(), x.get_marker(), x.get_markerfacecolor()) for x in drawn]
        assert len(styles) == len(set(styles))
    assert fig.axes[0].get_xscale() == "log" and "β" in fig.axes[-1].get_xlabel()
    # One parameter value, or only swept groups: nothing to draw.
    assert parameter.parameter_series(rows[:2]) is None
    assert parameter.parameter_series([{**r, "overrides": {"seed": 1}} for r in rows]) is None


def test_plot_and_compare_commands_redraw_without_recomputing(saved_run, tmp_path):
    workdir, _ = saved_run
    before = {p: p.stat().st_mtime_ns for p in (workdir / "members").rglob("*") if p.is_file()}
    out = cli("plot", f"--workdir={workdir}")
    assert out.returncode == 0, out.stderr
    assert "density.png" in out.stdout
    after = {p: p.stat().st_mtime_ns for p in (workdir / "members").rglob("*") if p.is_file()}
    assert before == after  # no measurement touched
    out = cli("compare", f"--workdir={tmp_path}", f"--runs={workdir},{workdir}")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "compare.png").exists() and "relu" in (tmp_path / "compare.md").read_text()


def test_partial_run_with_a_failed_seed_is_summarised_honestly(saved_run, tmp_path):

    workdir, _ = saved_run
    partial = tmp_path / "partial"
    shutil.copytree(workdir, partial)
    member = partial / "members" / "relu-seed1"
    lines = (member / "metrics.jsonl").read_text().splitlines()
    (member / "metrics.jsonl").write_text(lines[0] + "\n")  # seed 1 stopped after step 0
    storage.write_json(
        member / "status.json", {"state": "failed", "message": "non-finite", "step": 3}
    )
    run = experiments.load_run(partial)
    rows = {r["group"]: r for r in report.summary_rows(run)}
    relu = rows["relu"]
    assert relu["final step"] == 0 and relu["seeds"] == 2 and relu["failed"] == 1
    step0 = [run.members[f"relu-seed{s}"].records[0] for s in (0, 1)]
    assert relu["λmax(H)"].mean == pytest.approx(
        np.mean([r.top_eigenvalues.values[0] for r in step0])
    )
    text = report.summary_markdown(report.summary_rows(run))
    assert "relu: seeds reached steps [0, 20]" in text
    assert "Rows are at different steps (final step column): relu at 0, softplus_4 at 20" in text
    # The surviving seed's later eigenvalues are still drawn (thin per-seed line).
    fig = sharpness.eigenvalue_figure(run)
    xs = [list(line.get_xdata()) for ax in fig.axes for line in ax.lines if not line.get_gid()]
    assert [0, 10, 20] in xs
    pages.draw_all(partial)
    assert (partial / "report.md").exists()


def test_figures_follow_each_measurements_own_schedule(tmp_path):
    config = load_config()
    with config.unlocked():
        config.activations = ("relu",)
        config.measure.every = 5
        config.measure.quantities = ("lambda_max", "top_eigenvalues", "bottom_eigenvalues")
        config.measure.top_eigenvalues.every = 10
        config.measure.bottom_eigenvalues.steps = (0, 15)
        config.measure.top_eigenvalues.num_steps = 20
    run_lib.run(config, tmp_path, progress=quiet())
    member = experiments.load_run(tmp_path).members["relu-seed0"]
    have_top = [r.step for r in member.records if r.top_eigenvalues is not None]
    have_bottom = [r.step for r in member.records if r.bottom_eigenvalues is not None]
    assert member.steps == [0, 5, 10, 15, 20] and have_top == [0, 10, 20]
    assert have_bottom == [0, 15, 20]
    lines = {
        line.get_gid(): line
        for ax in sharpness.eigenvalue_figure(experiments.load_run(tmp_path)).axes
        for line in ax.lines
        if line.get_gid()
    }
    assert list(lines["eig/relu/top0"].get_xdata()) == have_top
    assert list(lines["eig/relu/bottom0"].get_xdata()) == have_bottom
    assert pages.draw_all(tmp_path)


def test_library_density_helper_draws_onto_a_given_axis():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    op = cv.from_matrix(np.diag(np.linspace(-1.0, 3.0, 40)))

    d = cv.spectral_density(op, num_probes=3, num_steps=10, key=jax.random.key(0))
    fig, ax = plt.subplots()
    grid, values = plotting.plot_density(ax, d, sigma=0.1, rug=True, label="diag")
    assert np.trapezoid(values, grid) == pytest.approx(1.0, abs=1e-3)
    assert np.allclose(ax.lines[0].get_ydata(), np.maximum(values, 1e-5))
    assert ax.get_yscale() == "log" and "σ = 0.1" in ax.get_ylabel()
    plt.close(fig)

"""Sweeps over any field: the product of values, fields that vary together, sweeps refused."""

import pytest

import curvature as cv

pytest.importorskip("flax")
from workbench_helpers import (  # noqa: E402
    cli,
    light_config,
    load_config,
    quiet,
)

import experiments  # noqa: E402
from experiments import config as config_lib  # noqa: E402
from experiments import (  # noqa: E402
    measure,
    report,
    sweep,
)
from experiments import run as run_lib  # noqa: E402
from experiments.errors import ConfigError  # noqa: E402


def test_a_sweep_over_the_learning_rate_runs_the_product(tmp_path):
    config = light_config()
    with config.unlocked():
        config.activations = ("relu",)
        config.seeds = (0, 1)
        config.sweep = ("train.learning_rate=0.1,0.3",)
    statuses = run_lib.run(config, tmp_path, progress=quiet())
    assert list(statuses) == [
        "relu-learning_rate=0.1-seed0",
        "relu-learning_rate=0.1-seed1",
        "relu-learning_rate=0.3-seed0",
        "relu-learning_rate=0.3-seed1",
    ]
    run = experiments.load_run(tmp_path)
    for name, member in run.members.items():
        lr = member.overrides["train.learning_rate"]
        assert member.config.train.learning_rate == lr and f"learning_rate={lr}" in name
        assert member.records[-1].learning_rate == lr
        assert member.records[-1].edge_of_stability == pytest.approx(2 / lr)
        assert float(member.opt_state(20).hyperparams["learning_rate"]) == pytest.approx(lr)
    # Members that share a seed start from the same parameters; a larger step moves further.
    a, b = run.members["relu-learning_rate=0.1-seed0"], run.members["relu-learning_rate=0.3-seed0"]
    assert a.records[0].train_loss == b.records[0].train_loss
    assert b.records[-1].train_loss < a.records[-1].train_loss
    rows = report.summary_rows(run)
    assert [r["group"] for r in rows] == ["relu-learning_rate=0.1", "relu-learning_rate=0.3"]
    assert all(r["seeds"] == 2 for r in rows)
    csv = (tmp_path / "summary.csv").read_text().splitlines()
    assert csv[0].startswith("group,activation,train.learning_rate,seeds")
    assert csv[1].startswith("relu-learning_rate=0.1,relu,0.1,2")


def test_sweep_from_the_command_line_and_compare_by_edge(tmp_path):
    args = ["--config=configs/smoke.py", "--config.activations=('tanh',)"]
    args += ["--config.measure.quantities=('lambda_max',)", "--config.train.steps=10"]
    out = cli(
        "run",
        *args,
        f"--workdir={tmp_path / 'a'}",
        "--sweep=train.learning_rate=0.2,0.4",
        "--sweep=model.width=4,8",
        "--quiet",
    )
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in (tmp_path / "a" / "members").iterdir())
    assert names == [
        f"tanh-learning_rate={lr}-width={w}-seed0" for lr in (0.2, 0.4) for w in (4, 8)
    ]
    cmp = cli("compare", f"--runs={tmp_path / 'a'}", f"--workdir={tmp_path / 'cmp'}")
    assert cmp.returncode == 0, cmp.stderr
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "tanh-learning_rate=0.4-width=8" in text and "λmax/edge" in text


def test_a_data_sweep_gives_each_member_its_data(tmp_path):
    config = light_config()
    with config.unlocked():
        config.activations = ("relu",)
        config.train.steps = 0
        config.sweep = ("data.num_train=100,150",)
    run_lib.run(config, tmp_path, progress=quiet())
    run = experiments.load_run(tmp_path)
    for n in (100, 150):
        member = run.members[f"relu-num_train={n}-seed0"]
        assert member.measure_data["x"].shape == (n, 64)
        H = cv.hessian(member.loss, member.params(0), member.measure_data)
        top = cv.eigsh(H, k=3, num_steps=20, key=measure.measurement_key(0, 0, "eig"))
        assert top.eigenvalues[0] == pytest.approx(member.records[0].top_eigenvalues.values[0])
    fps = set(run.member_fingerprints.values())
    assert len(fps) == 2


@pytest.mark.parametrize(
    "sweep,match",
    [
        ("dtype=float32,float64", "dtype holds for the whole run; it cannot be swept"),
        ("train.steps=True,10", "'True' is a bool, the field is a int"),
        ("data.path=a/b.npz,a_b.npz", "different values give the same member name"),
        ("measure.devices=1,2", "measure.devices holds for the whole run; it cannot be swept"),
        # A folder name too long for the file system: refused before config.json is written,
        # so the corrected command is not refused as another config in that workdir.
        (
            f"data.path={'a' * 300},b",
            r"member relu-path=a+\.\.\. would be a folder name of 316 bytes, more than a file "
            r"system allows \(255\); sweep shorter values \(the longest: data.path, 300 "
            r"characters\)",
        ),
    ],
)
def test_sweeps_that_cannot_run_as_asked_are_refused(tmp_path, sweep, match):
    config = light_config()
    with config.unlocked():
        config.sweep = (sweep,)
    with pytest.raises(ValueError, match=match):
        run_lib.run(config, tmp_path, progress=quiet())
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_fields_swept_together_need_one_value_each():
    config = load_config()
    with config.unlocked():
        config.sweep = ("train.optimizer+train.learning_rate=(adam,0.01),(sgd)",)
    with pytest.raises(ConfigError, match=r"'\(sgd\)' is not a tuple of 2 values"):
        sweep.members(config)
    with config.unlocked():
        config.sweep = ("train.optimizer+train.learning_rate=(adam,0.01)", "train.optimizer=sgd")
    with pytest.raises(ConfigError, match="a field is swept twice"):
        sweep.members(config)


def test_a_sweep_over_a_deprecated_key_sets_its_new_name():
    # Member names keep the key as written (a run directory swept over it keeps its members).
    config_lib._warned.clear()
    config = load_config()
    with config.unlocked():
        config.activations = ("relu",)
        config.sweep = ("measure.lambda_max.lanczos_steps=12,14",)
    with pytest.warns(FutureWarning, match="use measure.lambda_max.num_steps"):
        specs = sweep.members(config)
    assert [s.name for s in specs] == [
        "relu-lanczos_steps=12-seed0",
        "relu-lanczos_steps=14-seed0",
    ]
    assert [s.config.measure.lambda_max.num_steps for s in specs] == [12, 14]
    assert all("lanczos_steps" not in s.config.measure.lambda_max for s in specs)

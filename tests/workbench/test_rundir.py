"""Run directories hold their own files: a symbolic link inside one is refused before anything
is written through it, and ``load_run`` reads only the member folders of its workdir."""

import json
import os
import re
import shutil

import pytest

pytest.importorskip("flax")
from workbench_helpers import light_config, load_config, quiet, snapshot  # noqa: E402
from workbench_helpers import smoke_run as run_smoke_once  # noqa: E402

import experiments  # noqa: E402
from experiments import pages  # noqa: E402
from experiments import run as run_lib  # noqa: E402
from experiments.errors import RunDirError  # noqa: E402


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    return run_smoke_once(tmp_path_factory)


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    (workdir / ".lock").symlink_to(victim)
    config = light_config(steps=0)
    with config.unlocked():
        config.activations = ("relu",)
    with pytest.raises(RunDirError, match=r"\.lock is a symbolic link \(to .*precious\.txt\)"):
        run_lib.run(config, workdir, progress=quiet())
    assert victim.read_text() == "keep me\n"
    assert sorted(p.name for p in workdir.iterdir()) == [".lock"]


@pytest.mark.parametrize(
    "linked",
    [
        "members/relu-seed0/metrics.jsonl",
        "members/relu-seed0/spectra/step_000020.npz",
        "members/relu-seed0",
        "members",
    ],
)
def test_a_linked_file_or_folder_in_a_run_directory_is_refused(smoke_run, tmp_path, linked):
    # The link points at a copy outside the run directory. The last record is lost, so a resume
    # would measure step 20 again and write it through the link: it must be refused first, and
    # neither load_run nor plot may read the link as this run's.
    _, source, _ = smoke_run
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    inside = workdir / linked
    outside = tmp_path / "elsewhere"
    shutil.move(inside, outside)
    os.symlink(outside, inside)
    metrics = (workdir / "members" / "relu-seed0" / "metrics.jsonl").resolve()
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:-1]))

    def contents():
        return snapshot(outside) if outside.is_dir() else outside.read_bytes()

    before, inside_before = contents(), snapshot(workdir)
    message = re.escape(f"{inside} is a symbolic link (to {outside})")
    with pytest.raises(RunDirError, match=message):
        run_lib.run(load_config(), workdir, progress=quiet())
    assert contents() == before and snapshot(workdir) == inside_before
    with pytest.raises(RunDirError, match=message):
        experiments.load_run(workdir)
    with pytest.raises(RunDirError, match=message):
        pages.draw_all(workdir)


def test_a_workdir_that_is_itself_a_link_loads(smoke_run, tmp_path):
    _, source, _ = smoke_run
    (tmp_path / "link").symlink_to(source)
    run = experiments.load_run(tmp_path / "link")
    assert sorted(run.members) == ["relu-seed0", "tanh-seed0"]


@pytest.mark.parametrize("entry", ["../../other/members/relu-seed0", "ABSOLUTE", ".."])
def test_load_run_reads_no_member_outside_its_workdir(smoke_run, tmp_path, entry):
    _, source, _ = smoke_run
    workdir, other = tmp_path / "a" / "run", tmp_path / "other"
    shutil.copytree(source, workdir)
    shutil.copytree(source, other)
    if entry == "ABSOLUTE":
        entry = str(other / "members" / "tanh-seed0")
    info = json.loads((workdir / "run.json").read_text())
    info["members"] = ["relu-seed0", entry]
    (workdir / "run.json").write_text(json.dumps(info))
    message = re.escape(f"run.json lists the member {entry!r}, which is not a folder name")
    with pytest.raises(RunDirError, match=message):
        experiments.load_run(workdir)
    with pytest.raises(RunDirError, match=message):
        pages.draw_all(workdir)
    assert entry not in (workdir / "summary.md").read_text()

"""The layout of a run directory, and checked reads of a member's folder.

Run directory::

    workdir/
      config.json          the resolved config (a resumed run must match it)
      run.json             record format, data fingerprint, member names
      provenance.json      versions, git revision, seeds, dtype, matmul precision, devices, command,
                           per invocation; the measurement's device mesh (measure.devices)
      summary.md, .csv     per group (activation and swept values): the last measurement
      report.md, .html     the summary, the setup and the figures with captions
      figures/             PNG and PDF
      members/<name>/      one member (below)

Member folder (``workdir/members/<name>/``)::

    member.json            name, activation, seed, swept values, fingerprint, resolved config
    status.json            running | done | failed (with the reason)
    metrics.jsonl          one record per measurement, appended and fsynced
    training.npz           the per-step training log (experiments.training_log)
    spectra/step_XXXXXX.npz       SLQ nodes and weights, Ritz values, diagonals ...
    checkpoints/step_XXXXXX.npz   parameters and optimizer state at a measured step, leaves
                                  under their pytree paths (every step with measure.keep_params,
                                  else the last only)
    eigenvectors/step_XXXXXX.npz  top Hessian eigenvectors (measure.save_eigenvectors)
"""

from __future__ import annotations

import os
import pathlib

from experiments import storage, training_log
from experiments.errors import RunDirError
from experiments.measurements import Record


def refuse_links(workdir: pathlib.Path) -> None:
    """:class:`RunDirError` for the first symbolic link inside ``workdir`` (``workdir`` itself
    may be one): a linked lock, log, spectra file or member folder would have a run write into,
    or ``load_run`` read from, files that are not this run's."""
    for folder, dirs, files in os.walk(workdir):  # links to folders are listed, not followed
        for name in sorted(dirs + files):
            path = pathlib.Path(folder) / name
            if path.is_symlink():
                raise storage.symlink_error(path)


def is_folder_name(name) -> bool:
    """Whether ``name`` names a folder of ``members/`` (one path component, not ``..``)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and os.sep not in name
        and "\0" not in name
    )


class MemberDir:
    """Paths and checked reads of one member's folder."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.info = path / "member.json"
        self.status = path / "status.json"
        self.metrics = path / "metrics.jsonl"
        self.training = path / training_log.FILE

    def spectra(self, step: int) -> pathlib.Path:
        return self.path / "spectra" / f"step_{step:06d}.npz"

    def checkpoint(self, step: int) -> pathlib.Path:
        return self.path / "checkpoints" / f"step_{step:06d}.npz"

    def eigenvectors(self, step: int) -> pathlib.Path:
        return self.path / "eigenvectors" / f"step_{step:06d}.npz"

    def checkpoint_steps(self) -> list[int]:
        folder = self.path / "checkpoints"
        if not folder.exists():
            return []
        return sorted(int(p.stem[5:]) for p in folder.glob("step_*.npz") if p.stem[5:].isdigit())

    def records(self) -> list[Record]:
        out = []
        for obj in storage.read_metrics(self.metrics):
            try:
                out.append(Record.from_json(obj))
            except (TypeError, KeyError, ValueError, AttributeError):
                raise RunDirError(
                    f"{self.metrics}: a record is not in this version's format "
                    f"(step {obj.get('step') if isinstance(obj, dict) else '?'}); "
                    "use a new --workdir"
                ) from None
        return sorted(out, key=lambda r: r.step)

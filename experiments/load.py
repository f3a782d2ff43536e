"""Reloading a run directory: ``load_run(workdir)``.

    run = experiments.load_run("runs/relu_vs_smooth")
    member = run.members["relu-seed0"]
    member.records[-1].top_eigenvalues          # typed records, read by name
    H = curvature.hessian(member.loss, member.params(600), member.measure_data)

Records, statuses and spectra are read from disk alone (no model built, no data loaded); the
model, the loss, the data and the parameters are rebuilt on first use from the stored config, and
the data are checked against the run's fingerprint.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import warnings

import jax
import ml_collections
import numpy as np

from experiments import config as config_lib
from experiments import data as data_lib
from experiments import lifecycle, models, rundir, storage, sweep, train, training_log
from experiments.errors import RunDirError
from experiments.measurements import Record
from experiments.rundir import MemberDir


class _Steps(list):
    """A list of steps that may still be called like the method it replaces."""

    def __call__(self) -> list[int]:
        warnings.warn(
            "Member.checkpoint_steps is a property, like Member.steps: drop the parentheses",
            DeprecationWarning,
            stacklevel=2,
        )
        return list(self)


@dataclasses.dataclass
class Member:
    """One member of a run: what it is, what it recorded and, rebuilt on use, how to compute it."""

    run: Run = dataclasses.field(repr=False)
    name: str
    group: str  # the name without the seed
    activation: str
    activation_index: int
    model_activations: tuple[str, ...]  # what the model holds: the run's all, or its own
    seed: int
    overrides: dict  # swept {field path: value}
    config: ml_collections.ConfigDict  # resolved: its activation, seed and swept values
    status: dict
    records: list[Record]
    dir: pathlib.Path

    @property
    def steps(self) -> list[int]:
        """The measured steps (of :attr:`records`), in order."""
        return [r.step for r in self.records]

    @property
    def measurements(self) -> tuple[str, ...]:
        """The measurement plan (``measure.quantities``)."""
        return tuple(self.config.measure.quantities)

    def record(self, step: int) -> Record:
        for r in self.records:
            if r.step == step:
                return r
        raise KeyError(f"{self.name} has no record at step {step}; it has {self.steps}")

    def spectra(self, step: int) -> dict[str, np.ndarray]:
        """The arrays saved with the measurement at ``step`` (SLQ nodes, diagonals, ...)."""
        path = MemberDir(self.dir).spectra(step)
        if not path.exists():
            raise KeyError(f"{self.name} has no spectra file at step {step}")
        return storage.read_npz(path, "spectra file")

    # -- rebuilt on first use --------------------------------------------------------------

    @functools.cached_property
    def _setup(self):
        spec = sweep.MemberSpec(
            self.name,
            self.group,
            self.activation,
            self.activation_index,
            self.seed,
            self.overrides,
            self.config,
        )
        self.run._require_dtype(self.config.dtype)
        dataset = self.run.data_of(self)
        arrays = lifecycle.device_data(dataset, self.config.dtype)
        return lifecycle.setup(spec, self.model_activations, dataset, arrays)

    def _bind(self, fn):
        index = self.model_activations.index(self.activation)

        def bound(params, batch):
            if "activation" not in batch:
                batch = models.with_activation(batch, index)
            return fn(params, batch)

        return bound

    @functools.cached_property
    def model(self):
        """``model(params, batch) -> outputs`` with this member's activation; ``batch`` holds
        ``x`` (and ``y``)."""
        return self._bind(self._setup.model)

    @functools.cached_property
    def loss(self):
        """``loss(params, batch)``: the mean training loss over ``batch`` (``x``, ``y``)."""
        return self._bind(self._setup.loss)

    @property
    def measure_data(self) -> dict:
        """The fixed measurement set the records were measured on (``x``, ``y``)."""
        return {k: v for k, v in self._setup.measure_data.items() if k != "activation"}

    @property
    def train_data(self) -> dict:
        return {"x": self._setup.x_train, "y": self._setup.y_train}

    @property
    def test_data(self) -> dict:
        return {k: v for k, v in self._setup.test_data.items() if k != "activation"}

    @property
    def checkpoint_steps(self) -> list[int]:
        """The steps whose parameters and optimizer state were kept (:meth:`params`), a property
        like :attr:`steps`. Calling it, as when it was a method, still works, with a
        ``DeprecationWarning``."""
        return _Steps(MemberDir(self.dir).checkpoint_steps())

    def training(self):
        """The per-step training log (:class:`experiments.training_log.Curves`): loss against
        steps, gradient-equivalents and seconds, and the optimizer's diagnostics; ``None`` for
        a run from before the log existed."""
        return training_log.read(MemberDir(self.dir).training)

    def _checkpoint(self, step: int) -> dict:
        folder = MemberDir(self.dir)
        if step not in folder.checkpoint_steps():
            raise KeyError(
                f"{self.name} kept no parameters at step {step}; kept: {folder.checkpoint_steps()} "
                "(measure.keep_params=False keeps the last only)"
            )
        init = self._setup.init_params
        templates = {
            "params": init,
            "opt_state": train.make_optimizer(self.config.train).init(init),
        }
        fingerprint = self.run.member_fingerprints.get(self.name)
        return storage.load_checkpoint(folder.checkpoint(step), templates, fingerprint)[0]

    def params(self, step: int):
        """The parameters at a measured ``step`` (a pytree like the model's ``nnx.State``)."""
        return self._checkpoint(step)["params"]

    def opt_state(self, step: int):
        """The optax state at a measured ``step``."""
        return self._checkpoint(step)["opt_state"]

    def eigenvectors(self, step: int) -> np.ndarray:
        """``(n, k)`` top Hessian eigenvectors at ``step``, largest first, when the run saved them
        (``measure.save_eigenvectors``); map one to a pytree with ``operator.unravel``."""
        path = MemberDir(self.dir).eigenvectors(step)
        if not path.exists():
            raise KeyError(
                f"{self.name} saved no eigenvectors at step {step} (set measure.save_eigenvectors)"
            )
        return storage.read_npz(path, "eigenvectors file")["eigenvectors"]


@dataclasses.dataclass
class Run:
    """A run directory: its config, members (by name, in sweep order) and, on use, its data."""

    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    info: dict  # run.json: format, data fingerprint, member names
    provenance: dict
    members: dict[str, Member] = dataclasses.field(default_factory=dict)
    member_fingerprints: dict[str, str] = dataclasses.field(default_factory=dict)
    _datasets: dict = dataclasses.field(default_factory=dict, repr=False)

    @functools.cached_property
    def data(self):
        """The data set, loaded from the stored config and checked against the fingerprint."""
        dataset = data_lib.load(self.config.data)
        want = self.info.get("data_fingerprint")
        if want is not None and data_lib.fingerprint(dataset) != want:
            raise RunDirError(
                f"the data of {self.workdir} changed since the run (fingerprint "
                f"{data_lib.fingerprint(dataset)}, recorded {want}); the records cannot be reproduced"
            )
        return dataset

    def data_of(self, member: Member):
        """The data set of ``member`` (a sweep may change the data), checked against its
        fingerprint: loading must give what the member was measured on."""
        key = member.config.data.to_json_best_effort(sort_keys=True)
        if key not in self._datasets:
            self._datasets[key] = data_lib.load(member.config.data)
        dataset = self._datasets[key]
        got = lifecycle.fingerprint(member.config, data_lib.fingerprint(dataset))
        if got != self.member_fingerprints.get(member.name, got):
            raise RunDirError(
                f"the data of {member.name} in {self.workdir} changed since the run; its records "
                "cannot be reproduced"
            )
        return dataset

    def _require_dtype(self, dtype: str) -> None:
        if dtype == "float64" and not jax.config.jax_enable_x64:
            raise RuntimeError(
                f"{self.workdir} is a float64 run: use its members inside jax.enable_x64(True)"
            )

    def groups(self) -> dict[str, list[Member]]:
        """Members by group (activation and swept values), in sweep order."""
        out: dict[str, list[Member]] = {}
        for m in self.members.values():
            out.setdefault(m.group, []).append(m)
        return out


def load_run(workdir) -> Run:
    """The run in ``workdir``: config, members with their typed records, and on first use their
    model, loss, data, parameters and optimizer state at every kept step."""
    workdir = pathlib.Path(workdir).expanduser()
    rundir.refuse_links(workdir)
    stored = storage.read_json(workdir / "config.json")
    if stored is None:
        raise FileNotFoundError(f"{workdir} has no config.json: not a run directory")
    config = ml_collections.ConfigDict(config_lib.upgrade(stored))
    run = Run(
        workdir,
        config,
        storage.read_json(workdir / "run.json", {}),
        storage.read_json(workdir / "provenance.json", {}),
    )
    names = run.info.get("members")
    if names is None:  # a run stopped before run.json: whatever member folders exist
        folder = workdir / "members"
        names = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    for name in names:
        if not rundir.is_folder_name(name):  # "../../x" or "/x": another run's member
            raise RunDirError(
                f"{workdir / 'run.json'} lists the member {name!r}, which is not a folder name "
                "in members/; the file is corrupt: delete it (the member folders are read then) "
                "or use a new --workdir"
            )
        folder = MemberDir(workdir / "members" / name)
        info = storage.read_json(folder.info)
        if info is None:
            continue  # not started
        missing = [
            k
            for k in ("fingerprint", "group", "activation", "activation_index", "seed", "config")
            if k not in info
        ]
        if missing:
            raise RunDirError(f"{folder.info} is corrupt (it lacks {', '.join(missing)})")
        run.member_fingerprints[name] = info["fingerprint"]
        run.members[name] = Member(
            run=run,
            name=name,
            group=info["group"],
            activation=info["activation"],
            activation_index=info["activation_index"],
            model_activations=tuple(info.get("model_activations", [info["activation"]])),
            seed=info["seed"],
            overrides=info.get("overrides", {}),
            config=ml_collections.ConfigDict(config_lib.upgrade(info["config"])),
            status=storage.read_json(folder.status, {}),
            records=folder.records(),
            dir=folder.path,
        )
    return run


__all__ = ["Member", "Run", "load_run"]

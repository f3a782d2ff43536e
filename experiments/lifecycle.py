"""One member of a sweep: its checks on resume, training to each scheduled step and measuring
there, and the repair of lost records. Its folder is laid out in :mod:`experiments.rundir`.

The fingerprint hashes the member's resolved config (less what may change on resume) and the
data; every record, checkpoint and ``member.json`` carries it, so results of another config or
data set are refused even when ``config.json`` is gone. A record that is missing (a truncated
log, a lost line) is measured again from the kept parameters, or from retraining, which is
deterministic in the seed and the step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import curvature.sharding as cvs
from experiments import config as config_lib
from experiments import measure as measure_lib
from experiments import models, storage, train, training_log
from experiments.errors import RunDirError
from experiments.measurements import MEASUREMENTS
from experiments.optimizers import OPTIMIZERS
from experiments.record import Training
from experiments.rundir import MemberDir
from experiments.sweep import MemberSpec


class Interrupted(Exception):
    """Another member of a threaded run failed or was interrupted: stop between measurements."""


def fingerprint(member_config, data_fingerprint: str) -> str:
    """A hash of what a member computes: its resolved config, less the keys that may change on
    resume, renamed keys under their first names (:func:`experiments.config.fingerprint_form`),
    and the data."""
    resolved = config_lib.fingerprint_form(json.loads(member_config.to_json_best_effort()))
    text = json.dumps({"config": resolved, "data": data_fingerprint}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass
class Setup:
    """The pure functions and data of a member, shared by the run and by ``load_run``."""

    model: Callable  # model(params, batch) with batch["activation"]
    loss: Callable
    init_params: object
    x_train: jax.Array
    y_train: jax.Array
    test_data: dict  # with the activation column
    measure_data: dict  # with the activation column
    model_activations: tuple[str, ...] = ()
    index: int = 0  # the member's activation among model_activations (the data's column)
    # measure.devices > 1: the mesh that measure_data are sharded over (test_data replicated);
    # None: one device, unsharded.
    mesh: jax.sharding.Mesh | None = None

    def replicated(self, tree):
        """``tree`` (parameters, optimizer state) on every device of the mesh, if any."""
        return tree if self.mesh is None else cvs.replicate(tree, self.mesh)


def device_data(dataset, dtype) -> dict:
    """The dataset's arrays on the device, made once and shared by members: inputs in
    ``dtype``, except token ids (``dataset.is_tokens``), which stay int32."""
    x_dtype = jnp.int32 if dataset.is_tokens else dtype
    return {
        "x_train": jnp.asarray(dataset.x_train, x_dtype),
        "y_train": jnp.asarray(dataset.y_train),
        "x_test": jnp.asarray(dataset.x_test, x_dtype),
        "y_test": jnp.asarray(dataset.y_test),
    }


def setup(spec: MemberSpec, model_activations: tuple[str, ...], dataset, arrays: dict) -> Setup:
    """The member's model, loss and data; ``arrays`` from :func:`device_data`.

    ``model_activations``: the activations the model holds, the member's among them: the run's
    all (one compiled program for all, see ``share_activations``) or the member's alone."""
    config = spec.config
    dtype = jnp.dtype(config.dtype)
    graphdef, params, rest = _build(
        models.resolved(config.model, dataset.y_train.ndim),
        tuple(model_activations),
        dataset.input_shape,
        dataset.num_classes,
        spec.seed,
    )
    model, loss = models.pure_functions(
        graphdef, jax.tree_util.tree_structure(rest), config.train.loss
    )
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
    x_train, y_train = arrays["x_train"], arrays["y_train"]
    test = {"x": arrays["x_test"], "y": arrays["y_test"]}
    # The fixed measurement set: the first measure.num_examples of the named split.
    source = {"x": x_train, "y": y_train} if config.measure.split == "train" else test
    num = config.measure.num_examples or len(source["y"])
    meas = {k: v[:num] for k, v in source.items()}
    index = tuple(model_activations).index(spec.activation)
    return Setup(
        model,
        loss,
        params,
        x_train,
        y_train,
        models.with_activation(test, index),
        models.with_activation(meas, index),
        tuple(model_activations),
        index,
    )


_BUILT: dict = {}


def _build(model_cfg, activations, input_shape, num_classes, seed):
    """``models.build``, once per architecture and seed: members that differ only in their
    activation share the initial parameters (and the time to make them)."""
    key = (model_cfg.to_json_best_effort(), activations, tuple(input_shape), num_classes, seed)
    if key not in _BUILT:
        _BUILT[key] = models.build(model_cfg, activations, input_shape, num_classes, seed)
    return _BUILT[key]


def _num_outputs(s: Setup) -> int:
    """The model's outputs per example (the classes), from its shape alone."""
    batch = models.with_activation({"x": s.x_train[:1], "y": s.y_train[:1]}, s.index)
    return int(jax.eval_shape(s.model, s.init_params, batch).shape[-1])


def verify(spec: MemberSpec, folder: MemberDir, member_fingerprint: str) -> None:
    """Refuse a member folder that holds results of another config or data set, or a corrupt
    status or checkpoint file: :class:`RunDirError`, before anything is written."""
    if not folder.path.exists():
        return
    info = storage.read_json(folder.info)
    other = "holds results of another config or data set"
    hint = "resume with the same config and data, or choose a new --workdir"
    if info is not None and info.get("fingerprint") != member_fingerprint:
        stored = config_lib.upgrade(info.get("config", {}))
        diff = config_lib.differences(stored, json.loads(spec.config.to_json_best_effort()))
        detail = f" ({'; '.join(diff[:4])})" if diff else " (the data changed)"
        raise RunDirError(f"{folder.path} {other}{detail}; {hint}")
    status = storage.read_json(folder.status, {})
    if status and status.get("state") not in ("running", "done", "failed"):
        raise RunDirError(f"{folder.status} is corrupt (state {status.get('state')!r}); delete it")
    for record in folder.records():
        if record.fingerprint != member_fingerprint:
            raise RunDirError(f"{folder.metrics} {other} (step {record.step}); {hint}")
    for step in folder.checkpoint_steps():
        arrays = storage.read_npz(folder.checkpoint(step), "checkpoint", ("fingerprint", "step"))
        if str(arrays.get("fingerprint", "")) != member_fingerprint:
            raise RunDirError(f"{folder.checkpoint(step)} {other}; {hint}")
    if folder.training.exists():
        arrays = storage.read_npz(folder.training, "training log", ("fingerprint",))
        if str(arrays.get("fingerprint", "")) != member_fingerprint:
            raise RunDirError(f"{folder.training} {other}; {hint}")


def _lost_files(folder: MemberDir, record: dict, eigenvectors: int) -> bool:
    """Whether the files of the measurement ``record`` are missing or unreadable: its spectra
    file, when one of its measurements writes one (their declarations say), and its
    eigenvectors."""
    step = record["step"]
    paths = []
    with_spectra = [m.field for m in MEASUREMENTS.values() if m.spectra and m.field]
    if any(record.get(f) is not None for f in with_spectra):
        paths.append(folder.spectra(step))
    if eigenvectors:
        paths.append(folder.eigenvectors(step))
    for path in paths:
        if not path.exists():
            return True
        try:
            storage.read_npz(path, "file", ())
        except RunDirError:
            return True
    return False


def _set_status(folder: MemberDir, **status) -> dict:
    storage.write_json(folder.status, status)
    return status


def run_member(spec: MemberSpec, *args, **kwargs) -> dict:
    """Train ``spec`` through its schedule, measuring at each step that has no record yet.

    JAX's x64 switch is per thread: each member enters its own, so members in threads compute
    in their config's dtype."""
    with jax.enable_x64(spec.config.dtype == "float64"):
        return _run_member(spec, *args, **kwargs)


def _run_member(
    spec: MemberSpec,
    folder: MemberDir,
    setup_: Setup,
    member_fingerprint: str,
    *,
    progress,
    label: str,
    on_measurement: Callable | None = None,
    stop=None,
) -> dict:
    config = spec.config
    schedule = measure_lib.schedule(config)
    status = storage.read_json(folder.status, {})
    log = storage.MetricsLog(folder.metrics)
    damaged = _damaged_steps(folder, log, config)
    missing = _steps_to_measure(schedule, log, damaged, status)
    if not missing and status.get("state") in ("done", "failed"):
        return status
    _write_info(folder, spec, setup_, member_fingerprint)
    if status.get("state") != "failed":
        _set_status(folder, state="running")
    training = _Training(spec, folder, setup_, member_fingerprint)
    for target in missing:
        if stop is not None and stop.is_set():
            raise Interrupted(f"{spec.name}: stopped with the run")
        training.restore(target)
        if target > training.at:
            progress.update(f"{label}: training to step {target} of {schedule[-1]}")
            why = training.to(target)
            if why is not None:
                message = f"{why}; kept {len(log.records)} measurements"
                progress.line(f"{label}: stopped: {message}")
                return _set_status(folder, state="failed", message=message, step=training.at)
        training.keep(target)
        if target in damaged:
            log.drop(target)
        progress.update(f"{label}: measuring step {target} ({len(log.steps) + 1}/{len(schedule)})")
        try:
            record, spectra = _measure(spec, setup_, training, target, member_fingerprint)
        except measure_lib.MeasurementFailed as err:
            message = f"measurement at step {target} failed: {err}"
            progress.line(f"{label}: stopped: {message}")
            return _set_status(folder, state="failed", message=message, step=training.at)
        _write_measurement(folder, log, record, spectra)
        if not config.measure.keep_params:
            _keep_last_checkpoint(folder)
        if on_measurement is not None:
            on_measurement(spec.name, target)
    if status.get("state") == "failed":
        return status
    return _set_status(folder, state="done", step=schedule[-1])


def _damaged_steps(folder: MemberDir, log: storage.MetricsLog, config) -> set[int]:
    """Recorded steps whose spectra or eigenvector file is lost or unreadable: they lost part of
    their measurement and are measured again."""
    keep = config.measure.save_eigenvectors
    return {r["step"] for r in log.records if _lost_files(folder, r, keep)}


def _steps_to_measure(schedule, log: storage.MetricsLog, damaged: set[int], status: dict):
    """The steps to measure, in order: scheduled steps without a record, and damaged ones. A
    failed member is final (its reason stands): only its records lost before the step it
    reached are repaired."""
    missing = sorted({s for s in schedule if s not in log.steps} | damaged)
    if status.get("state") == "failed":
        missing = [s for s in missing if s <= status.get("step", -1)]
    return missing


def _write_info(folder: MemberDir, spec: MemberSpec, setup_: Setup, member_fingerprint: str):
    storage.write_json(
        folder.info,
        {
            "name": spec.name,
            "group": spec.group,
            "activation": spec.activation,
            "activation_index": spec.activation_index,
            "model_activations": list(setup_.model_activations),
            "seed": spec.seed,
            "overrides": spec.overrides,
            "fingerprint": member_fingerprint,
            "config": json.loads(spec.config.to_json_best_effort()),
        },
    )


class _Training:
    """A member's parameters and optimizer state at step ``at``, trained forward to the steps it
    measures (from the last kept checkpoint at or before them), and its training log."""

    def __init__(self, spec: MemberSpec, folder: MemberDir, s: Setup, member_fingerprint: str):
        config = spec.config
        self.folder, self.fingerprint, self.train_cfg = folder, member_fingerprint, config.train
        optimizer = train.make_optimizer(config.train)
        self.init = {"params": s.init_params, "opt_state": optimizer.init(s.init_params)}
        self.run_train = train.trainer(s.loss, config.train, len(s.y_train), s.model)
        self.dtype = jnp.dtype(config.dtype)  # the parameters' (token inputs are integers)
        names = list(train.new_log(config.train, self.dtype, self.init["opt_state"]))
        self.log = training_log.TrainingLog.load(
            folder.training, names, config.train.steps, member_fingerprint
        )
        self.num_outputs = _num_outputs(s) if OPTIMIZERS.get(config.train.optimizer).cost else 0
        train_data = models.with_activation({"x": s.x_train, "y": s.y_train}, s.index)
        self.initial_loss = float(train.evaluator(s.loss, s.model)(s.init_params, train_data)[0])
        self.factor = config.train.divergence_factor
        limit = self.factor * max(self.initial_loss, 1e-8) if self.factor else np.inf
        data_key = jax.random.fold_in(jax.random.key(spec.seed), 1)
        index = jnp.asarray(s.index, jnp.int32)
        self.data = (s.x_train, s.y_train, data_key, index, jnp.asarray(limit, self.dtype))
        self.state, self.at = self.init, 0  # in memory: the trees at step `at`

    def restore(self, target: int) -> None:
        """Go back to the last checkpoint at or before ``target`` (or to the start) when it is
        later than the state in memory, or when that state is past ``target``."""
        kept = [c for c in self.folder.checkpoint_steps() if c <= target]
        if kept and kept[-1] > self.at or self.at > target:
            if kept:
                path = self.folder.checkpoint(kept[-1])
                self.state, self.at = storage.load_checkpoint(path, self.init, self.fingerprint)
            else:
                self.state, self.at = self.init, 0

    def to(self, target: int) -> str | None:
        """Train to ``target`` (logged and saved); ``None``, or why training stopped early."""
        params, opt_state, reached, reason, loss = self.log.train(
            self.run_train, self.state, self.at, target, self.data, self.dtype
        )
        self.log.save(self.folder.training, self.cost(), self.fingerprint)
        self.state, self.at = {"params": params, "opt_state": opt_state}, int(reached)
        if int(reason) == train.OK:
            return None
        if int(reason) == train.NON_FINITE:
            return f"non-finite training loss or gradient at step {self.at} (loss {float(loss)})"
        return (
            f"diverged: training loss {float(loss):.4g} at step {self.at} exceeds "
            f"{self.factor:g} x the initial {self.initial_loss:.4g} (train.divergence_factor)"
        )

    def cost(self) -> np.ndarray:
        """Each logged step's cost in gradient-equivalents."""
        return train.gradient_equivalents(self.train_cfg, self.log.arrays, self.num_outputs)

    def keep(self, step: int) -> None:
        """The checkpoint of the state at ``step``, unless one is kept already."""
        path = self.folder.checkpoint(step)
        if not path.exists():
            storage.save_checkpoint(path, self.state, step, self.fingerprint)


def _measure(spec: MemberSpec, s: Setup, training: _Training, step: int, member_fingerprint: str):
    """The planned measurements at ``step`` from the trained state: ``(record, spectra)``, the
    record with the cost of training to the step."""
    ctx = measure_lib.Context(
        model=s.model,
        loss=s.loss,
        params=s.replicated(training.state["params"]),
        opt_state=s.replicated(training.state["opt_state"]),
        data=s.measure_data,
        config=spec.config,
        seed=spec.seed,
        step=step,
        plan=measure_lib.plan_at(spec.config, step),
    )
    record, spectra = measure_lib.measure(
        ctx, test_data=s.test_data, member=spec.name, fingerprint=member_fingerprint
    )
    cost = Training(*training.log.totals(step, training.cost()))
    return dataclasses.replace(record, training=cost), spectra


def _write_measurement(folder: MemberDir, log: storage.MetricsLog, record, spectra: dict) -> None:
    """The step's eigenvectors and spectra files, then its record (the record last: a record on
    disk means its files are)."""
    vectors = spectra.pop("eigenvectors", None)
    if vectors is not None:
        storage.write_npz(folder.eigenvectors(record.step), eigenvectors=vectors)
    if spectra:
        storage.write_npz(folder.spectra(record.step), **spectra)
    log.append(record.to_json())


def _keep_last_checkpoint(folder: MemberDir) -> None:
    """``measure.keep_params=False``: only the last checkpoint stays."""
    last = max(folder.checkpoint_steps())
    for step in folder.checkpoint_steps():
        if step != last:
            folder.checkpoint(step).unlink()

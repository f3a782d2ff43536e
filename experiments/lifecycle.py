"""One member of a sweep: its files, its checks on resume, training to each scheduled step and
measuring there, and the repair of lost records.

Member folder (``workdir/members/<name>/``)::

    member.json            name, activation, seed, swept values, fingerprint, resolved config
    status.json            running | done | failed (with the reason)
    metrics.jsonl          one Record per measurement, appended and fsynced
    training.npz           the per-step training log (experiments.training_log)
    spectra/step_XXXXXX.npz       SLQ nodes and weights, Ritz values, diagonals ...
    checkpoints/step_XXXXXX.npz   parameters and optimizer state at a measured step, leaves
                                  under their pytree paths (every step with measure.keep_params,
                                  else the last only)
    eigenvectors/step_XXXXXX.npz  top Hessian eigenvectors (measure.save_eigenvectors)

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
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import curvature.sharding as cvs
from experiments import config as config_lib
from experiments import measure as measure_lib
from experiments import models, storage, train, training_log
from experiments.errors import RunDirError
from experiments.record import Record, Training
from experiments.sweep import MemberSpec


class Interrupted(Exception):
    """Another member of a threaded run failed or was interrupted: stop between measurements."""


def fingerprint(member_config, data_fingerprint: str) -> str:
    """A hash of what a member computes: its resolved config, less the keys that may change on
    resume, and the data."""
    resolved = config_lib.drop_resumable(json.loads(member_config.to_json_best_effort()))
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
    """The dataset's arrays on the device in ``dtype``, made once and shared by members."""
    return {
        "x_train": jnp.asarray(dataset.x_train, dtype),
        "y_train": jnp.asarray(dataset.y_train),
        "x_test": jnp.asarray(dataset.x_test, dtype),
        "y_test": jnp.asarray(dataset.y_test),
    }


def setup(spec: MemberSpec, model_activations: tuple[str, ...], dataset, arrays: dict) -> Setup:
    """The member's model, loss and data; ``arrays`` from :func:`device_data`.

    ``model_activations``: the activations the model holds, the member's among them: the run's
    all (one compiled program for all, see ``share_activations``) or the member's alone."""
    config = spec.config
    dtype = jnp.dtype(config.dtype)
    graphdef, params, rest = _build(
        config.model, tuple(model_activations), dataset.input_shape, dataset.num_classes, spec.seed
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


def verify(spec: MemberSpec, folder: MemberDir, member_fingerprint: str) -> None:
    """Refuse a member folder that holds results of another config or data set, or a corrupt
    status or checkpoint file: :class:`RunDirError`, before anything is written."""
    if not folder.path.exists():
        return
    info = storage.read_json(folder.info)
    other = "holds results of another config or data set"
    hint = "resume with the same config and data, or choose a new --workdir"
    if info is not None and info.get("fingerprint") != member_fingerprint:
        diff = _diff(info.get("config", {}), json.loads(spec.config.to_json_best_effort()))
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


def _diff(a, b, prefix="") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        path = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], path + ".")
        elif a.get(k) != b.get(k):
            out.append(f"{path}: {a.get(k)!r} on disk, {b.get(k)!r} now")
    return out


# Record fields whose measurement writes arrays to the step's spectra file.
_SPECTRA_FIELDS = (
    "top_eigenvalues",
    "bottom_eigenvalues",
    "gauss_newton",
    "density",
    "diagonal",
    "optimizer_state",
    "preconditioner",
)


def _lost_files(folder: MemberDir, record: dict, eigenvectors: int) -> bool:
    """Whether the files of the measurement ``record`` are missing or unreadable."""
    step = record["step"]
    paths = []
    if any(record.get(f) is not None for f in _SPECTRA_FIELDS):
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
    # A step whose spectra or eigenvector file is lost or unreadable lost part of its
    # measurement: measure it again.
    damaged = {
        r["step"] for r in log.records if _lost_files(folder, r, config.measure.save_eigenvectors)
    }
    missing = sorted({s for s in schedule if s not in log.steps} | damaged)
    if status.get("state") == "failed":
        # Final: its reason stands. Records lost before the step it reached are repaired.
        missing = [s for s in missing if s <= status.get("step", -1)]
        if not missing:
            return status
    elif status.get("state") == "done" and not missing:
        return status
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
            "config": json.loads(config.to_json_best_effort()),
        },
    )
    if status.get("state") != "failed":
        _set_status(folder, state="running")

    optimizer = train.make_optimizer(config.train)
    s = setup_
    init = {"params": s.init_params, "opt_state": optimizer.init(s.init_params)}
    index = jnp.asarray(setup_.index, jnp.int32)
    run_train = train.trainer(s.loss, config.train, len(s.y_train), s.model)
    dtype = s.x_train.dtype
    names = list(train.new_log(config.train, dtype, init["opt_state"]))
    steps_log = training_log.TrainingLog.load(
        folder.training, names, config.train.steps, member_fingerprint
    )
    num_outputs = _num_outputs(s) if train.OPTIMIZERS.get(config.train.optimizer).cost else 0
    data_key = jax.random.fold_in(jax.random.key(spec.seed), 1)
    train_data = models.with_activation({"x": s.x_train, "y": s.y_train}, s.index)
    initial_loss = float(train.evaluator(s.loss, s.model)(s.init_params, train_data)[0])
    factor = config.train.divergence_factor
    limit = factor * max(initial_loss, 1e-8) if factor else np.inf
    state, at = init, 0  # in memory: the trees at step `at`

    for target in missing:
        if stop is not None and stop.is_set():
            raise Interrupted(f"{spec.name}: stopped with the run")
        kept = [c for c in folder.checkpoint_steps() if c <= target]
        if kept and kept[-1] > at or at > target:
            start = kept[-1] if kept else 0
            state, at = (
                storage.load_checkpoint(folder.checkpoint(start), init, member_fingerprint)
                if kept
                else (init, 0)
            )
        if target > at:
            progress.update(f"{label}: training to step {target} of {schedule[-1]}")
            data = (s.x_train, s.y_train, data_key, index, jnp.asarray(limit, dtype))
            params, opt_state, reached, reason, loss = steps_log.train(
                run_train, state, at, target, data, dtype
            )
            cost = train.gradient_equivalents(config.train, steps_log.arrays, num_outputs)
            steps_log.save(folder.training, cost, member_fingerprint)
            state, at = {"params": params, "opt_state": opt_state}, int(reached)
            if int(reason) != train.OK:
                if int(reason) == train.NON_FINITE:
                    why = f"non-finite training loss or gradient at step {at} (loss {float(loss)})"
                else:
                    why = (
                        f"diverged: training loss {float(loss):.4g} at step {at} exceeds "
                        f"{factor:g} x the initial {initial_loss:.4g} (train.divergence_factor)"
                    )
                message = f"{why}; kept {len(log.records)} measurements"
                progress.line(f"{label}: stopped: {message}")
                return _set_status(folder, state="failed", message=message, step=at)
        if not folder.checkpoint(target).exists():
            storage.save_checkpoint(folder.checkpoint(target), state, target, member_fingerprint)
        if target in damaged:
            log.drop(target)
        progress.update(f"{label}: measuring step {target} ({len(log.steps) + 1}/{len(schedule)})")
        ctx = measure_lib.Context(
            model=s.model,
            loss=s.loss,
            params=s.replicated(state["params"]),
            opt_state=s.replicated(state["opt_state"]),
            data=s.measure_data,
            config=config,
            seed=spec.seed,
            step=target,
            plan=measure_lib.plan_at(config, target),
        )
        try:
            record, spectra = measure_lib.measure(
                ctx, test_data=s.test_data, member=spec.name, fingerprint=member_fingerprint
            )
        except measure_lib.MeasurementFailed as err:
            message = f"measurement at step {target} failed: {err}"
            progress.line(f"{label}: stopped: {message}")
            return _set_status(folder, state="failed", message=message, step=at)
        cost = train.gradient_equivalents(config.train, steps_log.arrays, num_outputs)
        record = dataclasses.replace(record, training=Training(*steps_log.totals(target, cost)))
        vectors = spectra.pop("eigenvectors", None)
        if vectors is not None:
            storage.write_npz(folder.eigenvectors(target), eigenvectors=vectors)
        if spectra:
            storage.write_npz(folder.spectra(target), **spectra)
        log.append(record.to_json())
        if not config.measure.keep_params:
            last = max(folder.checkpoint_steps())
            for step in folder.checkpoint_steps():
                if step != last:
                    folder.checkpoint(step).unlink()
        if on_measurement is not None:
            on_measurement(spec.name, target)
    if status.get("state") == "failed":
        return status
    return _set_status(folder, state="done", step=schedule[-1])

"""A run: every member of a sweep (activations x swept values x seeds), trained with optax and
measured on a schedule, each finished measurement written at once. This module wires the
pieces: ``config`` (validation), ``sweep`` (members), ``lifecycle`` (one member), ``train``,
``measure``, ``storage`` and ``report``. The run directory is laid out in
:mod:`experiments.rundir`.

Programs compiled here are kept on disk for the next process (JAX's persistent compilation
cache, :mod:`experiments.compilation_cache`; ``CURVATURE_JAX_CACHE=off`` turns it off).

Resuming: invoke again with the same config and workdir. Finished members are skipped; an
unfinished one reloads its last checkpoint, skips the measurements on disk and continues; a lost
record is measured again. Training and probes are deterministic functions of the seed and the
step, so a resumed run equals an uninterrupted one. Everything is checked before anything is
written: the config, the sweep, the data, and every file already in the run directory.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import sys
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from experiments import compilation_cache, devices, lifecycle, report, rundir, storage, sweep, train
from experiments import config as config_lib
from experiments import data as data_lib
from experiments import measure as measure_lib
from experiments.errors import RunDirError
from experiments.record import FORMAT
from experiments.rundir import MemberDir


class Progress:
    """A live line on a terminal, one line per member otherwise."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()

    def line(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r\033[K" if self.live else "") + text + "\n")
            self.stream.flush()


def resolved(config) -> dict:
    return json.loads(config.to_json_best_effort())


def _comparable(obj: dict) -> dict:
    """A config as JSON, as runs compare: today's key names, less what a resume may change."""
    return config_lib.drop_resumable(config_lib.upgrade(obj))


class DataCache:
    """Data sets by their ``data`` config, loaded and fingerprinted once, and their device arrays
    by dtype: members that share data share the arrays."""

    def __init__(self):
        self._sets: dict = {}
        self._arrays: dict = {}

    def get(self, data_cfg):
        key = data_cfg.to_json_best_effort(sort_keys=True)
        if key not in self._sets:
            dataset = data_lib.load(data_cfg)
            self._sets[key] = (dataset, data_lib.fingerprint(dataset))
        return self._sets[key]

    def arrays(self, data_cfg, dtype: str) -> dict:
        key = (data_cfg.to_json_best_effort(sort_keys=True), dtype)
        if key not in self._arrays:
            self._arrays[key] = lifecycle.device_data(self.get(data_cfg)[0], dtype)
        return self._arrays[key]


class Plan:
    """A validated run: its workdir, data, members and their fingerprints."""

    def __init__(self, config, workdir, dataset, specs, setups, fingerprints, data_fingerprint):
        self.config = config
        self.workdir = workdir
        self.dataset = dataset
        self.specs = specs
        self.setups = setups
        self.fingerprints = fingerprints
        self.data_fingerprint = data_fingerprint


def prepare(config, workdir) -> Plan:
    """Validate the config and the sweep, load the data, build every member and check the run
    directory: every error before anything is written."""
    config_lib.validate(config)
    specs = sweep.members(config)
    for spec in specs:
        config_lib.validate(spec.config)
    datasets = DataCache()
    dataset, data_fp = datasets.get(config.data)
    shared = share_activations(config)
    setups, fingerprints = {}, {}
    for spec in specs:
        member_data, member_fp = datasets.get(spec.config.data)  # a sweep may change the data
        held = tuple(config.activations) if shared else (spec.activation,)
        setups[spec.name] = devices.on_mesh(
            lifecycle.setup(
                spec, held, member_data, datasets.arrays(spec.config.data, spec.config.dtype)
            ),
            spec.config.measure.devices,
        )
        num_params = sum(
            int(np.size(x)) for x in jax.tree_util.tree_leaves(setups[spec.name].init_params)
        )
        config_lib.validate(spec.config, num_params)
        fingerprints[spec.name] = lifecycle.fingerprint(spec.config, member_fp)
    workdir = pathlib.Path(workdir).expanduser()
    return Plan(config, workdir, dataset, specs, setups, fingerprints, data_fp)


def check_workdir(plan: Plan) -> None:
    """Refuse a run directory of another config, data set or sweep, or with corrupt files."""
    workdir = plan.workdir
    if workdir.exists() and not workdir.is_dir():
        raise RunDirError(f"{workdir} is a file, not a run directory")
    rundir.refuse_links(workdir)
    hint = "resume with the same config and data or choose a new --workdir"
    on_disk = storage.read_json(workdir / "config.json")
    if on_disk is not None and _comparable(on_disk) != _comparable(resolved(plan.config)):
        diff = config_lib.differences(_comparable(on_disk), _comparable(resolved(plan.config)))
        raise RunDirError(
            f"{workdir} holds a run of another config ({'; '.join(diff[:5])}); {hint}"
        )
    info = storage.read_json(workdir / "run.json")
    if info is not None and info.get("data_fingerprint") != plan.data_fingerprint:
        raise RunDirError(
            f"{workdir} holds a run on other data (fingerprint {info.get('data_fingerprint')} on "
            f"disk, {plan.data_fingerprint} now: the data file changed); {hint}"
        )
    if info is not None and info.get("format") != FORMAT:
        raise RunDirError(f"{workdir} was written by another version (format {info.get('format')})")
    names = {spec.name for spec in plan.specs}
    members_dir = workdir / "members"
    if members_dir.exists():
        strangers = sorted(
            p.name for p in members_dir.iterdir() if p.is_dir() and p.name not in names
        )
        if strangers:
            raise RunDirError(
                f"{workdir} holds members of another config ({', '.join(strangers[:3])}); {hint}"
            )
    for spec in plan.specs:
        folder = MemberDir(members_dir / spec.name)
        lifecycle.verify(spec, folder, plan.fingerprints[spec.name])


def run(
    config, workdir, *, on_measurement: Callable | None = None, progress: Progress | None = None
) -> dict:
    """Run (or resume) the whole sweep of ``config`` in ``workdir``; returns member statuses.
    Turns on JAX's persistent compilation cache (:mod:`experiments.compilation_cache`), so that
    the next process finds this one's programs compiled."""
    progress = progress or Progress()
    compilation_cache.enable()
    with jax.enable_x64(config.dtype == "float64"):
        plan = prepare(config, workdir)
        storage.check_writable(plan.workdir)
        with storage.WorkdirLock(plan.workdir):
            check_workdir(plan)
            statuses = _run_members(plan, on_measurement, progress)
    report.write_summary(plan.workdir)
    return statuses


def _run_members(plan: Plan, on_measurement, progress) -> dict:
    workdir = plan.workdir
    storage.write_json(workdir / "config.json", resolved(plan.config))
    storage.write_json(
        workdir / "run.json",
        {
            "format": FORMAT,
            "data_fingerprint": plan.data_fingerprint,
            "members": [spec.name for spec in plan.specs],
        },
    )
    history = storage.read_json(workdir / "provenance.json", {"invocations": []})
    history.setdefault("invocations", []).append(
        {**storage.provenance(plan.config), "measure_mesh": measure_mesh(plan)}
    )
    storage.write_json(workdir / "provenance.json", history)
    total = len(plan.specs)
    lock = threading.Lock()
    stop = threading.Event()

    def one(i, spec):
        t0 = time.perf_counter()
        label = f"[{i + 1}/{total}] {spec.name}"
        status = lifecycle.run_member(
            spec,
            MemberDir(workdir / "members" / spec.name),
            plan.setups[spec.name],
            plan.fingerprints[spec.name],
            progress=progress,
            label=label,
            on_measurement=on_measurement,
            stop=stop,
        )
        with lock:
            progress.line(f"{label}: {status['state']} ({time.perf_counter() - t0:.1f}s)")
        return status

    workers = num_workers(plan.config, total, sharded=measure_mesh(plan)["device_count"] > 1)
    shared = share_activations(plan.config)
    if workers > 1 and shared:
        _warm_up(plan, workers)
    if workers == 1:
        return {spec.name: one(i, spec) for i, spec in enumerate(plan.specs)}
    # Without a shared program, members that run at once should differ in their activation, so
    # that each thread compiles its own programs: seeds (and swept values) outermost.
    order = list(enumerate(plan.specs))
    if not shared:
        order.sort(
            key=lambda item: (item[1].seed, tuple(map(repr, item[1].overrides.values())), item[0])
        )
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="member") as pool:
        submitted = {spec.name: pool.submit(one, i, spec) for i, spec in order}
        futures = [submitted[spec.name] for spec in plan.specs]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()  # the first failure stops the others between measurements
        except BaseException:
            stop.set()
            for future in futures:
                future.cancel()
            raise
    return {spec.name: f.result() for spec, f in zip(plan.specs, futures, strict=True)}


def _warm_up(plan: Plan, workers: int) -> None:
    """Compile the first unfinished member's trainer and measurements in parallel threads."""
    for spec in plan.specs:
        status = storage.read_json(plan.workdir / "members" / spec.name / "status.json", {})
        if status.get("state") not in ("done", "failed"):
            break
    else:
        return
    setup = plan.setups[spec.name]
    config = spec.config
    optimizer = train.make_optimizer(config.train)

    def context():
        return measure_lib.Context(
            model=setup.model,
            loss=setup.loss,
            params=setup.replicated(setup.init_params),
            opt_state=setup.replicated(optimizer.init(setup.init_params)),
            data=setup.measure_data,
            config=config,
            seed=spec.seed,
            step=0,
            plan=(),
        )

    def evaluate():
        ctx = context()
        evaluate = train.evaluator(ctx.loss, ctx.model)
        jax.block_until_ready(
            (evaluate(ctx.params, ctx.data), evaluate(ctx.params, setup.test_data))
        )

    def trainer():  # zero steps: compiled, not run
        state = optimizer.init(setup.init_params)
        run_train = train.trainer(setup.loss, config.train, len(setup.y_train), setup.model)
        zero = jax.numpy.asarray(0)
        key = jax.random.key(0)
        index = jax.numpy.asarray(setup.index, jax.numpy.int32)
        dtype = jax.numpy.dtype(config.dtype)  # the parameters' (token inputs are integers)
        limit = jax.numpy.asarray(np.inf, dtype)
        log = train.new_log(config.train, dtype, state)
        args = (setup.x_train, setup.y_train, key, index, limit, log)
        jax.block_until_ready(run_train(setup.init_params, state, zero, zero, *args))

    with jax.enable_x64(config.dtype == "float64"):  # per thread: warm_up's threads enter it too
        measure_lib.warm_up(
            context,
            tuple(config.measure.quantities),
            workers,
            (evaluate, trainer),
            x64=config.dtype == "float64",
        )


def share_activations(config) -> bool:
    """``config.share_activations``: one compiled program for every activation (a ``lax.switch``
    around the model's forward pass), or one per activation. ``"auto"``: shared whenever the run
    has several activations. On 2 CPU cores the shared program compiles in 15 s where five
    separate ones take 5 x 7.5 s (XLA's compiler already uses both cores, so compiling them in
    threads does not help), and runs 13-27% slower per matvec (a 60-matvec Hutch++: 51 ms against
    40-45 ms for one activation alone). The main job took 65 s shared and 89 s separate (both
    measured before its traces shared one Hutch++ run). On an accelerator compiling dominates
    even more."""
    mode = config.share_activations
    if mode == "auto":
        return len(config.activations) > 1
    return mode == "yes"


def num_workers(config, num_members: int, *, sharded: bool = False) -> int:
    """``config.workers``, or automatically one per CPU core on a CPU and 2 on an accelerator:
    a small network's compiled programs use one core each, so members in threads fill them.
    With the measurement sharded over several accelerators (``measure.devices``), automatically
    1: each measurement already runs on every device of the mesh, and NCCL does not promise
    progress for collectives launched from several threads at once (they can deadlock). CPU
    devices' collectives are in-process rendezvous: threads are safe there (tested)."""
    workers = config.workers
    if not workers:
        if jax.default_backend() == "cpu":
            workers = os.cpu_count() or 1
        else:
            workers = 1 if sharded else 2
    return max(1, min(workers, num_members))


def measure_mesh(plan: Plan) -> dict:
    """The provenance of ``measure.devices``: the setting, whether the measurement data were
    sharded, the mesh (axis names, shape, device count, kind, platform and ids; one device when
    unsharded) and, when members differ (``"all"`` with measurement sets of different sizes),
    each member's device count."""
    counts = {
        name: 1 if s.mesh is None else int(s.mesh.devices.size) for name, s in plan.setups.items()
    }
    meshes = [s.mesh for s in plan.setups.values() if s.mesh is not None]
    mesh = max(meshes, key=lambda m: m.devices.size, default=None)
    used = jax.devices()[:1] if mesh is None else list(mesh.devices.flat)
    out = {
        "setting": plan.config.measure.devices,
        "sharded": mesh is not None,
        "axis_names": ["data"] if mesh is None else list(mesh.axis_names),
        "shape": [1] if mesh is None else list(mesh.devices.shape),
        "device_count": len(used),
        "device_kind": used[0].device_kind,
        "platform": used[0].platform,
        "device_ids": [int(d.id) for d in used],
    }
    if len(set(counts.values())) > 1:
        out["by_member"] = counts
    return out

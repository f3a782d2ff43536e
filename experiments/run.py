"""A run: train every member of a sweep (activation x seed) with optax and measure the loss
Hessian's curvature on a schedule, writing each finished measurement at once.

Run directory::

    workdir/
      config.json          the resolved config (a resumed run must match it)
      provenance.json      versions, git revision, seeds, dtype, matmul precision, devices, command
      summary.md, .csv     per activation: mean and spread over seeds of the final measurement
      members/<activation>-seed<seed>/
        metrics.jsonl      one record per measurement, appended as it finishes
        spectra/step_XXXXXX.npz   SLQ nodes and weights, Ritz values and residuals
        checkpoint.npz     parameters and optimizer state at the last measurement
        status.json        running | done | failed (with the reason)

Resuming: invoke again with the same config and workdir. Finished members are skipped; an
unfinished one reloads its checkpoint, skips the measurements on disk and continues. Training
and probes are deterministic functions of the seed and the step, so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import curvature as cv
from experiments import config as config_lib
from experiments import data as data_lib
from experiments import models, storage


class NonFiniteLoss(RuntimeError):
    """Training produced a non-finite loss; the member stops, its measurements stay."""


# --------------------------------------------------------------------------------------------
# Progress: a live line on a terminal, one line per member otherwise.


class Progress:
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


# --------------------------------------------------------------------------------------------
# Training.


def make_optimizer(
    name: str, learning_rate: float, momentum: float
) -> optax.GradientTransformation:
    """``train.optimizer`` by name: plain gradient descent, heavy-ball momentum or Adam."""
    if name == "sgd":
        return optax.sgd(learning_rate)
    if name == "momentum":
        return optax.sgd(learning_rate, momentum=momentum)
    return optax.adam(learning_rate)


def optimizer_args(train_cfg) -> tuple[str, float, float]:
    return train_cfg.optimizer, train_cfg.learning_rate, train_cfg.momentum


@functools.cache
def _trainer(loss_fn, optimizer_key: tuple, batch_size: int, num_train: int):
    """A compiled ``train(params, opt_state, start, stop, x, y, key)`` for one loss function.

    Steps ``start .. stop - 1`` run in one ``while_loop``; it stops early at the first non-finite
    loss or gradient, keeping the last finite parameters. Minibatch ``i`` of epoch ``e`` is slice
    ``i`` of ``permutation(fold_in(key, e))``, so the data order depends on the step alone.
    """
    optimizer = make_optimizer(*optimizer_key)
    full_batch = batch_size == 0 or batch_size >= num_train
    steps_per_epoch = max(1, num_train // batch_size) if not full_batch else 1

    def epoch_order(step, key):
        return jax.random.permutation(jax.random.fold_in(key, step // steps_per_epoch), num_train)

    def minibatch(x, y, step, order):
        if full_batch:
            return {"x": x, "y": y}
        idx = jax.lax.dynamic_slice(order, ((step % steps_per_epoch) * batch_size,), (batch_size,))
        return {"x": x[idx], "y": y[idx]}

    @jax.jit
    def train(params, opt_state, start, stop, x, y, key):
        def cond(carry):
            return (carry[2] < stop) & ~carry[3]

        def body(carry):
            params, opt_state, step, _, _, order = carry
            if not full_batch:  # a new permutation only when an epoch starts
                order = jax.lax.cond(
                    step % steps_per_epoch == 0, lambda: epoch_order(step, key), lambda: order
                )
            loss, grads = jax.value_and_grad(loss_fn)(params, minibatch(x, y, step, order))
            finite = jnp.isfinite(loss) & jnp.all(
                jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)])
            )
            updates, new_state = optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            keep = functools.partial(jnp.where, finite)
            params = jax.tree_util.tree_map(keep, new_params, params)
            opt_state = jax.tree_util.tree_map(keep, new_state, opt_state)
            return params, opt_state, step + finite.astype(step.dtype), ~finite, loss, order

        order = epoch_order(start, key) if not full_batch else jnp.zeros((), jnp.int32)
        init = (params, opt_state, start, jnp.asarray(False), jnp.asarray(0.0, x.dtype), order)
        params, opt_state, step, bad, loss, _ = jax.lax.while_loop(cond, body, init)
        return params, opt_state, step, bad, loss

    return train


@functools.cache
def _evaluator(loss_fn, model_fn):
    @jax.jit
    def evaluate(params, batch):
        loss, grad = jax.value_and_grad(loss_fn)(params, batch)
        accuracy = jnp.mean(jnp.argmax(model_fn(params, batch), axis=-1) == batch["y"])
        grad_norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(grad)))
        return loss, accuracy, grad_norm

    return evaluate


# --------------------------------------------------------------------------------------------
# Measurement.


def _floats(x) -> list[float]:
    return [float(v) for v in np.asarray(x).ravel()]


def edge_of_stability(train_cfg) -> float | None:
    """The sharpness above which the quadratic model diverges: 2/η for gradient descent,
    (2 + 2β)/η for heavy-ball momentum β; none for Adam (its preconditioner moves the edge)."""
    if train_cfg.optimizer == "sgd":
        return 2.0 / train_cfg.learning_rate
    if train_cfg.optimizer == "momentum":
        return (2.0 + 2.0 * train_cfg.momentum) / train_cfg.learning_rate
    return None


def measurement_keys(seed: int, step: int) -> dict[str, jax.Array]:
    """The PRNG keys of the measurement at ``step``: a function of the seed and step alone, so
    runs that share a seed share their probes and a resumed run draws the same ones."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 2), step)
    return {
        name: jax.random.fold_in(key, i) for i, name in enumerate(("eig", "trace", "slq", "fro"))
    }


def measure(config, fns, params, meas_data, test_data, keys) -> tuple[dict, dict]:
    """Every curvature quantity of one measurement: ``(record, spectra)``."""
    _, model_fn, loss_fn, out_loss = fns
    m = config.measure
    batch_size = m.batch_size or None
    timings = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        timings[name] = time.perf_counter() - t0
        return out

    evaluate = _evaluator(loss_fn, model_fn)
    train_loss, train_acc, grad_norm = timed("evaluate", lambda: evaluate(params, meas_data))
    test_loss, test_acc, _ = evaluate(params, test_data)
    if not np.isfinite(float(train_loss)):
        raise NonFiniteLoss(f"the loss on the measurement set is {float(train_loss)}")

    H = cv.hessian(loss_fn, params, meas_data, batch_size=batch_size, check=False)
    steps = m.lanczos_steps
    # Both ends from one Lanczos run: "BE" gives ceil(k/2) from the top and floor(k/2) from the bottom.
    k_end = max(m.top_k, m.bottom_k)
    ends = timed(
        "eigsh", lambda: cv.eigsh(H, k=2 * k_end, which="BE", num_steps=steps, key=keys["eig"])
    )
    top_values = np.asarray(ends.eigenvalues)[: m.top_k]
    top_residuals = np.asarray(ends.residual_norms)[: m.top_k]
    trace_h = timed("trace", lambda: cv.trace(H, num_matvecs=m.trace_matvecs, key=keys["trace"]))
    slq = timed(
        "slq",
        lambda: cv.spectral_density(
            H, num_probes=m.slq_probes, num_steps=m.slq_steps, key=keys["slq"]
        ),
    )
    lam_max = float(top_values[0])
    negative, negative_se = slq.mass_below()  # below -sqrt(eps) * max|node|: zeros excluded
    hessian = {
        "top": _floats(top_values),
        "top_residuals": _floats(top_residuals),
        "top_converged": [bool(c) for c in np.asarray(ends.converged)[: m.top_k]],
        "trace": float(trace_h.value),
        "trace_se": float(trace_h.standard_error),
        "negative_mass": negative,
        "negative_mass_se": negative_se,
    }
    spectra = {
        "slq_nodes": np.asarray(slq.nodes),
        "slq_weights": np.asarray(slq.weights),
        "dimension": np.asarray(H.size),
        "top": top_values,
        "top_residuals": top_residuals,
    }
    if m.bottom_k:
        # The bottom half of "BE" is in descending order; report the smallest first.
        bottom_values = np.asarray(ends.eigenvalues)[k_end:][::-1][: m.bottom_k]
        bottom_residuals = np.asarray(ends.residual_norms)[k_end:][::-1][: m.bottom_k]
        hessian["bottom"] = _floats(bottom_values)
        hessian["bottom_residuals"] = _floats(bottom_residuals)
        spectra["bottom"] = bottom_values
    record = {
        "train_loss": float(train_loss),
        "train_accuracy": float(train_acc),
        "test_loss": float(test_loss),
        "test_accuracy": float(test_acc),
        "grad_norm": float(grad_norm),
        "hessian": hessian,
        "lr_times_top": config.train.learning_rate * lam_max,
        "edge_of_stability": edge_of_stability(config.train),
    }
    if m.gauss_newton:
        G = cv.gauss_newton(
            model_fn, params, meas_data, loss=out_loss, batch_size=batch_size, check=False
        )
        R = H - G
        top_g = timed(
            "eigsh_gn", lambda: cv.eigsh(G, k=m.top_k, which="LA", num_steps=steps, key=keys["eig"])
        )
        trace_g = timed(
            "trace_gn", lambda: cv.trace(G, num_matvecs=m.trace_matvecs, key=keys["trace"])
        )
        trace_r = timed(
            "trace_residual", lambda: cv.trace(R, num_matvecs=m.trace_matvecs, key=keys["trace"])
        )
        # Shared probes: the three Frobenius estimates see the same z, so their ratios are tight.
        fro = {
            name: timed(
                f"frobenius_{name}",
                lambda op=op: cv.frobenius_norm_squared(
                    op, num_matvecs=m.frobenius_probes, key=keys["fro"]
                ),
            )
            for name, op in (("hessian", H), ("gauss_newton", G), ("residual", R))
        }
        hessian["frobenius_sq"] = float(fro["hessian"].value)
        hessian["frobenius_sq_se"] = float(fro["hessian"].standard_error)
        record["gauss_newton"] = {
            "top": _floats(top_g.eigenvalues),
            "top_residuals": _floats(top_g.residual_norms),
            "trace": float(trace_g.value),
            "trace_se": float(trace_g.standard_error),
            "frobenius_sq": float(fro["gauss_newton"].value),
            "frobenius_sq_se": float(fro["gauss_newton"].standard_error),
        }
        record["residual"] = {
            "trace": float(trace_r.value),
            "trace_se": float(trace_r.standard_error),
            "frobenius_sq": float(fro["residual"].value),
            "frobenius_sq_se": float(fro["residual"].standard_error),
            "relative_frobenius": float(np.sqrt(fro["residual"].value / fro["hessian"].value)),
        }
        spectra["gauss_newton_top"] = np.asarray(top_g.eigenvalues)
    record["timings"] = timings
    return record, spectra


# --------------------------------------------------------------------------------------------
# One member of the sweep.


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), tree)


def _setup(config, dataset, activation, seed):
    dtype = jnp.dtype(config.dtype)
    graphdef, params, rest = models.build(
        config.model, activation, dataset.input_shape, dataset.num_classes, seed
    )
    rest_treedef = jax.tree_util.tree_structure(rest)
    apply, model_fn, loss_fn = models.pure_functions(graphdef, rest_treedef, config.train.loss)
    fns = (apply, model_fn, loss_fn, models.output_loss(config.train.loss))
    return fns, _cast(params, dtype)


def run_member(
    config, dataset, activation, seed, member_dir, *, progress, on_measurement=None, label=None
):
    status_path = member_dir / "status.json"
    status = storage.read_json(status_path, {})
    if status.get("state") in ("done", "failed"):
        return status
    _set_status(status_path, state="running")
    dtype = jnp.dtype(config.dtype)
    fns, params = _setup(config, dataset, activation, seed)
    opt_state = make_optimizer(*optimizer_args(config.train)).init(params)
    step = saved = 0
    restored = storage.load_checkpoint(member_dir / "checkpoint.npz", (params, opt_state))
    if restored is not None:
        (params, opt_state), step = restored
        saved = step
    log = storage.MetricsLog(member_dir / "metrics.jsonl")

    x_train = jnp.asarray(dataset.x_train, dtype)
    y_train = jnp.asarray(dataset.y_train)
    test_data = {"x": jnp.asarray(dataset.x_test, dtype), "y": jnp.asarray(dataset.y_test)}
    # The fixed measurement set: the first measure.num_examples of the named split.
    source = {"x": x_train, "y": y_train} if config.measure.split == "train" else test_data
    num_meas = config.measure.num_examples or len(source["x"])
    meas_data = {k: v[:num_meas] for k, v in source.items()}
    data_key = jax.random.fold_in(jax.random.key(seed), 1)
    train = _trainer(fns[2], optimizer_args(config.train), config.train.batch_size, len(x_train))
    schedule = config_lib.schedule(config)
    name = label or storage.member_name(activation, seed)

    for target in schedule:
        if target < step:
            continue
        if target > step:
            progress.update(f"{name}: training to step {target} of {schedule[-1]}")
            params, opt_state, reached, bad, loss = train(
                params,
                opt_state,
                jnp.asarray(step),
                jnp.asarray(target),
                x_train,
                y_train,
                data_key,
            )
            step = int(reached)
            if bool(bad):
                message = (
                    f"non-finite training loss or gradient at step {step} (loss {float(loss)}); "
                    f"kept {len(log.records)} measurements"
                )
                progress.line(f"{name}: stopped: {message}")
                return _set_status(status_path, state="failed", message=message, step=step)
        if target not in log.steps:
            done = len(log.steps)
            progress.update(f"{name}: measuring step {target} ({done + 1}/{len(schedule)})")
            try:
                record, spectra = measure(
                    config, fns, params, meas_data, test_data, measurement_keys(seed, target)
                )
            except (NonFiniteLoss, FloatingPointError) as err:
                message = f"measurement at step {target} failed: {err}"
                progress.line(f"{name}: stopped: {message}")
                return _set_status(status_path, state="failed", message=message, step=step)
            record = {"step": target, "activation": activation, "seed": seed, **record}
            storage.write_npz(member_dir / "spectra" / f"step_{target:06d}.npz", **spectra)
            log.append(record)
            if on_measurement is not None:
                on_measurement(activation, seed, target)
        if step != saved:  # a resumed member does not rewrite the checkpoint it started from
            storage.save_checkpoint(member_dir / "checkpoint.npz", (params, opt_state), step)
            saved = step
    return _set_status(status_path, state="done", step=step)


def _set_status(path, **status) -> dict:
    storage.write_json(path, status)
    return status


# --------------------------------------------------------------------------------------------
# The sweep.


def _resolved(config) -> dict:
    return json.loads(config.to_json_best_effort())


# Keys that may change when a run is resumed: they change how, not what, is computed.
RESUMABLE_CHANGES = {("measure", "batch_size")}


def _comparable(resolved: dict) -> dict:
    out = json.loads(json.dumps(resolved))
    for section, key in RESUMABLE_CHANGES:
        out.get(section, {}).pop(key, None)
    return out


def _diff(a, b, prefix="") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        path = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], path + ".")
        elif a.get(k) != b.get(k):
            out.append(f"{path}: {a.get(k)!r} on disk, {b.get(k)!r} now")
    return out


def prepare(config, workdir) -> tuple[pathlib.Path, data_lib.Dataset]:
    """Validate the config, load the data and check the workdir: every error before training."""
    config_lib.validate(config)
    dataset = data_lib.load(config.data)
    _, params = _setup(config, dataset, config.activations[0], config.seeds[0])
    num_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
    config_lib.validate(config, num_params)
    workdir = pathlib.Path(workdir)
    resolved = _resolved(config)
    on_disk = storage.read_json(workdir / "config.json")
    if on_disk is not None and _comparable(on_disk) != _comparable(resolved):
        raise config_lib.ConfigError(
            f"{workdir} holds a run of another config ({'; '.join(_diff(on_disk, resolved)[:5])}); "
            "resume with the same config or choose a new --workdir"
        )
    return workdir, dataset


def run(
    config, workdir, *, on_measurement: Callable | None = None, progress: Progress | None = None
) -> dict:
    """Run (or resume) the whole sweep of ``config`` in ``workdir``; returns member statuses."""
    progress = progress or Progress()
    with jax.enable_x64(config.dtype == "float64"):
        workdir, dataset = prepare(config, workdir)
        with storage.WorkdirLock(workdir):
            statuses = _run_members(config, workdir, dataset, on_measurement, progress)
    from experiments import report

    report.write_summary(workdir)
    return statuses


def _run_members(config, workdir, dataset, on_measurement, progress) -> dict:
    storage.write_json(workdir / "config.json", _resolved(config))
    history = storage.read_json(workdir / "provenance.json", {"invocations": []})
    history["invocations"].append(storage.provenance(config))
    storage.write_json(workdir / "provenance.json", history)
    members = [(a, s) for a in config.activations for s in config.seeds]
    statuses = {}
    for i, (activation, seed) in enumerate(members):
        name = storage.member_name(activation, seed)
        t0 = time.perf_counter()
        status = run_member(
            config,
            dataset,
            activation,
            seed,
            workdir / "members" / name,
            progress=progress,
            on_measurement=on_measurement,
            label=f"[{i + 1}/{len(members)}] {name}",
        )
        statuses[name] = status
        elapsed = time.perf_counter() - t0
        progress.line(f"[{i + 1}/{len(members)}] {name}: {status['state']} ({elapsed:.1f}s)")
    return statuses

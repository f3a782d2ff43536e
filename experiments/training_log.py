"""A member's per-step training log, ``members/<name>/training.npz``: what every optimizer is
measured by.

Entry ``i`` of each array belongs to step ``i`` (the update from the parameters of step ``i`` to
those of step ``i + 1``)::

    loss                   the training-batch loss at the parameters step i starts from
    gradient_equivalents   the step's cost in gradients of the training batch
                           (experiments.train.gradient_equivalents)
    seconds                the step's share of its compiled stretch's wall time (below)
    <diagnostics>          the optimizer's, after the step (Hessian-free: damping, cg_steps,
                           reduction_ratio, step_size)
    segments               (k, 3): start step, stop step, wall seconds of each compiled stretch
    compile_seconds        compiling the trainer (and its first dispatch), this invocation
    reached                steps done; entries from here on are NaN
    fingerprint            of the member's config and data, as for checkpoints

Training runs as compiled stretches between measurement steps (one ``while_loop`` each), so wall
time is measured per stretch, after a zero-step call that compiles the trainer (timed apart as
``compile_seconds``), and excludes the measurements. Within a stretch it is divided among the
steps in proportion to their gradient-equivalents (equal shares for first-order methods): exact
at the stretch ends, interpolated within. A resumed run trains a stretch again from a checkpoint
and replaces its entries (training is deterministic; the seconds are that invocation's).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import storage
from experiments.errors import RunDirError

FILE = "training.npz"
_META = ("segments", "compile_seconds", "reached", "fingerprint", "gradient_equivalents", "seconds")


@dataclasses.dataclass
class TrainingLog:
    """The arrays of ``training.npz`` while a member trains (see the module docstring)."""

    arrays: dict[str, np.ndarray]  # loss and the optimizer's diagnostics, one entry a step
    segments: list[tuple[int, int, float]] = dataclasses.field(default_factory=list)
    compile_seconds: float = float("nan")
    reached: int = 0

    @classmethod
    def load(
        cls, path: pathlib.Path, names: list[str], steps: int, fingerprint: str
    ) -> TrainingLog:
        """The log on disk, or a new one (NaN) when there is none."""
        new = cls({name: np.full(steps, np.nan) for name in names})
        if not path.exists():
            return new
        arrays = storage.read_npz(path, "training log")
        if str(arrays.get("fingerprint", "")) != fingerprint:
            raise RunDirError(
                f"{path} holds the training log of another config or data set; resume with the "
                "same config and data, or choose a new --workdir"
            )
        for name in names:
            if name in arrays and arrays[name].shape == (steps,):
                new.arrays[name] = arrays[name].astype(float)
        new.segments = [(int(a), int(b), float(t)) for a, b, t in arrays.get("segments", [])]
        new.reached = int(arrays.get("reached", 0))
        return new

    def device(self, dtype) -> dict:
        """The arrays for :func:`experiments.train.trainer`."""
        return {k: jnp.asarray(v, dtype) for k, v in self.arrays.items()}

    def update(self, log: dict, start: int, stop: int, seconds: float) -> None:
        """Steps ``start .. stop - 1`` trained in ``seconds``; ``log`` as the trainer returned
        it (entries outside the stretch unchanged)."""
        for k, v in log.items():
            self.arrays[k][start:stop] = np.asarray(v, float)[start:stop]
        self.segments = [s for s in self.segments if s[0] < start] + [(start, stop, seconds)]
        self.reached = stop

    def train(self, run_train, state: dict, start: int, stop: int, data: tuple, dtype):
        """Steps ``start .. stop - 1`` by ``run_train`` (:func:`experiments.train.trainer`)
        from ``state`` (``params``, ``opt_state``), ``data`` its arguments from ``x`` to
        ``limit``; logged and timed, after a zero-step call that compiles it the first time
        (timed as ``compile_seconds``). Returns ``(params, opt_state, step, reason, loss)``."""
        trees = (state["params"], state["opt_state"])
        if math.isnan(self.compile_seconds):
            t0 = time.perf_counter()
            here = jnp.asarray(start)
            jax.block_until_ready(run_train(*trees, here, here, *data, self.device(dtype)))
            self.compile_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        *out, log = jax.block_until_ready(
            run_train(*trees, jnp.asarray(start), jnp.asarray(stop), *data, self.device(dtype))
        )
        self.update(log, start, int(out[2]), time.perf_counter() - t0)
        return tuple(out)

    def seconds(self, cost: np.ndarray) -> np.ndarray:
        """Each step's share of its stretch's wall time, in proportion to ``cost``."""
        out = np.full(len(cost), np.nan)
        for start, stop, seconds in self.segments:
            part = cost[start:stop]
            total = np.nansum(part)
            if stop > start and total > 0:
                out[start:stop] = seconds * part / total
        return out

    def save(self, path: pathlib.Path, cost: np.ndarray, fingerprint: str) -> None:
        """Write the log with each step's gradient-equivalents ``cost`` and seconds."""
        cost = np.where(np.arange(len(cost)) < self.reached, cost, np.nan)
        storage.write_npz(
            path,
            **self.arrays,
            gradient_equivalents=cost,
            seconds=self.seconds(cost),
            segments=np.asarray(self.segments, float).reshape(-1, 3),
            compile_seconds=np.asarray(self.compile_seconds),
            reached=np.asarray(self.reached),
            fingerprint=np.asarray(fingerprint),
        )

    def totals(self, step: int, cost: np.ndarray) -> tuple[float, float]:
        """Gradient-equivalents and seconds of the steps before ``step``."""
        return float(np.sum(cost[:step])), float(np.sum(self.seconds(cost)[:step]))


@dataclasses.dataclass(frozen=True)
class Curves:
    """A member's training log, read back (:meth:`experiments.load.Member.training`).

    ``loss[i]`` is the training-batch loss at step ``i``'s parameters, and
    ``gradient_equivalents[i]`` and ``seconds[i]`` what reaching them cost (0 at step 0):
    plot ``loss`` against any of ``step``, ``gradient_equivalents`` and ``seconds``."""

    step: np.ndarray
    loss: np.ndarray
    gradient_equivalents: np.ndarray  # cumulative, before step i
    seconds: np.ndarray  # cumulative, before step i; compile excluded
    cost: np.ndarray  # per step
    diagnostics: dict[str, np.ndarray]
    compile_seconds: float

    def first_below(self, target: float) -> int | None:
        """The first step whose loss is at or below ``target`` (``None``: never)."""
        hit = np.flatnonzero(self.loss <= target)
        return int(hit[0]) if len(hit) else None


def read(path: pathlib.Path) -> Curves | None:
    """The curves of ``training.npz``, or ``None`` when the member has none (an older run)."""
    if not path.exists():
        return None
    arrays = storage.read_npz(path, "training log")
    n = int(arrays.get("reached", 0))
    cost = arrays["gradient_equivalents"][:n]
    seconds = arrays["seconds"][:n]
    zero = np.zeros(1)
    return Curves(
        step=np.arange(n),
        loss=arrays["loss"][:n],
        gradient_equivalents=np.concatenate([zero, np.cumsum(cost)])[:n],
        seconds=np.concatenate([zero, np.cumsum(seconds)])[:n],
        cost=cost,
        diagnostics={k: v[:n] for k, v in arrays.items() if k not in (*_META, "loss")},
        compile_seconds=float(arrays.get("compile_seconds", np.nan)),
    )

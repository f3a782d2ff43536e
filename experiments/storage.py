"""Run-directory files: atomic writes, an append-only metrics log, checkpoints, provenance."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
from importlib import metadata

import jax
import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


def member_name(activation: str, seed: int) -> str:
    """A sweep member's folder name under ``workdir/members``."""
    return f"{activation.replace(':', '_')}-seed{seed}"


def atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: pathlib.Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_jsonable) + "\n").encode())


def read_json(path: pathlib.Path, default=None):
    if not path.exists():
        return default
    return json.loads(path.read_text())


def write_npz(path: pathlib.Path, **arrays) -> None:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(path, buffer.getvalue())


def _jsonable(x):
    if isinstance(x, np.generic | np.ndarray | jax.Array):
        return np.asarray(x).tolist()
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


def _parse_records(text: str) -> tuple[list[dict], bool]:
    """Complete, parsable records of a metrics log, and whether anything else was found.

    Only a crash can cut a record short (the log is append-only), and then only the last one;
    any unparsable line is skipped rather than taken to end the log.
    """
    lines = text.split("\n")
    records, clean = [], lines[-1] == ""
    for line in lines[:-1]:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            clean = False
    return records, clean


class MetricsLog:
    """``metrics.jsonl``: one JSON record per finished measurement, appended and fsynced.

    A record cut short by a crash is dropped when the log is opened again, and the file is
    rewritten without it.
    """

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.records: list[dict] = []
        if path.exists():
            self.records, clean = _parse_records(path.read_text())
            if not clean:
                atomic_write_bytes(
                    path, "".join(json.dumps(r) + "\n" for r in self.records).encode()
                )

    @property
    def steps(self) -> set[int]:
        return {r["step"] for r in self.records}

    def append(self, record: dict) -> None:
        line = json.dumps(record, default=_jsonable) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records.append(json.loads(line))


def read_metrics(path: pathlib.Path) -> list[dict]:
    """The complete records of a metrics log (a record cut short by a crash is left out)."""
    if not path.exists():
        return []
    return _parse_records(path.read_text())[0]


class WorkdirLock:
    """An exclusive lock on ``workdir/.lock`` for the duration of a run, so that two processes
    (a relaunch, a requeued job) never train and append to the same run directory at once."""

    def __init__(self, workdir: pathlib.Path):
        self.path = pathlib.Path(workdir) / ".lock"
        self.file = None

    def __enter__(self):
        import fcntl

        from experiments.errors import ConfigError

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise ConfigError(
                f"another process is running in {self.path.parent}; wait for it or use a new --workdir"
            ) from None
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def save_checkpoint(path: pathlib.Path, tree, step: int) -> None:
    leaves = jax.tree_util.tree_leaves(tree)
    write_npz(
        path,
        step=np.asarray(step),
        **{f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)},
    )


def load_checkpoint(path: pathlib.Path, template):
    """``(tree, step)`` restored into the structure of ``template``; ``None`` if absent."""
    if not path.exists():
        return None
    with np.load(path) as f:
        leaves = [f[k] for k in sorted(k for k in f.files if k.startswith("leaf_"))]
        step = int(f["step"])
    want, treedef = jax.tree_util.tree_flatten(template)
    if len(leaves) != len(want) or any(
        np.shape(a) != np.shape(b) for a, b in zip(leaves, want, strict=False)
    ):
        from experiments.errors import ConfigError

        raise ConfigError(
            f"{path} does not match this model and optimizer; delete it or use a new --workdir"
        )
    leaves = [np.asarray(a, dtype=np.asarray(b).dtype) for a, b in zip(leaves, want, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(x) for x in leaves]), step


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_revision() -> dict:
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}
    if rev.returncode != 0:
        return {"revision": None, "dirty": None}
    return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def provenance(config) -> dict:
    devices = jax.devices()
    return {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {
            name: _version(name)
            for name in (
                "curvature-jax",
                "jax",
                "jaxlib",
                "flax",
                "optax",
                "numpy",
                "ml_collections",
                "scikit-learn",
            )
        },
        "git": git_revision(),
        "seeds": list(config.seeds),
        "dtype": config.dtype,
        "x64_enabled": bool(jax.config.jax_enable_x64),
        "matmul_precision": str(jax.config.jax_default_matmul_precision or "default"),
        "backend": jax.default_backend(),
        "device_count": len(devices),
        "device_kind": devices[0].device_kind,
    }

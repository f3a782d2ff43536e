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
import zipfile
from importlib import metadata

import jax
import numpy as np

from experiments.errors import RunDirError

_UMASK = os.umask(0)
os.umask(_UMASK)


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
    """The JSON object in ``path``; ``default`` if absent; :class:`RunDirError` if unreadable."""
    if not path.exists():
        return default
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirError(
            f"{path} is corrupt ({_reason(err)}); delete it or use a new --workdir"
        ) from None
    if not isinstance(obj, dict):
        raise RunDirError(
            f"{path} is corrupt (not a JSON object); delete it or use a new --workdir"
        )
    return obj


def _reason(err: BaseException) -> str:
    return str(err).split("\n")[0] or type(err).__name__


def read_npz(path: pathlib.Path, what: str = "file", keys=None) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file (all, or those of ``keys`` that it has), read at once;
    :class:`RunDirError` if it is corrupt. Never unpickles (``allow_pickle=False``)."""
    try:
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as f:
            names = f.files if keys is None else [k for k in keys if k in f.files]
            return {k: np.asarray(f[k]) for k in names}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        remedy = {
            "checkpoint": "delete it (the member retrains from its seed or an earlier checkpoint)",
            "spectra file": "run the same command again to measure that step anew",
        }.get(what, "delete it or use a new --workdir")
        raise RunDirError(
            f"{path}: the {what} is corrupt ({_reason(err).split('. ')[0]}); {remedy}"
        ) from None


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


def symlink_error(path) -> RunDirError:
    """The error for a symbolic link found where a run directory keeps its own file or folder."""
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return RunDirError(
        f"{path} is a symbolic link{target}; a run directory holds its own files, so nothing is "
        "read or written through a link: replace it with a copy of what it points to, or use a "
        "new --workdir"
    )


def open_no_follow(path: pathlib.Path, flags: int) -> int:
    """``os.open(path, flags)`` that refuses a symbolic link at ``path`` (``O_NOFOLLOW``) with
    :class:`RunDirError`, instead of writing to what it points at."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError:
        if os.path.islink(path):
            raise symlink_error(path) from None
        raise


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

    def drop(self, step: int) -> None:
        """Remove the records of ``step`` (before it is measured again)."""
        self.records = [r for r in self.records if r.get("step") != step]
        atomic_write_bytes(
            self.path,
            "".join(json.dumps(r, default=_jsonable) + "\n" for r in self.records).encode(),
        )

    def append(self, record: dict) -> None:
        line = json.dumps(record, default=_jsonable) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(open_no_follow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a") as f:
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

        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Not open(path, "w"): that truncates whatever a link named .lock points at.
        self.file = os.fdopen(open_no_follow(self.path, os.O_WRONLY | os.O_CREAT), "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise RunDirError(
                f"another process is running in {self.path.parent}; wait for it or use a new --workdir"
            ) from None
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def _path_key(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def save_checkpoint(path: pathlib.Path, trees: dict, step: int, fingerprint: str) -> None:
    """``trees`` (e.g. ``{"params": ..., "opt_state": ...}``) at ``step``, every leaf under its
    pytree path (``params/hidden/0/kernel/value``), with the member's fingerprint."""
    arrays = {"step": np.asarray(step), "fingerprint": np.asarray(fingerprint)}
    for name, tree in trees.items():
        for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            arrays[f"{name}/{_path_key(p)}"] = np.asarray(leaf)
    write_npz(path, **arrays)


def load_checkpoint(path: pathlib.Path, templates: dict, fingerprint: str | None = None):
    """``(trees, step)`` restored into the structures of ``templates`` by leaf path.

    Raises :class:`RunDirError` when the file is corrupt, was written for another member config or
    data (``fingerprint``), or its leaves do not fit the templates."""
    arrays = read_npz(path, "checkpoint")
    if "step" not in arrays:
        raise RunDirError(
            f"{path}: the checkpoint is corrupt (no step); delete it or use a new --workdir"
        )
    if fingerprint is not None and str(arrays.get("fingerprint", "")) != fingerprint:
        raise RunDirError(
            f"{path} was written by a run of another config or data set; use a new --workdir"
        )
    out = {}
    for name, template in templates.items():
        flat, treedef = jax.tree_util.tree_flatten_with_path(template)
        leaves = []
        for p, want in flat:
            key = f"{name}/{_path_key(p)}"
            got = arrays.get(key)
            if got is None or got.shape != np.shape(want):
                raise RunDirError(
                    f"{path} does not match this model and optimizer ({key}: "
                    f"{'missing' if got is None else got.shape} vs {np.shape(want)}); "
                    "delete it or use a new --workdir"
                )
            leaves.append(jax.numpy.asarray(got.astype(np.asarray(want).dtype)))
        out[name] = jax.tree_util.tree_unflatten(treedef, leaves)
    return out, int(arrays["step"])


def check_writable(workdir: pathlib.Path) -> None:
    """:class:`RunDirError` unless ``workdir`` can be created and written."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise RunDirError(f"cannot write to {workdir}: {err.strerror or err}") from None


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

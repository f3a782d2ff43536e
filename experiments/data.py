"""Data sources that need no network: scikit-learn's bundled digits, synthetic sources, and a
user's local ``.npz`` or MNIST-style idx files.

Every source returns a :class:`Dataset` of float32 inputs and int32 labels, split into train and
test deterministically (a fixed permutation seed) and standardised with statistics of the
training inputs only.
"""

from __future__ import annotations

import gzip
import hashlib
import pathlib
import struct
from collections.abc import Callable
from typing import NamedTuple

import ml_collections
import numpy as np

from experiments.errors import DataError, require
from experiments.registry import Registry


class Dataset(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


# ``loader(data_cfg) -> (x_train, y_train, x_test, y_test)`` by ``data.source``.
SOURCES: Registry[Callable] = Registry("data source", "data.source")
"""Data sources by name (``data.source``): ``SOURCES.register("name", load)`` with
``load(data_cfg) -> Dataset``; the built-in ones are listed in the API reference."""


def section() -> ml_collections.ConfigDict:
    """The config section ``data``, at its defaults."""
    s = ml_collections.ConfigDict()
    s.source = "digits"  # digits | teacher | mixture | npz | idx (SOURCES)
    s.path = ""  # npz file, or folder of idx / idx.gz files
    s.test_fraction = 0.25  # for sources without their own test split
    s.split_seed = 0
    s.standardize = True
    s.num_train = 0  # 0: all
    s.num_test = 0
    s.image_shape = ()  # e.g. (8, 8, 1) for a CNN on digits
    s.num_examples = 2000  # synthetic sources
    s.input_dim = 20
    s.num_classes = 10
    s.teacher_width = 32
    s.separation = 3.0
    s.synthetic_seed = 0
    return s


def check(config) -> None:
    """Raise :class:`~experiments.errors.ConfigError` for the first bad key of ``data``. What
    needs the files (their arrays, the split's sizes) is checked when they load
    (:class:`~experiments.errors.DataError`)."""
    d = config.data
    SOURCES.get(d.source)
    require(
        d.num_train >= 0 and d.num_test >= 0, "data.num_train/num_test", "must be >= 0 (0: all)"
    )


def load(cfg) -> Dataset:
    """The dataset that ``cfg`` (the ``data`` section of a config) names."""
    x_tr, y_tr, x_te, y_te = SOURCES.get(cfg.source)(cfg)
    if cfg.num_train and cfg.num_train < len(x_tr):
        x_tr, y_tr = x_tr[: cfg.num_train], y_tr[: cfg.num_train]
    if cfg.num_test and cfg.num_test < len(x_te):
        x_te, y_te = x_te[: cfg.num_test], y_te[: cfg.num_test]
    x_tr, x_te = np.asarray(x_tr, np.float32), np.asarray(x_te, np.float32)
    if cfg.standardize:
        x_tr, x_te = _standardize(x_tr, x_te)
    if cfg.image_shape:
        shape = tuple(cfg.image_shape)
        if int(np.prod(shape)) != int(np.prod(x_tr.shape[1:])):
            raise DataError(
                f"config key data.image_shape: {shape} does not hold inputs of shape {x_tr.shape[1:]}"
            )
        x_tr, x_te = x_tr.reshape((-1,) + shape), x_te.reshape((-1,) + shape)
    y_tr, y_te = np.asarray(y_tr, np.int32), np.asarray(y_te, np.int32)
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    return Dataset(x_tr, y_tr, x_te, y_te, num_classes, cfg.source)


def fingerprint(dataset: Dataset) -> str:
    """A SHA-256 of the arrays a run trains and measures on (after splitting and
    standardising): a resumed run refuses data that changed since it started."""
    digest = hashlib.sha256()
    for array in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test):
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def _from_split(make):
    """A source of one pool of examples, split into train and test by ``data.test_fraction``."""

    def loader(cfg):
        x, y = make(cfg)
        return _split(x, y, cfg.test_fraction, cfg.split_seed)

    return loader


def _split(x, y, test_fraction, seed):
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"config key data.test_fraction must lie in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(x))
    num_test = int(round(test_fraction * len(x)))
    if num_test < 1 or num_test >= len(x):
        raise DataError(
            f"config key data.test_fraction: {test_fraction} of {len(x)} examples leaves "
            f"{num_test} for testing and {len(x) - num_test} for training; both need at least 1"
        )
    test, train = order[:num_test], order[num_test:]
    return x[train], y[train], x[test], y[test]


def _standardize(x_train, x_test):
    flat = x_train.reshape(len(x_train), -1)
    mean, std = flat.mean(0), flat.std(0)
    std = np.where(std > 1e-6, std, 1.0)  # constant pixels (digits' borders) stay at zero

    def apply(x):
        return ((x.reshape(len(x), -1) - mean) / std).reshape(x.shape).astype(np.float32)

    return apply(x_train), apply(x_test)


def _digits(cfg=None):
    from sklearn.datasets import load_digits  # ships its data with the package: no download

    bunch = load_digits()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int32)


def _teacher(cfg):
    """Gaussian inputs labelled by the argmax of a random one-hidden-layer tanh teacher."""
    rng = np.random.default_rng(cfg.synthetic_seed)
    x = rng.normal(size=(cfg.num_examples, cfg.input_dim)).astype(np.float32)
    w1 = rng.normal(size=(cfg.input_dim, cfg.teacher_width)) / np.sqrt(cfg.input_dim)
    w2 = rng.normal(size=(cfg.teacher_width, cfg.num_classes)) / np.sqrt(cfg.teacher_width)
    return x, np.argmax(np.tanh(x @ w1) @ w2, axis=1).astype(np.int32)


def _mixture(cfg):
    """One isotropic Gaussian per class, means at distance ``separation`` scale."""
    rng = np.random.default_rng(cfg.synthetic_seed)
    means = (
        rng.normal(size=(cfg.num_classes, cfg.input_dim)) * cfg.separation / np.sqrt(cfg.input_dim)
    )
    y = rng.integers(0, cfg.num_classes, size=cfg.num_examples).astype(np.int32)
    x = means[y] + rng.normal(size=(cfg.num_examples, cfg.input_dim))
    return x.astype(np.float32), y


def _require_file(path: str, what: str) -> pathlib.Path:
    if not path:
        raise DataError(f"config key data.path is empty; the {what} source reads a local path")
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise DataError(f"config key data.path: {p} does not exist")
    return p


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz(path):
    p = _require_file(path, "npz")
    try:
        with np.load(p, allow_pickle=False) as f:
            missing = [k for k in _NPZ_KEYS if k not in f.files]
            if missing:
                raise DataError(
                    f"{p} lacks the arrays {missing}; an npz data file needs {list(_NPZ_KEYS)} "
                    f"(it has {sorted(f.files)})"
                )
            arrays = {k: np.asarray(f[k]) for k in _NPZ_KEYS}
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{p} is not a readable .npz file: {err}") from err
    _check_pairs(p, arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"])
    return tuple(arrays[k] for k in _NPZ_KEYS)


def _check_pairs(where, x_tr, y_tr, x_te, y_te):
    for name, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        if len(x) == 0:
            raise DataError(f"{where}: x_{name} is empty")
        if np.issubdtype(x.dtype, np.complexfloating):
            raise DataError(
                f"{where}: x_{name} has dtype {x.dtype}; complex inputs are not supported "
                "(split real and imaginary parts into features)"
            )
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise DataError(f"{where}: x_{name} has dtype {x.dtype}; inputs must be numeric")
        if x.ndim < 2:
            raise DataError(f"{where}: x_{name} has shape {x.shape}; need (examples, features...)")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(
                f"{where}: y_{name} has shape {y.shape}; need ({len(x)},) labels to match x_{name}"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{where}: y_{name} has dtype {y.dtype}; labels must be integers")
        if y.min() < 0:
            raise DataError(f"{where}: y_{name} has negative labels")
        if not np.all(np.isfinite(x)):
            raise DataError(f"{where}: x_{name} has non-finite values")
    used = np.union1d(np.unique(y_tr), np.unique(y_te))
    if len(used) < used[-1] + 1:
        missing = np.setdiff1d(np.arange(used[-1] + 1), used)
        raise DataError(
            f"{where}: the labels must be 0..C-1, but the largest is {used[-1]} and "
            f"{len(missing)} of 0..{used[-1]} never occur (first: {missing[:5].tolist()}); "
            "renumber the labels"
        )
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(
            f"{where}: x_train {x_tr.shape[1:]} and x_test {x_te.shape[1:]} differ per example"
        )


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: pathlib.Path) -> np.ndarray:
    """An array from an MNIST-style idx file, gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path} cannot be read: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: the idx header is cut short")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 1
    body = raw[4 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise DataError(
            f"{path}: header says {dims} of {dtype}, but the file holds {len(body)} bytes"
        )
    return np.frombuffer(body, dtype).reshape(dims).astype(dtype.newbyteorder("="))


_IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _idx(path):
    folder = _require_file(path, "idx")
    if not folder.is_dir():
        raise DataError(
            f"config key data.path: {folder} must be a folder holding the four idx files"
        )
    arrays = {}
    for key, stem in _IDX_NAMES.items():
        found = [folder / stem, folder / (stem + ".gz")]
        found = [f for f in found if f.exists()]
        if not found:
            raise DataError(f"{folder} lacks {stem} (or {stem}.gz)")
        arrays[key] = read_idx(found[0])
    x_tr, y_tr = arrays["x_train"], arrays["y_train"].astype(np.int64)
    x_te, y_te = arrays["x_test"], arrays["y_test"].astype(np.int64)
    _check_pairs(folder, x_tr, y_tr, x_te, y_te)
    return x_tr, y_tr, x_te, y_te


SOURCES.register("digits", _from_split(_digits))  # scikit-learn's bundled 1,797 8x8 images
SOURCES.register("teacher", _from_split(_teacher))
SOURCES.register("mixture", _from_split(_mixture))
SOURCES.register("npz", lambda cfg: _npz(cfg.path))
SOURCES.register("idx", lambda cfg: _idx(cfg.path))

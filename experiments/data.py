"""Data sources that need no network: scikit-learn's bundled digits, synthetic sources, a
user's local ``.npz`` or MNIST-style idx files, and sequences of tokens (modular arithmetic, a
character corpus that ships with the package, a user's ``.npy`` token ids).

Every source returns a :class:`Dataset` with int32 labels, split into train and test
deterministically (a fixed permutation seed, or contiguous windows of a stream). Inputs are
float32 standardised with statistics of the training inputs only, except for token sources
(:attr:`Dataset.is_tokens`): their inputs are int32 token ids of shape ``(N, T)``, never
standardised, and ``num_classes`` is the vocabulary size, so that a model's embedding and its
output cover every token.
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

    @property
    def is_tokens(self) -> bool:
        """Whether the inputs are integer token ids (a token source) rather than features."""
        return bool(np.issubdtype(self.x_train.dtype, np.integer))


class TokenArrays(NamedTuple):
    """What a token source's loader returns instead of ``(x_train, y_train, x_test, y_test)``:
    integer token ids, inputs ``(N, T)``, labels ``(N,)`` (one per sequence) or ``(N, T)`` (one
    per position), and ``vocab_size``, the number of token ids (all ids lie in
    ``0..vocab_size-1``). :func:`load` keeps them integer and makes ``vocab_size`` the dataset's
    ``num_classes``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    vocab_size: int


# ``loader(data_cfg) -> (x_train, y_train, x_test, y_test)`` (or :class:`TokenArrays`) by
# ``data.source``.
SOURCES: Registry[Callable] = Registry("data source", "data.source")
"""Data sources by name (``data.source``): ``SOURCES.register("name", load)`` with
``load(data_cfg) -> Dataset``; the built-in ones are listed in the API reference."""


def section() -> ml_collections.ConfigDict:
    """The config section ``data``, at its defaults."""
    s = ml_collections.ConfigDict()
    # digits | teacher | mixture | npz | idx | modular_addition | characters | tokens (SOURCES)
    s.source = "digits"
    s.path = ""  # npz file, folder of idx / idx.gz files, text file (characters), npy (tokens)
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
    s.context = 32  # characters, tokens from a 1-D stream: tokens per input sequence
    s.modulus = 97  # modular_addition: p
    s.operation = "add"  # modular_addition: add | subtract | multiply | divide (p prime)
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
    _check_context(d)
    _check_modular(d)


def _check_context(d) -> None:
    require(d.context >= 1, "data.context", f"must be >= 1 (tokens per sequence), got {d.context}")


def _check_modular(d) -> None:
    require(d.modulus >= 2, "data.modulus", f"must be >= 2, got {d.modulus}")
    require(
        d.operation in _OPERATIONS,
        "data.operation",
        f"unknown operation {d.operation!r}; known: {', '.join(_OPERATIONS)}",
    )
    require(
        d.operation != "divide" or _is_prime(d.modulus),
        "data.modulus",
        f"{d.modulus} is not prime; data.operation='divide' needs a prime modulus "
        "(every nonzero b has an inverse mod p only then)",
    )


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % k for k in range(2, int(n**0.5) + 1))


def load(cfg) -> Dataset:
    """The dataset that ``cfg`` (the ``data`` section of a config) names.

    Token sources (their loader returns :class:`TokenArrays`) keep int32 inputs, ignore
    ``data.standardize`` and refuse ``data.image_shape``; their ``num_classes`` is the
    vocabulary size. Other sources' ``num_classes`` is the largest label + 1."""
    arrays = SOURCES.get(cfg.source)(cfg)
    if isinstance(arrays, TokenArrays):
        return _load_tokens(cfg, arrays)
    x_tr, y_tr, x_te, y_te = arrays
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


def _load_tokens(cfg, arrays: TokenArrays) -> Dataset:
    if cfg.image_shape:
        raise DataError(
            f"config key data.image_shape: {tuple(cfg.image_shape)} is for images; the "
            f"{cfg.source} source gives token sequences (leave data.image_shape empty)"
        )
    x_tr, y_tr, x_te, y_te, vocab_size = arrays
    if cfg.num_train:
        x_tr, y_tr = x_tr[: cfg.num_train], y_tr[: cfg.num_train]
    if cfg.num_test:
        x_te, y_te = x_te[: cfg.num_test], y_te[: cfg.num_test]
    x_tr, y_tr, x_te, y_te = (np.asarray(a, np.int32) for a in (x_tr, y_tr, x_te, y_te))
    return Dataset(x_tr, y_tr, x_te, y_te, int(vocab_size), cfg.source)


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
    num_test = _num_test(test_fraction, len(x), "examples")
    order = np.random.default_rng(seed).permutation(len(x))
    test, train = order[:num_test], order[num_test:]
    return x[train], y[train], x[test], y[test]


def _num_test(test_fraction, total: int, what: str) -> int:
    """How many of ``total`` examples go to the test split; both splits need one at least."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"config key data.test_fraction must lie in (0, 1), got {test_fraction}")
    num_test = int(round(test_fraction * total))
    if num_test < 1 or num_test >= total:
        raise DataError(
            f"config key data.test_fraction: {test_fraction} of {total} {what} leaves "
            f"{num_test} for testing and {total - num_test} for training; both need at least 1"
        )
    return num_test


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


# --------------------------------------------------------------------------------------------
# Token sequences.

_OPERATIONS = ("add", "subtract", "multiply", "divide")

BUNDLED_CORPUS = pathlib.Path(__file__).parent / "data" / "corpus.txt"
"""The character corpus used when ``data.path`` is empty: scikit-learn's dataset descriptions
(BSD-3-Clause, see ``CORPUS_LICENSE.txt`` beside it), frozen by ``make_corpus.py``."""


def _modular_arithmetic(cfg) -> TokenArrays:
    """Power et al. (2022), "Grokking": every pair ``(a, b)`` of ``0..p-1`` as the sequence
    ``[a, OP, b, EQ]`` with ``OP = p``, ``EQ = p + 1`` (vocabulary ``0..p+1``) and the label
    ``(a op b) mod p``, one per sequence. ``divide`` is ``a * b^-1 mod p`` for prime ``p`` and
    ``b != 0`` (p (p - 1) sequences; the others have all p^2). Split by ``data.test_fraction``
    with ``data.split_seed``."""
    _check_modular(cfg)
    p = int(cfg.modulus)
    a, b = np.divmod(np.arange(p * p, dtype=np.int64), p)
    if cfg.operation == "divide":
        a, b = a[b != 0], b[b != 0]
        inverse = np.array([0] + [pow(k, -1, p) for k in range(1, p)], np.int64)
        y = a * inverse[b] % p
    else:
        y = {"add": a + b, "subtract": a - b, "multiply": a * b}[cfg.operation] % p
    x = np.stack([a, np.full_like(a, p), b, np.full_like(a, p + 1)], axis=1)
    return TokenArrays(*_split(x, y, cfg.test_fraction, cfg.split_seed), vocab_size=p + 2)


def _characters(cfg) -> TokenArrays:
    """A character-level corpus: a UTF-8 text file at ``data.path``, or the bundled corpus.
    Tokens are indices into the sorted distinct characters of the whole text; windows as in
    :func:`_stream_windows`."""
    path = _require_file(cfg.path, "characters") if cfg.path else BUNDLED_CORPUS
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"config key data.path: {path} cannot be read: {err}") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"config key data.path: {path} is not UTF-8 text (byte {err.start}: {err.reason})"
        ) from err
    if not text:
        raise DataError(f"config key data.path: {path} is empty")
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    vocab, ids = np.unique(codes, return_inverse=True)  # sorted by code point, as sorted(set())
    windows = _stream_windows(ids.reshape(-1), cfg, f"{path} ({len(text)} characters)")
    return TokenArrays(*windows, vocab_size=len(vocab))


def _stream_windows(stream: np.ndarray, cfg, where: str):
    """Non-overlapping windows of ``data.context + 1`` tokens of a stream (a remainder shorter
    than a window is dropped): ``x = window[:-1]``, ``y = window[1:]``. The last
    ``data.test_fraction`` of the windows are the test split, contiguous, so the test text never
    overlaps the training text (``data.split_seed`` plays no part)."""
    _check_context(cfg)
    size = cfg.context + 1
    count = len(stream) // size
    if count < 1:
        raise DataError(f"{where} is shorter than one window of data.context + 1 = {size} tokens")
    windows = np.asarray(stream[: count * size]).reshape(count, size)
    num_train = count - _num_test(cfg.test_fraction, count, f"windows of {size} tokens")
    train, test = windows[:num_train], windows[num_train:]
    return train[:, :-1], train[:, 1:], test[:, :-1], test[:, 1:]


def _tokens(cfg) -> TokenArrays:
    """Token ids from a ``.npy`` file: a 1-D stream (windowed as characters are, by
    ``data.context``) or 2-D sequences ``(N, T + 1)`` (``x = [:, :-1]``, ``y = [:, 1:]``, split
    at random by ``data.test_fraction`` with ``data.split_seed``; ``data.context`` unused). The
    vocabulary size is the largest id + 1."""
    path = _require_file(cfg.path, "tokens")
    if path.suffix != ".npy":
        raise DataError(f"config key data.path: {path} is not a .npy file (the tokens source)")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"config key data.path: {path} is not a readable .npy file: {err}") from err
    if not isinstance(array, np.ndarray):  # an .npz archive under a .npy name
        array.close()
        raise DataError(f"config key data.path: {path} is not a .npy file (an archive)")
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{path}: token ids have dtype {array.dtype}; they must be integers")
    if array.size and array.min() < 0:
        raise DataError(f"{path}: token ids must be >= 0, found {array.min()}")
    if array.size and array.max() > np.iinfo(np.int32).max:
        raise DataError(f"{path}: token id {array.max()} does not fit int32")
    if array.ndim == 1:
        x_tr, y_tr, x_te, y_te = _stream_windows(array, cfg, f"{path} ({len(array)} tokens)")
    elif array.ndim == 2:
        if array.shape[0] < 1 or array.shape[1] < 2:
            raise DataError(
                f"{path}: sequences of shape {array.shape} are too short for one window; need "
                "(N, T + 1) with N >= 1, T >= 1"
            )
        x_tr, y_tr, x_te, y_te = _split(
            array[:, :-1], array[:, 1:], cfg.test_fraction, cfg.split_seed
        )
    else:
        raise DataError(
            f"{path}: token ids of shape {array.shape}; need a 1-D stream or 2-D sequences "
            "(N, T + 1)"
        )
    vocab_size = 1 + max(int(a.max()) for a in (x_tr, y_tr, x_te, y_te))
    return TokenArrays(x_tr, y_tr, x_te, y_te, vocab_size)


SOURCES.register("digits", _from_split(_digits))  # scikit-learn's bundled 1,797 8x8 images
SOURCES.register("teacher", _from_split(_teacher))
SOURCES.register("mixture", _from_split(_mixture))
SOURCES.register("npz", lambda cfg: _npz(cfg.path))
SOURCES.register("idx", lambda cfg: _idx(cfg.path))
SOURCES.register("modular_addition", _modular_arithmetic)  # Power et al. 2022, "Grokking"
SOURCES.register("characters", _characters)
SOURCES.register("tokens", _tokens)

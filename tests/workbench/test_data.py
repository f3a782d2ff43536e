"""Data sources: local files checked and refused in one line, deterministic splits."""

import gzip
import struct

import numpy as np
import pytest

pytest.importorskip("flax")
from workbench_helpers import (  # noqa: E402
    load_config,
    quiet,
)

from experiments import data as data_lib  # noqa: E402
from experiments import run as run_lib  # noqa: E402


def test_npz_with_wrong_arrays(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((4, 3)), y_train=np.zeros(4, np.int64), x_test=np.zeros((2, 3)))
    config = load_config()
    with config.unlocked():
        config.data.source, config.data.path = "npz", str(path)
    with pytest.raises(data_lib.DataError, match=r"lacks the arrays \['y_test'\]"):
        run_lib.run(config, tmp_path / "run", progress=quiet())
    np.savez(
        path,
        x_train=np.zeros((4, 3)),
        y_train=np.zeros(3, np.int64),
        x_test=np.zeros((2, 3)),
        y_test=np.zeros(2, np.int64),
    )
    with pytest.raises(data_lib.DataError, match=r"y_train has shape \(3,\); need \(4,\)"):
        data_lib.load(config.data)


def test_npz_labels_with_gaps_and_complex_inputs_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3))
    y = np.arange(20) % 10
    config = load_config()
    with config.unlocked():
        config.data.source, config.data.path = "npz", str(tmp_path / "d.npz")
    y_gap = y.copy()
    y_gap[0] = 100_000
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y_gap, x_test=x[:5], y_test=y[:5])
    with pytest.raises(
        data_lib.DataError, match="labels must be 0..C-1, but the largest is 100000"
    ):
        data_lib.load(config.data)
    np.savez(tmp_path / "d.npz", x_train=x + 1j, y_train=y, x_test=x[:5], y_test=y[:5])
    with pytest.raises(data_lib.DataError, match="x_train has dtype complex128; complex inputs"):
        data_lib.load(config.data)


def write_idx(path, array, code):
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def test_idx_and_npz_sources_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 255, (30, 4, 4)).astype(np.uint8),
        "y_train": (np.arange(30) % 3).astype(np.uint8),
        "x_test": rng.integers(0, 255, (10, 4, 4)).astype(np.uint8),
        "y_test": rng.integers(0, 3, 10).astype(np.uint8),
    }
    for key, stem in data_lib._IDX_NAMES.items():
        suffix = ".gz" if key.startswith("x") else ""
        write_idx(tmp_path / (stem + suffix), arrays[key], 0x08)
    config = load_config()
    with config.unlocked():
        config.data.source, config.data.path = "idx", str(tmp_path)
        config.data.standardize = False
    ds = data_lib.load(config.data)
    assert np.array_equal(ds.x_train, arrays["x_train"].astype(np.float32))
    assert np.array_equal(ds.y_test, arrays["y_test"]) and ds.num_classes == 3
    np.savez(
        tmp_path / "d.npz",
        **{k: v.astype(np.int64) if k.startswith("y") else v for k, v in arrays.items()},
    )
    with config.unlocked():
        config.data.source, config.data.path, config.data.standardize = (
            "npz",
            str(tmp_path / "d.npz"),
            True,
        )
    ds = data_lib.load(config.data)
    assert np.allclose(ds.x_train.reshape(30, -1).mean(0), 0, atol=1e-5)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(data_lib.DataError, match="bad magic number"):
        data_lib.read_idx(tmp_path / "bad" / "train-images-idx3-ubyte")
    (tmp_path / "bad" / "cut").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(data_lib.DataError, match="header is cut short"):
        data_lib.read_idx(tmp_path / "bad" / "cut")
    (tmp_path / "bad" / "fake.gz").write_bytes(b"not gzip at all")
    with pytest.raises(data_lib.DataError, match="cannot be read"):
        data_lib.read_idx(tmp_path / "bad" / "fake.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data_lib.DataError, match="lacks train-images-idx3-ubyte"):
        data_lib._idx(str(tmp_path / "empty"))
    for bad, match in (
        (dict(arrays, x_test=np.zeros((0, 4, 4))), "x_test is empty"),
        (dict(arrays, x_train=np.full((30, 2), "a")), "inputs must be numeric"),
    ):
        np.savez(
            tmp_path / "bad.npz",
            **{k: v.astype(np.int64) if k.startswith("y") else v for k, v in bad.items()},
        )
        with pytest.raises(data_lib.DataError, match=match):
            data_lib._npz(str(tmp_path / "bad.npz"))


def test_digits_split_is_deterministic():
    config = load_config()
    a, b = data_lib.load(config.data), data_lib.load(config.data)
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    assert a.x_train.shape == (200, 64) and a.num_classes == 10
    assert data_lib.fingerprint(a) == data_lib.fingerprint(b)
    with config.unlocked():
        config.data.num_train = 199
    assert data_lib.fingerprint(data_lib.load(config.data)) != data_lib.fingerprint(a)


@pytest.mark.parametrize("source", ["teacher", "mixture"])
def test_synthetic_sources_are_deterministic_and_learnable(source):
    config = load_config()
    with config.unlocked():
        config.data.source, config.data.num_examples, config.data.num_classes = source, 400, 4
    a, b = data_lib.load(config.data), data_lib.load(config.data)
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_train, b.y_train)
    assert a.x_train.shape == (200, 20) and a.num_classes <= 4  # num_train=200 in smoke
    assert len(np.unique(a.y_train)) >= 2
    assert abs(float(a.x_train.mean())) < 0.05  # standardised on the training inputs

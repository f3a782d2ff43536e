"""Sequence data sources: modular arithmetic, the bundled character corpus, a user's token ids;
integer inputs that stay integer; the fingerprints of the feature sources unchanged."""

import fnmatch
import pathlib
import tomllib

import ml_collections
import numpy as np
import pytest

from experiments import data as data_lib
from experiments.errors import ConfigError, DataError

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORPUS_DIR = ROOT / "experiments" / "data"


def data_cfg(**changes):
    cfg = data_lib.section()
    cfg.update(changes)
    return cfg


def checked(**changes):
    data_lib.check(ml_collections.ConfigDict({"data": data_cfg(**changes)}))


# --------------------------------------------------------------------------------------------
# The feature sources did not change.


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, "ec33d408f3e49c83"),
        ({"image_shape": (8, 8, 1)}, "72146140f80608eb"),
        ({"standardize": False}, "d05471dfa5b7c0b6"),
    ],
)
def test_digits_fingerprint_is_pinned(changes, expected):
    # Values computed on the code before the token sources were added.
    dataset = data_lib.load(data_cfg(**changes))
    assert dataset.x_train.dtype == np.float32 and not dataset.is_tokens
    assert data_lib.fingerprint(dataset) == expected


# --------------------------------------------------------------------------------------------
# Modular arithmetic.

OPERATIONS = {
    "add": lambda a, b, p: (a + b) % p,
    "subtract": lambda a, b, p: (a - b) % p,
    "multiply": lambda a, b, p: (a * b) % p,
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_modular_arithmetic_labels_and_pairs(operation):
    p = 11
    d = data_lib.load(data_cfg(source="modular_addition", modulus=p, operation=operation))
    assert d.is_tokens and d.num_classes == p + 2 and d.name == "modular_addition"
    assert d.x_train.dtype == np.int32 and d.y_train.dtype == np.int32
    assert d.x_train.shape == (p * p - 30, 4) and d.x_test.shape == (30, 4)  # round(0.25 * 121)
    assert d.y_train.shape == (p * p - 30,) and d.y_test.shape == (30,)
    x, y = np.concatenate([d.x_train, d.x_test]), np.concatenate([d.y_train, d.y_test])
    assert np.all(x[:, 1] == p) and np.all(x[:, 3] == p + 1)
    a, b = x[:, 0].astype(np.int64), x[:, 2].astype(np.int64)
    np.testing.assert_array_equal(y, OPERATIONS[operation](a, b, p))
    # Every pair exactly once across train and test.
    assert sorted((a * p + b).tolist()) == list(range(p * p))


def test_modular_division_needs_a_prime_and_leaves_out_zero():
    p = 7
    d = data_lib.load(data_cfg(source="modular_addition", modulus=p, operation="divide"))
    x, y = np.concatenate([d.x_train, d.x_test]), np.concatenate([d.y_train, d.y_test])
    a, b = x[:, 0], x[:, 2]
    assert len(x) == p * (p - 1) and b.min() == 1
    np.testing.assert_array_equal(y * b % p, a)  # y = a / b
    assert len({(i, j) for i, j in zip(a.tolist(), b.tolist(), strict=True)}) == p * (p - 1)
    with pytest.raises(ConfigError, match=r"config key data.modulus: 8 is not prime"):
        checked(source="modular_addition", modulus=8, operation="divide")
    with pytest.raises(ConfigError, match=r"config key data.modulus: 9 is not prime"):
        data_lib.load(data_cfg(source="modular_addition", modulus=9, operation="divide"))


def test_modular_arithmetic_is_deterministic_and_split_by_seed():
    cfg = data_cfg(source="modular_addition", modulus=13)
    first, second = data_lib.load(cfg), data_lib.load(cfg)
    for u, v in zip(first[:4], second[:4], strict=True):
        np.testing.assert_array_equal(u, v)
    assert data_lib.fingerprint(first) == data_lib.fingerprint(second)
    other = data_lib.load(data_cfg(source="modular_addition", modulus=13, split_seed=1))
    assert data_lib.fingerprint(other) != data_lib.fingerprint(first)
    test_pairs = {tuple(r) for r in first.x_test.tolist()}
    assert test_pairs != {tuple(r) for r in other.x_test.tolist()}


def test_new_keys_are_checked_by_name():
    checked()  # the defaults pass
    with pytest.raises(ConfigError, match=r"config key data.context: must be >= 1"):
        checked(context=0)
    with pytest.raises(
        ConfigError, match=r"data.context: must be >= 1 \(tokens per sequence\), got 0"
    ):
        data_lib.load(data_cfg(source="characters", context=0))
    with pytest.raises(ConfigError, match=r"config key data.modulus: must be >= 2, got 1"):
        checked(modulus=1)
    with pytest.raises(ConfigError, match=r"config key data.operation: unknown operation 'pow'"):
        checked(operation="pow")


# --------------------------------------------------------------------------------------------
# Characters.


def decode(windows, vocab):
    return "".join(vocab[i] for i in windows.reshape(-1))


def test_bundled_corpus_ships_with_its_license():
    corpus = CORPUS_DIR / "corpus.txt"
    raw = corpus.read_bytes()
    assert 10_000 < len(raw) < 100_000
    raw.decode("utf-8")  # strict
    notice = (CORPUS_DIR / "CORPUS_LICENSE.txt").read_text(encoding="utf-8")
    assert "BSD 3-Clause License" in notice and "The scikit-learn developers" in notice
    assert "scikit-learn 1." in notice  # the provenance: the version the text came from
    # pyproject's package data carries every file of the folder.
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["experiments"]
    for name in ("corpus.txt", "CORPUS_LICENSE.txt", "make_corpus.py"):
        assert any(fnmatch.fnmatch(f"data/{name}", glob) for glob in package_data), name


def test_bundled_corpus_windows_decode_to_the_text():
    text = (CORPUS_DIR / "corpus.txt").read_text(encoding="utf-8")
    vocab = sorted(set(text))
    d = data_lib.load(data_cfg(source="characters", context=32))
    assert d.is_tokens and d.num_classes == len(vocab) and d.name == "characters"
    assert d.x_train.dtype == np.int32 and d.y_train.dtype == np.int32
    count = len(text) // 33
    num_test = round(0.25 * count)
    assert d.x_train.shape == d.y_train.shape == (count - num_test, 32)
    assert d.x_test.shape == d.y_test.shape == (num_test, 32)
    # x and y are one window shifted by one; train is the start of the text, test follows it.
    np.testing.assert_array_equal(d.x_train[:, 1:], d.y_train[:, :-1])
    train = np.concatenate([d.x_train, d.y_train[:, -1:]], axis=1)
    test = np.concatenate([d.x_test, d.y_test[:, -1:]], axis=1)
    assert decode(train, vocab) == text[: 33 * (count - num_test)]
    assert decode(test, vocab) == text[33 * (count - num_test) : 33 * count]
    again = data_lib.load(data_cfg(source="characters", context=32))
    assert data_lib.fingerprint(again) == data_lib.fingerprint(d)


def test_make_corpus_reproduces_the_frozen_files():
    pytest.importorskip("sklearn")
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_corpus", CORPUS_DIR / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text, version = module.corpus_text()
    notice = (CORPUS_DIR / "CORPUS_LICENSE.txt").read_text(encoding="utf-8")
    if f"scikit-learn {version})" not in notice:
        pytest.skip(f"the corpus was frozen from another scikit-learn than {version}")
    assert text == (CORPUS_DIR / "corpus.txt").read_text(encoding="utf-8")
    assert module.license_text(version) == notice


def test_characters_from_a_file(tmp_path):
    path = tmp_path / "t.txt"
    # 46 characters, 7 distinct, one outside ASCII; "z" only in the remainder past the last
    # window, and still in the vocabulary.
    text = "abcabd éé" * 5 + "z"
    path.write_text(text, encoding="utf-8")
    d = data_lib.load(data_cfg(source="characters", path=str(path), context=3, test_fraction=0.2))
    vocab = sorted(set(text))
    assert d.num_classes == 7 and d.x_train.shape == (9, 3) and d.x_test.shape == (2, 3)
    assert vocab.index("z") not in np.concatenate([d.x_train, d.y_train, d.x_test, d.y_test])
    train = np.concatenate([d.x_train, d.y_train[:, -1:]], axis=1)
    assert decode(train, vocab) == text[:36]
    # Standardisation does not apply to token ids; truncation keeps the whole vocabulary.
    same = data_lib.load(
        data_cfg(source="characters", path=str(path), context=3, test_fraction=0.2, num_train=2)
    )
    np.testing.assert_array_equal(same.x_train, d.x_train[:2])
    assert same.num_classes == 7 and same.x_train.dtype == np.int32


def test_characters_refuse_bad_files(tmp_path):
    def load(path, **changes):
        return data_lib.load(data_cfg(source="characters", path=str(path), **changes))

    with pytest.raises(DataError, match=r"data.path: .*missing.txt does not exist"):
        load(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 text \(byte 3"):
        load(tmp_path / "latin1.txt")
    (tmp_path / "short.txt").write_text("abcdef", encoding="utf-8")
    with pytest.raises(DataError, match=r"short.txt \(6 characters\) is shorter than one window"):
        load(tmp_path / "short.txt", context=6)
    with pytest.raises(DataError, match=r"of 2 windows of 3 tokens leaves 0 for testing"):
        load(tmp_path / "short.txt", context=2, test_fraction=0.2)
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty.txt is empty"):
        load(tmp_path / "empty.txt")
    with pytest.raises(DataError, match=r"data.image_shape: \(4, 8\) is for images"):
        data_lib.load(data_cfg(source="characters", image_shape=(4, 8)))


# --------------------------------------------------------------------------------------------
# A user's token ids.


def test_tokens_from_a_stream(tmp_path):
    stream = (np.arange(50) * 7 % 23).astype(np.int64)
    np.save(tmp_path / "s.npy", stream)
    d = data_lib.load(
        data_cfg(source="tokens", path=str(tmp_path / "s.npy"), context=4, test_fraction=0.2)
    )
    assert d.x_train.shape == (8, 4) and d.x_test.shape == (2, 4) and d.x_train.dtype == np.int32
    windows = np.concatenate([d.x_train, d.x_test])
    np.testing.assert_array_equal(windows, stream[:50].reshape(10, 5)[:, :-1])
    np.testing.assert_array_equal(np.concatenate([d.y_train, d.y_test])[:, -1], stream[4:50:5])
    assert d.num_classes == int(stream.max()) + 1 == 23


def test_tokens_from_sequences(tmp_path):
    rng = np.random.default_rng(0)
    sequences = rng.integers(0, 40, size=(20, 6)).astype(np.uint16)
    sequences[3, 2] = 57  # the largest id, in an input position
    np.save(tmp_path / "q.npy", sequences)
    cfg = data_cfg(source="tokens", path=str(tmp_path / "q.npy"), context=99)
    d = data_lib.load(cfg)
    assert d.x_train.shape == (15, 5) and d.y_test.shape == (5, 5) and d.num_classes == 58
    rows = np.concatenate(
        [np.concatenate([d.x_train, d.x_test]), np.concatenate([d.y_train, d.y_test])[:, -1:]],
        axis=1,
    )
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, sequences.tolist()))
    assert data_lib.fingerprint(data_lib.load(cfg)) == data_lib.fingerprint(d)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros(10, np.float32), r"token ids have dtype float32; they must be integers"),
        (np.array([1, -2, 3] * 20), r"token ids must be >= 0, found -2"),
        (np.arange(5), r"\(5 tokens\) is shorter than one window of data.context \+ 1 = 33"),
        (np.zeros((4, 1), np.int32), r"sequences of shape \(4, 1\) are too short"),
        (np.array(3), r"token ids of shape \(\); need a 1-D stream or 2-D sequences"),
        (np.zeros((2, 3, 4), np.int32), r"token ids of shape \(2, 3, 4\); need a 1-D"),
    ],
)
def test_tokens_refuse_bad_arrays(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError, match=message):
        data_lib.load(data_cfg(source="tokens", path=str(tmp_path / "bad.npy")))


def test_tokens_refuse_bad_files(tmp_path):
    def load(path):
        return data_lib.load(data_cfg(source="tokens", path=str(path)))

    with pytest.raises(DataError, match=r"data.path is empty; the tokens source"):
        load("")
    (tmp_path / "t.txt").write_text("1 2 3")
    with pytest.raises(DataError, match=r"t.txt is not a .npy file"):
        load(tmp_path / "t.txt")
    (tmp_path / "broken.npy").write_bytes(b"not an array")
    with pytest.raises(DataError, match=r"broken.npy is not a readable .npy file"):
        load(tmp_path / "broken.npy")
    np.savez(tmp_path / "z.npz", a=np.arange(3))
    (tmp_path / "z.npz").rename(tmp_path / "z.npy")
    with pytest.raises(DataError, match=r"z.npy is not a .npy file \(an archive\)"):
        load(tmp_path / "z.npy")


# --------------------------------------------------------------------------------------------
# On the device.


def test_device_data_keeps_token_ids_integer():
    pytest.importorskip("flax")
    import jax.numpy as jnp

    from experiments import lifecycle

    tokens = lifecycle.device_data(
        data_lib.load(data_cfg(source="modular_addition", modulus=5)), jnp.float16
    )
    assert tokens["x_train"].dtype == tokens["x_test"].dtype == jnp.int32
    assert tokens["y_train"].dtype == jnp.int32
    digits = data_lib.load(data_cfg(num_train=10, num_test=5))
    features = lifecycle.device_data(digits, jnp.float16)
    assert features["x_train"].dtype == features["x_test"].dtype == jnp.float16
    np.testing.assert_allclose(
        np.asarray(features["x_train"], np.float32), digits.x_train, rtol=1e-3, atol=1e-3
    )

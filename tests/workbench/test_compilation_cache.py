"""JAX's persistent compilation cache: programs compiled by one process are loaded by the next
one instead of being compiled again, in a directory a variable chooses; the user's home is left
alone by the tests (``conftest.py`` turns the cache off for them; each test process keeps its
programs in a temporary directory of its own, ``tests/conftest.py``)."""

import pathlib

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("flax")
from experiments import compilation_cache  # noqa: E402


@pytest.fixture
def jax_cache_config():
    """JAX's cache settings as they were, restored after the test (they are process-wide); the
    test starts with no cache directory (``tests/conftest.py`` gives each test process one)."""
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", None)
    jax_cache.reset_cache()
    yield
    for name, value in before.items():
        jax.config.update(name, value)
    jax_cache.reset_cache()


def test_the_tests_keep_the_cache_off():
    assert compilation_cache.ENV == "CURVATURE_JAX_CACHE"
    assert compilation_cache.directory() is None


def test_the_directory_follows_the_variable_or_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(compilation_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache.directory() == tmp_path / "curvature" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compilation_cache.directory() == tmp_path / ".cache" / "curvature" / "jax"
    monkeypatch.setenv(compilation_cache.ENV, "~/jax")
    assert compilation_cache.directory() == tmp_path / "jax"
    monkeypatch.setenv(compilation_cache.ENV, "OFF")
    assert compilation_cache.directory() is None


def test_a_program_compiled_once_is_loaded_from_disk(monkeypatch, tmp_path, jax_cache_config):
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "jax"))
    monkeypatch.setattr(compilation_cache, "MIN_COMPILE_SECONDS", 0.0)  # this program is small
    assert compilation_cache.enable() == tmp_path / "jax"
    assert compilation_cache.enable() == tmp_path / "jax"  # once set, kept

    def program(x):
        return jnp.tanh(x @ x.T).sum()

    x = jnp.ones((8, 8))
    jax.jit(program)(x)
    assert list((tmp_path / "jax").iterdir())  # written
    jax.clear_caches()  # nothing compiled in memory, as in the next process
    events = []

    def listen(event, **kwargs):
        events.append(event)

    jax.monitoring.register_event_listener(listen)
    try:
        jax.jit(program)(x)
    finally:
        jax.monitoring.unregister_event_listener(listen)
    assert "/jax/compilation_cache/cache_hits" in events


def test_an_unwritable_directory_is_a_warning(monkeypatch, tmp_path, jax_cache_config):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "file" / "jax"))
    with pytest.warns(RuntimeWarning, match="cannot be written: every process compiles"):
        assert compilation_cache.enable() is None
    assert not jax.config.jax_compilation_cache_dir


def test_a_directory_of_the_process_is_kept(monkeypatch, tmp_path, jax_cache_config):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "other"))
    assert compilation_cache.enable() == pathlib.Path(tmp_path / "mine")
    assert not (tmp_path / "other").exists()

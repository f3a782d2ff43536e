"""Fixtures: float64 per test, a key, and compiled programs released after each module. Shared
helpers (models, problems, dense references) live in ``tests/helpers.py``."""

import os

# The suite compiles many small programs and runs each briefly: XLA's backend optimisations cost
# more time than they save here (about half the compile time on 2 cores). Numerics are unchanged.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Free every compiled program after each test module. Each XLA:CPU executable holds memory
    maps for its code; the whole suite compiles enough of them in one process to pass the
    kernel's vm.max_map_count (65,530), and the next compile then crashes."""
    yield
    jax.clear_caches()


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture
def key():
    return jax.random.key(0)

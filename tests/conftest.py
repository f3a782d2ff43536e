"""Fixtures: float64 per test, a key, and compiled programs released after each module. Shared
helpers (models, problems, dense references) live in ``tests/helpers.py``."""

import atexit
import os
import shutil
import tempfile

# The suite compiles many small programs and runs each briefly: XLA's backend optimisations cost
# more time than they save here (about half the compile time on 2 cores). Numerics are unchanged.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax  # noqa: E402
import pytest  # noqa: E402

# Every compiled program of this test process is also kept on disk (JAX's persistent compilation
# cache, in a directory of its own, removed at exit): the modules free their programs (below),
# and a later module that compiles the same program (the same problems' estimators, the
# experiments' training and measurements) loads it instead, about 80 s of CPU over the suite.
# The same executable, so the same numbers. One directory per process: JAX writes an entry in
# place, so a process sharing the directory could read one half-written; child processes (set
# by config, not environment) compile their own as before.
_COMPILED_PROGRAMS = tempfile.mkdtemp(prefix="curvature-tests-jax-")
atexit.register(shutil.rmtree, _COMPILED_PROGRAMS, True)
jax.config.update("jax_compilation_cache_dir", _COMPILED_PROGRAMS)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.02)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile``, with the test modules that read the smoke run in one unit: the run
    is made once per test process (``workbench_helpers.smoke_run``, about 17 s of CPU), and with
    a file per unit the two processes each made it. The unit, having many tests, starts early."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    shared = {}  # test file -> whether it reads the smoke run

    def reads_the_smoke_run(path):
        if path not in shared:
            file = config.rootpath / path
            shared[path] = file.suffix == ".py" and "run_smoke_once(" in file.read_text()
        return shared[path]

    class SmokeRunTogether(LoadFileScheduling):
        def _split_scope(self, nodeid):
            path = super()._split_scope(nodeid)
            return "the smoke run's readers" if reads_the_smoke_run(path) else path

    return SmokeRunTogether(config, log)


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

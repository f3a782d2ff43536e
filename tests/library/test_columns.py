"""Products with the unit vectors (``dense``, the exact diagonal) a block at a time from the
host: the dense float64 Hessian's numbers, one compiled program for every block, progress,
a warning for large ``n`` and Ctrl-C honoured between blocks."""

import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from helpers import SIGINT_HANDLER, hessian_problem

import curvature as cv
from curvature import _columns, _driver


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_dense_and_exact_diagonal_are_the_dense_hessians(x64, activation):
    op, h = hessian_problem(activation)
    for block in (None, 7, op.size + 5):
        np.testing.assert_allclose(cv.dense(op, block_size=block), h, rtol=1e-10, atol=1e-12)
        exact = cv.diagonal(op, method="exact", probe_batch_size=block)
        np.testing.assert_allclose(exact.diagonal, np.diag(h), rtol=1e-10, atol=1e-12)
        assert int(exact.num_matvecs) == op.size


def test_every_block_runs_one_compiled_program_and_progress_is_shown(x64, capsys):
    op, h = hessian_problem("tanh")
    cv.dense(op, block_size=4)
    before = _driver._run_compiled._cache_size()
    again = cv.dense(op * 2.0 - op, block_size=4, progress=True)  # another operator type
    after_one = _driver._run_compiled._cache_size()
    assert after_one == before + 1  # the combination's block program, once for all its blocks
    np.testing.assert_allclose(again, h, rtol=1e-10, atol=1e-12)
    err = capsys.readouterr().err
    assert f"dense: {op.size:,}/{op.size:,} unit vectors (100%)" in err
    cv.dense(op, block_size=4, progress=False)
    assert _driver._run_compiled._cache_size() == after_one
    assert capsys.readouterr().err == ""


def test_a_large_run_warns_first(x64, monkeypatch):
    op, h = hessian_problem("relu")
    monkeypatch.setattr(_columns, "LARGE", 10)
    with pytest.warns(UserWarning, match=rf"takes n = {op.size} products .* Ctrl-C stops it"):
        d = cv.diagonal(op, method="exact", progress=False)
    np.testing.assert_allclose(d.diagonal, np.diag(h), rtol=1e-10, atol=1e-12)


def test_ctrl_c_stops_an_exact_diagonal_between_blocks(tmp_path):
    # 100 blocks of 4 unit vectors of compiled work (no Python inside), a few seconds in all:
    # SIGINT must end the run within a block or two, not at the end.
    script = tmp_path / "child.py"
    script.write_text(
        SIGINT_HANDLER
        + textwrap.dedent(
            """
            import sys, time
            import jax, jax.numpy as jnp
            import curvature as cv
            w = jax.random.normal(jax.random.key(0), (1500, 1500)) / 40.0
            u = jax.random.normal(jax.random.key(1), (1500, 400)) / 20.0

            def matvec(v):
                x = jax.lax.fori_loop(0, 40, lambda i, x: jnp.tanh(w @ x), u @ v)
                return v + 1e-30 * (u.T @ x)

            op = cv.from_function(matvec, jnp.zeros(400))
            cv.diagonal(op, method="exact", probe_batch_size=4)  # compiles; times the run
            start = time.perf_counter()
            cv.diagonal(op, method="exact", probe_batch_size=4)
            print(f"whole {time.perf_counter() - start:.3f}", flush=True)
            start = time.perf_counter()
            print("go", flush=True)
            try:
                cv.diagonal(op, method="exact", probe_batch_size=4)
            except KeyboardInterrupt:
                print(f"stopped {time.perf_counter() - start:.3f}", flush=True)
                sys.exit(3)
            print("finished", flush=True)
            """
        )
    )
    child = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    whole = float(child.stdout.readline().split()[1])
    assert child.stdout.readline().strip() == "go"
    time.sleep(whole / 5)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 3, (out, err)
    # The child's own clock (process start-up and exit excluded): the signal came at a fifth of
    # the run; it stopped soon after, not at the end.
    stopped = float(out.split()[-1])
    assert stopped < 0.6 * whole, (stopped, whole)

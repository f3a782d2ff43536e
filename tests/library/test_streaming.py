"""Streamed data (curvature.streaming): operators over a loader equal the in-memory operators on
the same examples (float64, uneven batches, H and the Gauss-Newton matrix), every estimator gives
the in-memory result, memmaps and .npy shards work, and misuse gets a clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SIGINT_HANDLER, dense_hessian, make_problem

import curvature as cv
from curvature import _driver

NUM = 23  # batches of 7: 7, 7, 7, 2


def loader_of(data, batch_size=7):
    host = jax.tree_util.tree_map(np.asarray, data)
    return cv.batches(host, batch_size)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_streamed_hessian_and_gauss_newton_equal_in_memory(x64, activation):
    params, data, model, loss, _ = make_problem(activation, "cross_entropy", num_examples=NUM)
    stream = loader_of(data)
    h = cv.hessian(loss, params, stream)
    assert h.streamed and h.dtype == jnp.float64
    assert rel(cv.dense(h), dense_hessian(loss, params, data)) < 1e-12
    g = cv.gauss_newton(model, params, stream, loss="cross_entropy")
    g_mem = cv.gauss_newton(model, params, data, loss="cross_entropy")
    assert rel(cv.dense(g), cv.dense(g_mem)) < 1e-12
    # Chunks inside each streamed batch (batch_size=3: 3, 3, 1 of a batch of 7) change nothing.
    h3 = cv.hessian(loss, params, stream, batch_size=3)
    v = jax.random.normal(jax.random.key(0), (h.size,))
    assert rel(h3 @ v, h @ v) < 1e-12
    # The exact Gauss-Newton diagonal is summed over batches with the same weights.
    d = cv.diagonal(g, method="exact").diagonal
    assert rel(d, jnp.diag(cv.dense(g_mem))) < 1e-12


def test_every_estimator_gives_the_in_memory_result(x64, key):
    params, data, model, loss, _ = make_problem("tanh", "mse", num_examples=NUM)
    stream = loader_of(data)
    mem, st = cv.hessian(loss, params, data), cv.hessian(loss, params, stream)
    e_mem, e_st = cv.eigsh(mem, k=3, key=key), cv.eigsh(st, k=3, key=key)
    np.testing.assert_allclose(e_st.eigenvalues, e_mem.eigenvalues, rtol=1e-10)
    assert np.all(e_st.converged) and np.all(e_st.residual_norms < 1e-8)
    for method in ("hutch++", "hutchinson"):
        t_mem = cv.trace(mem, num_matvecs=12, key=key, method=method)
        t_st = cv.trace(st, num_matvecs=12, key=key, method=method, probe_batch_size=4)
        np.testing.assert_allclose(t_st.value, t_mem.value, rtol=1e-10)
        np.testing.assert_allclose(t_st.standard_error, t_mem.standard_error, rtol=1e-8)
    d_mem = cv.diagonal(mem, num_matvecs=4, key=key)
    d_st = cv.diagonal(st, num_matvecs=4, key=key)
    np.testing.assert_allclose(d_st.diagonal, d_mem.diagonal, rtol=1e-9, atol=1e-12)
    s_mem = cv.spectral_density(mem, num_probes=2, num_steps=8, key=key)
    s_st = cv.spectral_density(st, num_probes=2, num_steps=8, key=key)
    np.testing.assert_allclose(s_st.nodes, s_mem.nodes, rtol=1e-9, atol=1e-12)
    p_st = cv.power_iteration(st, k=1, key=key, max_steps=50)
    np.testing.assert_allclose(p_st.eigenvalues[0], e_mem.eigenvalues[0], rtol=1e-6)
    # The residual H - G: two streamed operators combined, one pass each.
    g_mem = cv.gauss_newton(model, params, data, loss="mse")
    g_st = cv.gauss_newton(model, params, stream, loss="mse")
    f_mem = cv.frobenius_norm_squared(mem - g_mem, num_matvecs=3, key=key)
    f_st = cv.frobenius_norm_squared(st - g_st, num_matvecs=3, key=key)
    np.testing.assert_allclose(f_st.value, f_mem.value, rtol=1e-9)


def test_memmaps_and_npy_shards(x64, tmp_path, key):
    params, data, _, loss, _ = make_problem("relu", "cross_entropy", num_examples=NUM)
    host = jax.tree_util.tree_map(np.asarray, data)
    np.save(tmp_path / "x.npy", host["x"])
    np.save(tmp_path / "y.npy", host["y"])
    mapped = {name: np.load(tmp_path / f"{name}.npy", mmap_mode="r") for name in ("x", "y")}
    ref = cv.hessian(loss, params, data)
    v = jax.random.normal(key, (ref.size,))
    from_memmap = cv.hessian(loss, params, cv.batches(mapped, 10))
    assert rel(from_memmap @ v, ref @ v) < 1e-12

    for i, start in enumerate(range(0, NUM, 9)):  # shards of 9, 9, 5 examples
        np.save(tmp_path / f"x{i}.npy", host["x"][start : start + 9])
        np.save(tmp_path / f"y{i}.npy", host["y"][start : start + 9])

    def shards():
        for i in range(3):
            yield {"x": np.load(tmp_path / f"x{i}.npy"), "y": np.load(tmp_path / f"y{i}.npy")}

    from_shards = cv.hessian(loss, params, shards)
    assert rel(from_shards @ v, ref @ v) < 1e-12


def test_batches_are_read_ahead_by_a_thread(x64):
    params, data, _, loss, _ = make_problem("relu", "mse", num_examples=NUM)
    host = jax.tree_util.tree_map(np.asarray, data)
    import threading

    readers = set()

    def loader():
        for start in range(0, NUM, 7):
            readers.add(threading.current_thread().name)
            yield jax.tree_util.tree_map(lambda x, s=start: x[s : s + 7], host)

    op = cv.hessian(loss, params, loader)  # reads the first batch here, for its checks
    readers.clear()
    op @ jnp.ones(op.size)
    assert readers == {"curvature-prefetch"}


def test_streamed_misuse_gets_clear_errors(x64, key):
    params, data, _, loss, _ = make_problem("relu", "mse", num_examples=NUM)
    host = jax.tree_util.tree_map(np.asarray, data)
    with pytest.raises(TypeError, match="iterator"):
        cv.hessian(loss, params, iter([host]))
    with pytest.raises(ValueError, match="no batches"):
        cv.hessian(loss, params, lambda: [])
    with pytest.raises(TypeError, match="zero-argument function"):
        cv.hessian(loss, params, lambda batch: batch)

    passes = []

    def shrinking():  # drops a batch on every pass: not a fixed data set
        passes.append(None)
        yield from list(loader_of(data)())[: 5 - len(passes)]

    op = cv.hessian(loss, params, shrinking)
    op @ jnp.ones(op.size)
    with pytest.raises(ValueError, match="same examples on every pass"):
        op @ jnp.ones(op.size)

    def mixed():
        yield host
        yield {"x": host["x"]}

    with pytest.raises(ValueError, match="batch 1 .* structure"):
        cv.hessian(loss, params, mixed) @ jnp.ones(cv.hessian(loss, params, data).size)

    st = cv.hessian(loss, params, loader_of(data))
    with pytest.raises(TypeError, match="cannot be traced"):
        jax.jit(lambda v: st @ v)(jnp.ones(st.size))
    with pytest.raises(TypeError, match="cannot be traced"):
        jax.grad(
            lambda p: cv.eigsh(cv.hessian(loss, p, loader_of(data)), k=1, key=key).eigenvalues[0]
        )(params)
    with pytest.raises(ValueError, match="probe_batch_size"):
        cv.spectral_density(st, num_probes=4, num_steps=5, key=key, probe_batch_size=2)
    with pytest.raises(ValueError, match="leading"):
        cv.batches({"x": host["x"], "y": host["y"][:5]}, 4)


def test_prepared_operator_outside_jit_holds_the_linearisation(x64, key):
    params, data, model, loss, _ = make_problem("tanh", "cross_entropy")
    for op in (
        cv.hessian(loss, params, data),
        cv.gauss_newton(model, params, data, loss="cross_entropy"),
    ):
        prepared = op.prepared()
        assert prepared is not op and "prepared" in repr(prepared)
        assert rel(cv.dense(prepared), cv.dense(op)) < 1e-12
        # Compiled once: a second preparation at new parameters reuses the matvec's program.
        moved = jax.tree_util.tree_map(lambda p: p * 1.01, params)
        again = cv.hessian(loss, moved, data) if op.name == "hessian" else None
        if again is not None:
            v = jax.random.normal(key, (op.size,))
            prepared @ v
            before = _driver._run_compiled._cache_size()
            assert rel(again.prepared() @ v, again @ v) < 1e-12
            assert _driver._run_compiled._cache_size() == before + 1  # `again @ v` only
    chunked = cv.hessian(loss, params, data, batch_size=5)
    assert chunked.prepared() is chunked


def test_loader_thread_sees_x64_and_is_joined(x64):
    import threading

    params, data, _, loss, _ = make_problem("tanh", "mse", num_examples=NUM)
    host = jax.tree_util.tree_map(np.asarray, data)
    dtypes = []

    def loader():  # builds JAX arrays in the prefetch thread: float64 only under the caller's x64
        for start in range(0, NUM, 7):
            batch = {k: jnp.asarray(v[start : start + 7]) for k, v in host.items()}
            dtypes.append(batch["x"].dtype)
            yield batch

    op = cv.hessian(loss, params, loader)
    v = jax.random.normal(jax.random.key(0), (op.size,))
    assert rel(op @ v, cv.hessian(loss, params, data) @ v) < 1e-12
    assert set(dtypes) == {jnp.dtype(jnp.float64)}
    assert not [t for t in threading.enumerate() if t.name == "curvature-prefetch"]


def test_solvers_and_blocks_accept_streamed_operators(x64, key):
    import curvature.optim

    params, data, model, loss, _ = make_problem("relu", "cross_entropy", num_examples=NUM)
    g_mem = cv.gauss_newton(model, params, data, loss="cross_entropy")
    g_st = cv.gauss_newton(model, params, loader_of(data), loss="cross_entropy")
    b = jax.random.normal(key, (g_mem.size,))
    x_mem = curvature.optim.conjugate_gradient(g_mem, b, damping=0.1, max_steps=20).x
    x_st = curvature.optim.conjugate_gradient(g_st, b, damping=0.1, max_steps=20).x
    assert rel(x_st, x_mem) < 1e-10
    first = [True] + [False] * (len(params) - 1)
    rows = [{"w": f, "b": f} for f in first]
    cols = [{"w": not f, "b": not f} for f in first]
    block_st, block_mem = cv.restrict(g_st, rows, cols), cv.restrict(g_mem, rows, cols)
    x = jax.random.normal(key, (block_mem.shape[1], 3))
    assert rel(block_st @ x, block_mem @ x) < 1e-12


def test_prepared_outside_jit_never_holds_a_closure(x64, key):
    params, data, model, loss, _ = make_problem("tanh", "cross_entropy")
    residual = cv.hessian(loss, params, data) - cv.gauss_newton(
        model, params, data, loss="cross_entropy"
    )
    assert residual.prepared() is residual  # no pullback for a combination: itself, not constants
    fisher = cv.empirical_fisher(loss, params, data)
    assert fisher.prepared() is fisher


def test_wrappers_of_streamed_operators_compose_their_capabilities(x64, key):
    # A block, a preconditioned form and a combination of streamed operators: products and exact
    # diagonals from passes over the data, equal to the in-memory ones (the wrappers compose the
    # streamed operator's host methods; nothing asks what the wrapped operator can do).
    params, data, model, loss, _ = make_problem("tanh", "cross_entropy", num_examples=NUM)
    g_mem = cv.gauss_newton(model, params, data, loss="cross_entropy")
    g_st = cv.gauss_newton(model, params, loader_of(data), loss="cross_entropy")
    h_mem, h_st = cv.hessian(loss, params, data), cv.hessian(loss, params, loader_of(data))
    layer = lambda path, leaf: path[0].idx == 1  # noqa: E731
    p = jnp.linspace(0.5, 2.0, g_mem.size)
    pairs = [
        (cv.restrict(g_st, layer), cv.restrict(g_mem, layer)),
        (cv.preconditioned(g_st, p), cv.preconditioned(g_mem, p)),
        (2.0 * g_st - g_st, 2.0 * g_mem - g_mem),
    ]
    for streamed, in_memory in pairs:
        assert streamed.streamed and streamed.has_fast_diagonal
        exact = [cv.diagonal(op, method="exact").diagonal for op in (streamed, in_memory)]
        assert rel(exact[0], exact[1]) < 1e-12
        x = jax.random.normal(key, (in_memory.size, 2))
        assert rel(streamed @ x, in_memory @ x) < 1e-12
    # A combination of a streamed and an in-memory operator: the residual H - G.
    mixed = cv.eigsh(h_st - g_mem, k=1, num_steps=10, key=key)
    alone = cv.eigsh(h_mem - g_mem, k=1, num_steps=10, key=key)
    assert rel(mixed.eigenvalues, alone.eigenvalues) < 1e-10


def test_blocks_of_streamed_operators_compile_once(x64, key):
    # A block's products from the host are compiled on its ranges alone: a new streamed operator
    # (a fresh loader each training step, say) compiles nothing new and keeps no loader alive.
    from curvature import blocks

    params, data, _, loss, _ = make_problem("tanh", "mse")
    layer = lambda path, leaf: path[0].idx == 0  # noqa: E731
    x = jax.random.normal(key, (cv.restrict(cv.hessian(loss, params, data), layer).size, 2))
    sizes = []
    for _ in range(3):
        block = cv.restrict(cv.hessian(loss, params, lambda: [data]), layer)
        block @ x
        sizes.append((blocks._embed_rows_jit._cache_size(), blocks._extract_rows_jit._cache_size()))
    assert sizes[0] == sizes[1] == sizes[2], sizes


_BLOCKED_LOADER = """
import threading
import jax.numpy as jnp
import curvature as cv

calls = []


def loader():  # the second call blocks in the user's own code, as a stuck reader would
    calls.append(None)
    if len(calls) > 1:
        print("blocked", flush=True)
        threading.Event().wait()
    yield {"x": jnp.ones((4, 3))}


op = cv.hessian(lambda w, b: jnp.mean((b["x"] @ w) ** 2), jnp.ones(3), loader, check=False)
op @ jnp.ones(3)
"""


def test_ctrl_c_interrupts_a_loader_blocked_in_its_own_code():
    import signal
    import subprocess
    import sys

    child = subprocess.Popen(
        [sys.executable, "-c", SIGINT_HANDLER + _BLOCKED_LOADER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "blocked"
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=20)  # hung forever before (an unbounded join)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode != 0 and "KeyboardInterrupt" in err, err[-2000:]


def test_a_loader_must_yield_the_same_examples_on_every_pass(x64):
    params, data, _, loss, _ = make_problem("tanh", "mse", num_examples=NUM)
    host = jax.tree_util.tree_map(np.asarray, data)
    seeds = iter(range(100))

    def drawn(replace):  # a fresh draw of the examples on every pass, as many of them
        def loader():
            rng = np.random.default_rng(next(seeds))
            order = rng.choice(NUM, NUM, replace=replace)
            for start in range(0, NUM, 7):
                yield {k: v[order[start : start + 7]] for k, v in host.items()}

        return loader

    v = jnp.ones(cv.hessian(loss, params, data).size)
    resampled = cv.hessian(loss, params, drawn(replace=True))
    resampled @ v
    with pytest.raises(ValueError, match="batch 0 from the loader holds other examples"):
        resampled @ v
    # The same examples in another order every pass: the same operator, accepted.
    shuffled = cv.hessian(loss, params, drawn(replace=False))
    assert rel(shuffled @ v, cv.hessian(loss, params, data) @ v) < 1e-12
    assert rel(shuffled @ v, cv.hessian(loss, params, data) @ v) < 1e-12


def test_bad_batches_from_a_loader_are_named(x64):
    params, data, _, loss, _ = make_problem("relu", "mse", num_examples=NUM)
    host = jax.tree_util.tree_map(np.asarray, data)
    n = cv.hessian(loss, params, data).size

    def wider():  # the second batch has more features than the model takes
        yield {k: v[:7] for k, v in host.items()}
        yield {"x": np.concatenate([host["x"][7:]] * 2, axis=1), "y": host["y"][7:]}

    with pytest.raises(
        TypeError, match=r"batch 1 .*\['x'\] \(16, 8\) \(the first batch: \(7, 4\)\)"
    ):
        cv.hessian(loss, params, wider) @ jnp.ones(n)
    with pytest.raises(TypeError, match="batch 0 .* holds a str.*lambda: \\[data\\]"):
        cv.hessian(loss, params, lambda: host)  # iterates over the dict's keys
    # numpy integers are integers.
    assert cv.hessian(loss, params, cv.batches(host, np.int64(10))).streamed

"""Conv-net matvecs inside compiled loops on CPU (issue 8, item 6).

A small CNN's Hessian-vector product is ~20x slower inside the compiled Lanczos / trace loops than
as one jitted call on the CPU backend. Cause: XLA:CPU's ``ConvCanonicalization`` pass rewrites
non-canonical convolutions (anything but input NHWC, kernel HWIO, output NHWC) into
transpose + canonical convolution + transpose, which Eigen's multithreaded kernel runs, but it only
visits ``module->entry_computation()``. The transposed convolutions of the backward pass (weight
gradient ``f01b_i01o->01bf``, input gradient ``b01f_01oi->b01f``) that sit in a ``while`` body
(``fori_loop``, ``scan``, ``lax.map``) stay non-canonical and fall back to XLA's naive emitted
convolution loop.

The library's formulation (``curvature/_conv.py``, applied by the builders on the CPU backend to
functions that contain a convolution): the matvec's jaxpr is re-emitted with every
``conv_general_dilated`` canonical before XLA sees it (the same transposes the XLA pass would add),
recursing into nested jaxprs (``scan`` over data chunks, ``cond``, ``custom_jvp``). "plain" below
is the same operator built with the rewrite switched off.

Measured, on one run (times are medians; loop figures are total / matvecs, compile excluded by
ahead-of-time compilation):

* standalone jitted ``op.matvec`` (and the chunked operator's, ``batch_size=N/4``: its scan over
  chunks is itself a loop);
* per-matvec time inside ``eigsh(k=5)``, ``lanczos`` and ``trace(method="hutchinson")``, for the
  operator without the rewrite ("plain") and with it (the library's default);
* the same for an MLP 64-128-128-10 (no convolutions: the rewrite must change nothing).

    python benchmarks/bench_cnn_loops.py   # ~2 minutes on 2 CPU cores

Writes benchmarks/results/cnn_loops_<backend>.json and .png (time per matvec / standalone
matvec time, plain and rewritten) and prints a Markdown table.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from _timing import median_time
from jax import lax
from sklearn.datasets import load_digits

import curvature as cv
from curvature import _conv

NUM_EXAMPLES = 512
CHANNELS = (8, 16)
STEPS = 20  # Lanczos steps / Hutchinson probes (the slow baseline bounds the run time)
K = 5
RESULTS = pathlib.Path(__file__).parent / "results"


# --------------------------------------------------------------------------------------------
# The operator with and without the library's rewrite (curvature/_conv.py).


def build(loss, params, data, *, rewrite: bool, batch_size=None) -> cv.LinearOperator:
    """The Hessian operator with the library's CPU convolution rewrite on (the default) or off."""
    _conv.enabled = rewrite
    try:
        return cv.hessian(loss, params, data, batch_size=batch_size)
    finally:
        _conv.enabled = True


# --------------------------------------------------------------------------------------------
# Models on scikit-learn's digits.


def digits(n: int):
    d = load_digits()
    x = (d.images[:n] / 16.0).astype(np.float32)[..., None]  # (n, 8, 8, 1), NHWC
    return {"x": jnp.asarray(x), "y": jnp.asarray(d.target[:n].astype(np.int32))}


def cross_entropy(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def cnn_problem(n: int):
    keys = jax.random.split(jax.random.key(0), len(CHANNELS) + 1)
    sizes = (1, *CHANNELS)
    params = {
        f"conv{i}": {
            "w": jax.random.normal(keys[i], (3, 3, a, b)) * np.sqrt(2.0 / (9 * a)),
            "b": jnp.zeros(b),
        }
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    }
    params["dense"] = {
        "w": jax.random.normal(keys[-1], (CHANNELS[-1], 10)) / np.sqrt(CHANNELS[-1]),
        "b": jnp.zeros(10),
    }

    def loss(p, batch):
        h = batch["x"]
        for i in range(len(CHANNELS)):
            h = lax.conv_general_dilated(
                h, p[f"conv{i}"]["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            h = jax.nn.relu(h + p[f"conv{i}"]["b"])
        logits = h.mean(axis=(1, 2)) @ p["dense"]["w"] + p["dense"]["b"]
        return cross_entropy(logits, batch["y"])

    return loss, params, digits(n)


def mlp_problem(n: int):
    sizes = (64, 128, 128, 10)
    keys = jax.random.split(jax.random.key(1), len(sizes) - 1)
    params = [
        {"w": jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]

    def loss(p, batch):
        h = batch["x"].reshape(batch["x"].shape[0], -1)
        for layer in p[:-1]:
            h = jax.nn.relu(h @ layer["w"] + layer["b"])
        return cross_entropy(h @ p[-1]["w"] + p[-1]["b"], batch["y"])

    return loss, params, digits(n)


# --------------------------------------------------------------------------------------------
# Timing.


def standalone(ops: dict, rounds: int = 9) -> dict:
    """Median ``op.matvec`` times, the operators alternating each round (shared 2-core load)."""
    v = jax.random.normal(jax.random.key(7), (next(iter(ops.values())).size,))
    for op in ops.values():
        jax.block_until_ready(op.matvec(v))
    times = {name: [] for name in ops}
    for _ in range(rounds):
        for name, op in ops.items():
            t0 = time.perf_counter()
            jax.block_until_ready(op.matvec(v))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


ESTIMATORS = {
    "eigsh": (lambda op, key: cv.eigsh(op, k=K, num_steps=STEPS, key=key).eigenvalues, STEPS + K),
    "lanczos": (lambda op, key: cv.lanczos(op, num_steps=STEPS, key=key).alphas, STEPS),
    "trace": (
        lambda op, key: cv.trace(op, num_matvecs=STEPS, key=key, method="hutchinson").value,
        STEPS,
    ),
}


def in_loops(op, repeats: int) -> dict:
    """Seconds per matvec inside each compiled estimator (compiled ahead of time, not timed)."""
    key = jax.random.key(3)
    out = {}
    for name, (run, matvecs) in ESTIMATORS.items():
        compiled = jax.jit(run).lower(op, key).compile()
        out[name] = median_time(compiled, op, key, repeats=repeats) / matvecs
    return out


def check_same(op, other) -> float:
    v = jax.random.normal(jax.random.key(5), (op.size,))
    a, b = op.matvec(v), other.matvec(v)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))


def main():
    started = time.perf_counter()
    results = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "num_examples": NUM_EXAMPLES,
        "cnn_channels": list(CHANNELS),
        "steps": STEPS,
        "k": K,
    }
    rows = []

    loss, params, data = cnn_problem(NUM_EXAMPLES)
    op = build(loss, params, data, rewrite=False)
    chunked = build(loss, params, data, rewrite=False, batch_size=NUM_EXAMPLES // 4)
    new = build(loss, params, data, rewrite=True)
    new_chunked = build(loss, params, data, rewrite=True, batch_size=NUM_EXAMPLES // 4)
    results["cnn_num_params"] = op.size
    results["cnn_rel_diff_rewritten"] = check_same(op, new)
    results["cnn_rel_diff_chunked_rewritten"] = check_same(op, new_chunked)
    alone = standalone({"op": op, "new": new})
    alone_chunked = standalone({"op": chunked, "new": new_chunked}, rounds=3)
    base = in_loops(op, repeats=1)  # ~20x slower: one timed run each
    fast = in_loops(new, repeats=3)
    results["cnn"] = {
        "standalone_matvec_s": alone["op"],
        "standalone_matvec_rewritten_s": alone["new"],
        "chunked_standalone_matvec_s": alone_chunked["op"],
        "chunked_standalone_matvec_rewritten_s": alone_chunked["new"],
        "per_matvec_in_loop_s": base,
        "per_matvec_in_loop_rewritten_s": fast,
    }
    ref = alone["op"]
    rows.append(("CNN", "standalone `op.matvec`", ref, alone["new"], ref))
    rows.append(
        (
            "CNN",
            f"chunked (batch_size={NUM_EXAMPLES // 4}) standalone",
            *alone_chunked.values(),
            ref,
        )
    )
    rows += [("CNN", f"per matvec in `{n}`", base[n], fast[n], ref) for n in ESTIMATORS]

    loss, params, data = mlp_problem(1797)
    op = build(loss, params, data, rewrite=False)
    new = build(loss, params, data, rewrite=True)
    results["mlp_num_params"] = op.size
    alone = standalone({"op": op, "new": new}, rounds=15)
    base, fast = in_loops(op, repeats=5), in_loops(new, repeats=5)
    results["mlp"] = {
        "standalone_matvec_s": alone["op"],
        "standalone_matvec_rewritten_s": alone["new"],
        "per_matvec_in_loop_s": base,
        "per_matvec_in_loop_rewritten_s": fast,
    }
    ref = alone["op"]
    rows.append(("MLP", "standalone `op.matvec`", ref, alone["new"], ref))
    rows += [("MLP", f"per matvec in `{n}`", base[n], fast[n], ref) for n in ESTIMATORS]
    results["wall_s"] = time.perf_counter() - started

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"cnn_loops_{results['backend']}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"jax {results['jax']}, {results['backend']}, matmul precision "
        f"{results['matmul_precision']}; CNN n={results['cnn_num_params']}, "
        f"MLP n={results['mlp_num_params']}, {STEPS} steps/probes, k={K}\n"
    )
    print(
        "| model | measure | plain (ms) | rewritten (ms) | plain / standalone | rewritten / standalone |"
    )
    print("|---|---|---|---|---|---|")
    for model, what, a, b, ref in rows:
        print(
            f"| {model} | {what} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / ref:.2f} | {b / ref:.2f} |"
        )
    figure(rows, path.with_suffix(".png"), results)
    print(f"\nwrote {path} and its .png ({results['wall_s']:.0f} s)")


def figure(rows, path, results) -> None:
    """Bars: each measure's time over the plain standalone matvec, plain and rewritten."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{model}: {what.replace('`', '')}" for model, what, *_ in rows]
    plain = [a / ref for _, _, a, _, ref in rows]
    fast = [b / ref for _, _, _, b, ref in rows]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.4))
    ax.barh(y - 0.2, plain, 0.4, label="plain (XLA as is)", color="tab:red")
    ax.barh(y + 0.2, fast, 0.4, label="rewritten (curvature's default on CPU)", color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(2.0, color="k", lw=0.8, ls="--", label="2x standalone (the target)")
    ax.set_xscale("log")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("time per matvec / standalone matvec time (log)")
    ax.set_title(
        f"Conv net vs MLP matvecs inside compiled loops, {results['backend']} "
        f"({results['cpu_count']} cores), jax {results['jax']}",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

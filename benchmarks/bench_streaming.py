"""Streamed data (issue 9): ``eigsh`` on data read batch by batch from the host against the same
data in memory, and the HVP cost of a prepared operator.

Model: ``bench_core``'s ReLU MLP at 784-128-128-10 (118,282 parameters), 8,192 Gaussian examples
with random labels, softmax cross-entropy, float32; ``eigsh(k=5, num_steps=30)``. Cases (timed in alternation
after one untimed call each, so that compilation is excluded and machine load hits all alike):

* in memory, one chunk (the default: the whole estimator one compiled program, the forward pass
  linearised once);
* in memory, ``batch_size=2048`` (chunks scanned inside the compiled matvec);
* streamed from numpy arrays, ``curvature.batches(data, 2048)``;
* streamed from ``.npy`` memmaps on disk, batches of 2048;
* streamed from memmaps in batches of 3,000 (a shorter last batch: two compiled shapes).

    python benchmarks/bench_streaming.py            # about 3 minutes on 2 cores
    python benchmarks/bench_streaming.py --quick    # a small model, to check the script

Writes benchmarks/results/streaming_<platform>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from _timing import interleaved, once, write_result
from bench_core import build

import curvature as cv


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, to check the script")
    args = parser.parse_args()
    sizes, num, batch, rounds = (
        ((64, 32, 10), 1024, 256, 1) if args.quick else ((784, 128, 128, 10), 8192, 2048, 3)
    )
    params, data, loss = build(sizes, num)
    data = jax.tree_util.tree_map(np.asarray, data)  # on the host, as a loader would read it
    folder = pathlib.Path(tempfile.mkdtemp(prefix="curvature-bench-"))
    for name, array in data.items():
        np.save(folder / f"{name}.npy", array)
    mapped = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in data}

    operators = {
        "in_memory": cv.hessian(loss, params, data),
        "in_memory_chunked": cv.hessian(loss, params, data, batch_size=batch),
        "streamed_arrays": cv.hessian(loss, params, cv.batches(data, batch)),
        "streamed_memmap": cv.hessian(loss, params, cv.batches(mapped, batch)),
        "streamed_memmap_uneven": cv.hessian(loss, params, cv.batches(mapped, 3 * num // 8)),
    }
    key = jax.random.key(0)
    calls = {
        name: (lambda op=op: cv.eigsh(op, k=5, num_steps=30, key=key).eigenvalues, ())
        for name, op in operators.items()
    }
    medians, first = interleaved(calls, rounds=rounds)
    values = {name: np.asarray(fn()).tolist() for name, (fn, _) in calls.items()}
    ref = np.asarray(values["in_memory"])
    out = {
        "n": operators["in_memory"].size,
        "examples": num,
        "batch": batch,
        "eigsh": "k=5, num_steps=30",
        "seconds": medians,
        "first_call_seconds": first,
        "over_in_memory": {k: v / medians["in_memory"] for k, v in medians.items()},
        "over_in_memory_chunked": {k: v / medians["in_memory_chunked"] for k, v in medians.items()},
        "eigenvalues": values,
        "max_rel_diff_from_in_memory": {
            k: float(np.max(np.abs(np.asarray(v) - ref) / np.abs(ref))) for k, v in values.items()
        },
    }

    # The HVP of a prepared operator (linearisation held as arrays) against a gradient.
    op = operators["in_memory"]
    prepared = op.prepared()
    v = jax.random.normal(jax.random.key(1), (op.size,), jnp.float32)
    grad = jax.jit(jax.grad(loss))
    device_data = jax.tree_util.tree_map(jnp.asarray, data)
    hvp, _ = interleaved(
        {
            "grad_s": (grad, (params, device_data)),
            "hvp_s": (op.matvec, (v,)),
            "prepared_hvp_s": (prepared.matvec, (v,)),
        },
        rounds=5 * rounds,
    )
    out["hvp"] = {**hvp, "prepare_s": once(lambda: jax.tree_util.tree_leaves(op.prepared()))}
    name = "streaming_quick" if args.quick else f"streaming_{jax.default_backend()}"
    write_result(out, name, table(out))


def table(r):
    lines = [
        f"eigsh ({r['eigsh']}), n={r['n']:,}, {r['examples']:,} examples, batches of {r['batch']}",
        "",
        "| data | seconds | / in memory | / in memory, chunked | max rel. diff. of values |",
        "|---|---|---|---|---|",
    ]
    for k, s in r["seconds"].items():
        lines.append(
            f"| {k} | {s:.2f} | {r['over_in_memory'][k]:.2f} | "
            f"{r['over_in_memory_chunked'][k]:.2f} | {r['max_rel_diff_from_in_memory'][k]:.1e} |"
        )
    h = r["hvp"]
    lines += [
        "",
        f"HVP / gradient: {h['hvp_s'] / h['grad_s']:.2f}; prepared HVP / gradient: "
        f"{h['prepared_hvp_s'] / h['grad_s']:.2f} (preparing: {h['prepare_s']:.3f} s)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

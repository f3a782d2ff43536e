"""Curvature by blocks: the first call (compilation included) and a repeat of
``curvature.block_summary`` of H, G and R = H - G on shared probes, with and without each block's
top eigenvalue, on the main job's network.

    python benchmarks/bench_blocks.py     # ~1 minute on 2 CPU cores; writes results/blocks_cpu.json

A 64-32-32-10 tanh MLP (3,466 parameters, three layers) on 1,348 Gaussian examples with random
labels, softmax cross-entropy, float32, 32 probes a layer: the shapes of ``configs/relu_vs_smooth.py``'s
``blocks`` measurement. The probe statistics of every block are one compiled program (compiled
once per number of groups and probes); each block's top eigenvalue (``num_steps``) is a Lanczos
run on that block, compiled per block shape.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from _timing import write_result

import curvature as cv

SIZES = (64, 32, 32, 10)
EXAMPLES = 1348


def problem():
    key = jax.random.key(0)
    params = [
        {
            "w": jax.random.normal(jax.random.fold_in(key, i), (a, b)) / np.sqrt(a),
            "b": jnp.zeros(b),
        }
        for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True))
    ]
    data = {
        "x": jax.random.normal(key, (EXAMPLES, SIZES[0])),
        "y": jax.random.randint(jax.random.fold_in(key, 1), (EXAMPLES,), 0, SIZES[-1]),
    }

    def model(p, batch):
        h = batch["x"]
        for layer in p[:-1]:
            h = jnp.tanh(h @ layer["w"] + layer["b"])
        return h @ p[-1]["w"] + p[-1]["b"]

    def loss(p, batch):
        out = model(p, batch)
        return jnp.mean(jax.nn.logsumexp(out, -1) - out[jnp.arange(out.shape[0]), batch["y"]])

    H = cv.hessian(loss, params, data)
    G = cv.gauss_newton(model, params, data, loss="cross_entropy")
    return H, G


def main():
    H, G = problem()
    key = jax.random.key(1)
    out = {"num_params": H.size, "examples": EXAMPLES, "layers": len(SIZES) - 1, "probes": 32}
    for name, steps in (("statistics", 0), ("with_top_eigenvalues", 20)):
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            summaries = cv.block_summary((H, G, H - G), key=key, num_matvecs=32, num_steps=steps)
            jax.block_until_ready(jax.tree_util.tree_leaves(summaries))
            times.append(time.perf_counter() - t0)
        out[name] = {"first_call_s": times[0], "repeat_s": times[1], "num_steps": steps}
        print(f"{name}: first call {times[0]:.2f} s, repeat {times[1]:.2f} s", flush=True)
    table = "\n".join(
        [
            "| block_summary of (H, G, H - G) | first call (s) | repeat (s) |",
            "|---|---|---|",
            *(
                f"| {name} | {out[name]['first_call_s']:.2f} | {out[name]['repeat_s']:.2f} |"
                for name in ("statistics", "with_top_eigenvalues")
            ),
        ]
    )
    write_result(out, f"blocks_{jax.default_backend()}", table)


if __name__ == "__main__":
    main()

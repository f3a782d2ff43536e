"""Core-library benchmark (issue 2): HVP cost, eigsh overhead, Lanczos vs power iteration, compile.

Model: a 784-512-512-10 ReLU MLP (669,706 parameters), 8,192 Gaussian examples with random labels,
softmax cross-entropy, float32. Every figure is a ratio of times measured in this one run.

    python benchmarks/bench_core.py            # full run, a few minutes on 2 cores
    python benchmarks/bench_core.py --quick    # smaller model, to check the script

Writes benchmarks/results/core_<platform>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from _timing import interleaved, median_time, write_result

import curvature as cv


def timed(fn, *args, repeats=5):
    """Median wall time of ``fn(*args)`` after one warm-up call (which compiles)."""
    return median_time(fn, *args, repeats=repeats, warm_up=True)


def compile_seconds(jitted, *args, **static):
    """Ahead-of-time compile time of a jitted function for these arguments (no execution)."""
    lowered = jitted.lower(*args, **static)
    t0 = time.perf_counter()
    lowered.compile()
    return time.perf_counter() - t0


def build(sizes, num_examples, seed=0):
    key = jax.random.key(seed)
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        params.append(
            {
                "w": jax.random.normal(jax.random.fold_in(key, i), (a, b)) * np.sqrt(2.0 / a),
                "b": jnp.zeros(b),
            }
        )
    x = jax.random.normal(jax.random.fold_in(key, 100), (num_examples, sizes[0]))
    y = jax.random.randint(jax.random.fold_in(key, 101), (num_examples,), 0, sizes[-1])

    def loss(p, batch):
        h = batch["x"]
        for layer in p[:-1]:
            h = jax.nn.relu(h @ layer["w"] + layer["b"])
        logits = h @ p[-1]["w"] + p[-1]["b"]
        logz = jax.nn.logsumexp(logits, axis=-1)
        return jnp.mean(logz - jnp.take_along_axis(logits, batch["y"][:, None], -1)[:, 0])

    return params, {"x": x, "y": y}, loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, to check the script")
    args = parser.parse_args()
    sizes, num_examples = ((784, 64, 64, 10), 1024) if args.quick else ((784, 512, 512, 10), 8192)
    params, data, loss = build(sizes, num_examples)
    op = cv.hessian(loss, params, data)
    n = op.size
    v = jax.random.normal(jax.random.key(1), (n,), jnp.float32)
    out = {"n": n, "examples": num_examples, "sizes": sizes}

    # --- HVP versus gradient --------------------------------------------------------------
    grad = jax.jit(jax.grad(loss))
    plain_hvp = jax.jit(lambda p, t: jax.jvp(lambda q: jax.grad(loss)(q, data), (p,), (t,))[1])
    tangent = op.unravel(v)
    _, lin = jax.linearize(lambda q: jax.grad(loss)(q, data), params)
    linearized = jax.jit(lin)
    prepared = op.prepared()  # the gradient's pullback held as arrays: H v = (v^T H)^T
    medians, _ = interleaved(
        {
            "grad_s": (grad, (params, data)),
            "plain_jvp_grad_hvp_s": (plain_hvp, (params, tangent)),
            "curvature_hvp_s": (op.matvec, (v,)),
            "prepared_hvp_s": (prepared.matvec, (v,)),
            "linearized_hvp_s": (linearized, (tangent,)),
        }
    )
    out.update(medians)
    out["hvp_over_grad"] = out["curvature_hvp_s"] / out["grad_s"]
    out["plain_hvp_over_grad"] = out["plain_jvp_grad_hvp_s"] / out["grad_s"]
    out["hvp_over_plain_hvp"] = out["curvature_hvp_s"] / out["plain_jvp_grad_hvp_s"]
    out["linearized_hvp_over_grad"] = out["linearized_hvp_s"] / out["grad_s"]
    out["prepared_hvp_over_grad"] = out["prepared_hvp_s"] / out["grad_s"]
    print(f"n={n}: grad {out['grad_s']:.3f}s, HVP {out['curvature_hvp_s']:.3f}s", flush=True)

    # --- eigsh with 100 Lanczos steps versus 100 HVPs ----------------------------------------
    key = jax.random.key(0)
    for steps in (20, 100):
        run = jax.jit(lambda o, k, steps=steps: cv.lanczos(o, num_steps=steps, key=k))
        out[f"lanczos{steps}_compile_s"] = compile_seconds(run, op, key)
    out["compile_100_over_20"] = out["lanczos100_compile_s"] / out["lanczos20_compile_s"]
    eigsh100 = timed(lambda: cv.eigsh(op, k=5, num_steps=100, key=key), repeats=1)
    out["eigsh100_s"] = eigsh100
    out["eigsh100_over_100_hvps"] = eigsh100 / (100 * out["curvature_hvp_s"])
    # The cost of one Lanczos step (a matvec plus re-orthogonalisation) in gradients.
    out["eigsh100_step_over_grad"] = eigsh100 / (105 * out["grad_s"])
    print(
        f"eigsh(100 steps) {eigsh100:.2f}s = {out['eigsh100_over_100_hvps']:.3f} x 100 HVPs",
        flush=True,
    )

    # --- top-5 to 1e-4 relative: Lanczos versus power iteration ----------------------------
    reference = cv.eigsh(op, k=5, num_steps=min(n, 150), key=jax.random.key(7))
    ref = np.asarray(reference.eigenvalues, np.float64)
    out["top5_reference"] = ref.tolist()

    def rel_error(values):
        return float(np.max(np.abs(np.sort(np.asarray(values))[::-1] - ref) / np.abs(ref)))

    for steps in (10, 15, 20, 30, 40, 60, 80, 100):
        call = lambda s=steps: cv.eigsh(op, k=5, num_steps=s, key=key)  # noqa: E731
        t = timed(call, repeats=1)
        err = rel_error(call().eigenvalues)
        if err <= 1e-4:
            out["eigsh_top5"] = {
                "num_steps": steps,
                "matvecs": steps + 5,
                "seconds": t,
                "rel_error": err,
            }
            break
    print(f"eigsh top-5: {out.get('eigsh_top5')}", flush=True)
    for tol in (1e-2, 3e-3, 1e-3, 3e-4, 1e-4):
        call = lambda t=tol: cv.power_iteration(op, k=5, key=key, max_steps=1000, tol=t)  # noqa: E731
        t0 = time.perf_counter()
        res = jax.block_until_ready(call())
        wall = time.perf_counter() - t0  # includes compile on the first tol only; re-time below
        err = rel_error(res.eigenvalues)
        print(f"  power tol={tol}: {int(res.num_matvecs)} matvecs, err {err:.2e}", flush=True)
        if err <= 1e-4:
            wall = timed(call, repeats=1)
            out["power_top5"] = {
                "tol": tol,
                "matvecs": int(res.num_matvecs),
                "seconds": wall,
                "rel_error": err,
                "iters_per_pair": np.asarray(res.num_iters).tolist(),
            }
            break
    if "eigsh_top5" in out and "power_top5" in out:
        out["power_over_eigsh_matvecs"] = (
            out["power_top5"]["matvecs"] / out["eigsh_top5"]["matvecs"]
        )
        out["power_over_eigsh_seconds"] = (
            out["power_top5"]["seconds"] / out["eigsh_top5"]["seconds"]
        )

    name = "core_quick" if args.quick else f"core_{jax.default_backend()}"
    write_result(out, name, table(out))


def table(r):
    rows = [
        ("gradient (s)", f"{r['grad_s']:.3f}"),
        ("HVP, curvature.hessian (s)", f"{r['curvature_hvp_s']:.3f}"),
        ("HVP / gradient", f"{r['hvp_over_grad']:.2f}"),
        ("plain jvp(grad) HVP / gradient", f"{r['plain_hvp_over_grad']:.2f}"),
        ("curvature HVP / plain jvp(grad) HVP", f"{r['hvp_over_plain_hvp']:.3f}"),
        ("linearize-once HVP / gradient", f"{r['linearized_hvp_over_grad']:.2f}"),
        ("HVP of H.prepared() / gradient", f"{r['prepared_hvp_over_grad']:.2f}"),
        ("eigsh, 100 steps, full reorth. / 100 HVPs", f"{r['eigsh100_over_100_hvps']:.3f}"),
        ("eigsh, one step (matvec + reorth.) / gradient", f"{r['eigsh100_step_over_grad']:.2f}"),
        ("compile: Lanczos 20 steps (s)", f"{r['lanczos20_compile_s']:.2f}"),
        ("compile: Lanczos 100 steps (s)", f"{r['lanczos100_compile_s']:.2f}"),
    ]
    if "eigsh_top5" in r:
        e = r["eigsh_top5"]
        rows.append(("top-5 to 1e-4, eigsh: matvecs / s", f"{e['matvecs']} / {e['seconds']:.1f}"))
    if "power_top5" in r:
        p = r["power_top5"]
        rows.append(
            ("top-5 to 1e-4, power iteration: matvecs / s", f"{p['matvecs']} / {p['seconds']:.1f}")
        )
    lines = ["| measure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

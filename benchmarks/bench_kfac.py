"""K-FAC benchmark (issue 18): construction, inverse and products against one gradient.

Model: bench_core's 784-512-512-10 ReLU MLP (669,706 parameters), 8,192 Gaussian examples with
random labels, softmax cross-entropy, float32. Every time is a median of interleaved rounds and
every figure a ratio to a gradient of the mean loss over the same data, measured in this run:

* ``curvature.kfac`` with ``fisher="exact"`` (10 backward passes an example), ``"mc"`` (one
  sample) and ``"empirical"``, and ``curvature.ekfac``, against an exact K-FAC of this MLP
  written by hand; each compiled by a first call (timed: first call - median, and what JAX's
  monitoring events count as tracing, lowering and XLA compilation in it), then rebuilt at new
  parameters of the same shapes, which must not add a program to the statistics' cache;
* ``curvature.inverse(kfac, damping=1e-3)`` (the factors' eigendecompositions; also with
  OpenBLAS limited to one thread) and one product with it, against one product with K-FAC,
  EK-FAC and the Gauss-Newton matrix;
* the bytes of the factors against the parameters', and the compiled construction's working
  memory.

    python benchmarks/bench_kfac.py            # full run, 6-9 minutes on 2 shared cores
    python benchmarks/bench_kfac.py --quick    # smaller model, to check the script

Writes benchmarks/results/kfac_<platform>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import pathlib
import resource
import subprocess

import jax
import jax.numpy as jnp
from _timing import interleaved, once, write_result
from bench_core import build
from jax import monitoring

import curvature as cv

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # not a dependency of the library (scikit-learn brings it)
    threadpool_limits = None

# The modules, not the functions of the same name that curvature exports.
_kfac = importlib.import_module("curvature.kfac")
_fisher = importlib.import_module("curvature.fisher")

DAMPING = 1e-3
FISHERS = ("exact", "mc", "empirical")


def mlp(params, batch):
    """bench_core's MLP as ``model(params, batch) -> logits`` (its ``build`` returns the loss)."""
    h = batch["x"]
    for layer in params[:-1]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def hand_kfac(params, batch):
    """Exact K-FAC of this MLP written out: the forward pass keeping each layer's input, the
    softmax Hessian's 10 square-root columns propagated back through the pre-activations as one
    matrix product per layer, and each factor one matrix product. A reference for the library's
    general construction (the same factors)."""
    n = batch["x"].shape[0]
    inputs, pre = [], []
    h = batch["x"]
    for i, layer in enumerate(params):
        inputs.append(h)
        pre.append(h @ layer["w"] + layer["b"])
        h = jax.nn.relu(pre[-1]) if i < len(params) - 1 else pre[-1]
    probs = jax.nn.softmax(h, axis=-1)
    root = jnp.sqrt(probs)
    classes = probs.shape[-1]
    # (n, k, classes): column k of diag(√p) - p √p^T, so that sum_k u_k u_k^T = diag(p) - p p^T
    g = root[:, :, None] * jnp.eye(classes) - root[:, :, None] * probs[:, None, :]
    grads = [g]
    for i in range(len(params) - 1, 0, -1):
        g = (g @ params[i]["w"].T) * (pre[i - 1] > 0)[:, None, :]
        grads.append(g)
    factors = []
    hi = jax.lax.Precision.HIGHEST  # as the library accumulates its factors
    for a, g in zip(inputs, grads[::-1], strict=True):
        a = jnp.concatenate([a, jnp.ones((n, 1), a.dtype)], axis=-1)
        g = g.reshape(-1, g.shape[-1])
        factors.append((jnp.matmul(a.T, a, precision=hi) / n, jnp.matmul(g.T, g, precision=hi) / n))
    return factors


def inverse_one_blas_thread(op):
    with threadpool_limits(1, user_api="blas"):
        return jax.block_until_ready(cv.inverse(op, damping=DAMPING))


def code_version() -> str:
    """The commit of the measured ``curvature`` (the imported one), ``+dirty`` if changed."""
    where = pathlib.Path(cv.__file__).parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--", "."],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return f"{where} (no git)"
    return f"{commit}{'+dirty' if dirty else ''} ({where})"


def nbytes(tree) -> int:
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(tree)))


def statistics_memory(params, data) -> dict:
    """The compiled exact construction's memory (``memory_analysis``): what its one program over
    all the data needs, the most of the three Fishers (10 cotangents an example). Compiled anew
    from a fresh copy of the library's jitted program, whose caches stay as they are."""
    layout, batching, data, model, out_loss, spec = _kfac._build(
        mlp, params, data, loss="cross_entropy", targets=None, batch_size=None, fisher="exact",
        num_samples=1, key=None, check=False, what="kfac",
    )  # fmt: skip
    fresh = jax.jit(lambda *a: _kfac._statistics.__wrapped__(*a), static_argnums=(4, 5))
    compiled = fresh.lower(model, out_loss, params, {"batch": data}, batching, spec).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    return {
        "temp_bytes": int(stats.temp_size_in_bytes),
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
    }


class CompileLog:
    """Tracing, lowering and XLA compilation during a call, from JAX's monitoring events: what
    a first call spends compiling, apart from the noise of timing one call on a shared
    machine."""

    _STAGES = {
        "jaxpr_trace_duration": "trace_s",
        "jaxpr_to_mlir_module_duration": "lower_s",
        "backend_compile_duration": "compile_s",
    }

    def __init__(self):
        self.totals = None
        monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **_):
        stage = self._STAGES.get(event.rsplit("/", 1)[-1])
        if self.totals is not None and stage is not None:
            self.totals[stage] += duration
            if stage == "compile_s":
                self.totals["programs"] += 1

    def first_call(self, fn, *args) -> tuple[float, dict]:
        """``once(fn, *args)`` and what it spent compiling."""
        self.totals = dict.fromkeys(("trace_s", "lower_s", "compile_s", "programs"), 0)
        try:
            seconds = once(fn, *args)
            return seconds, self.totals
        finally:
            self.totals = None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, to check the script")
    args = parser.parse_args()
    sizes, num_examples = ((784, 64, 64, 10), 1024) if args.quick else ((784, 512, 512, 10), 8192)
    rounds_build, rounds_product = (3, 5) if args.quick else (11, 31)
    params, data, loss = build(sizes, num_examples)
    params_new = build(sizes, num_examples, seed=1)[0]  # new values, the same shapes
    key = jax.random.key(3)
    out = {
        "n": int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
        "examples": num_examples,
        "sizes": sizes,
        "damping": DAMPING,
        "rounds": {"construction": rounds_build, "products": rounds_product},
        "date": datetime.date.today().isoformat(),
        "curvature": code_version(),
    }
    load_start = list(os.getloadavg())  # 1, 5 and 15 minutes: how shared the machine was
    grad = jax.jit(jax.grad(loss))

    def builder(fisher, approx=cv.kfac):
        extra = {"num_samples": 1, "key": key} if fisher == "mc" else {}
        return lambda p: approx(mlp, p, data, loss="cross_entropy", fisher=fisher, **extra)

    builders = {f"kfac_{f}": builder(f) for f in FISHERS}
    builders["ekfac_exact"] = builder("exact", cv.ekfac)

    # --- first calls (compilation), then new parameters of the same shapes ------------------
    log = CompileLog()
    first, compiling, rebuild, cache = {}, {}, {}, {}
    for name, make in builders.items():
        first[name], compiling[name] = log.first_call(make, params)
        before = (_kfac._statistics._cache_size(), _fisher._draw._cache_size())
        rebuild[name] = once(make, params_new)
        after = (_kfac._statistics._cache_size(), _fisher._draw._cache_size())
        cache[name] = {"statistics": [before[0], after[0]], "mc_draw": [before[1], after[1]]}
        print(f"{name}: first {first[name]:.2f}s, new params {rebuild[name]:.2f}s, "
              f"statistics cache {before[0]} -> {after[0]}", flush=True)  # fmt: skip
    out["new_params_recompiled"] = {
        n: c["statistics"][1] > c["statistics"][0] for n, c in cache.items()
    }
    out["cache_sizes"] = cache
    out["new_params_s"] = rebuild

    op = builders["kfac_exact"](params)
    reference = jax.jit(hand_kfac)
    first["hand_kfac_exact"], compiling["hand_kfac_exact"] = log.first_call(reference, params, data)
    first["inverse"], compiling["inverse"] = log.first_call(
        lambda o: cv.inverse(o, damping=DAMPING), op
    )
    hand = reference(params, data)
    out["hand_max_rel_diff"] = max(
        float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
        for (a, b), f in zip(hand, op.kronecker, strict=True)
        for x, y in ((a, f.A), (b, f.B))
    )

    # --- constructions against a gradient -------------------------------------------------
    calls = {"grad": (grad, (params, data))}
    calls.update({name: (make, (params,)) for name, make in builders.items()})
    calls["hand_kfac_exact"] = (reference, (params, data))
    calls["inverse"] = (lambda o: cv.inverse(o, damping=DAMPING), (op,))
    if threadpool_limits is not None:
        # JAX's CPU eigh calls LAPACK from scipy's OpenBLAS, whose threads fight XLA's and any
        # other process's for the cores: the same inverse with OpenBLAS on one thread.
        calls["inverse_blas1"] = (inverse_one_blas_thread, (op,))
    build_s, _ = interleaved(calls, rounds=rounds_build)
    out["construction_s"] = build_s
    out["construction_over_grad"] = {k: t / build_s["grad"] for k, t in build_s.items()}
    out["first_call_s"] = first
    out["first_minus_median_s"] = {k: first[k] - build_s[k] for k in first}
    out["first_call_compiling"] = compiling
    print(f"constructions: {build_s}", flush=True)

    # --- products against a gradient -------------------------------------------------------
    inv = cv.inverse(op, damping=DAMPING)
    eigen = builders["ekfac_exact"](params)
    gn = cv.gauss_newton(mlp, params, data, loss="cross_entropy")
    gn_prepared = gn.prepared()
    v = jax.random.normal(jax.random.key(1), (op.size,), jnp.float32)
    products = {
        "grad": (grad, (params, data)),
        "kfac": (op.matvec, (v,)),
        "inverse": (inv.matvec, (v,)),
        "ekfac": (eigen.matvec, (v,)),
        "gauss_newton": (gn.matvec, (v,)),
        "gauss_newton_prepared": (gn_prepared.matvec, (v,)),
    }
    product_s, _ = interleaved(products, rounds=rounds_product)
    out["product_s"] = product_s
    out["product_over_grad"] = {k: t / product_s["grad"] for k, t in product_s.items()}
    # (K + λI)^-1 (K + λI) v = v: the inverse is exact up to float32 round-off.
    back = inv.matvec(op.matvec(v) + DAMPING * v)
    out["inverse_rel_residual"] = float(jnp.linalg.norm(back - v) / jnp.linalg.norm(v))
    print(f"products: {product_s}", flush=True)

    # --- memory ----------------------------------------------------------------------------
    param_bytes = nbytes(params)
    out["memory"] = {
        "param_bytes": param_bytes,
        "kfac_factor_bytes": nbytes(op.kronecker) + nbytes(op.diagonal),
        "inverse_bytes": nbytes(inv),
        "ekfac_bytes": nbytes(eigen),
        "factor_shapes": {
            name: [list(f.A.shape), list(f.B.shape)] for name, f in op.factors.items()
        },
        "exact_statistics_program": statistics_memory(params, data),
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    out["memory"]["kfac_over_params"] = out["memory"]["kfac_factor_bytes"] / param_bytes
    out["load_average"] = {"start": load_start, "end": list(os.getloadavg())}

    name = "kfac_quick" if args.quick else f"kfac_{jax.default_backend()}"
    write_result(out, name, table(out))


def table(r):
    b, bg = r["construction_s"], r["construction_over_grad"]
    p, pg = r["product_s"], r["product_over_grad"]
    first_minus, compiling, m = r["first_minus_median_s"], r["first_call_compiling"], r["memory"]
    mib = 2.0**20

    def row(label, seconds, ratio, name=None):
        cells = ["", ""]
        if name in first_minus:
            cells[0] = f"{first_minus[name]:.1f}"
        if name in compiling:
            c = compiling[name]
            cells[1] = f"{c['trace_s'] + c['lower_s']:.1f} + {c['compile_s']:.1f} ({c['programs']})"
        return f"| {label} | {seconds:.3f} | {ratio:.2f} | {cells[0]} | {cells[1]} |"

    lines = [
        "| measure | seconds | / gradient | first call - median (s) | "
        "first call: trace + compile (s) (programs) |",
        "|---|---|---|---|---|",
        row("gradient, `jax.jit(jax.grad(loss))`", b["grad"], 1.0),
    ]
    for fisher, what in (
        ("exact", "10 backward passes an example"),
        ("mc", "1 sample"),
        ("empirical", "the labels' gradients"),
    ):
        name = f"kfac_{fisher}"
        lines.append(row(f'`kfac`, `fisher="{fisher}"` ({what})', b[name], bg[name], name))
    lines += [
        row("`ekfac` (exact; compiles its second pass)", b["ekfac_exact"], bg["ekfac_exact"],
            "ekfac_exact"),
        row("exact K-FAC of this MLP written by hand (reference)", b["hand_kfac_exact"],
            bg["hand_kfac_exact"], "hand_kfac_exact"),
        row(f"`inverse(kfac, damping={r['damping']:g})`", b["inverse"], bg["inverse"], "inverse"),
    ]  # fmt: skip
    if "inverse_blas1" in b:
        lines.append(
            row("the same, OpenBLAS on one thread", b["inverse_blas1"], bg["inverse_blas1"])
        )
    lines += [
        row("gradient (the products' rounds)", p["grad"], 1.0),
    ]  # fmt: skip
    for name, label in (
        ("kfac", "K-FAC product `op @ v`"),
        ("inverse", "inverse product `inv @ v`"),
        ("ekfac", "EK-FAC product"),
        ("gauss_newton", "Gauss-Newton product `G @ v`"),
        ("gauss_newton_prepared", "Gauss-Newton product `G.prepared() @ v`"),
    ):
        lines.append(row(label, p[name], pg[name]))
    recompiled = [k for k, v in r["new_params_recompiled"].items() if v]
    exact = m["exact_statistics_program"]
    lines += [
        "",
        "| memory and checks | value |",
        "|---|---|",
        f"| parameters | {r['n']:,} ({m['param_bytes'] / mib:.2f} MiB) |",
        f"| K-FAC factors | {m['kfac_factor_bytes'] / mib:.2f} MiB "
        f"({m['kfac_over_params']:.2f}x the parameters) |",
        f"| inverse (eigenbases and eigenvalues) | {m['inverse_bytes'] / mib:.2f} MiB |",
        f"| EK-FAC | {m['ekfac_bytes'] / mib:.2f} MiB |",
        f"| exact construction, compiled working memory | "
        f"{exact.get('temp_bytes', float('nan')) / mib:.0f} MiB |",
        f"| process peak RSS | {m['process_peak_rss_bytes'] / mib:.0f} MiB |",
        f"| recompiled at new parameters | {', '.join(recompiled) or 'none'} |",
        f"| factors: max rel. diff. to the hand-written ones | {r['hand_max_rel_diff']:.1e} |",
        f"| `inv @ ((K + λI) v)` relative residual | {r['inverse_rel_residual']:.1e} |",
        f"| load average (1 min) at start / end | {r['load_average']['start'][0]:.1f} / "
        f"{r['load_average']['end'][0]:.1f} |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

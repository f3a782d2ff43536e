"""GPU-at-scale benchmark (issue 9, item 6): three large models, every estimator, two precisions.

Models (float32 parameters, every loss the mean over its examples):

* ``mlp``: ReLU MLP 4096-8192-8192-10 (100,761,610 parameters), 8,192 Gaussian examples with
  random labels, softmax cross-entropy (the problem measured in issue 9);
* ``resnet``: a ResNet-18-like net for 32x32x3 inputs (11,169,162 parameters): a 3x3 stem, four
  stages of two basic blocks (64, 128, 256, 512 channels, stride 2 and 1x1 projection shortcuts
  from the second stage on), global average pool, dense 10; biases instead of BatchNorm (a pure
  function of the parameters), the second convolution of each block initialised small (Fixup-like)
  so that the unnormalised net stays well scaled; plain ``lax.conv_general_dilated``, NHWC/HWIO;
  512 Gaussian images, random labels, cross-entropy;
* ``gpt``: a GPT-2-small transformer language model (124,439,808 parameters: 12 layers,
  d_model 768, 12 heads, vocabulary 50,257, a 1,024-row position table of which the first 256
  are used, tied input/output embedding, pre-LayerNorm, GELU, plain causal softmax attention;
  the layers are stacked and run by ``lax.scan``), next-token cross-entropy on 8 sequences of
  256 random token ids (2,040 predicted tokens).

For each model, at the default matmul precision (TF32 on NVIDIA GPUs) and under
``jax.default_matmul_precision("highest")``:

* gradient and HVP (``curvature.hessian(...).matvec``, and a plain ``jvp(grad)``) times: medians
  of rounds in which the calls alternate in a shuffled order (as in ``bench_core.py``);
* ``eigsh`` top-5 (30 Lanczos steps + 5 residual checks), its eigenvalues and recomputed residuals;
* ``trace``: Hutch++ with 99 matvecs (the 33-vector sketch that overflowed XLA's QR workspace in
  issue 9) and Hutchinson with 30, value +- standard error;
* ``spectral_density`` (SLQ): 3 probes x 20 steps;
* for each of these four programs: the ahead-of-time ``.lower()`` and ``.compile()`` times, the
  compiled program's ``memory_analysis()`` (arguments, outputs, temporaries) and the run time of
  the compiled program (so compilation and execution are separate);
* the device's ``peak_bytes_in_use`` after each step (``memory_stats()``; None on CPU). JAX has no
  way to reset it, so it is the running peak of the process: models run in the order given.

Each (model, precision) section runs under a time budget (``--budget-s``, default 420 s for the
whole script, leaving room in 8 minutes for start-up and a step in flight): a step is skipped, and
recorded as skipped, once its section's share of the budget is spent. A failure
(out of memory, say) is recorded in the JSON and the rest still runs. Results are written after
every section.

    python benchmarks/bench_gpu.py            # one GPU; 5-7 minutes on an H200 (estimated)
    python benchmarks/bench_gpu.py --quick    # small models, to check the script (CPU: ~2 min)
    python benchmarks/bench_gpu.py --models=gpt --precisions=highest   # a rerun of one part

Writes benchmarks/results/gpu_<device-kind>.json (``--quick``: gpu_quick_<device-kind>.json) and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import pathlib
import platform
import re
import time
import traceback

import jax
import numpy as np
from _gpu_models import BUILDERS
from _gpu_support import Budget, peak_bytes, precision_context, run_program
from _timing import interleaved

import curvature as cv

PRECISIONS = ("default", "highest")

# Sizes and estimator settings. "quick" shrinks every model so the script runs in about two
# minutes on 2 CPU cores; the estimator settings shrink with it.
FULL = {
    "mlp": {"sizes": (4096, 8192, 8192, 10), "examples": 8192},
    "resnet": {"widths": (64, 128, 256, 512), "blocks": 2, "image": 32, "examples": 512},
    "gpt": {
        "vocab": 50257,
        "positions": 1024,
        "context": 256,
        "layers": 12,
        "d_model": 768,
        "heads": 12,
        "sequences": 8,
    },
}
QUICK = {
    "mlp": {"sizes": (256, 256, 256, 10), "examples": 1024},
    "resnet": {"widths": (8, 16), "blocks": 1, "image": 16, "examples": 64},
    "gpt": {
        "vocab": 512,
        "positions": 64,
        "context": 32,
        "layers": 2,
        "d_model": 64,
        "heads": 4,
        "sequences": 4,
    },
}
# XLA:CPU compiles each of these programs in 2-20 s (the transformer's the slowest, whatever its
# size), so --quick runs each precision on part of the models only: both on the MLP, the default on
# the ResNet, "highest" on the transformer (every code path once, in about 2 minutes on 2 cores).
QUICK_PRECISIONS = {"mlp": ("default", "highest"), "resnet": ("default",), "gpt": ("highest",)}
# eigsh: k=5 with 30 steps (issue 9 measured this on the 100M MLP: 1.55 s default, 6.7 s highest).
# Traces: Hutch++ with 99 matvecs, the case that failed in issue 9 (a 33-vector sketch of the 100M
# MLP, n * 33 > 2^31: XLA's QR workspace overflowed; the sketch is now orthonormalised by
# Gram-Schmidt in place, and the probes are held a block at a time); Hutchinson with 30.
# SLQ: one Lanczos basis (20 x n) at a time, except for the ResNet whose 3 bases fit together.
ESTIMATORS_FULL = {
    "rounds": 7,
    "eigsh": {"k": 5, "num_steps": 30, "probe_batch_size": 5},
    "hutch++": {"num_matvecs": 99, "probe_batch_size": 5},
    "hutchinson": {"num_matvecs": 30, "probe_batch_size": 5},
    "slq": {"num_probes": 3, "num_steps": 20},
    "slq_probe_batch_size": {"mlp": None, "resnet": 3, "gpt": None},
}
ESTIMATORS_QUICK = {
    "rounds": 3,
    "eigsh": {"k": 5, "num_steps": 20, "probe_batch_size": 5},
    "hutch++": {"num_matvecs": 12, "probe_batch_size": 4},
    "hutchinson": {"num_matvecs": 12, "probe_batch_size": 4},
    "slq": {"num_probes": 2, "num_steps": 10},
    "slq_probe_batch_size": {"mlp": None, "resnet": 2, "gpt": None},
}


def measure(name, params, data, loss, op, est, precision, budget, log):
    row = {"model": name, "matmul_precision": precision, "errors": {}, "skipped": []}
    key = jax.random.key(0)
    t_section = time.perf_counter()

    def step(label, fn):
        if budget.left() <= 0:
            row["skipped"].append(label)
            log(f"  {label}: skipped (time budget)")
            return
        t0 = time.perf_counter()
        try:
            fn()
            log(f"  {label}: {time.perf_counter() - t0:.1f} s")
        except Exception as e:  # out of memory, say: record it and go on
            row["errors"][label] = f"{type(e).__name__}: {str(e)[:2000]}"
            log(f"  {label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            traceback.print_exc()
        gc.collect()

    def hvp_grad():
        v = jax.random.normal(jax.random.key(1), (op.size,), op.dtype)
        tangent = op.unravel(v)
        grad = jax.jit(jax.grad(loss))
        plain = jax.jit(lambda p, t: jax.jvp(lambda q: jax.grad(loss)(q, data), (p,), (t,))[1])
        calls = {
            "grad_s": (grad, (params, data)),
            "hvp_s": (op.matvec, (v,)),
            "plain_jvp_grad_hvp_s": (plain, (params, tangent)),
        }
        try:  # the linearisation held as arrays: the memory of a backward pass's residuals
            prepared = op.prepared()
            calls["prepared_hvp_s"] = (prepared.matvec, (v,))
        except Exception as e:  # out of memory, say: record it and time the rest
            row["errors"]["prepared"] = f"{type(e).__name__}: {str(e)[:2000]}"
        medians, first = interleaved(calls, rounds=est["rounds"])
        row.update(medians)
        row["first_call_s"] = first
        row["hvp_over_grad"] = medians["hvp_s"] / medians["grad_s"]
        row["plain_hvp_over_grad"] = medians["plain_jvp_grad_hvp_s"] / medians["grad_s"]
        if "prepared_hvp_s" in medians:
            row["prepared_hvp_over_grad"] = medians["prepared_hvp_s"] / medians["grad_s"]
        row["hvp_peak_bytes_in_use"] = peak_bytes()

    def eigsh():
        kw = est["eigsh"]
        timing, r = run_program(lambda o, k: cv.eigsh(o, key=k, **kw), op, key)
        values = np.asarray(r.eigenvalues, np.float64)
        residuals = np.asarray(r.residual_norms, np.float64)
        scale = float(np.max(np.abs(values)))
        row["eigsh"] = {
            **kw,
            **timing,
            "eigenvalues": values.tolist(),
            "residual_norms": residuals.tolist(),
            "relative_residuals": (residuals / scale).tolist() if scale > 0 else None,
            "converged": np.asarray(r.converged).tolist(),
            "num_matvecs": int(r.num_matvecs),
        }

    def trace(method):
        kw = est[method]

        def go():
            timing, r = run_program(
                lambda o, k: cv.trace(o, key=k, method=method, **kw), op, jax.random.key(2)
            )
            row[method] = {
                **kw,
                **timing,
                "value": float(r.value),
                "standard_error": float(r.standard_error),
            }

        return go

    def slq():
        kw = dict(est["slq"], probe_batch_size=est["slq_probe_batch_size"][name])
        timing, r = run_program(
            lambda o, k: cv.spectral_density(o, key=k, **kw), op, jax.random.key(3)
        )
        nodes = np.asarray(r.nodes, np.float64)
        tr, tr_se, _ = r.trace()
        row["slq"] = {
            **kw,
            **timing,
            "num_matvecs": kw["num_probes"] * kw["num_steps"],
            "node_min": float(nodes.min()),
            "node_max": float(nodes.max()),
            "trace": float(tr),
            "trace_standard_error": float(tr_se),
        }

    with precision_context(precision):
        row["config_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
        step("hvp/grad", hvp_grad)
        step("eigsh", eigsh)
        step("hutch++", trace("hutch++"))
        step("hutchinson", trace("hutchinson"))
        step("slq", slq)
    row["section_s"] = time.perf_counter() - t_section
    row["peak_bytes_in_use"] = peak_bytes()
    return row


# --- reporting ----------------------------------------------------------------------------------


def _f(x, fmt):
    return "—" if x is None else format(x, fmt)


def table(rows) -> str:
    head = (
        "| model | precision | params | grad (s) | HVP (s) | HVP / grad | prepared HVP / grad | "
        "eigsh top-5 | "
        "max rel. residual | eigsh run / compile (s) | Hutch++ ± SE (s) | "
        "Hutchinson ± SE (s) | SLQ run / compile (s) | peak (GB) | notes |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if "params" not in r:
            lines.append(f"| {r['model']} | — | failed: {next(iter(r['errors']), '?')} |")
            continue
        e, hp, hu, s = (r.get(m) for m in ("eigsh", "hutch++", "hutchinson", "slq"))
        eig = ", ".join(f"{v:.4g}" for v in e["eigenvalues"]) if e else "—"
        rel = _f(max(e["relative_residuals"]), ".1e") if e and e["relative_residuals"] else "—"
        peak = r.get("peak_bytes_in_use")
        cells = [
            r["model"],
            r["matmul_precision"],
            f"{r['params']:,}",
            _f(r.get("grad_s"), ".4f"),
            _f(r.get("hvp_s"), ".4f"),
            _f(r.get("hvp_over_grad"), ".2f"),
            _f(r.get("prepared_hvp_over_grad"), ".2f"),
            eig,
            rel,
            f"{e['run_s']:.2f} / {e['compile_s']:.1f}" if e else "—",
            f"{hp['value']:.4g} ± {hp['standard_error']:.2g} ({hp['run_s']:.2f})" if hp else "—",
            f"{hu['value']:.4g} ± {hu['standard_error']:.2g} ({hu['run_s']:.2f})" if hu else "—",
            f"{s['run_s']:.2f} / {s['compile_s']:.1f}" if s else "—",
            "—" if peak is None else f"{peak / 1e9:.1f}",
            "; ".join(
                [f"{k} failed" for k in r.get("errors", {})]
                + [f"{k} skipped (time)" for k in r.get("skipped", [])]
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, to check the script")
    parser.add_argument("--models", default="mlp,resnet,gpt", help="comma-separated subset")
    parser.add_argument(
        "--precisions", default=None, help="default,highest (default: both; see --quick)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=None, help="time budget (default 420, --quick 240)"
    )
    args = parser.parse_args()
    t_start = time.perf_counter()
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in BUILDERS:
            parser.error(f"unknown model {m!r}; choose from {sorted(BUILDERS)}")
    if args.precisions is not None:
        chosen = tuple(p for p in args.precisions.split(",") if p)
        for p in chosen:
            if p not in PRECISIONS:
                parser.error(f"unknown precision {p!r}; choose from {PRECISIONS}")
        precisions = {m: chosen for m in models}
    elif args.quick:
        precisions = {m: QUICK_PRECISIONS[m] for m in models}
    else:
        precisions = {m: PRECISIONS for m in models}
    sizes = QUICK if args.quick else FULL
    est = ESTIMATORS_QUICK if args.quick else ESTIMATORS_FULL
    budget_s = args.budget_s if args.budget_s is not None else (240.0 if args.quick else 420.0)
    budget = Budget(budget_s, sum(len(p) for p in precisions.values()))

    device = jax.devices()[0]
    kind = device.device_kind
    name = f"gpu_quick_{slug(kind)}" if args.quick else f"gpu_{slug(kind)}"
    path = pathlib.Path(__file__).parent / "results" / f"{name}.json"
    out = {
        "quick": args.quick,
        "platform": {
            "jax": jax.__version__,
            "jaxlib": importlib.metadata.version("jaxlib"),
            "backend": jax.default_backend(),
            "device_kind": kind,
            "device_count": jax.device_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "dtype": "float32",
        },
        "budget_s": budget_s,
        "models": {m: sizes[m] for m in models},
        "precisions": precisions,
        "estimators": est,
        "rows": [],
    }

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", flush=True)

    def save():
        out["total_s"] = time.perf_counter() - t_start
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")

    log(f"{kind} ({jax.default_backend()}), jax {jax.__version__}, budget {budget_s:.0f} s")
    for m in models:
        base = {"model": m}
        try:
            t0 = time.perf_counter()
            params, data, loss = BUILDERS[m](sizes[m], jax.random.key(0))
            op = cv.hessian(loss, params, data)
            jax.block_until_ready(op)
            base["params"] = int(op.size)
            base["examples"] = int(jax.tree_util.tree_leaves(data)[0].shape[0])
            base["build_s"] = time.perf_counter() - t0
            log(f"{m}: {op.size:,} parameters, {base['examples']} examples")
        except Exception as e:
            base["errors"] = {"build": f"{type(e).__name__}: {str(e)[:2000]}"}
            log(f"{m}: build FAILED {type(e).__name__}: {e}")
            traceback.print_exc()
            out["rows"].append(base)
            for _ in precisions[m]:
                budget.open_section()
            save()
            continue
        for p in precisions[m]:
            budget.open_section()
            log(f"{m} at {p} precision ({budget.left():.0f} s for this section)")
            row = measure(m, params, data, loss, op, est, p, budget, log)
            out["rows"].append({**base, **row})
            save()
        del params, data, loss, op
        gc.collect()
    save()
    print(table(out["rows"]))
    log(f"done in {out['total_s']:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()

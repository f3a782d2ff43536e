"""Hessian-free against Adam to a target training loss on the digits MLP, in gradient-equivalents
and seconds (writes results/optim_cpu.json and prints a Markdown table).

    python benchmarks/bench_optim.py            # ~2 minutes on 2 CPU cores
    python benchmarks/bench_optim.py --quick    # fewer steps and repeats, to check the script

The problem is ``configs/optimizers.py``'s: a 64-32-32-10 MLP (ReLU or tanh, 3,466 parameters)
on the 1,348 training digits, full-batch cross-entropy, float32, the same initial parameters for
both methods, trained by the experiments' compiled trainer (``experiments.train.trainer``), which
logs every step's loss and optimizer diagnostics. Hessian-free: ``curvature.optim.hessian_free``
with the config's defaults (Gauss-Newton, 50 CG steps at most, initial damping 1e-3, Martens'
backtracking and the Armijo line search, step 1). Adam: optax's, each learning rate of a sweep
(``--adam-lrs``); for each target the best one (fewest steps to it) is reported, with the others
in the JSON.

For each method and target: the first step whose training loss is at or below the target, the
gradient-equivalents spent to reach it (``experiments.train.gradient_equivalents``: 1 a step for
Adam; Hessian-free's CG curvature products at 1.5 each and loss evaluations at 0.5 each) and its
wall time: the compiled loop run from the initial parameters for exactly that many steps, median
of ``--repeats`` runs that alternate between the methods in a shuffled order (``_timing``).
Compilation is timed apart (the first, zero-step call of each trainer). All in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = (1e-2, 1e-4, 1e-6)


def build(activation: str, optimizer: str, learning_rate: float, steps: int, damping: float):
    """The member of ``configs/optimizers.py`` with this optimizer: its trainer and arguments."""
    import importlib.util

    import jax
    import jax.numpy as jnp

    from experiments import data as data_lib
    from experiments import lifecycle, sweep, train

    spec_ = importlib.util.spec_from_file_location("config", ROOT / "configs" / "optimizers.py")
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    config = module.get_config()
    config.sweep = ()
    overrides = {
        "train.optimizer": optimizer,
        "train.learning_rate": learning_rate,
        "train.steps": steps,
        "train.hessian_free.damping": damping,
    }
    member = sweep.resolve(config, activation, 0, overrides)
    spec = sweep.MemberSpec(
        activation, activation, activation, 0, 0, overrides, member
    )  # fmt: skip
    dataset = data_lib.load(member.data)
    setup = lifecycle.setup(spec, (activation,), dataset, lifecycle.device_data(dataset, "float32"))
    state = train.make_optimizer(member.train).init(setup.init_params)
    run = train.trainer(setup.loss, member.train, len(setup.y_train), setup.model)
    fixed = (
        setup.x_train,
        setup.y_train,
        jax.random.key(0),
        jnp.asarray(setup.index, jnp.int32),
        jnp.asarray(np.inf, jnp.float32),
        train.new_log(member.train, jnp.float32, state),
    )

    def steps_from_init(k):
        start, stop = jnp.asarray(0), jnp.asarray(k)
        return run(setup.init_params, state, start, stop, *fixed)

    num_outputs = dataset.num_classes
    num_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(setup.init_params))
    return member.train, steps_from_init, num_outputs, num_params


def curve(activation, optimizer, learning_rate, steps, damping=1e-3):
    """Losses and per-step gradient-equivalents of ``steps`` steps, and the compile time."""
    import jax
    from _timing import once

    from experiments import train

    train_cfg, steps_from_init, num_outputs, num_params = build(
        activation, optimizer, learning_rate, steps, damping
    )
    compile_s = once(steps_from_init, 0)
    out = jax.block_until_ready(steps_from_init(steps))
    log = {k: np.asarray(v, float) for k, v in out[5].items()}
    reached = int(out[2])
    cost = train.gradient_equivalents(train_cfg, log, num_outputs)
    extra = {k: v[:reached].tolist() for k, v in log.items() if k != "loss"}
    return {
        "loss": log["loss"][:reached],
        "cost": cost[:reached],
        "diagnostics": extra,
        "compile_s": compile_s,
        "num_params": num_params,
        "run": steps_from_init,
    }


def first_below(loss: np.ndarray, target: float) -> int | None:
    hit = np.flatnonzero(loss <= target)
    return int(hit[0]) if len(hit) else None


def best_of(curves: dict, target: float):
    """The setting whose curve reaches ``target`` at the least cost, and that cost's step."""
    found = {}
    for setting, c in curves.items():
        k = first_below(c["loss"], target)
        if k is not None:
            found[setting] = (float(c["cost"][:k].sum()), k)
    if not found:
        return None, None
    best = min(found, key=lambda x: found[x][0])
    return best, found[best][1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--adam-lrs", default="0.001,0.003,0.01,0.03,0.1,0.3")
    parser.add_argument("--hf-dampings", default="0.001,0.1,1")
    parser.add_argument("--adam-steps", type=int, default=6000)
    parser.add_argument("--hf-steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--activations", default="relu,tanh")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "optim_cpu.json"))
    args = parser.parse_args()
    if args.quick:
        args.adam_steps, args.hf_steps, args.repeats = 300, 20, 2
        args.adam_lrs, args.hf_dampings = "0.01,0.03", "0.001,1"
    import jax
    from _timing import interleaved

    lrs = [float(x) for x in args.adam_lrs.split(",")]
    dampings = [float(x) for x in args.hf_dampings.split(",")]
    result = {
        "problem": "digits 64-32-32-10 MLP, full-batch cross-entropy on 1,348 examples, float32",
        "targets": list(TARGETS),
        "adam_learning_rates": lrs,
        "hessian_free_initial_dampings": dampings,
        "adam_steps": args.adam_steps,
        "hessian_free_steps": args.hf_steps,
        "repeats": args.repeats,
        "activations": {},
    }
    rows = []
    for activation in args.activations.split(","):
        hfs = {d: curve(activation, "hessian_free", 1.0, args.hf_steps, d) for d in dampings}
        adams = {lr: curve(activation, "adam", lr, args.adam_steps) for lr in lrs}
        entry = {
            "num_params": hfs[dampings[0]]["num_params"],
            "compile_s": {f"hessian_free damping {d:g}": h["compile_s"] for d, h in hfs.items()}
            | {f"adam {lr:g}": a["compile_s"] for lr, a in adams.items()},
            "hessian_free": {
                f"{d:g}": {
                    "loss": h["loss"].tolist(),
                    "gradient_equivalents": h["cost"].tolist(),
                    **h["diagnostics"],
                }
                for d, h in hfs.items()
            },
            "adam_loss_every_100": {
                f"{lr:g}": a["loss"][::100].tolist() for lr, a in adams.items()
            },
            "targets": {},
        }
        for target in TARGETS:
            lr, k_adam = best_of(adams, target)
            damping, k_hf = best_of(hfs, target)
            calls = {}
            if k_hf is not None:
                calls["hessian_free"] = (hfs[damping]["run"], (k_hf,))
            if k_adam is not None:
                calls["adam"] = (adams[lr]["run"], (k_adam,))
            medians, _ = interleaved(calls, rounds=args.repeats) if calls else ({}, {})
            hf = hfs.get(damping)
            row = {
                "adam_steps_by_lr": {
                    f"{x:g}": first_below(a["loss"], target) for x, a in adams.items()
                },
                "hessian_free_steps_by_damping": {
                    f"{d:g}": first_below(h["loss"], target) for d, h in hfs.items()
                },
                "hessian_free_gradient_equivalents_by_damping": {
                    f"{d:g}": None
                    if first_below(h["loss"], target) is None
                    else float(h["cost"][: first_below(h["loss"], target)].sum())
                    for d, h in hfs.items()
                },
                "adam_best_lr": lr,
                "adam_steps": k_adam,
                "adam_gradient_equivalents": k_adam,
                "adam_s": medians.get("adam"),
                "hessian_free_best_damping": damping,
                "hessian_free_steps": k_hf,
                "hessian_free_gradient_equivalents": None
                if k_hf is None
                else float(hf["cost"][:k_hf].sum()),
                "hessian_free_cg_steps": None
                if k_hf is None
                else int(np.sum(hf["diagnostics"]["cg_steps"][:k_hf])),
                "hessian_free_s": medians.get("hessian_free"),
            }
            entry["targets"][f"{target:g}"] = row
            rows.append((activation, target, row))
        result["activations"][activation] = entry
    result |= {
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))
    for activation, entry in result["activations"].items():
        compile_s = ", ".join(f"{k} {v:.2f} s" for k, v in entry["compile_s"].items())
        print(f"{activation}: compile {compile_s}")
        for target, r in entry["targets"].items():
            print(
                f"  to {target}: Adam steps by η {r['adam_steps_by_lr']}; HF grad-eq. by initial "
                f"damping {r['hessian_free_gradient_equivalents_by_damping']}"
            )
    print(f"wrote {out}")


def table(rows) -> str:
    def num(x, fmt):
        return "not reached" if x is None else format(x, fmt)

    head = (
        "| activation | target loss | Adam η (best) | Adam steps = grad-eq. | Adam s "
        "| HF λ₀ (best) | HF steps (CG steps) | HF grad-eq. | HF s | HF / Adam grad-eq. "
        "| HF / Adam s |"
    )
    lines = [head, "|" + "---|" * 11]
    for activation, target, r in rows:
        ratio_ge = ratio_s = None
        if r["adam_steps"] and r["hessian_free_steps"] is not None:
            ratio_ge = r["hessian_free_gradient_equivalents"] / r["adam_gradient_equivalents"]
            ratio_s = r["hessian_free_s"] / r["adam_s"]
        hf_steps = (
            "not reached"
            if r["hessian_free_steps"] is None
            else f"{r['hessian_free_steps']} ({r['hessian_free_cg_steps']})"
        )
        lines.append(
            f"| {activation} | {target:g} | {num(r['adam_best_lr'], 'g')} | "
            f"{num(r['adam_steps'], 'd')} | {num(r['adam_s'], '.3f')} | "
            f"{num(r['hessian_free_best_damping'], 'g')} | {hf_steps} | "
            f"{num(r['hessian_free_gradient_equivalents'], '.0f')} | "
            f"{num(r['hessian_free_s'], '.3f')} | {num(ratio_ge, '.2f')} | {num(ratio_s, '.2f')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

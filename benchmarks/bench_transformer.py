"""Transformer benchmark (issue 19): the study's model, its curvature products against one
gradient, a loss landscape against forward passes, and every block's top eigenvalues in one
program against a loop of ``eigsh`` over the blocks.

Model: ``configs/transformers.py``'s GPT-style transformer (2 layers, width 32, 4 heads, MLP 4x,
GELU, 32,476 parameters) at its initial parameters, on the first 64 windows of 32 characters of
the bundled corpus (2,048 next-character predictions), float32. Times are medians of
interleaved rounds (``_timing.interleaved``); every figure is a ratio measured in this run:

* HVP (``H @ v``) and Gauss-Newton product (``G @ v``) against a gradient of the mean loss;
* ``curvature.loss_landscape`` on 21 points (1-D) and 11 x 11 (2-D), against as many forward
  passes (the loss alone);
* ``curvature.block_eigenvalues`` (k = 3, 20 Lanczos steps) over the study's 9 kinds of block,
  one program, against ``curvature.eigsh(restrict(H, block))`` for each block in a Python loop:
  first call (compiling: one program against one per block size) and warm;
* ``curvature.gradient_overlap`` (k = 10, 60 steps) in HVPs.

    python benchmarks/bench_transformer.py           # 2-3 minutes on 2 cores
    python benchmarks/bench_transformer.py --quick   # fewer rounds, to check the script

Writes benchmarks/results/transformer_<platform>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from _timing import interleaved, write_result

import curvature as cv
from experiments import data as data_lib
from experiments import models
from experiments.measurements import block_spectra

ROOT = pathlib.Path(__file__).resolve().parent.parent


def study_config():
    spec = importlib.util.spec_from_file_location(
        "transformers", ROOT / "configs" / "transformers.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.get_config()


def problem():
    module, config = study_config()
    dataset = data_lib.load(config.data)
    model_cfg = models.resolved(config.model, dataset.y_train.ndim)
    graphdef, params, rest = models.build(
        model_cfg, ("gelu",), dataset.input_shape, dataset.num_classes, seed=0
    )
    model, loss = models.pure_functions(
        graphdef, jax.tree_util.tree_structure(rest), config.train.loss
    )
    n = config.measure.num_examples
    data = models.with_activation(
        {"x": jnp.asarray(dataset.x_train[:n]), "y": jnp.asarray(dataset.y_train[:n])}, 0
    )
    groups = block_spectra.groups_of(params, module.KINDS)
    return model, loss, params, data, groups


def first_and_warm(fn, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        warm.append(time.perf_counter() - t0)
    return first, float(np.median(warm))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, repeats = (3, 1) if args.quick else (15, 3)
    model, loss, params, data, groups = problem()
    H = cv.hessian(loss, params, data)
    G = cv.gauss_newton(model, params, data, loss="cross_entropy")
    v = jax.random.normal(jax.random.key(0), (H.size,))
    grad = jax.jit(jax.grad(loss))
    value = jax.jit(loss)
    hvp = jax.jit(lambda v: H @ v)
    gvp = jax.jit(lambda v: G @ v)
    top = cv.eigsh(H, k=2, key=jax.random.key(1), num_steps=40)
    d1, d2 = top.eigenvectors[:, 0], top.eigenvectors[:, 1]
    line, square = np.linspace(-0.5, 0.5, 21), np.linspace(-0.5, 0.5, 11)

    def landscape_1d():
        return cv.loss_landscape(loss, params, data, directions=d1, grid=line).loss

    def landscape_2d():
        return cv.loss_landscape(loss, params, data, directions=[d1, d2], grid=square).loss

    medians, _ = interleaved(
        {
            "gradient": (grad, (params, data)),
            "loss": (value, (params, data)),
            "hvp": (hvp, (v,)),
            "ggn_product": (gvp, (v,)),
            "landscape_1d": (landscape_1d, ()),
            "landscape_2d": (landscape_2d, ()),
        },
        rounds,
    )
    key = jax.random.key(2)
    one_first, one_warm = first_and_warm(
        lambda: cv.block_eigenvalues(H, groups, k=3, key=key, num_steps=20).eigenvalues, repeats
    )

    def loop():
        out = []
        for g, selector in enumerate(groups.values()):
            block = cv.restrict(H, selector)
            steps = min(20, block.size)
            out.append(cv.eigsh(block, k=3, num_steps=steps, key=jax.random.fold_in(key, g)))
        return [r.eigenvalues for r in out]

    loop_first, loop_warm = first_and_warm(loop, repeats)
    grad_tree = grad(params, data)
    overlap_first, overlap_warm = first_and_warm(
        lambda: cv.gradient_overlap(H, grad_tree, k=10, key=key, num_steps=60).overlap, repeats
    )
    sizes = [int(cv.Layout.of(params).size)]
    block_sizes = sorted({cv.restrict(H, s).size for s in groups.values()})
    g = medians["gradient"]
    out = {
        "model": {
            "parameters": sizes[0],
            "examples": int(data["y"].shape[0]),
            "tokens": int(data["y"].size),
            "blocks": list(groups),
            "distinct_block_sizes": len(block_sizes),
        },
        "seconds": {
            **medians,
            "block_eigenvalues_first": one_first,
            "block_eigenvalues_warm": one_warm,
            "eigsh_loop_first": loop_first,
            "eigsh_loop_warm": loop_warm,
            "gradient_overlap_first": overlap_first,
            "gradient_overlap_warm": overlap_warm,
        },
        "ratios": {
            "hvp_over_gradient": medians["hvp"] / g,
            "ggn_product_over_gradient": medians["ggn_product"] / g,
            "landscape_1d_over_21_losses": medians["landscape_1d"] / (21 * medians["loss"]),
            "landscape_2d_over_121_losses": medians["landscape_2d"] / (121 * medians["loss"]),
            "eigsh_loop_over_block_eigenvalues_first": loop_first / one_first,
            "eigsh_loop_over_block_eigenvalues_warm": loop_warm / one_warm,
            "gradient_overlap_in_hvps": overlap_warm / medians["hvp"],
        },
        "quick": args.quick,
    }
    r = out["ratios"]
    s = out["seconds"]
    table = "\n".join(
        [
            "| measurement | seconds | ratio |",
            "|---|---|---|",
            f"| gradient | {g:.4f} | 1 |",
            f"| HVP (H v) | {medians['hvp']:.4f} | {r['hvp_over_gradient']:.2f} gradients |",
            f"| Gauss-Newton product (G v) | {medians['ggn_product']:.4f} | "
            f"{r['ggn_product_over_gradient']:.2f} gradients |",
            f"| loss_landscape, 21 points | {medians['landscape_1d']:.4f} | "
            f"{r['landscape_1d_over_21_losses']:.2f} x 21 losses |",
            f"| loss_landscape, 11 x 11 | {medians['landscape_2d']:.4f} | "
            f"{r['landscape_2d_over_121_losses']:.2f} x 121 losses |",
            f"| block_eigenvalues, 9 blocks, first call | {one_first:.2f} | 1 |",
            f"| eigsh per block in a loop, first call ({len(block_sizes)} block sizes) | "
            f"{loop_first:.2f} | {r['eigsh_loop_over_block_eigenvalues_first']:.2f} x |",
            f"| block_eigenvalues, warm | {one_warm:.2f} | 1 |",
            f"| eigsh per block in a loop, warm | {loop_warm:.2f} | "
            f"{r['eigsh_loop_over_block_eigenvalues_warm']:.2f} x |",
            f"| gradient_overlap k=10, 60 steps, warm | {s['gradient_overlap_warm']:.2f} | "
            f"{r['gradient_overlap_in_hvps']:.0f} HVPs |",
        ]
    )
    write_result(out, f"transformer_{jax.default_backend()}", table)


if __name__ == "__main__":
    main()

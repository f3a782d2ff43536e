"""Interactive speed: first calls (compilation included) and repeats of the estimators a
researcher calls at a prompt, on a 2-layer flax NNX transformer (12 parameter groups) and a CNN
with BatchNorm.

    python benchmarks/bench_interactive.py [--label after]   # ~3 minutes on 2 CPU cores
    # writes results/interactive_cpu_<label>.json

The models (synthetic data from a fixed key; nothing is downloaded):

* transformer: tokens of a 16-symbol vocabulary, sequences of 8, width 12, 2 heads, MLP 16,
  pre-LayerNorm blocks, a causal mask, next-token cross-entropy on 64 sequences: 2,616
  parameters in 12 groups (embeddings, then per block its LayerNorm, qkv, projection and two MLP
  layers, then the head), the shape of the 2.7k-parameter model of issue 16;
* CNN: 8x8 one-channel images, 3x3 convolutions of 6 and 20 channels each followed by BatchNorm
  (running averages: evaluation mode) and ReLU, global average pooling and a 10-way dense layer,
  cross-entropy on 128 images: 1,422 parameters in 5 groups.

Timed (``time.perf_counter`` around each call, its result ready), in this order in one process:
``block_summary`` (16 probes and 20 Lanczos steps a group) and ``block_densities`` (4 probes, 20
steps) of the transformer's 12 groups, twice each; ``eigsh`` of the transformer's H with ``k=5``
(first call), then ``k=3`` (a new ``k``), ``k=3`` again, ``num_steps=36`` (a new length in
the size bucket of 40) and ``num_steps=50`` (the next bucket);
on the CNN one matvec, ``dense`` and ``diagonal(method="exact")``, twice each, and ``eigsh`` with
a new ``k``. Run the same script against another checkout with ``PYTHONPATH=<checkout>`` to
compare (the "before" figures in ``benchmarks/README.md`` came that way from commit 57ad374).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from _timing import write_result
from flax import nnx

import curvature as cv
import curvature.flax as cvf

VOCAB, LENGTH, WIDTH, HEADS, HIDDEN = 16, 8, 12, 2, 16


class Embed(nnx.Module):
    def __init__(self, rngs):
        self.tok = nnx.Param(jax.random.normal(rngs.params(), (VOCAB, WIDTH)) * 0.5)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (LENGTH, WIDTH)) * 0.5)

    def __call__(self, tokens):
        return self.tok[tokens] + self.pos[: tokens.shape[-1]]


class Block(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.qkv = nnx.Linear(WIDTH, 3 * WIDTH, rngs=rngs)
        self.proj = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
        self.fc1 = nnx.Linear(WIDTH, HIDDEN, rngs=rngs)
        self.fc2 = nnx.Linear(HIDDEN, WIDTH, rngs=rngs)

    def __call__(self, x):
        b, t, _ = x.shape
        q, k, v = jnp.split(self.qkv(self.norm(x)), 3, axis=-1)
        heads = lambda a: a.reshape(b, t, HEADS, WIDTH // HEADS)  # noqa: E731
        scores = jnp.einsum("bqhd,bkhd->bhqk", heads(q), heads(k)) / np.sqrt(WIDTH // HEADS)
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), heads(v))
        x = x + self.proj(mixed.reshape(b, t, WIDTH))
        return x + self.fc2(jax.nn.gelu(self.fc1(x)))


class Transformer(nnx.Module):
    def __init__(self, rngs):
        self.embed = Embed(rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(2)])
        self.head = nnx.Linear(WIDTH, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 6, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(6, rngs=rngs)
        self.conv2 = nnx.Conv(6, 20, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(20, rngs=rngs)
        self.dense = nnx.Linear(20, 10, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = jax.nn.relu(self.bn2(self.conv2(x)))
        return self.dense(x.mean(axis=(1, 2)))


def _xent(logits, labels):
    picked = jnp.take_along_axis(logits, labels[..., None], -1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - picked)


def transformer_hessian():
    key = jax.random.key(0)
    model = Transformer(nnx.Rngs(0))
    tokens = jax.random.randint(key, (64, LENGTH + 1), 0, VOCAB)
    data = {"x": tokens[:, :-1], "y": tokens[:, 1:]}
    return cvf.hessian(lambda m, b: _xent(m(b["x"]), b["y"]), model, data)


def cnn_hessian():
    key = jax.random.key(1)
    model = CNN(nnx.Rngs(1))
    # Running statistics that are not the initial 0 / 1, as after training.
    model.bn1.mean.value = 0.1 * jnp.ones(6)
    model.bn2.var.value = 1.5 * jnp.ones(20)
    data = {
        "x": jax.random.normal(key, (128, 8, 8, 1)),
        "y": jax.random.randint(jax.random.fold_in(key, 1), (128,), 0, 10),
    }
    return cvf.hessian(lambda m, b: _xent(m(b["x"]), b["y"]), model, data)


def timed(fn):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="after")
    args = parser.parse_args()
    key = jax.random.key(2)
    H = transformer_hessian()
    groups = cv.layer_groups(H.layout.skeleton())
    C = cnn_hessian()
    out = {
        "curvature": cv.__file__,
        "transformer": {"parameters": H.size, "groups": len(groups)},
        "cnn": {"parameters": C.size},
    }
    t = out["transformer"]

    def summary():
        return cv.block_summary(H, key=key, num_matvecs=16, num_steps=20).trace

    def densities():
        return [
            d.nodes for d in cv.block_densities(H, key=key, num_probes=4, num_steps=20).values()
        ]

    for name, fn in (("block_summary", summary), ("block_densities", densities)):
        t[f"{name}_first_s"] = timed(fn)
        t[f"{name}_cached_s"] = timed(fn)
        print(name, t[f"{name}_first_s"], t[f"{name}_cached_s"], flush=True)

    def eig(k, steps=40):
        return lambda: cv.eigsh(H, k=k, num_steps=steps, key=key).eigenvalues

    t["eigsh_k5_first_s"] = timed(eig(5))
    t["eigsh_new_k3_s"] = timed(eig(3))
    t["eigsh_k3_cached_s"] = timed(eig(3))
    t["eigsh_new_num_steps36_s"] = timed(eig(3, 36))  # within 40's size bucket
    t["eigsh_new_num_steps50_s"] = timed(eig(3, 50))  # the next bucket (60)
    print({k: v for k, v in t.items() if k.startswith("eigsh")}, flush=True)

    c = out["cnn"]
    v = jnp.ones(C.size, C.dtype)
    c["matvec_first_s"] = timed(lambda: C @ v)
    c["matvec_cached_s"] = timed(lambda: C @ v)
    for name, fn in (
        ("dense", lambda: cv.dense(C)),
        ("exact_diagonal", lambda: cv.diagonal(C, method="exact").diagonal),
    ):
        c[f"{name}_first_s"] = timed(fn)
        c[f"{name}_cached_s"] = timed(fn)
        print(name, c[f"{name}_first_s"], c[f"{name}_cached_s"], flush=True)
    c["eigsh_k5_first_s"] = timed(lambda: cv.eigsh(C, k=5, num_steps=40, key=key).eigenvalues)
    c["eigsh_new_k3_s"] = timed(lambda: cv.eigsh(C, k=3, num_steps=40, key=key).eigenvalues)
    rows = [
        f"{model} {name}: {value:.2f}"
        for model in ("transformer", "cnn")
        for name, value in out[model].items()
        if name.endswith("_s")
    ]
    write_result(out, f"interactive_cpu_{args.label}", "\n".join(rows))


if __name__ == "__main__":
    main()

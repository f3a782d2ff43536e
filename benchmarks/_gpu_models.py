"""The models of ``bench_gpu.py``: a wide ReLU MLP, a ResNet-sized convolutional net and a
GPT-2-small-sized transformer language model (plain attention), each ``build(cfg, key) ->
(params, data, loss)`` with Gaussian or random-token data (nothing downloaded)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# --- models -------------------------------------------------------------------------------------


def cross_entropy(logits, labels):
    logz = jax.nn.logsumexp(logits, axis=-1)
    return jnp.mean(logz - jnp.take_along_axis(logits, labels[..., None], -1)[..., 0])


def build_mlp(cfg, key):
    sizes = cfg["sizes"]
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w = jax.random.normal(jax.random.fold_in(key, i), (a, b)) * np.sqrt(2.0 / a)
        params.append({"w": w, "b": jnp.zeros(b)})
    n = cfg["examples"]
    x = jax.random.normal(jax.random.fold_in(key, 100), (n, sizes[0]))
    y = jax.random.randint(jax.random.fold_in(key, 101), (n,), 0, sizes[-1])

    def loss(p, batch):
        h = batch["x"]
        for layer in p[:-1]:
            h = jax.nn.relu(h @ layer["w"] + layer["b"])
        return cross_entropy(h @ p[-1]["w"] + p[-1]["b"], batch["y"])

    return params, {"x": x, "y": y}, loss


def _conv(x, w, stride=1):
    return lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def build_resnet(cfg, key):
    counter = iter(range(10_000))

    def conv_param(kh, cin, cout, scale=1.0):
        std = scale * np.sqrt(2.0 / (kh * kh * cin))
        w = jax.random.normal(jax.random.fold_in(key, next(counter)), (kh, kh, cin, cout)) * std
        return {"w": w, "b": jnp.zeros(cout)}

    widths = cfg["widths"]
    params = {"stem": conv_param(3, 3, widths[0]), "stages": []}
    cin = widths[0]
    for s, width in enumerate(widths):
        stage = []
        for b in range(cfg["blocks"]):
            block = {
                "conv1": conv_param(3, cin, width),
                # Fixup-like: the residual branch starts small, so no normalisation is needed.
                "conv2": conv_param(3, width, width, scale=0.25),
            }
            if s > 0 and b == 0:
                block["proj"] = conv_param(1, cin, width)
            stage.append(block)
            cin = width
        params["stages"].append(stage)
    head = jax.random.normal(jax.random.fold_in(key, next(counter)), (cin, 10)) / np.sqrt(cin)
    params["head"] = {"w": head, "b": jnp.zeros(10)}

    n, size = cfg["examples"], cfg["image"]
    x = jax.random.normal(jax.random.fold_in(key, 20_000), (n, size, size, 3))
    y = jax.random.randint(jax.random.fold_in(key, 20_001), (n,), 0, 10)

    def loss(p, batch):
        h = jax.nn.relu(_conv(batch["x"], p["stem"]["w"]) + p["stem"]["b"])
        for s, stage in enumerate(p["stages"]):
            for b, block in enumerate(stage):
                stride = 2 if (s > 0 and b == 0) else 1
                r = jax.nn.relu(_conv(h, block["conv1"]["w"], stride) + block["conv1"]["b"])
                r = _conv(r, block["conv2"]["w"]) + block["conv2"]["b"]
                if "proj" in block:
                    h = _conv(h, block["proj"]["w"], stride) + block["proj"]["b"]
                h = jax.nn.relu(h + r)
        features = jnp.mean(h, axis=(1, 2))
        return cross_entropy(features @ p["head"]["w"] + p["head"]["b"], batch["y"])

    return params, {"x": x, "y": y}, loss


def _layer_norm(x, g, b, eps=1e-5):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return (x - mu) * lax.rsqrt(var + eps) * g + b


def build_gpt(cfg, key):
    d, layers, vocab, heads = cfg["d_model"], cfg["layers"], cfg["vocab"], cfg["heads"]

    def normal(i, shape, std=0.02):
        return jax.random.normal(jax.random.fold_in(key, i), shape) * std

    proj_std = 0.02 / np.sqrt(2 * layers)  # GPT-2's scaled initialisation of residual outputs
    params = {
        "wte": normal(0, (vocab, d)),
        "wpe": normal(1, (cfg["positions"], d), 0.01),
        "blocks": {  # stacked along a leading layer axis, run by lax.scan
            "ln1_g": jnp.ones((layers, d)),
            "ln1_b": jnp.zeros((layers, d)),
            "attn_w": normal(2, (layers, d, 3 * d)),
            "attn_b": jnp.zeros((layers, 3 * d)),
            "proj_w": normal(3, (layers, d, d), proj_std),
            "proj_b": jnp.zeros((layers, d)),
            "ln2_g": jnp.ones((layers, d)),
            "ln2_b": jnp.zeros((layers, d)),
            "fc_w": normal(4, (layers, d, 4 * d)),
            "fc_b": jnp.zeros((layers, 4 * d)),
            "out_w": normal(5, (layers, 4 * d, d), proj_std),
            "out_b": jnp.zeros((layers, d)),
        },
        "lnf_g": jnp.ones(d),
        "lnf_b": jnp.zeros(d),
    }
    tokens = jax.random.randint(
        jax.random.fold_in(key, 100), (cfg["sequences"], cfg["context"] + 1), 0, vocab
    )

    def loss(p, batch):
        ids, targets = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
        bsz, t = ids.shape
        dh = d // heads
        h = p["wte"][ids] + p["wpe"][:t]
        causal = jnp.tril(jnp.ones((t, t), bool))

        def layer(h, w):
            qkv = _layer_norm(h, w["ln1_g"], w["ln1_b"]) @ w["attn_w"] + w["attn_b"]
            q, k, v = (z.reshape(bsz, t, heads, dh) for z in jnp.split(qkv, 3, axis=-1))
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
            scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
            att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
            h = h + att.reshape(bsz, t, d) @ w["proj_w"] + w["proj_b"]
            m = _layer_norm(h, w["ln2_g"], w["ln2_b"]) @ w["fc_w"] + w["fc_b"]
            h = h + jax.nn.gelu(m, approximate=True) @ w["out_w"] + w["out_b"]
            return h, None

        h, _ = lax.scan(layer, h, p["blocks"])
        logits = _layer_norm(h, p["lnf_g"], p["lnf_b"]) @ p["wte"].T  # tied embedding
        return cross_entropy(logits, targets)

    return params, {"tokens": tokens}, loss


BUILDERS = {"mlp": build_mlp, "resnet": build_resnet, "gpt": build_gpt}

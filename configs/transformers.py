"""Transformers and directions: is a transformer's Hessian heterogeneous across its parameter
blocks (Zhang et al. 2024), does ReLU's same-layer residual vanish in a transformer too, and does
the gradient live in the top Hessian eigenspace (Gur-Ari et al. 2018)?

The default (``configs/transformers.py``): a 2-layer GPT-style transformer (width 32, 4 heads,
pre-norm, MLP 4x) with a ReLU and with a GELU MLP, on the bundled character corpus (windows of
32 characters: 979 training windows), trained by Adam (η = 3e-3, batches of 64, 600 steps).
Measured on the first 64 training windows (2,048 tokens): the spectra of the parameter blocks
(pooled by kind over the layers: embeddings, query, key, value, attention output, MLP in, MLP
out, norms, head) at initialisation and at the end with the Jensen-Shannon distance between
them; how much of R = H − G lies within layers (``blocks``); the gradient's share of the top-10
Hessian eigenspace along training; the loss along the top eigenvector at the end.

The contrast, the same measurements on the digits with the same optimizer: ``:cnn`` (a CNN with
LayerNorm, channels 8 and 16) and ``:mlp`` (the main job's 64-32-32-10 MLP), both with ReLU and
GELU: ``python -m experiments run --config=configs/transformers.py:cnn --workdir=...``.
docs/studies/transformers.md has the findings; about 5.5 minutes on 2 CPU cores for all three.
"""

from experiments.config import base_config

# The transformer's blocks by kind, pooled over its layers (Zhang et al. compare these kinds).
KINDS = (
    "embeddings=embed|position",
    "query=*/query",
    "key=*/key",
    "value=*/value",
    "attention output=*/output",
    "mlp in=*/mlp_in",
    "mlp out=*/mlp_out",
    "norms=*norm*",
    "head=head",
)


def get_config(variant: str = "transformer"):
    c = base_config()
    c.activations = ("relu", "gelu")
    c.seeds = (0,)
    c.train.optimizer = "adam"
    c.train.learning_rate = 3e-3
    c.train.steps = 600
    c.train.batch_size = 64
    c.measure.num_examples = 64
    c.measure.steps = (0, 25, 50, 100, 200, 400, 600)
    c.measure.quantities = (
        "lambda_max",
        "block_spectra",
        "gradient_overlap",
        "blocks",
        "landscape",
    )
    c.measure.block_spectra.steps = (0, 600)
    c.measure.blocks.steps = (0, 600)
    c.measure.blocks.num_matvecs = 16
    c.measure.block_spectra.num_steps = 20
    c.measure.block_spectra.density_steps = 30
    c.measure.landscape.steps = (600,)
    c.measure.landscape.radius = 0.5
    c.measure.gradient_overlap.k = 10
    if variant == "transformer":
        c.data.source = "characters"
        c.data.context = 32
        c.model.kind = "transformer"
        c.model.width = 32
        c.model.depth = 2
        c.model.heads = 4
        c.measure.block_spectra.groups = KINDS
    elif variant in ("cnn", "mlp"):
        c.data.source = "digits"
        c.measure.num_examples = 256
        c.train.batch_size = 128
        if variant == "cnn":
            c.data.image_shape = (8, 8, 1)
            c.model.kind = "cnn"
            c.model.channels = (8, 16)
            c.model.norm = "layer"
    else:
        raise ValueError(f"configs/transformers.py: unknown variant {variant!r} (cnn, mlp)")
    return c

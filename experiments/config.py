"""The experiment configuration: defaults, and a validation that names the offending key.

Configs are ``configs/*.py`` files whose ``get_config()`` returns an ``ml_collections.ConfigDict``
(the flax-examples convention); variants start from :func:`base_config` and change a few fields.
The command line overrides fields as ``--config.train.steps=500``. The config is locked, so a
misspelt key is an error, and ml_collections rejects a value of the wrong type.
"""

from __future__ import annotations

import ml_collections

from experiments import data as data_lib
from experiments import models
from experiments.errors import ConfigError

OPTIMIZERS = ("sgd", "momentum", "adam")
LOSSES = ("cross_entropy", "mse")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # The sweep: every activation x every seed. A seed fixes initialisation, data order and probes,
    # so runs that share a seed differ only in their activation.
    c.activations = ("relu", "tanh", "gelu", "silu", "softplus")
    c.seeds = (0, 1)
    c.dtype = "float32"  # or "float64"

    c.data = ml_collections.ConfigDict()
    c.data.source = "digits"  # digits | teacher | mixture | npz | idx
    c.data.path = ""  # npz file, or folder of idx / idx.gz files
    c.data.test_fraction = 0.25  # for sources without their own test split
    c.data.split_seed = 0
    c.data.standardize = True
    c.data.num_train = 0  # 0: all
    c.data.num_test = 0
    c.data.image_shape = ()  # e.g. (8, 8, 1) for a CNN on digits
    c.data.num_examples = 2000  # synthetic sources
    c.data.input_dim = 20
    c.data.num_classes = 10
    c.data.teacher_width = 32
    c.data.separation = 3.0
    c.data.synthetic_seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.kind = "mlp"  # mlp | cnn
    c.model.width = 32
    c.model.depth = 2
    c.model.channels = (8, 16)  # cnn

    c.train = ml_collections.ConfigDict()
    c.train.loss = "cross_entropy"  # cross_entropy | mse (on one-hot labels)
    c.train.optimizer = "sgd"  # sgd (plain gradient descent) | momentum | adam
    c.train.learning_rate = 0.1
    c.train.momentum = 0.9
    c.train.steps = 1000
    c.train.batch_size = 0  # 0: full batch

    c.measure = ml_collections.ConfigDict()
    c.measure.every = 100  # measure every k steps; step 0 and the last step always
    c.measure.steps = ()  # or an explicit list of steps (then `every` is ignored)
    c.measure.split = "train"  # the measurement set: "train" or "test" examples
    c.measure.num_examples = 0  # the first N examples of that split; 0: all of it
    c.measure.batch_size = 0  # chunk size inside the curvature matvec; 0: all at once
    c.measure.top_k = 5
    c.measure.bottom_k = 3
    c.measure.lanczos_steps = 60
    c.measure.trace_matvecs = 60  # Hutch++
    c.measure.frobenius_probes = 16  # shared probes for ||H||_F, ||G||_F, ||R||_F
    c.measure.slq_probes = 4
    c.measure.slq_steps = 60
    c.measure.gauss_newton = True  # also measure G and R = H - G
    return c


def validate(config, num_params: int | None = None) -> None:
    """Raise :class:`ConfigError` naming the first bad key. Runs before any training."""

    def need(ok, key, message):
        if not ok:
            raise ConfigError(f"config key {key}: {message}")

    need(len(config.activations) > 0, "activations", "empty")
    for name in config.activations:
        try:
            models.parse_activation(name)
        except ValueError as err:
            raise ConfigError(f"config key activations: {err}") from None
    need(len(set(config.activations)) == len(config.activations), "activations", "duplicates")
    need(len(config.seeds) > 0, "seeds", "empty")
    need(all(isinstance(s, int) and s >= 0 for s in config.seeds), "seeds", "need integers >= 0")
    need(
        config.dtype in ("float32", "float64"),
        "dtype",
        f"{config.dtype!r} is not float32 or float64",
    )
    need(
        config.data.source in data_lib.SOURCES,
        "data.source",
        f"{config.data.source!r} is not one of {data_lib.SOURCES}",
    )
    need(
        config.model.kind in ("mlp", "cnn"),
        "model.kind",
        f"{config.model.kind!r} is not 'mlp' or 'cnn'",
    )
    need(config.model.width >= 1 and config.model.depth >= 1, "model.width/depth", "must be >= 1")
    need(config.train.loss in LOSSES, "train.loss", f"{config.train.loss!r} is not one of {LOSSES}")
    need(
        config.train.optimizer in OPTIMIZERS,
        "train.optimizer",
        f"{config.train.optimizer!r} is not one of {OPTIMIZERS}",
    )
    need(config.train.learning_rate > 0, "train.learning_rate", "must be positive")
    need(config.train.steps >= 0, "train.steps", "must be >= 0")
    need(config.train.batch_size >= 0, "train.batch_size", "must be >= 0 (0: full batch)")
    m = config.measure
    need(m.every >= 1, "measure.every", "must be >= 1")
    need(
        all(isinstance(s, int) and not isinstance(s, bool) for s in m.steps),
        "measure.steps",
        f"steps must be integers, got {tuple(m.steps)}",
    )
    need(m.split in ("train", "test"), "measure.split", f"{m.split!r} is not 'train' or 'test'")
    need(m.num_examples >= 0, "measure.num_examples", "must be >= 0 (0: the whole split)")
    need(m.batch_size >= 0, "measure.batch_size", "must be >= 0 (0: all examples at once)")
    need(
        config.data.num_train >= 0 and config.data.num_test >= 0,
        "data.num_train/num_test",
        "must be >= 0 (0: all)",
    )
    need(
        0.0 <= config.train.momentum < 1.0,
        "train.momentum",
        f"{config.train.momentum} is not in [0, 1)",
    )
    need(
        all(0 <= s <= config.train.steps for s in m.steps),
        "measure.steps",
        f"steps must lie in [0, train.steps={config.train.steps}]",
    )
    need(
        m.top_k >= 1 and m.bottom_k >= 0, "measure.top_k/bottom_k", "need top_k >= 1, bottom_k >= 0"
    )
    need(
        m.lanczos_steps >= 2 * max(m.top_k, m.bottom_k),
        "measure.lanczos_steps",
        f"{m.lanczos_steps} is smaller than 2 * max(top_k, bottom_k) (both ends come from one run)",
    )
    need(m.trace_matvecs >= 4, "measure.trace_matvecs", "Hutch++ needs at least 4")
    need(
        m.frobenius_probes >= 2, "measure.frobenius_probes", "need at least 2 for a standard error"
    )
    need(
        m.slq_probes >= 1 and m.slq_steps >= 2,
        "measure.slq_probes/slq_steps",
        "need >= 1 probe and >= 2 steps",
    )
    if num_params is not None:
        need(
            m.lanczos_steps <= num_params,
            "measure.lanczos_steps",
            f"{m.lanczos_steps} exceeds the {num_params} parameters",
        )
        need(
            m.slq_steps <= num_params,
            "measure.slq_steps",
            f"{m.slq_steps} exceeds the {num_params} parameters",
        )


def schedule(config) -> list[int]:
    """The measurement steps: explicit or every k, always with step 0 and the last step."""
    last = config.train.steps
    steps = (
        set(config.measure.steps)
        if config.measure.steps
        else set(range(0, last + 1, config.measure.every))
    )
    return sorted(steps | {0, last})

"""The config: every bad value is an error naming its key, before any training."""

import jax
import pytest

pytest.importorskip("flax")
from workbench_helpers import (  # noqa: E402
    load_config,
    quiet,
)

from experiments import run as run_lib  # noqa: E402


@pytest.mark.parametrize(
    "change,match",
    [
        (
            lambda c: setattr(c, "activations", ("relu", "swish2")),
            "config key activations: unknown activation 'swish2'",
        ),
        (
            lambda c: setattr(c.data, "source", "mnist"),
            "config key data.source: unknown data source 'mnist'; known: digits",
        ),
        (
            lambda c: (
                setattr(c.data, "source", "npz"),
                setattr(c.data, "path", "/nonexistent/d.npz"),
            ),
            "data.path: /nonexistent/d.npz does not exist",
        ),
        (
            lambda c: setattr(c.measure.top_eigenvalues, "num_steps", 2),
            "config key measure.top_eigenvalues: num_steps=2 must be an integer >= k=3",
        ),
        (
            lambda c: setattr(c.train, "optimizer", "lbfgs"),
            "config key train.optimizer: unknown optimizer 'lbfgs'; known: sgd, momentum, adam, rmsprop",
        ),
        (
            lambda c: setattr(c.measure.density, "num_steps", 10_000),
            "config key measure.density: num_steps=10000 exceeds the 682 parameters",
        ),
        (
            lambda c: setattr(c.measure, "steps", (0, 5.5, 10)),
            "config key measure.steps: steps must be integers",
        ),
        (lambda c: setattr(c.measure, "num_examples", -100), "config key measure.num_examples"),
        (lambda c: setattr(c.measure, "split", "validation"), "config key measure.split"),
        (lambda c: setattr(c.train, "momentum", 1.5), "config key train.momentum"),
        (lambda c: setattr(c.data, "num_train", -5), "config key data.num_train"),
        (
            lambda c: setattr(c.model, "kind", "cnn"),
            "config key model.kind='cnn' needs image inputs",
        ),
        (
            lambda c: setattr(c.data, "test_fraction", 0.0001),
            "config key data.test_fraction: 0.0001 of 1797 examples leaves 0",
        ),
        (
            lambda c: setattr(c.train, "learning_rate", float("inf")),
            "config key train.learning_rate: inf is not a finite positive number",
        ),
        (
            lambda c: setattr(c.measure, "quantities", ("lambda_max", "hessian_rank")),
            "config key measure.quantities: unknown measurement 'hessian_rank'; known: lambda_max",
        ),
        (
            lambda c: setattr(c.measure, "quantities", ("optimizer_state",)),
            "config key measure.optimizer_state: needs an optimizer with a second moment "
            "\\(adam, rmsprop\\), not 'sgd'",
        ),
        (
            lambda c: setattr(c, "sweep", ("train.learning_rat=0.1,0.2",)),
            "sweep train.learning_rat: config key train.learning_rat does not exist",
        ),
        (
            lambda c: setattr(c, "sweep", ("train.learning_rate=0.1,fast",)),
            "sweep train.learning_rate: 'fast' is a str, the field is a float",
        ),
        (
            lambda c: setattr(c, "sweep", ("train.learning_rate=0.1,inf",)),
            "config key train.learning_rate: inf is not a finite positive number",
        ),
        (
            lambda c: setattr(c.measure, "save_eigenvectors", 4),
            "config key measure.save_eigenvectors: 4 exceeds the 3 eigenvalues",
        ),
        (
            lambda c: setattr(c.measure, "devices", 0),
            "config key measure.devices: 0 is not an integer >= 1 or 'all'",
        ),
        (
            lambda c: setattr(c.measure, "devices", "four"),
            "config key measure.devices: 'four' is not an integer >= 1 or 'all'",
        ),
        (
            lambda c: setattr(c.measure, "devices", 4096),
            r"config key measure.devices: 4096 devices asked for, but jax.device_count\(\) is "
            f"{jax.device_count()}",
        ),
    ],
)
def test_bad_config_fails_before_training(tmp_path, change, match):
    config = load_config()
    with config.unlocked():
        change(config)
    with pytest.raises(ValueError, match=match):
        run_lib.run(config, tmp_path, progress=quiet())
    assert not (tmp_path / "members").exists()


def test_an_old_key_set_in_a_config_file_names_its_new_place(tmp_path):
    config = load_config()
    with config.unlocked():
        config.measure.top_k = 3  # unlocked: a config file would add it silently
    with pytest.raises(
        ValueError, match="measure.top_k: does not exist; it moved to measure.top_eigenvalues.k"
    ):
        run_lib.run(config, tmp_path, progress=quiet())

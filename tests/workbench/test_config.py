"""The config: every bad value is an error naming its key, before any training."""

import warnings

import jax
import pytest

pytest.importorskip("flax")
from workbench_helpers import (  # noqa: E402
    load_config,
    quiet,
)

from experiments import config as config_lib  # noqa: E402
from experiments import run as run_lib  # noqa: E402
from experiments.errors import ConfigError  # noqa: E402


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


# Release 0.1's names of the budgets, written out here (not read from the code's table).
RELEASE_01_NAMES = {
    "measure.lambda_max.lanczos_steps": "measure.lambda_max.num_steps",
    "measure.top_eigenvalues.lanczos_steps": "measure.top_eigenvalues.num_steps",
    "measure.bottom_eigenvalues.lanczos_steps": "measure.bottom_eigenvalues.num_steps",
    "measure.gauss_newton.lanczos_steps": "measure.gauss_newton.num_steps",
    "measure.density.lanczos_steps": "measure.density.num_steps",
    "measure.fisher.lanczos_steps": "measure.fisher.num_steps",
    "measure.preconditioner.lanczos_steps": "measure.preconditioner.num_steps",
    "measure.trace.matvecs": "measure.trace.num_matvecs",
    "measure.gauss_newton.trace_matvecs": "measure.gauss_newton.num_matvecs",
    "measure.fisher.trace_matvecs": "measure.fisher.num_matvecs",
    "measure.diagonal.matvecs": "measure.diagonal.num_matvecs",
    "measure.optimizer_state.diagonal_matvecs": "measure.optimizer_state.num_matvecs",
    "measure.frobenius.probes": "measure.frobenius.num_matvecs",
    "measure.blocks.probes": "measure.blocks.num_matvecs",
    "measure.density.probes": "measure.density.num_probes",
    "measure.gradient_noise.chunk": "measure.gradient_noise.batch_size",
}


def _holds(config, path):
    *parents, leaf = path.split(".")
    for part in parents:
        config = config[part]
    return leaf in config


def test_every_renamed_key_is_today_a_key_under_its_new_name():
    assert config_lib.RENAMED_KEYS == RELEASE_01_NAMES
    base = config_lib.base_config()
    for old, new in RELEASE_01_NAMES.items():
        assert _holds(base, new) and not _holds(base, old), old


def test_a_deprecated_key_in_a_config_file_sets_its_new_name_and_warns_once(tmp_path):
    config_lib._warned.clear()
    config = load_config()
    with config.unlocked():  # what a config file written for release 0.1 does
        config.measure.trace.matvecs = 12
        config.measure.density.lanczos_steps = 30
    with pytest.warns(FutureWarning) as caught:
        config_lib.validate(config)
    assert sorted(str(w.message) for w in caught) == [
        "config key measure.density.lanczos_steps is deprecated: use measure.density.num_steps",
        "config key measure.trace.matvecs is deprecated: use measure.trace.num_matvecs",
    ]
    assert config.measure.trace.num_matvecs == 12 and "matvecs" not in config.measure.trace
    assert config.measure.density.num_steps == 30 and "lanczos_steps" not in config.measure.density
    # Once per key and process: the same key in another config is mapped silently.
    again = load_config()
    with again.unlocked():
        again.measure.trace.matvecs = 14
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config_lib.validate(again)
    assert again.measure.trace.num_matvecs == 14
    # A run takes it the same way: what it stores and fingerprints holds the new name only.
    late = load_config()
    with late.unlocked():
        late.measure.trace.matvecs = 16
    plan = run_lib.prepare(late, tmp_path)
    assert run_lib.resolved(plan.config)["measure"]["trace"] == {
        "every": 0,
        "steps": [],
        "num_matvecs": 16,
    }
    assert all(s.config.measure.trace.num_matvecs == 16 for s in plan.specs)


def test_errors_name_the_new_key_and_unknown_settings_are_errors():
    config_lib._warned.clear()
    config = load_config()
    with config.unlocked():
        config.measure.frobenius.probes = 1  # deprecated, and too few
    with pytest.warns(FutureWarning, match="measure.frobenius.probes is deprecated"):
        with pytest.raises(
            ConfigError,
            match="config key measure.frobenius: num_matvecs=1 must be an integer >= 2",
        ):
            config_lib.validate(config)
    config = load_config()
    with config.unlocked():
        config.measure.trace.num_matvec = 30  # misspelt: once silently ignored
    with pytest.raises(
        ConfigError,
        match="config key measure.trace.num_matvec: does not exist; known: every, steps, "
        "num_matvecs",
    ):
        config_lib.validate(config)

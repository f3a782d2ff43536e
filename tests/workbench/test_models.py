"""Models and activations: names, the softplus-to-ReLU family, one program for every activation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
from workbench_helpers import (  # noqa: E402
    load_config,
)

from experiments import config as config_lib  # noqa: E402
from experiments import (  # noqa: E402
    measure,  # noqa: E402
    models,
)
from experiments import run as run_lib  # noqa: E402


def test_activations_by_name():
    x = jnp.linspace(-3, 3, 101)
    assert np.allclose(models.activation_fn("softplus:200")(x), jax.nn.relu(x), atol=5e-3)
    assert not np.allclose(
        models.activation_fn("gelu")(x), models.activation_fn("gelu_tanh")(x), atol=1e-5
    )
    assert np.allclose(models.activation_fn("leaky_relu:0.1")(-x), jnp.where(x > 0, -0.1 * x, -x))
    for bad, match in (
        ("softplus:-1", "beta must be positive"),
        ("tanh:2", "takes no parameter"),
        ("soft", "unknown activation"),
    ):
        with pytest.raises(ValueError, match=match):
            models.parse_activation(bad)


def test_softplus_beta_study_activations_tend_to_relu():
    # softplus(beta x) / beta against the formula in float64, for the study's betas: it exceeds
    # ReLU by at most log(2) / beta (at 0), so it approaches ReLU as beta grows.
    config = load_config("softplus_beta")
    betas = [models.parse_activation(a)[1] for a in config.activations[1:]]
    assert config.activations[0] == "relu" and betas == [1, 2, 5, 10, 20, 50]
    x = np.linspace(-4.0, 4.0, 801)
    gaps = []
    with jax.enable_x64(True):
        for name, beta in zip(config.activations[1:], betas, strict=True):
            got = np.asarray(models.activation_fn(name)(jnp.asarray(x)))
            assert np.allclose(got, np.logaddexp(0.0, beta * x) / beta, rtol=1e-12, atol=1e-14)
            gap = got - np.maximum(x, 0.0)
            assert np.all(gap > -1e-14) and np.max(gap) == pytest.approx(
                np.log(2) / beta, rel=1e-12
            )
            gaps.append(np.max(gap))
    assert np.all(np.diff(gaps) < 0)
    # The config validates, shares one compiled program across its seven activations and
    # measures the curvature by layer at the first and last steps only.
    config_lib.validate(config)
    assert run_lib.share_activations(config)
    assert "blocks" in measure.plan_at(config, 600) and "blocks" in measure.plan_at(config, 0)
    assert "blocks" not in measure.plan_at(config, 200)
    main = load_config("relu_vs_smooth")
    config_lib.validate(main)
    with_blocks = [s for s in measure.schedule(main) if "blocks" in measure.plan_at(main, s)]
    assert with_blocks == [0, 600]


def test_the_shared_program_computes_each_activation_exactly():
    # One compiled model for a sweep's activations (lax.switch on the data's activation column)
    # gives each activation's own network, bit for bit up to round-off.
    cfg = load_config().model
    shared = models.build(cfg, ("relu", "tanh", "gelu"), (5,), 3, seed=0)
    alone = models.build(cfg, ("tanh",), (5,), 3, seed=0)
    m_shared, _ = models.pure_functions(shared[0], jax.tree_util.tree_structure(shared[2]), "mse")
    m_alone, _ = models.pure_functions(alone[0], jax.tree_util.tree_structure(alone[2]), "mse")
    x = jax.random.normal(jax.random.key(1), (7, 5))
    want = m_alone(alone[1], models.with_activation({"x": x}, 0))
    got = m_shared(shared[1], models.with_activation({"x": x}, 1))
    assert np.allclose(got, want, rtol=1e-6, atol=1e-7)

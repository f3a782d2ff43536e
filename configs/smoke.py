"""A tiny end-to-end config for tests and a first look: seconds, not minutes."""

from experiments.config import base_config


def get_config():
    c = base_config()
    c.activations = ("relu", "tanh")
    c.seeds = (0,)
    c.data.num_train = 200
    c.data.num_test = 100
    c.model.width = 8
    c.model.depth = 2
    c.train.steps = 20
    c.train.learning_rate = 0.2
    c.measure.every = 10
    c.measure.top_eigenvalues.k = 3
    c.measure.top_eigenvalues.lanczos_steps = 20
    c.measure.bottom_eigenvalues.k = 2
    c.measure.bottom_eigenvalues.lanczos_steps = 20
    c.measure.gauss_newton.k = 3
    c.measure.gauss_newton.lanczos_steps = 20
    c.measure.gauss_newton.trace_matvecs = 30
    c.measure.trace.matvecs = 30
    c.measure.frobenius.probes = 4
    c.measure.density.probes = 2
    c.measure.density.lanczos_steps = 15
    return c

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
    c.measure.top_eigenvalues.num_steps = 20
    c.measure.bottom_eigenvalues.k = 2
    c.measure.bottom_eigenvalues.num_steps = 20
    c.measure.gauss_newton.k = 3
    c.measure.gauss_newton.num_steps = 20
    c.measure.gauss_newton.num_matvecs = 30
    c.measure.trace.num_matvecs = 30
    c.measure.frobenius.num_matvecs = 4
    c.measure.density.num_probes = 2
    c.measure.density.num_steps = 15
    return c

"""The default comparison: ReLU against tanh, GELU, SiLU and softplus on scikit-learn's digits.

A 64-32-32-10 MLP trained by full-batch gradient descent (so the edge of stability 2/lr applies),
two seeds, curvature measured at 9 steps (denser early, where it changes fastest; the spectral
density at 4) on the 1,348 training images. About a minute on 2 CPU cores.
"""

from experiments.config import base_config


def get_config():
    c = base_config()
    c.activations = ("relu", "tanh", "gelu", "silu", "softplus")
    c.seeds = (0, 1)
    c.train.steps = 600
    c.train.learning_rate = 0.2
    c.measure.steps = (0, 10, 25, 50, 100, 200, 300, 450, 600)
    # The spectral density (SLQ, 240 matvecs) is drawn at initialisation and at the end: it is
    # measured at four steps, not eleven.
    c.measure.density.steps = (0, 100, 300, 600)
    # Of G's spectrum the summary reports the top eigenvalue: one Ritz pair from 30 steps.
    c.measure.gauss_newton.k = 1
    c.measure.gauss_newton.num_steps = 30
    # The curvature by layer (the block figure) at initialisation and at the end only.
    c.measure.quantities = (*c.measure.quantities, "blocks")
    c.measure.blocks.steps = (0, 600)
    return c

"""The default comparison: ReLU against tanh, GELU, SiLU and softplus on scikit-learn's digits.

A 64-32-32-10 MLP trained by full-batch gradient descent (so the edge of stability 2/lr applies),
two seeds, curvature measured at 11 steps (denser early, where it changes fastest) on the 1,348
training images.
"""

from experiments.config import base_config


def get_config():
    c = base_config()
    c.activations = ("relu", "tanh", "gelu", "silu", "softplus")
    c.seeds = (0, 1)
    c.train.steps = 600
    c.train.learning_rate = 0.2
    c.measure.steps = (0, 10, 25, 50, 100, 150, 200, 300, 400, 500, 600)
    return c

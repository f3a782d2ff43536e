"""Outliers of the Hessian spectrum (Sagun et al. 2017; Papyan 2019, 2020): the top-20
eigenvalues of H and of its Gauss-Newton part G for wide ReLU and tanh networks, at
initialisation and after training, with cross-entropy and with squared error.

For C classes, the class structure of the gradients predicts about C outliers standing apart
from the bulk, C - 1 with softmax cross-entropy (its output Hessian has rank C - 1: the logits'
common shift does not change the loss). The `spectrum` figure and the summary answer from data
how many eigenvalues stand apart (the largest gap among the top 20). About 2 minutes on 2 CPU
cores.
"""

from experiments.config import base_config


def get_config():
    c = base_config()
    c.activations = ("relu", "tanh")
    c.seeds = (0, 1)
    c.sweep = ("train.loss=cross_entropy,mse",)
    c.model.width = 256
    c.model.depth = 2
    c.train.learning_rate = 0.1
    c.train.steps = 1000
    c.measure.steps = (0, 1000)
    c.measure.quantities = ("top_eigenvalues", "gauss_newton")
    c.measure.top_eigenvalues.k = 20
    c.measure.top_eigenvalues.num_steps = 80
    c.measure.gauss_newton.k = 20
    c.measure.gauss_newton.num_steps = 80
    c.measure.gauss_newton.num_matvecs = 30
    return c

"""Can RMSProp be viewed as estimating second-order effects? Adam and RMSProp on the digits,
ReLU and tanh (64-32-32-10 MLP, minibatches of 64, η = 1e-3, 1,000 steps, identical
initialisation and data order), and at 5 steps the ``preconditioner`` measurement: the second
moment ν and √ν against the exact diagonals of the Hessian H, its Gauss-Newton part G and the
empirical Fisher F on the 1,348 training digits (Pearson, Spearman and log-log correlation over
the parameters, per layer and overall, exact zeros excluded and counted), and the top and
bottom eigenvalues and condition number λmax / mean eigenvalue of H and of P^-1/2 H P^-1/2,
with P what the update divides by (Adam: √ν̂ + ε).

The ``preconditioner`` figure draws the correlations along training and per layer, and the
conditioning of H against the preconditioned H. About 2 minutes on 2 CPU cores.
"""

from experiments.config import base_config


def get_config():
    c = base_config()
    c.activations = ("relu", "tanh")
    c.seeds = (0,)
    c.sweep = ("train.optimizer=adam,rmsprop",)
    c.model.width = 32
    c.model.depth = 2
    c.train.optimizer = "adam"  # and rmsprop, by the sweep
    c.train.learning_rate = 1e-3
    c.train.batch_size = 64
    c.train.steps = 1000
    c.measure.steps = (0, 25, 100, 250, 500, 1000)
    c.measure.quantities = ("preconditioner",)
    c.measure.preconditioner.k = 3
    c.measure.preconditioner.num_steps = 40
    return c

"""Optimizers compared: SGD, heavy-ball momentum, Adam, RMSProp and Hessian-free (Martens 2010,
``curvature.optim.hessian_free``) on ReLU and tanh networks, full-batch cross-entropy on the
digits, from the same initial parameters, with the curvature (λmax, tr H) along the way.

Each optimizer runs at its own learning rate (the best of a small grid, 0.1-1 for SGD, 0.03-0.3
for momentum, 0.001-0.1 for Adam and 0.001-0.1 for RMSProp, for both activations; the fields vary
together, see ``experiments.sweep``): the first-order methods 1,500 steps, Hessian-free 40 steps
(its Gauss-Newton CG takes 10-50 curvature products a step), about the same number of
gradient-equivalents. Every step's loss, cost in gradient-equivalents and wall time is logged
(``training.npz``); the ``optimizers`` figure plots the loss against all three and the summary
adds the cost of reaching a target loss. One member at a time (``workers = 1``), so that wall
times are not shared with another member. About two minutes on 2 CPU cores.
"""

from experiments.config import base_config


def get_config():
    c = base_config()
    c.activations = ("relu", "tanh")
    c.seeds = (0,)
    c.workers = 1
    c.sweep = (
        "train.optimizer+train.learning_rate+train.steps+measure.every="
        "(sgd,1.0,1500,100),(momentum,0.3,1500,100),(adam,0.03,1500,100),"
        "(rmsprop,0.01,1500,100),(hessian_free,1.0,40,5)",
    )
    c.model.width = 32
    c.model.depth = 2
    c.train.loss = "cross_entropy"
    c.train.batch_size = 0  # full batch: Hessian-free's curvature and line search on all of it
    # The initial λ: the best of 1e-3 (the library's default), 0.1 and 1 in
    # benchmarks/bench_optim.py; Levenberg-Marquardt adapts it from the first step.
    c.train.hessian_free.damping = 0.1
    c.train.hessian_free.max_cg_steps = 50
    c.measure.quantities = ("lambda_max", "trace")
    c.measure.trace.num_matvecs = 30
    return c

"""Is K-FAC a better approximation of a ReLU network's Hessian than of a smooth one's? The main
job's network and training (a 64-32-32-10 MLP on the digits, full-batch gradient descent at
η = 0.2 for 600 steps), ReLU against tanh, GELU and softplus, one seed; at steps 0, 100, 300 and
600 the ``approximations`` measurement compares K-FAC (exact, Monte Carlo, eigenvalue-corrected),
the empirical Fisher and the Gauss-Newton diagonal with the Hessian H and its Gauss-Newton part
G on the 1,348 training digits (the optimizer's second moment needs Adam or RMSProp: gradient
descent has none), and the ``blocks`` measurement how much of H lies between layers (which no
block-diagonal approximation has) and how much of R = H − G within them (which no
approximation of G has).

The ``approximations`` figure draws the overlaps and relative errors along training, and K-FAC's
error at the end next to those two parts. About 2 minutes on 2 idle CPU cores (160-170 s of
CPU); docs/studies/approximations.md has its findings.
"""

from experiments.config import base_config


def get_config():
    c = base_config()
    c.activations = ("relu", "tanh", "gelu", "softplus")
    c.seeds = (0,)
    c.train.steps = 600
    c.train.learning_rate = 0.2
    c.measure.steps = (0, 100, 300, 600)
    c.measure.quantities = ("approximations", "blocks")
    # 100 probes: relative errors to ± 0.02-0.03, enough to tell the activations apart.
    c.measure.approximations.num_matvecs = 100
    # How well K-FAC and G's diagonal precondition G + λI, λ = 1e-3 λmax(G).
    c.measure.approximations.conditioned = ("kfac", "diagonal_ggn")
    return c

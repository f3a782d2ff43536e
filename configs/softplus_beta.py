"""Softplus sharpened towards ReLU: softplus(βx)/β for β = 1, 2, 5, 10, 20, 50 against ReLU on
the digits, the main job's network, training and seeds.

softplus(βx)/β is smooth for every β and tends to ReLU as β grows (it differs from ReLU by at
most log(2)/β, at 0), but its second derivative β·σ(βx)(1 − σ(βx)) grows into a spike of mass 1
at 0. Does the curvature approach ReLU's? The `activation_parameter` figure draws λmax, tr H and
tr G, the residual share ‖R‖F/‖H‖F (R = H − G) and the same-layer share of ‖R‖F² (which is 0
for ReLU) against β, ReLU as horizontal lines; the `blocks` figure shows the same-layer share
for every β. All activations share one compiled program (the model's ``lax.switch``). About two
minutes on 2 CPU cores.
"""

from experiments.config import base_config

BETAS = (1, 2, 5, 10, 20, 50)


def get_config():
    c = base_config()
    c.activations = ("relu", *(f"softplus:{beta}" for beta in BETAS))
    c.seeds = (0, 1)
    c.train.steps = 600
    c.train.learning_rate = 0.2
    c.measure.steps = (0, 50, 200, 600)
    c.measure.quantities = ("lambda_max", "trace", "gauss_newton", "frobenius", "blocks")
    c.measure.lambda_max.num_steps = 30
    c.measure.gauss_newton.k = 1
    c.measure.gauss_newton.num_steps = 30
    c.measure.blocks.steps = (0, 600)
    return c

"""Edge of stability (Cohen et al. 2021): full-batch gradient descent with squared error on the
digits, tanh and ReLU, learning rates 0.1 to 0.4, 6,000 steps, the sharpness λmax every 50.

Gradient descent on a quadratic diverges when λmax > 2/η. Cohen et al. found that training
pushes λmax up (progressive sharpening) until it reaches 2/η and then hovers there while the
loss keeps falling, non-monotonically. The `edge_of_stability` figure plots η·λmax/2 against
steps with the line at 1. A λmax-only plan: 121 measurements of 61 matvecs per member. About two
minutes on 2 CPU cores.
"""

from experiments.config import base_config


def get_config():
    c = base_config()
    c.activations = ("tanh", "relu")
    c.seeds = (0,)
    c.sweep = ("train.learning_rate=0.1,0.2,0.3,0.4",)
    c.model.width = 64
    c.model.depth = 2
    c.train.loss = "mse"
    c.train.optimizer = "sgd"
    c.train.batch_size = 0  # full batch: the edge 2/η holds
    c.train.steps = 6000
    c.train.divergence_factor = 0.0  # the loss spikes at the edge; only a non-finite loss stops
    c.measure.every = 50
    c.measure.quantities = ("lambda_max",)
    # At the edge the top eigenvalues crowd together (the top four of tanh at η = 0.4 lie within
    # 1.5%): 30 Lanczos steps leave most of them unconverged (residual ~0.4%), 60 converge.
    c.measure.lambda_max.num_steps = 60
    return c

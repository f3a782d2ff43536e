# %% [markdown]
# # Your own flax NNX model
#
# This tutorial measures the loss curvature of a small convolutional network with BatchNorm,
# written in flax NNX and trained briefly with optax Adam on scikit-learn's bundled digits. You
# will build its Hessian with `curvature.flax`, take its top eigenvalues, trace and spectral
# density, look at it layer by layer, split off its Gauss-Newton part, and see why a Hessian of
# BatchNorm in training mode is refused. The network has about two thousand parameters and the
# whole page runs in well under a minute on two CPU cores; every estimate's cost is given in
# matvecs (Hessian-vector products, each about two gradients).

# %% [markdown]
# ## The data and the model
#
# The digits are 8×8 grey images; we standardise the pixels (with the training set's mean and
# standard deviation) and give them a channel axis, so the inputs are `(N, 8, 8, 1)` in the
# NHWC layout flax's `Conv` expects. The network: two 3×3 convolutions with 8 channels, each
# followed by BatchNorm and a ReLU, a 2×2 average pool, and a linear read-out to the 10 classes.
#
# BatchNorm's `momentum=0.9` (flax's default is 0.99) lets its running averages settle within the
# few dozen training steps below, so that evaluation mode, the mode the curvature is measured in,
# uses statistics of the data rather than the initial zeros and ones.
#
# Everything is float32 (flax's default and the library's: an operator's dtype follows the
# parameters), and every random draw takes an explicit PRNG key.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import curvature as cv
import curvature.flax as cvf
from curvature.plotting import plot_density, series_style

digits = load_digits()
images = digits.images.astype(np.float32)[..., None]  # (1797, 8, 8, 1)
labels = digits.target.astype(np.int32)
order = np.random.default_rng(0).permutation(len(labels))
train_idx, test_idx = order[:1297], order[1297:]
mean, std = images[train_idx].mean(), images[train_idx].std()
images = (images - mean) / std
x_train, y_train = jnp.asarray(images[train_idx]), jnp.asarray(labels[train_idx])
x_test, y_test = jnp.asarray(images[test_idx]), jnp.asarray(labels[test_idx])


class CNN(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, kernel_size=(3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(4 * 4 * 8, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))  # (N, 4, 4, 8)
        return self.head(x.reshape(x.shape[0], -1))


def cross_entropy(logits, y):
    """The mean softmax cross-entropy over the batch: the library's convention is a mean loss."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


model = CNN(rngs=nnx.Rngs(0))
num_params = sum(p.size for p in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
print(f"{num_params} parameters")

# %% [markdown]
# ## Training briefly with Adam
#
# A plain `nnx.Optimizer` with optax Adam, 60 steps on minibatches of 128 in training mode
# (BatchNorm normalises with each minibatch's statistics and updates its running averages).
# This is ordinary flax code; the library is not involved yet.

# %%
optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(model(x), axis=-1) == y)


model.train()
batch_key = jax.random.key(1)
for step in range(60):
    idx = jax.random.choice(jax.random.fold_in(batch_key, step), len(y_train), (128,), False)
    loss = train_step(model, optimizer, x_train[idx], y_train[idx])
    if step % 20 == 0 or step == 59:
        print(f"step {step:2d}: minibatch loss {float(loss):.3f}")
model.eval()
test_accuracy = float(accuracy(model, x_test, y_test))
print(f"test accuracy (evaluation mode, running statistics): {test_accuracy:.3f}")
print("BatchNorm running mean of bn1:", np.round(np.asarray(model.bn1.mean[...]), 2))
assert test_accuracy > 0.8

# %% [markdown]
# ## The Hessian of a flax model
#
# `curvature.flax.hessian(loss, model, data)` takes a loss of the *module* and a batch,
# `loss(module, batch)`, that returns the **mean** loss over the batch; the operator is the
# Hessian of the mean loss over all of `data` (a pytree of arrays whose leading axis indexes
# examples; `batch_size=` would chunk it without changing the operator). We use 256 training
# examples. Building the operator costs no matvec (only a check of the loss on 64 examples,
# below).
#
# Only the `nnx.Param` leaves are differentiated (the convolution kernels and biases,
# BatchNorm's scale and bias, the read-out); the running mean and variance are carried as
# constants. The module is used through a copy in **evaluation mode**, so BatchNorm normalises
# with its running averages: each example's loss then depends on that example alone, and the
# dataset Hessian is well defined. The operator is float32, like the parameters (float64
# parameters, under `jax.enable_x64(True)`, would give a float64 operator).
#
# `curvature.flax.parameters(model)` is the pytree the operator differentiates: `H.unravel(v)`
# maps any flat vector of length `H.shape[0]` (a Ritz vector, a diagonal) to a pytree of this
# structure (an `nnx.State`; its paths end in NNX's `value`), and its paths are what `restrict`
# and `block_summary` selectors see.

# %%
data = {"x": x_train[:256], "y": y_train[:256]}
H = cvf.hessian(lambda m, b: cross_entropy(m(b["x"]), b["y"]), model, data)
print("H:", H.shape, H.dtype)

params = cvf.parameters(model)
print(type(params).__name__)
for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    print(f"  {jax.tree_util.keystr(path, simple=True, separator='/'):20s} {leaf.shape}")
assert H.shape == (num_params, num_params) and H.dtype == jnp.float32

# %% [markdown]
# ## Top eigenvalues
#
# `cv.eigsh` runs Lanczos from a random start vector (hence the key). With `k=3` and
# `num_steps=30` it costs 30 + 3 + 30 matvecs: the Lanczos run, three products that recompute the
# residual norms honestly, and a second Lanczos run on the operator deflated of the converged
# pairs that checks no eigenvalue was missed (`check_steps`, by default as many as `num_steps`).
# `converged[i]` says that the i-th value is the i-th largest eigenvalue to tolerance
# (`residual ≤ sqrt(eps) · max|θ|`, with float32's eps).
#
# The top eigenvector comes back flat; `H.unravel` turns it into a pytree shaped like the
# parameters, so we can see which layers it lives in.

# %%
key = jax.random.key(42)
top = cv.eigsh(H, k=3, num_steps=30, key=jax.random.fold_in(key, 0))
for i in range(3):
    print(
        f"λ{i + 1} = {float(top.eigenvalues[i]):.4f}  residual {float(top.residual_norms[i]):.1e}"
        f"  converged={bool(top.converged[i])}"
    )
print("matvecs:", int(top.num_matvecs))

v = H.unravel(top.eigenvectors[:, 0])  # a pytree like cvf.parameters(model)
shares = {
    jax.tree_util.keystr(path, simple=True, separator="/"): float(jnp.sum(leaf**2))
    for path, leaf in jax.tree_util.tree_flatten_with_path(v)[0]
}
print("share of the top eigenvector's squared norm by parameter:")
for name, share in shares.items():
    print(f"  {name:20s} {share:.3f}")
assert bool(top.converged[0])
assert abs(sum(shares.values()) - 1) < 1e-4

# %% [markdown]
# ## The spectral density
#
# Stochastic Lanczos quadrature: `num_probes` Lanczos runs of `num_steps` steps each (3 × 20 =
# 60 matvecs) give a quadrature of the eigenvalue distribution. `plot_density` smooths it with a
# Gaussian of standard deviation `sigma` (here 1% of λ1) and draws it on a log axis, since a
# network's Hessian has most of its eigenvalues near zero and a few large outliers; `rug=True`
# marks the quadrature nodes, the dotted lines eigsh's top three eigenvalues, which the outlying
# peaks should match. The density carries its own trace estimate (Hutchinson on the SLQ
# probes) with a standard error, which three probes leave wide.

# %%
density = cv.spectral_density(H, num_probes=3, num_steps=20, key=jax.random.fold_in(key, 1))
slq_trace = density.trace()
print(f"tr H from SLQ = {float(slq_trace.value):.2f} ± {float(slq_trace.standard_error):.2f}")

sigma = 0.01 * float(top.eigenvalues[0])
fig, ax = plt.subplots(figsize=(6, 3.5))
plot_density(ax, density, sigma=sigma, rug=True, label="H")
for i, value in enumerate(top.eigenvalues):
    ax.axvline(float(value), color="grey", linestyle=":", label="eigsh top 3" if i == 0 else None)
ax.set_title("Hessian spectral density (SLQ, 3 probes × 20 steps)")
ax.legend()
fig.tight_layout()
plt.show()
# The largest quadrature node is λ1, found again by the SLQ runs.
assert abs(float(density.nodes.max()) - float(top.eigenvalues[0])) < 0.02 * float(
    top.eigenvalues[0]
)

# %% [markdown]
# ## The Gauss-Newton part, and traces on shared probes
#
# `curvature.flax.gauss_newton` takes the model's *outputs*, `apply(module, batch) -> logits`,
# and a named output loss; with `loss="cross_entropy"` it finds the integer labels under the
# batch's `"y"` key. G = Jᵀ (∂²ℓ/∂f²) J is the Hessian of the loss with the network linearised
# at the current parameters (for softmax cross-entropy, also the true Fisher) and is positive
# semi-definite; `H − G` is what it leaves out, the network's own second derivatives weighted by
# the loss's gradient. A product with G costs about a gradient and a half, one with H about two.
#
# `cv.trace` uses Hutch++ by default: a third of its budget sketches the top of the spectrum,
# whose trace it takes exactly, and the rest are Hutchinson probes for what is left; it returns
# the estimate and its standard error. Given the tuple `(H, G, H - G)` it estimates all three on
# shared probes and on H's sketch: past the sketch, each probe costs one product with H and one
# with G, and the residual's products are their difference. With `num_matvecs=45` that is 45
# products with H (15 of them for the sketch) and 30 with G. H's numbers are exactly what
# `cv.trace(H, ...)` alone gives with the same key; G's and the residual's are unbiased, each
# within its own error bar.
#
# What to expect of tr(H − G): in evaluation mode BatchNorm is a fixed affine map, so the network
# is piecewise linear in each layer's own parameters (ReLU'' = 0). The same-layer blocks of
# H − G vanish, and with them its trace, which only sees the diagonal: tr(H − G) is zero here,
# while H − G itself is not (its cross-layer blocks remain). The estimate below is consistent
# with zero within its error bar; its error bar is not small, because the probes see the
# cross-layer blocks.

# %%
G = cvf.gauss_newton(lambda m, b: m(b["x"]), model, data, loss="cross_entropy")
tr_h, tr_g, tr_r = cv.trace((H, G, H - G), num_matvecs=45, key=jax.random.fold_in(key, 2))
for name, t in (("H", tr_h), ("G", tr_g), ("H - G", tr_r)):
    print(
        f"tr {name:5s} = {float(t.value):8.3f} ± {float(t.standard_error):.3f}"
        f"  ({int(t.num_matvecs)} products with it)"
    )
assert [int(t.num_matvecs) for t in (tr_h, tr_g, tr_r)] == [45, 30, 30]
assert float(tr_g.value) > 0
assert abs(float(tr_r.value)) < 4 * float(tr_r.standard_error)  # zero in theory
# The SLQ trace and Hutch++'s estimate the same number.
assert abs(float(slq_trace.value) - float(tr_h.value)) < 5 * float(
    np.hypot(slq_trace.standard_error, tr_h.standard_error)
)

# %% [markdown]
# ## Layer by layer
#
# `cv.block_summary(H, key=...)` partitions the parameters into groups, by default
# `cv.layer_groups` (one group per layer: leaves whose paths agree up to the last key, NNX's
# trailing `value` ignored, so a convolution's kernel and bias, or BatchNorm's scale and bias,
# form one group). For every group it gives the trace of the diagonal block (Hutchinson,
# `num_matvecs` probes on that group's entries) with its standard error, the block's top
# eigenvalue with a `converged` flag, and for every pair of groups the squared Frobenius norm of
# the block, from the same probes. Cost: per group `num_matvecs` products for the probes
# and up to `2 num_steps + 1` for the top eigenvalue (Lanczos and its rank check, as in
# `eigsh`; a BatchNorm block of 16 parameters gets at most 16 steps): at most
# 5 × (12 + 31) = 215 matvecs here.
#
# `summary.same_group_share()` is the share of ‖H‖F² in the same-layer (diagonal) blocks, from
# `frobenius_sq`, with a delta-method standard error from `frobenius_sq_se` (the blocks'
# estimates are independent). The rest of ‖H‖F² couples different layers.

# %%
print("groups:", list(cv.layer_groups(params)))
summary = cv.block_summary(H, key=jax.random.fold_in(key, 3), num_matvecs=12, num_steps=15)
for g, name in enumerate(summary.names):
    print(
        f"  {name:5s} {int(summary.sizes[g]):4d} params: trace {summary.trace[g]:7.3f}"
        f" ± {summary.trace_se[g]:.3f}   top eigenvalue {summary.top[g]:7.3f}"
        f" converged={bool(summary.converged[g])}"
    )

share, share_se = summary.same_group_share()
print(f"same-layer share of ||H||_F^2: {share:.3f} ± {share_se:.3f}")
layer_sum, layer_sum_se = summary.trace.sum(), np.sqrt(np.sum(summary.trace_se**2))
print(
    f"sum of per-layer traces: {layer_sum:.3f} ± {layer_sum_se:.3f}"
    f" (Hutch++ above: {float(tr_h.value):.3f} ± {float(tr_h.standard_error):.3f})"
)
# The per-layer traces add up to tr H, within the error bars of both estimates.
assert abs(layer_sum - float(tr_h.value)) < 5 * np.hypot(layer_sum_se, tr_h.standard_error)

# %% [markdown]
# `cv.block_densities` gives the spectral density of every diagonal block (the per-block view of
# Zhang et al. 2024), all groups in one compiled program: groups × `num_probes` × `num_steps`
# matvecs, here at most 5 × 4 × 12 = 240 (a block smaller than `num_steps` gets as many steps as
# its size, which are exact for it). Each block's density integrates to 1 over that block's own
# eigenvalues; its trace estimate has a standard error, as above.

# %%
blocks = cv.block_densities(H, key=jax.random.fold_in(key, 4), num_probes=4, num_steps=12)
grid = np.linspace(
    min(float(d.nodes.min()) for d in blocks.values()) - 5 * sigma,
    max(float(d.nodes.max()) for d in blocks.values()) + 5 * sigma,
    2000,
)
fig, ax = plt.subplots(figsize=(6, 3.5))
for i, (name, block) in enumerate(blocks.items()):
    plot_density(ax, block, sigma=sigma, grid=grid, label=name, **series_style(i))
    t = block.trace()
    print(f"  {name:5s} tr = {float(t.value):7.3f} ± {float(t.standard_error):.3f}")
ax.set_title("Spectral density of each layer's diagonal block of H")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## BatchNorm in training mode is refused
#
# With `train=True` the module keeps its own mode. Put it in training mode, and BatchNorm
# normalises each batch with that batch's own mean and variance: an example's loss then depends
# on the other examples in its batch, so the "dataset loss" depends on how the examples are
# grouped, and its Hessian would change with `batch_size`. There is no dataset Hessian to
# compute. The builders check for this before any work (the loss of the first 64 examples at once
# against the mean of its two halves) and refuse such a loss with a message that says why and
# how to fix it. (Dropout is refused the same way.)

# %%
model.train()
try:
    cvf.hessian(lambda m, b: cross_entropy(m(b["x"]), b["y"]), model, data, train=True)
except ValueError as err:
    message = str(err)
    print(message)
else:
    raise AssertionError("the training-mode Hessian should have been refused")
finally:
    model.eval()
assert "grouped into batches" in message

# %% [markdown]
# ## What it cost
#
# In matvecs: `eigsh` 63, SLQ 60, the shared traces 45 with H and 30 with G, `block_summary` at
# most 215 and `block_densities` at most 240. A matvec of this network on 256 examples takes
# milliseconds on a CPU; most of the wall time is compiling the programs, once each. Rebuilding
# `H` at new parameters (along training, say) gives an operator of the same type and shapes, so
# every compiled program is reused.

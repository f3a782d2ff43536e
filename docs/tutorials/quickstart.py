# %% [markdown]
# # Quick start, checked against the dense Hessian
#
# This page builds the Hessian of a small tanh network's loss as a matrix-free operator and runs
# every estimator of `curvature` on it: the top and bottom eigenvalues (Lanczos), the trace
# (Hutch++), the diagonal, the spectral density (stochastic Lanczos quadrature) and the
# Gauss-Newton split $H = G + R$. The network has a few hundred parameters, so the Hessian is
# also small enough to write down densely, and every estimate is checked against the exact
# value. Costs are counted in matvecs (Hessian-vector products, about two gradients each): a few
# thousand in all, half of them for the dense matrices that the checks need.

# %% [markdown]
# ## Setup: float64, a small MLP, a mean loss
#
# JAX computes in float32 by default, and so does `curvature`: an operator's dtype is that of
# the parameters. The checks on this page compare estimates with exact values to many digits,
# so we switch to float64 first, before any array is created (the setting applies to arrays
# made after it). The same calls work in float32, with relative round-off near `1e-7` instead of
# `1e-16`.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import curvature as cv
import curvature.plotting as cvp

jax.config.update("jax_enable_x64", True)  # before any array is created
key = jax.random.key(0)

# %% [markdown]
# The data are synthetic regression: 256 examples with 6 inputs and 2 targets made by a random
# "teacher" network plus noise. The model is an MLP with two hidden layers of 16 units. The
# parameters are a plain pytree (a list of `(w, b)` pairs); `curvature` ravels it into one flat
# vector of length $n$ and unravels results back into the same shapes.
#
# The convention that makes every number on this page well defined: `loss(params, batch)`
# returns the **mean** loss over the examples of `batch`. The operator is then the Hessian of the
# mean loss over the whole data set, whatever `batch_size` the data are split into.

# %%
sizes = [6, 16, 16, 2]


def init(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (m, p)) / np.sqrt(m), jnp.zeros(p))
        for k, m, p in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp(activation):
    def model(params, batch):
        h = batch["x"]
        for w, b in params[:-1]:
            h = activation(h @ w + b)
        w, b = params[-1]
        return h @ w + b

    return model


def mse(model):
    def loss(params, batch):  # the mean over the batch of 0.5 * squared error
        return 0.5 * jnp.mean(jnp.sum((model(params, batch) - batch["y"]) ** 2, axis=-1))

    return loss


k_data, k_teacher, k_noise, k_params = jax.random.split(key, 4)
x = jax.random.normal(k_data, (256, sizes[0]))
teacher = init(k_teacher, sizes)
y = mlp(jnp.tanh)(teacher, {"x": x}) + 0.1 * jax.random.normal(k_noise, (256, sizes[-1]))
data = {"x": x, "y": y}

params = init(k_params, sizes)
model = mlp(jnp.tanh)
loss = mse(model)
print("loss at these parameters:", float(loss(params, data)))
print("dtype:", params[0][0].dtype)

# %% [markdown]
# ## The operator
#
# `cv.hessian` builds the operator; it costs nothing until it is multiplied. With
# `batch_size=64` each product scans the 256 examples in four chunks inside one compiled
# program; the operator is the same for any `batch_size` (it only trades memory for speed).
# `H.shape` is `(n, n)`.

# %%
H = cv.hessian(loss, params, data, batch_size=64)
n = H.shape[0]
print("H.shape:", H.shape, " dtype:", H.dtype)

# %% [markdown]
# For the checks we also build the dense matrix. `cv.dense` multiplies $H$ by the $n$ unit
# vectors, so it costs $n$ matvecs: fine here, impossible for a real network (that is what the
# estimators are for). `jnp.linalg.eigvalsh` then gives the exact spectrum.

# %%
H_dense = cv.dense(H, progress=False)
exact = jnp.linalg.eigvalsh(H_dense)  # ascending
print(f"dense H: {n} matvecs; symmetric to {float(jnp.abs(H_dense - H_dense.T).max()):.1e}")
print("exact top 3:   ", np.asarray(exact[::-1][:3]))
print("exact bottom 3:", np.asarray(exact[:3]))

# %% [markdown]
# ## Top and bottom eigenvalues: `eigsh`
#
# `cv.eigsh` runs Lanczos with full reorthogonalisation from a random start vector drawn with the
# explicit `key`. It then recomputes each Ritz pair's residual norm $\|Hv - \lambda v\|$ with one
# more matvec each, and checks with a second, shorter Lanczos run that no eigenvalue was
# missed. `converged[i]` means "this is the $i$-th eigenvalue from that end, to tolerance".
# The cost, `num_matvecs`, is `num_steps + k + check_steps`.
#
# `which="LA"` (the default) gives the largest eigenvalues; `which="SA"` the smallest, here the
# most negative: a network at initialisation is not at a minimum and its Hessian is indefinite.

# %%
top = cv.eigsh(H, k=4, num_steps=40, key=jax.random.key(1))
bottom = cv.eigsh(H, k=4, which="SA", num_steps=40, key=jax.random.key(2))


def show(name, res, ref):
    print(f"{name} ({int(res.num_matvecs)} matvecs)")
    for lam, r, c, e in zip(res.eigenvalues, res.residual_norms, res.converged, ref, strict=True):
        print(
            f"  {float(lam):+.10f}  residual {float(r):.1e}  converged {bool(c)}  exact {e:+.10f}"
        )


show("top, 40 steps", top, exact[::-1][:4])
show("bottom, 40 steps", bottom, exact[:4])
assert bool(top.converged.all()) and not bool(bottom.converged.all())

# %% [markdown]
# The top end converged in 40 steps. The bottom end is more crowded (its eigenvalues are closer
# together relative to the width of the spectrum), and 40 steps were not enough: `eigsh` says so
# (`converged` is `False` where the residual is above the tolerance, `sqrt(eps)` times the
# largest Ritz value). More steps fix it:

# %%
bottom = cv.eigsh(H, k=4, which="SA", num_steps=80, key=jax.random.key(2))
show("bottom, 80 steps", bottom, exact[:4])

# %% [markdown]
# The dense check: the relative error of each eigenvalue against `eigvalsh` of the dense
# matrix. For a converged pair the error of the eigenvalue is of the order of the residual
# norm squared over the gap to the next eigenvalue, so it is far below the residual itself.

# %%
assert bool(top.converged.all()) and bool(bottom.converged.all())
rel = jnp.concatenate(
    [
        jnp.abs(top.eigenvalues - exact[::-1][:4]) / jnp.abs(exact[::-1][:4]),
        jnp.abs(bottom.eigenvalues - exact[:4]) / jnp.abs(exact[:4]),
    ]
)
print(f"max relative error of the 8 eigenvalues against the dense matrix: {float(rel.max()):.1e}")
assert float(rel.max()) < 1e-6

# %% [markdown]
# ## The trace: Hutch++
#
# `cv.trace` estimates $\operatorname{tr} H$ from `num_matvecs` products with random sign
# vectors (Rademacher probes, drawn from `key`), by default with Hutch++: a third of the
# budget sketches the largest-magnitude eigenvalues, whose part of the trace is then computed
# exactly, and the remaining probes estimate the rest. Every estimate comes with its standard
# error. The test below is the honest one: the error against the exact trace must be within
# four standard errors.

# %%
tr = cv.trace(H, num_matvecs=60, key=jax.random.key(3))
tr_exact = float(jnp.trace(H_dense))
err = float(tr.value) - tr_exact
print(
    f"Hutch++ ({int(tr.num_matvecs)} matvecs): {float(tr.value):.5f} ± {float(tr.standard_error):.5f}"
)
print(
    f"exact trace: {tr_exact:.5f};  error = {err / float(tr.standard_error):+.2f} standard errors"
)
assert abs(err) < 4 * float(tr.standard_error)

# %% [markdown]
# ## The diagonal
#
# `cv.diagonal` estimates every diagonal entry at once from the same kind of probes, each with
# its own standard error (the Bekas estimator: the mean of $z_i (Hz)_i$). Its noise on entry $i$
# comes from the off-diagonal entries of row $i$, so it is useful when the Hessian is roughly
# diagonally dominant and needs many probes otherwise. We compare with the exact diagonal: the
# correlation over all parameters (`cv.compare_diagonals`), and the errors measured in their own
# standard errors, which should look like a standard normal sample.

# %%
diag = cv.diagonal(H, num_matvecs=200, key=jax.random.key(4))
diag_exact = jnp.diag(H_dense)
comparison = cv.compare_diagonals(diag.diagonal, diag_exact)
z = (diag.diagonal - diag_exact) / diag.standard_error
print(f"diagonal ({int(diag.num_matvecs)} matvecs): Pearson r = {comparison.overall.pearson:.3f}")
print(f"errors in standard errors: mean {float(z.mean()):+.2f}, std {float(z.std()):.2f}")
print(f"fraction within 2 standard errors: {float((jnp.abs(z) < 2).mean()):.3f}")
assert comparison.overall.pearson > 0.8
assert float((jnp.abs(z) < 2).mean()) > 0.85

# %% [markdown]
# ## The spectral density
#
# `cv.spectral_density` runs stochastic Lanczos quadrature: `num_probes` Lanczos runs of
# `num_steps` steps, each from a random sign vector, whose Ritz values and weights form a
# quadrature of the eigenvalue density. It costs `num_probes * num_steps` matvecs. Smoothed with
# a Gaussian of standard deviation `sigma`, it is compared below with the exact eigenvalues
# smoothed by the same kernel, on a log axis (the bulk near zero is far denser than the
# outliers at the top). `curvature.plotting.plot_density` draws it; the ticks along the bottom
# are the raw Ritz nodes of all probes.
#
# The density also gives moments with standard errors over probes: $\frac1n \operatorname{tr}
# H^2$ is checked against the exact value.

# %%
density = cv.spectral_density(H, num_probes=8, num_steps=30, key=jax.random.key(5))
sigma = 0.08
grid = cvp.density_grid([density], sigma=sigma)
exact_kde = np.mean(
    np.exp(-0.5 * ((grid[:, None] - np.asarray(exact)[None, :]) / sigma) ** 2), axis=1
) / (sigma * np.sqrt(2 * np.pi))

fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
ax.plot(
    grid, np.maximum(exact_kde, 1e-5), color="0.6", lw=3, label="exact eigenvalues, same kernel"
)
cvp.plot_density(ax, density, sigma=sigma, grid=grid, rug=True, label="SLQ, 8 probes × 30 steps")
ax.set_xlabel("eigenvalue of H")
ax.set_ylabel("density")
ax.legend(loc="upper right")
plt.show()

m2 = density.moment(2)
m2_exact = float(jnp.mean(exact**2))
print(
    f"SLQ ({int(density.num_matvecs)} matvecs): (1/n) tr H^2 = {float(m2.value):.3e} ± {float(m2.standard_error):.1e}"
)
print(f"exact (1/n) tr H^2 = {m2_exact:.3e}")
assert abs(float(m2.value) - m2_exact) < 4 * float(m2.standard_error)

# %% [markdown]
# ## Gauss-Newton and the residual $H - G$
#
# The generalised Gauss-Newton matrix $G = J^\top (\partial^2 \ell / \partial f^2) J$ is the
# Hessian of the loss with the model linearised at the parameters. `cv.gauss_newton` takes the
# model, not the loss, and a named output loss: `"mse"` is exactly our `0.5 * mean` of the
# summed squared error, with the targets found under the key `"y"`. The remainder $R = H - G$
# collects the model's own second derivatives, weighted by the residuals $f - y$.
#
# Operators combine: `H - G` is an operator too. Passing a tuple to `cv.trace` estimates all
# three on **shared probes**: each probe costs one product with $H$ and one with $G$, and the
# residual's products are their difference, so `num_matvecs=150` costs 150 products of each.

# %%
G = cv.gauss_newton(model, params, data, loss="mse", batch_size=64)
G_dense = cv.dense(G, progress=False)
traces = cv.trace((H, G, H - G), num_matvecs=150, key=jax.random.key(6))
exact_traces = [jnp.trace(H_dense), jnp.trace(G_dense), jnp.trace(H_dense - G_dense)]
for name, t, e in zip(["H", "G", "H - G"], traces, exact_traces, strict=True):
    e = float(e)
    print(f"tr({name:5}) = {float(t.value):+.5f} ± {float(t.standard_error):.5f}   exact {e:+.5f}")
    assert abs(float(t.value) - e) < 4 * float(t.standard_error)
g_min = float(jnp.linalg.eigvalsh(G_dense)[0])
print(f"smallest eigenvalue of G: {g_min:.1e} (G is positive semi-definite)")
assert g_min > -1e-12

# %% [markdown]
# ## Per-layer view of the top eigenvector
#
# Results are flat vectors of length $n$; `H.unravel` maps one back to the parameter pytree. The
# squared norms of the top eigenvector's pieces say which layers the sharpest direction lives
# in (they sum to 1).

# %%
v = H.unravel(top.eigenvectors[:, 0])
for i, (w, b) in enumerate(v):
    print(
        f"layer {i}: |w|^2 = {float(jnp.sum(w**2)):.3f}  |b|^2 = {float(jnp.sum(b**2)):.3f}"
        f"   shapes {w.shape}, {b.shape}"
    )

# %% [markdown]
# ## ReLU: a residual with zero trace
#
# The residual $R$ contains second derivatives of the network output in the parameters. For a
# ReLU network the output is piecewise *linear* in each layer's weights and biases (the
# activation is linear on each side of zero), so every same-layer block of $R$ vanishes, its
# diagonal with them: $\operatorname{tr}(H - G) = 0$ exactly, although $R$ itself is not zero (the
# products of different layers' weights give cross-layer blocks). A smooth activation such as
# tanh has a same-layer second derivative and a non-zero residual trace. The same three
# estimates on shared probes, for the same network with ReLU, show it within the error bars.

# %%
relu_model = mlp(jax.nn.relu)
H_relu = cv.hessian(mse(relu_model), params, data, batch_size=64)
G_relu = cv.gauss_newton(relu_model, params, data, loss="mse", batch_size=64)
t_relu = cv.trace((H_relu, G_relu, H_relu - G_relu), num_matvecs=150, key=jax.random.key(6))
R_relu = cv.dense(H_relu, progress=False) - cv.dense(G_relu, progress=False)
r_tanh, r_relu = traces[2], t_relu[2]
print(f"tanh: tr(H - G) = {float(r_tanh.value):+.5f} ± {float(r_tanh.standard_error):.5f}")
print(f"ReLU: tr(H - G) = {float(r_relu.value):+.5f} ± {float(r_relu.standard_error):.5f}")
print(
    f"ReLU, dense: tr(R) = {float(jnp.trace(R_relu)):+.1e}, max |diag R| = "
    f"{float(jnp.abs(jnp.diag(R_relu)).max()):.1e}, ||R||_F = {float(jnp.linalg.norm(R_relu)):.3f}"
)
assert abs(float(r_relu.value)) < 4 * float(r_relu.standard_error)
assert abs(float(r_tanh.value)) > 4 * float(r_tanh.standard_error)
assert float(jnp.abs(jnp.diag(R_relu)).max()) < 1e-12 < float(jnp.linalg.norm(R_relu))

# %% [markdown]
# ## What it cost
#
# Besides the $n$-matvec dense matrices (the checks), the estimates used: `eigsh` 40 or 80
# steps plus the residual and rank checks per end, Hutch++ 60, the diagonal 200, SLQ
# $8 \times 30 = 240$, and the shared-probe traces 150 products with $H$ and 150 with $G$ (the
# `num_matvecs` printed above). None of these budgets is tied to $n$: for a network with
# millions of parameters the same calls cost the same number of products, each about two
# gradients (how many products a given accuracy needs depends on the spectrum, which is what
# the error bars and `converged` flags report). Where to go next: the [conventions](../../guide/conventions/) in
# detail, and the [ReLU against smooth activations](../../studies/relu_vs_smooth/) study, which
# runs these estimators along training.

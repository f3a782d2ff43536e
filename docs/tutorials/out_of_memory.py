# %% [markdown]
# # Data that do not fit in memory
#
# When the data set is too large for memory, `curvature` builds the same operators from a
# *loader*: a function that returns a fresh iterable of batches, read from disk as they are
# needed. This page writes scikit-learn's digits to `.npy` files, streams them back through
# numpy memmaps and through a generator over shards, and checks that the estimators give the
# numbers of the in-memory operator. It also counts the passes over the data that each
# estimator makes (one per product), and shows what happens to a loader that does not yield the
# same examples twice. Everything is float32, on a data set small enough to check against the
# in-memory operator: a few hundred passes over 1,797 examples, seconds on a CPU.

# %% [markdown]
# ## Setup: digits on disk
#
# The data: the 1,797 8×8 digit images bundled with scikit-learn (no download), pixels scaled
# to $[0, 1]$, written as two `.npy` files in a temporary directory. The model: an MLP with one
# hidden layer of 16 tanh units and a softmax cross-entropy loss. As everywhere in `curvature`,
# `loss(params, batch)` is the **mean** over the examples of `batch`, and the operator is the
# Hessian of the mean loss over the whole data set. Everything is float32 (JAX's default).

# %%
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

import curvature as cv

digits = load_digits()
x_all = (digits.data / 16.0).astype(np.float32)
y_all = digits.target.astype(np.int32)

tmp = tempfile.mkdtemp()
np.save(os.path.join(tmp, "x.npy"), x_all)
np.save(os.path.join(tmp, "y.npy"), y_all)
for name in ("x.npy", "y.npy"):
    print(f"{name}: {os.path.getsize(os.path.join(tmp, name)):,} bytes")

k1, k2 = jax.random.split(jax.random.key(0))
params = {
    "w1": jax.random.normal(k1, (64, 16)) / 8.0,
    "b1": jnp.zeros(16),
    "w2": jax.random.normal(k2, (16, 10)) / 4.0,
    "b2": jnp.zeros(10),
}


def model(params, batch):
    hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def loss(params, batch):  # mean softmax cross-entropy over the batch
    logits = model(params, batch)
    picked = jnp.take_along_axis(logits, batch["y"][:, None], axis=-1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)


# %% [markdown]
# ## Streaming from memmaps
#
# `np.load(..., mmap_mode="r")` maps a file without reading it; a slice is read from disk when
# it is used. `cv.batches(arrays, batch_size)` turns a pytree of such arrays into a loader (a
# zero-argument function returning a fresh iterator of batches: here 512, 512, 512 and a shorter
# 261). Passed to `cv.hessian` instead of the arrays, it gives a *streamed* operator: each
# product with it is one pass over the batches, each batch's product weighted by its size.
#
# For comparison, the in-memory operator on the same examples, scanned in chunks of the same
# size inside one compiled program.

# %%
x_disk = np.load(os.path.join(tmp, "x.npy"), mmap_mode="r")
y_disk = np.load(os.path.join(tmp, "y.npy"), mmap_mode="r")
print(type(x_disk).__name__, x_disk.shape, x_disk.dtype)

H_disk = cv.hessian(loss, params, cv.batches({"x": x_disk, "y": y_disk}, 512))
H_mem = cv.hessian(loss, params, {"x": jnp.asarray(x_all), "y": jnp.asarray(y_all)}, batch_size=512)
print("streamed: ", type(H_disk).__name__, H_disk.shape)
print("in memory:", type(H_mem).__name__, H_mem.shape)

# %% [markdown]
# ## The same estimators, the same numbers
#
# The estimators are the same algorithms whichever the data source (for a streamed operator
# their loops run on the host, each product a pass over the data; in memory the whole
# estimator is one compiled program). With the same `key` they draw the same start vectors and
# probes, so they give the same numbers up to float32 round-off, which differs only in the
# order of the additions. First the top eigenvalues (`eigsh`, Lanczos with 20 steps, plus the
# residual and rank checks: `num_matvecs` products):

# %%
key = jax.random.key(1)
top_disk = cv.eigsh(H_disk, k=3, num_steps=20, key=key)
top_mem = cv.eigsh(H_mem, k=3, num_steps=20, key=key)
for name, res in [("streamed ", top_disk), ("in memory", top_mem)]:
    print(
        f"{name}: {np.asarray(res.eigenvalues)}  converged {np.asarray(res.converged)}  "
        f"residuals {np.asarray(res.residual_norms)}  ({int(res.num_matvecs)} matvecs)"
    )
eig_diff = float(jnp.abs(top_disk.eigenvalues - top_mem.eigenvalues).max())
print(f"max |difference| = {eig_diff:.1e}")
assert bool(top_disk.converged.all()) and bool(top_mem.converged.all())
assert eig_diff < 1e-5 * float(top_mem.eigenvalues[0])

# %% [markdown]
# Then the trace (Hutch++, 24 products), each with its standard error. The two estimates agree
# up to round-off, far below their standard error: the streamed operator is the same matrix.

# %%
tr_disk = cv.trace(H_disk, num_matvecs=24, key=key)
tr_mem = cv.trace(H_mem, num_matvecs=24, key=key)
for name, t in [("streamed ", tr_disk), ("in memory", tr_mem)]:
    print(f"{name}: tr H = {float(t.value):.6f} ± {float(t.standard_error):.6f}")
tr_diff = abs(float(tr_disk.value) - float(tr_mem.value))
print(f"|difference| = {tr_diff:.1e}")
assert tr_diff < 1e-5 * abs(float(tr_mem.value))

# %% [markdown]
# ## A generator over shards
#
# A data set on disk is often split into shards. Any function that returns a fresh iterable of
# batches is a loader, and a generator function is one: calling `shards()` starts a new pass.
# Below, the data are written as four shards of uneven sizes, and each shard is one batch:
# batches may differ in size (each size compiles its product once). The operator is the same
# Hessian again, so the trace with the same key matches the in-memory one, up to round-off from
# a different summation order.

# %%
paths = []
for i, (xs, ys) in enumerate(zip(np.array_split(x_all, 4), np.array_split(y_all, 4), strict=True)):
    paths.append((os.path.join(tmp, f"x_{i:03d}.npy"), os.path.join(tmp, f"y_{i:03d}.npy")))
    np.save(paths[-1][0], xs)
    np.save(paths[-1][1], ys)


def shards():
    for x_path, y_path in paths:
        yield {"x": np.load(x_path), "y": np.load(y_path)}


print("shard sizes:", [len(batch["y"]) for batch in shards()])
H_shards = cv.hessian(loss, params, shards)
tr_shards = cv.trace(H_shards, num_matvecs=24, key=key)
print(f"shards: tr H = {float(tr_shards.value):.6f} ± {float(tr_shards.standard_error):.6f}")
tr_diff = abs(float(tr_shards.value) - float(tr_mem.value))
print(f"|difference| from in memory = {tr_diff:.1e}")
assert tr_diff < 1e-5 * abs(float(tr_mem.value))

# %% [markdown]
# ## How it runs, and what it costs
#
# Every product with a streamed operator is one pass over the loader. A background thread reads
# the next batches (a memmap slice is read from disk there) while the current one is being
# multiplied, and each batch is put on the device one batch ahead of use, so the device does not
# wait for the disk. Each batch's product is one compiled program, compiled once per batch
# shape.
#
# The cost is therefore counted in passes. Vectors multiplied together share a pass: a block of
# `probe_batch_size` probes (default 1) costs one pass, and so does `eigsh`'s residual check of
# its `k` Ritz vectors. To see it, wrap the loader in a function that counts its calls. (One
# call happens when the operator is built: the first batch is checked there.)

# %%
calls = 0


def counted():
    global calls
    calls += 1
    return shards()


H_counted = cv.hessian(loss, params, counted)
print("passes when built:", calls)

start = calls
res = cv.eigsh(H_counted, k=3, num_steps=20, key=key)
print(
    f"eigsh: {int(res.num_matvecs)} matvecs in {calls - start} passes (converged {np.asarray(res.converged)})"
)
for block in (1, 4):
    start = calls
    t = cv.trace(H_counted, num_matvecs=24, key=key, probe_batch_size=block)
    print(
        f"trace, probe_batch_size={block}: {int(t.num_matvecs)} matvecs in {calls - start} passes,"
        f" tr H = {float(t.value):.6f} ± {float(t.standard_error):.6f}"
    )
    assert calls - start == int(t.num_matvecs) // block

# %% [markdown]
# Larger probe blocks mean fewer passes over the data (and more memory: one parameter-sized
# vector per probe in the block). With data on a slow disk, the passes are the cost to watch:
# `eigsh` with `num_steps` steps reads the data set about `2 * num_steps` times with its default
# rank check, Hutch++ with `num_matvecs` products `num_matvecs / probe_batch_size` times.

# %% [markdown]
# ## A loader must yield the same examples on every pass
#
# The operator is the Hessian of a fixed data set, so every pass must see the same examples (in
# any order). Each pass after the first is checked against the first one: the number of examples
# and a fingerprint of each batch. A loader that resamples (here: drawing with replacement, a
# new draw on every call) is refused with an error that names the first batch that differs:

# %%
rng = np.random.default_rng(0)


def resampled():
    idx = rng.choice(len(y_all), size=len(y_all))  # a bootstrap sample, new on every call
    return cv.batches({"x": x_all[idx], "y": y_all[idx]}, 512)()


H_bad = cv.hessian(loss, params, resampled)
try:
    cv.trace(H_bad, num_matvecs=8, key=key)
except ValueError as error:
    print("ValueError:", error)
else:
    raise AssertionError("a resampling loader should be refused")

# %% [markdown]
# To stream a random subset, draw it once (with a fixed seed) and return the same one on every
# call.
#
# ## Where next
#
# The cost of streaming is one pass over the data per product (or per block of
# `probe_batch_size` probes), plus the host loop between products. For the memory each estimator
# needs, measured timings of streamed against in-memory data, and many devices and many hosts,
# see the [Scale guide](../../guide/scale/).

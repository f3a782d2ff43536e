"""The child processes of ``test_sharding.py``; each prints one JSON line of measurements.

``python tests/_sharding_worker.py devices`` (with 8 forced CPU devices): estimators on data
sharded over 8 devices against the same estimators on unsharded data, the collectives of one
matvec, and parameters sharded along a model axis.

``python tests/_sharding_worker.py process ID PORT``: one of 2 processes with 2 CPU devices each,
under ``jax.distributed``: the estimators on data sharded over the global 4-device mesh; process 0
also gives them on the whole data set held by itself alone (the reference of both, compared by the
test).

Float64 throughout, so sharded and unsharded results differ only by the order of summation.
"""

import json
import sys

import numpy as np


def problem(jax, jnp):
    """A tanh MLP 5-8-3 (n = 75) with cross-entropy on 64 Gaussian examples."""
    key = jax.random.key(0)
    params = []
    for i, (a, b) in enumerate([(5, 8), (8, 3)]):
        kw, kb = jax.random.split(jax.random.fold_in(key, i))
        params.append(
            {
                "w": jax.random.normal(kw, (a, b)) / np.sqrt(a),
                "b": 0.1 * jax.random.normal(kb, (b,)),
            }
        )
    data = {
        "x": jax.random.normal(jax.random.fold_in(key, 10), (64, 5)),
        "y": jax.random.randint(jax.random.fold_in(key, 11), (64,), 0, 3),
    }

    def model(p, batch):
        h = jnp.tanh(batch["x"] @ p[0]["w"] + p[0]["b"])
        return h @ p[1]["w"] + p[1]["b"]

    def loss(p, batch):
        out = model(p, batch)
        picked = jnp.take_along_axis(out, batch["y"][:, None], -1)[:, 0]
        return jnp.mean(jax.nn.logsumexp(out, axis=-1) - picked)

    return key, params, data, model, loss


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def vectors_diff(a, b):
    """Largest difference of two sets of eigenvector columns, signs aligned."""
    a, b = np.asarray(a), np.asarray(b)
    signs = np.sign(np.sum(a * b, axis=0))
    return float(np.max(np.abs(a - b * signs)))


def estimates(cv, op, key, every=True, trace=False):
    """What the checks compare: the top eigenpairs; with ``every``, also Hutch++ and the SLQ
    nodes and weights; with ``trace``, also Hutch++."""
    top = cv.eigsh(op, k=3, key=key)
    out = {
        "eigenvalues": np.asarray(top.eigenvalues),
        "eigenvectors": np.asarray(top.eigenvectors),
        "converged": bool(np.all(top.converged)),
    }
    if every or trace:
        out["hutch++"] = float(cv.trace(op, num_matvecs=12, key=key).value)
    if every:
        out["slq"] = cv.spectral_density(op, num_probes=4, num_steps=12, key=key)
    return out


def plain(estimated):
    """:func:`estimates` without SLQ as JSON values, for :func:`errors` in the test."""
    return {
        "eigenvalues": estimated["eigenvalues"].tolist(),
        "eigenvectors": estimated["eigenvectors"].tolist(),
        "converged": estimated["converged"],
        "hutch++": estimated["hutch++"],
    }


def errors(mine, reference, op=None, cv=None, key=None):
    """The largest absolute differences of :func:`estimates` against a reference; with ``op``,
    also Hutchinson's trace of ``op`` against the reference's SLQ trace, which is Hutchinson's
    with the same probes (``spectral_density(...).trace()``, documented and tested)."""
    out = {
        "eigenvalues": max_diff(mine["eigenvalues"], reference["eigenvalues"]),
        "eigenvectors": vectors_diff(mine["eigenvectors"], reference["eigenvectors"]),
        "converged": mine["converged"] and reference["converged"],
        "scale": float(np.max(np.abs(reference["eigenvalues"]))),
    }
    if "hutch++" in mine:
        out["hutch++"] = abs(mine["hutch++"] - reference["hutch++"])
    if "slq" in mine:
        out["slq_nodes"] = max_diff(mine["slq"].nodes, reference["slq"].nodes)
        out["slq_weights"] = max_diff(mine["slq"].weights, reference["slq"].weights)
    if op is not None:
        hutchinson = cv.trace(op, num_matvecs=4, key=key, method="hutchinson").value
        out["hutchinson"] = abs(float(hutchinson) - reference["slq"].trace()[0])
    return out


def devices():
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    import curvature as cv
    import curvature.sharding as cvs

    assert jax.device_count() == 8, jax.devices()
    key, params, data, model, loss = problem(jax, jnp)
    mesh = cvs.data_mesh()
    sharded = cvs.shard_data(data, mesh)
    out = {"data_spec": str(sharded["x"].sharding.spec)}

    def gauss_newton(d):
        return cv.gauss_newton(model, params, d, loss="cross_entropy", targets="y")

    # Each sharded operator against the same estimators on the unsharded one (the chunked
    # operator against the unchunked one: the same matrix).
    op, op_sharded = cv.hessian(loss, params, data), cv.hessian(loss, params, sharded)
    reference = estimates(cv, op, key)
    out["hessian"] = errors(estimates(cv, op_sharded, key), reference, op_sharded, cv, key)
    chunked = cv.hessian(loss, params, sharded, batch_size=16)
    out["hessian_chunked"] = errors(estimates(cv, chunked, key, every=False), reference)
    ggn, ggn_sharded = gauss_newton(data), gauss_newton(sharded)
    out["gauss_newton"] = errors(
        estimates(cv, ggn_sharded, key, every=False), estimates(cv, ggn, key, every=False)
    )
    for name, sharded_op in [
        ("hessian", op_sharded),
        ("hessian_chunked", chunked),
        ("gauss_newton", ggn_sharded),
    ]:
        out[name]["collectives"] = cvs.collective_counts(sharded_op)

    # Unequal shards are refused; so is an Explicit mesh axis.
    refused = {}
    explicit = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    for what, call in [
        ("uneven", lambda: cvs.shard_data({"x": data["x"][:60]}, mesh)),
        ("explicit", lambda: cvs.shard_data(data, explicit)),
    ]:
        try:
            call()
            refused[what] = None
        except ValueError as error:
            refused[what] = str(error)
    out["refused"] = refused

    # Parameters sharded along a model axis (16 x 64 and 64 x 3 weights over 8 devices), data
    # replicated: the flat vectors and the Lanczos basis are sharded along n.
    model_mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
    wide = {
        "w1": jax.random.normal(key, (16, 64)) / 4,
        "w2": jax.random.normal(jax.random.fold_in(key, 1), (64, 3)) / 8,
    }
    specs = {"w1": PartitionSpec(None, "model"), "w2": PartitionSpec("model", None)}
    wide_sharded = jax.tree_util.tree_map(
        lambda w, s: jax.device_put(w, NamedSharding(model_mesh, s)), wide, specs
    )
    xy = {"x": data["x"] @ jnp.ones((5, 16)) / 5, "y": jax.nn.one_hot(data["y"], 3)}

    def mse(p, batch):
        out = jnp.tanh(batch["x"] @ p["w1"]) @ p["w2"]
        return 0.5 * jnp.mean(jnp.sum((out - batch["y"]) ** 2, axis=-1))

    op, op_sharded = cv.hessian(mse, wide, xy), cv.hessian(mse, wide_sharded, xy)
    run = cv.lanczos(op_sharded, num_steps=12, key=key)
    reference = cv.lanczos(op, num_steps=12, key=key)
    out["model_axis"] = {
        "n": op.size,
        "basis_spec": str(run.basis.sharding.spec),
        "basis_shard_shape": list(run.basis.addressable_shards[0].data.shape),
        "alphas": max_diff(run.alphas, reference.alphas),
        "betas": max_diff(run.betas, reference.betas),
        "scale": float(np.max(np.abs(reference.alphas))),
        "collectives": cvs.collective_counts(op_sharded),
    }
    print(json.dumps(out))


def process(process_id: int, port: int):
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_enable_x64", True)
    # jax's CPU collectives across processes default to gloo (TCP); nothing else to set.
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=10,
        shutdown_timeout_seconds=10,
    )
    import jax.numpy as jnp

    import curvature as cv
    import curvature.sharding as cvs

    key, params, data, model, loss = problem(jax, jnp)
    out = {}
    if process_id == 0:
        # The reference: the whole data set on this process's first device, nothing shared. It
        # is the same in both processes: process 0 computes it once (process 1 waits for it in
        # the first collective below) and the test compares both processes' results with it.
        op = cv.hessian(loss, params, data)
        out["reference"] = plain(estimates(cv, op, key, every=False, trace=True))
    mesh = cvs.data_mesh()  # the 4 devices of both processes
    half = 64 // jax.process_count()
    mine = jax.tree_util.tree_map(
        lambda x: np.asarray(x)[process_id * half : (process_id + 1) * half], data
    )
    sharded = cvs.shard_data(mine, mesh, process_local=True)
    op_sharded = cv.hessian(loss, cvs.replicate(params, mesh), sharded)
    out |= {
        "process_index": jax.process_index(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "global_shape": list(sharded["x"].shape),
        "result": plain(estimates(cv, op_sharded, key, every=False, trace=True)),
    }
    print(json.dumps(out), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "devices":
        devices()
    else:
        process(int(sys.argv[2]), int(sys.argv[3]))

"""Stochastic trace, diagonal and Frobenius-norm estimation, for one operator or several on shared
probes.

* Hutchinson (1989): $\\mathrm{tr}(A) = E[z^T A z]$ for Rademacher $z$; the standard error is the
  sample standard deviation over probes divided by $\\sqrt{m}$.
* Hutch++ (Meyer, Musco, Musco & Woodruff 2021): spend a third of the matvecs on a sketch
  $Q = \\mathrm{orth}(A S)$, take $\\mathrm{tr}(Q^T A Q)$ exactly (another third) and estimate the
  remainder $\\mathrm{tr}((I - QQ^T) A (I - QQ^T))$ by Hutchinson with the last third. Its error
  decays as $1/m$ instead of $1/\\sqrt{m}$ when the spectrum decays fast. The standard error is that
  of the Hutchinson part, conditional on the sketch (the exact part has no variance given ``Q``).
* Diagonal (Bekas, Kokiopoulou & Saad 2007): $\\mathrm{diag}(A) = E[z \\odot A z]$, with a
  standard error per entry.
* Frobenius norm: $\\|A\\|_F^2 = E \\|A z\\|^2$.

Several operators at once: :func:`trace`, :func:`diagonal` and :func:`frobenius_norm_squared`
take a tuple of operators of one layout and return a tuple of results computed on the same
probes (and, for Hutch++, one sketch: that of the first operator, against which every operator's
exact part is taken; each estimate stays unbiased, since the sketch is drawn before the probes).
An operator that appears in several of them is multiplied once per probe: for ``(H, G, H - G)``
each probe costs one product with ``H`` and one with ``G``, and the residual's products are their
difference (operators are matched by identity: pass the same objects, not copies). With the same
key, an operator alone gives the same numbers as in the tuple (for Hutch++, the first operator,
whose sketch the others share; theirs differ, each unbiased within its error bar), and an
estimate's linearity holds on shared probes: Hutchinson's ``tr H - tr G`` equals ``tr(H - G)``.

Memory: probes are drawn, multiplied and folded into running statistics a block at a time
(``probe_batch_size`` probes, vmapped; by default one, which was fastest on CPU), so an
estimator holds ``O(block * n)`` numbers whatever ``num_matvecs`` is; Hutch++ adds its sketch,
``num_matvecs / 3`` vectors of length ``n`` by nature, orthonormalised in place (Gram-Schmidt
twice, no QR workspace).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvature import _driver
from curvature._checks import (
    check_finite_result,
    check_key,
    is_traced,
    positive_int,
    require_square,
)
from curvature._columns import unit_products
from curvature._lanczos import safe_norm
from curvature._memory import check_vectors
from curvature.linear_operator import LinearOperator, combine, family, recipe_atoms

__all__ = [
    "DiagonalResult",
    "TraceResult",
    "diagonal",
    "frobenius_norm_squared",
    "hutchinson",
    "probe_rows",
    "rademacher",
    "trace",
]

_METHODS = ("hutch++", "hutchinson")


class TraceResult(NamedTuple):
    """A trace estimate: ``value`` +- ``standard_error``, from ``num_matvecs`` matvecs."""

    value: jax.Array
    standard_error: jax.Array
    num_matvecs: jax.Array


class DiagonalResult(NamedTuple):
    """A diagonal estimate ``(n,)`` with a standard error per entry."""

    diagonal: jax.Array
    standard_error: jax.Array
    num_matvecs: jax.Array


def rademacher(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """The +-1 probes used by every estimator here: :func:`trace`, :func:`diagonal`,
    :func:`frobenius_norm_squared` and ``spectral_density`` draw probe ``i`` as row ``i`` of
    ``rademacher(key, (num_probes, n), op.dtype)`` from the key they are given, so estimators
    called with the same key share their probes. Row ``i`` comes from ``fold_in(key, i)``, so a
    block of rows can be drawn alone (:func:`probe_rows`): the estimators never hold them all."""
    shape = tuple(shape)
    if len(shape) == 1:
        return probe_rows(key, jnp.zeros((1,), jnp.int32), shape[0], dtype)[0]
    rows = probe_rows(key, jnp.arange(int(np.prod(shape[:-1]))), shape[-1], dtype)
    return rows.reshape(shape)


@functools.partial(jax.jit, static_argnums=(2, 3))
def probe_rows(key: jax.Array, rows: jax.Array, n: int, dtype) -> jax.Array:
    """Rows ``rows`` (indices) of ``rademacher(key, (m, n), dtype)``, shape ``(len(rows), n)``."""
    draw = lambda i: jax.random.rademacher(jax.random.fold_in(key, i), (n,), jnp.int8)  # noqa: E731
    return jax.vmap(draw)(rows).astype(dtype)


def block_size(count: int, probe_batch_size: int | None) -> int:
    """Probes per block: ``probe_batch_size``, or by default one; never more than ``count``.

    One, because vmapping probes was slower on CPU: a 26k-parameter MLP's Hutchinson run took
    4.2 ms a matvec one at a time, 6.3 with 4 together, 11.3 with 16 (jax 0.10.2, 2 cores)."""
    if probe_batch_size is None:
        return 1
    return max(1, min(positive_int(probe_batch_size, "probe_batch_size"), count))


def orthonormal_rows(y: jax.Array, first=0, stop=None) -> jax.Array:
    """Orthonormal rows spanning the rows of ``y`` (``(k, n)``): classical Gram-Schmidt twice,
    row by row in place. Unlike a Householder QR of the ``n x k`` matrix it needs no workspace
    beyond ``y`` (XLA's QR fails for ``n k > 2^31``) and keeps float32 orthogonality at round-off;
    a row that is (numerically) in the span of the previous ones becomes zero. With ``first``
    and ``stop`` (may be traced) only rows ``first .. stop - 1`` are taken, against every row
    before them (already orthonormal); the rows after them must be zero or are ignored."""
    stop = y.shape[0] if stop is None else stop
    if isinstance(first, int) and isinstance(stop, int) and stop - first == 1:
        return _orthonormal_row(first, y)  # one row: no loop (no copy of y into a loop)
    return jax.lax.fori_loop(first, stop, _orthonormal_row, y)


def _orthonormal_row(i, q: jax.Array) -> jax.Array:
    """Row ``i`` of ``q`` orthonormalised against the rows before it (Gram-Schmidt twice)."""
    tiny = jnp.finfo(q.dtype).eps ** 0.75
    v = q[i]
    norm0 = safe_norm(v)
    done = jnp.arange(q.shape[0]) < i
    for _ in range(2):
        v = v - q.T @ jnp.where(done, q @ v, 0)
    norm = safe_norm(v)
    keep = norm > tiny * norm0
    return q.at[i].set(jnp.where(keep, v / jnp.where(keep, norm, 1.0), 0))


# --------------------------------------------------------------------------------------------
# What a probe yields.


def _trace_sample(z, az):
    return jnp.sum(z * az, axis=1)


def _diagonal_sample(z, az):
    return z * az


def _norm_sample(z, az):
    return jnp.sum(az**2, axis=1)


SAMPLES = {"trace": _trace_sample, "diagonal": _diagonal_sample, "frobenius": _norm_sample}


# --------------------------------------------------------------------------------------------
# The Monte Carlo steps, shared by every estimator here.


def _num_atoms(recipes) -> int:
    return max(set().union(*(recipe_atoms(r) for r in recipes))) + 1


def _samples(sample, z, products, recipes, coefficients):
    """Per requested operator ``k``: ``sample(z, A_k z)`` from the atoms' products."""
    values = dict(enumerate(products))
    wide = _wide(z.dtype)
    return tuple(
        jax.tree_util.tree_map(
            lambda s: s.astype(wide), sample(z, combine(recipe, values, coefficients))
        )
        for recipe in recipes
    )


def _wide(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _merge(stats, block_stats):
    """Chan et al.'s parallel update of (count, means, M2s) with a block's (count, means, M2s)."""
    n_a, mean_a, m2_a = stats
    n_b, mean_b, m2_b = block_stats
    total = n_a + n_b
    weight = n_b / jnp.maximum(total, 1)

    def mean(a, b):
        return a + (b - a) * weight

    def m2(a_mean, b_mean, a, b):
        delta = b_mean - a_mean
        return a + b + delta**2 * n_a * weight

    means = jax.tree_util.tree_map(mean, mean_a, mean_b)
    m2s = jax.tree_util.tree_map(m2, mean_a, mean_b, m2_a, m2_b)
    return total, means, m2s


def _fold(stats, samples, valid):
    """A block's samples (rows not ``valid`` left out) merged into ``stats``."""
    m = jnp.sum(valid)
    acc = stats[0].dtype

    def block_mean(s):
        mask = valid.reshape((-1,) + (1,) * (s.ndim - 1))
        return jnp.sum(jnp.where(mask, s, 0), axis=0) / jnp.maximum(m, 1)

    def block_m2(s, mean):
        mask = valid.reshape((-1,) + (1,) * (s.ndim - 1))
        return jnp.sum(jnp.where(mask, (s - mean) ** 2, 0), axis=0)

    means = jax.tree_util.tree_map(block_mean, samples)
    m2s = jax.tree_util.tree_map(block_m2, samples, means)
    return _merge(stats, (m.astype(acc), means, m2s))


def _monte_carlo(count: int, block: int, sample, recipes, key_field: str, project: bool):
    """Steps that estimate ``E sample(z, A_k z)`` for every requested operator ``k`` over
    ``count`` probes drawn with ``state[key_field]`` (projected off ``state["q"]`` when
    ``project``), into ``state["raw"]``, per operator: the samples (one block), or the running
    statistics ``(count, mean, M2)``; :func:`_finalized` makes means and standard errors of them.

    Probes are drawn, multiplied (``block`` at a time, vmapped) and folded into running
    statistics block by block: memory ``O(block * n)``, whatever ``count`` is."""
    num_blocks = -(-count // block)
    atoms = tuple(range(_num_atoms(recipes)))

    def draw(state, b, size):
        n = state["z"].shape[1]
        idx = b * block + jnp.arange(size)
        z = probe_rows(state[key_field], idx, n, state["z"].dtype)
        if project:
            q = state["q"]
            # z q^T without transposing q: jnp's z @ q.T held a transposed copy of the sketch
            # when probes go one at a time.
            z = z - jax.lax.dot_general(z, q, (((1,), (1,)), ((), ()))) @ q
        return idx, z

    if num_blocks == 1:  # one block: no loop (and less to compile)

        def drawn(state, i):
            _, z = draw(state, 0, count)
            return {**state, "z": z}

        def estimate(state, i, products):
            samples = _samples(sample, state["z"], products, recipes, state["coefficients"])
            return {**state, "raw": samples}

        return _driver.Seq(
            _driver.Map(drawn),
            _driver.Apply(lambda s, i: s["z"], estimate, operators=atoms, mode="rows"),
        )

    def drawn(state, b):
        idx, z = draw(state, b, block)
        return {**state, "z": jnp.where((idx < count)[:, None], z, 0)}

    def fold(state, b, products):
        z = state["z"]
        valid = b * block + jnp.arange(block) < count
        samples = _samples(sample, z, products, recipes, state["coefficients"])
        return {**state, "stats": _fold(state["stats"], samples, valid)}

    def running(state, i):
        total, means, m2s = state["stats"]
        out = {key: value for key, value in state.items() if key != "stats"}
        out["raw"] = tuple(_Running(total, m, v) for m, v in zip(means, m2s, strict=True))
        return out

    body = _driver.Seq(
        _driver.Map(drawn),
        _driver.Apply(lambda s, i: s["z"], fold, operators=atoms, mode="rows"),
    )
    return _driver.Seq(_driver.Repeat(num_blocks, body), _driver.Map(running))


def _start(specs, key, coefficients, *, sample, recipes, block: int, count: int) -> dict:
    """The state of a Monte Carlo run: the probe block, zero statistics."""
    (m, n), dtype = specs[0].shape, specs[0].dtype
    state = {"key": key, "coefficients": coefficients, "z": jnp.zeros((block, n), dtype)}
    if -(-count // block) > 1:
        shapes = jax.eval_shape(
            sample,
            jax.ShapeDtypeStruct((block, n), dtype),
            jax.ShapeDtypeStruct((block, m), dtype),
        )
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape[1:], _wide(dtype)), shapes)
        per_operator = tuple(zeros for _ in recipes)
        state["stats"] = (jnp.zeros((), _wide(dtype)), per_operator, per_operator)
    return state


# --------------------------------------------------------------------------------------------
# The estimators' programs.


@functools.cache
def _hutchinson_program(kinds: tuple[str, ...], count: int, block: int, recipes) -> _driver.Program:
    """The statistics ``kinds`` (names in :data:`SAMPLES`) of every requested operator on the same
    probes: per operator, per statistic, ``(mean, standard error)``."""
    sample = _statistics(kinds)

    def init(specs, key, coefficients):
        return _start(
            specs, key, coefficients, sample=sample, recipes=recipes, block=block, count=count
        )

    def finish(state, specs, key, coefficients):
        return {"raw": state["raw"]}

    return _driver.Program(
        init,
        _monte_carlo(count, block, sample, recipes, "key", project=False),
        finish,
        name="hutchinson",
    )


class _Running(NamedTuple):
    """Running statistics of a Monte Carlo run (Chan et al.'s count, mean and M2)."""

    total: jax.Array
    mean: Any
    m2: Any


def _finalized(raw, dtype) -> tuple[jax.Array, jax.Array]:
    """The mean and standard error of one operator's statistic from its raw Monte Carlo output
    (:class:`_Running` statistics, or the samples of a single block), in a small compiled program
    of its own: an operator's numbers are then the same alone and among others (XLA arranges
    the arithmetic of one program by all it contains)."""
    if isinstance(raw, _Running):
        return _from_running(raw.total, raw.mean, raw.m2, np.dtype(dtype))
    return _from_samples(raw, np.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(3,))
def _from_running(total, mean, m2, dtype):
    return mean.astype(dtype), jnp.sqrt(m2 / (total - 1) / total).astype(dtype)


@functools.partial(jax.jit, static_argnums=(1,))
def _from_samples(samples, dtype):
    count = samples.shape[0]
    mean = jnp.mean(samples, axis=0)
    error = jnp.std(samples, axis=0, ddof=1) / jnp.sqrt(count)
    return mean.astype(dtype), error.astype(dtype)


def _per_statistic(raw) -> tuple:
    """One operator's raw output split per statistic (several statistics are tuples)."""
    if isinstance(raw, _Running):
        if not isinstance(raw.mean, tuple):
            return (raw,)
        return tuple(_Running(raw.total, m, v) for m, v in zip(raw.mean, raw.m2, strict=True))
    return raw if isinstance(raw, tuple) else (raw,)


@functools.cache
def _statistics(kinds: tuple[str, ...]):
    """One sample function for several statistics: a tuple of their samples (one statistic: its
    sample alone, so that its arithmetic is the estimator's own)."""
    if len(kinds) == 1:
        return SAMPLES[kinds[0]]
    return lambda z, az: tuple(SAMPLES[kind](z, az) for kind in kinds)


@functools.cache
def _hutch_plus_plus_program(num_matvecs: int, block: int, recipes) -> _driver.Program:
    sketch = num_matvecs // 3
    count = num_matvecs - 2 * sketch
    atoms = tuple(range(_num_atoms(recipes)))
    first = tuple(sorted(recipe_atoms(recipes[0])))  # the sketch is of the first operator
    sketch_block = min(block, sketch)
    sketch_blocks = -(-sketch // sketch_block)
    exact_blocks = -(-sketch // block)
    # The sketch's rows, whole blocks of both sizes (sketch_block divides block or equals
    # sketch); the rows past the sketch stay zero.
    rows_held = max(sketch_blocks * sketch_block, exact_blocks * block)

    def init(specs, key, coefficients):
        key_s, key_g = jax.random.split(key)
        state = _start(
            specs,
            key_g,
            coefficients,
            sample=_trace_sample,
            recipes=recipes,
            block=block,
            count=count,
        )
        n, dtype = specs[0].size, specs[0].dtype
        state["sketch_key"] = key_s
        state["q"] = jnp.zeros((rows_held, n), dtype)
        state["forms"] = tuple(jnp.zeros((exact_blocks,), dtype) for _ in atoms)
        return state

    def sketch_rows(state, b):
        n = state["q"].shape[1]
        return probe_rows(
            state["sketch_key"], b * sketch_block + jnp.arange(sketch_block), n, state["q"].dtype
        )

    def sketched(state, b, products):
        # Each block of the sketch is orthonormalised against the rows before it as it arrives
        # (Gram-Schmidt twice, row by row, as orthonormal_rows): one (sketch, n) buffer in all.
        values = dict(zip(first, products, strict=True))
        first_row = b * sketch_block
        y = combine(recipes[0], values, state["coefficients"])
        y = jnp.where((first_row + jnp.arange(sketch_block) < sketch)[:, None], y, 0)
        q = jax.lax.dynamic_update_slice_in_dim(
            state["q"], y.astype(state["q"].dtype), first_row, 0
        )
        if sketch_block == 1:
            return {**state, "q": _orthonormal_row(first_row, q)}
        q = orthonormal_rows(q, first_row, first_row + sketch_block)
        return {**state, "q": q}

    def exact_rows(state, b):
        return jax.lax.dynamic_slice_in_dim(state["q"], b * block, block, 0)

    def exact(state, b, products):
        rows = exact_rows(state, b)
        forms = tuple(
            f.at[b].set(jnp.sum(rows * p)) for f, p in zip(state["forms"], products, strict=True)
        )
        return {**state, "forms": forms}

    def finish(state, specs, key, coefficients):
        forms = dict(enumerate(f[0] if exact_blocks == 1 else jnp.sum(f) for f in state["forms"]))
        exact = tuple(combine(recipe, forms, coefficients) for recipe in recipes)
        return {"raw": state["raw"], "exact": exact}

    # One block is no loop (as a single block of probes below): less to compile.
    sketch_step = _driver.Apply(sketch_rows, sketched, operators=first, mode="rows")
    exact_step = _driver.Apply(exact_rows, exact, operators=atoms, mode="rows")
    drop_key = _driver.Map(lambda state, i: {k: v for k, v in state.items() if k != "sketch_key"})
    body = _driver.Seq(
        sketch_step if sketch_blocks == 1 else _driver.Repeat(sketch_blocks, sketch_step),
        drop_key,
        exact_step if exact_blocks == 1 else _driver.Repeat(exact_blocks, exact_step),
        _monte_carlo(count, block, _trace_sample, recipes, "key", project=True),
    )
    return _driver.Program(init, body, finish, name="hutch++")


# --------------------------------------------------------------------------------------------
# The public estimators.


def _operators(ops, what: str, *, square: bool = True) -> tuple[tuple, bool]:
    """``ops`` as a tuple of operators of one layout, and whether one operator was given."""
    single = isinstance(ops, LinearOperator)
    ops = (ops,) if single else tuple(ops)
    if not ops or not all(isinstance(op, LinearOperator) for op in ops):
        raise TypeError(f"{what} takes an operator or a tuple of operators, got {ops!r}")
    for op in ops:
        if square:
            require_square(op, what)
        if op.shape != ops[0].shape or op.layout != ops[0].layout:
            raise ValueError(
                f"{what}: operators on shared probes need one layout; got shapes "
                f"{[op.shape for op in ops]}"
            )
    return ops, single


def _estimate(program_of, ops, key):
    """Run a Monte Carlo program on the family of ``ops``: per operator, per statistic,
    ``(mean, standard error)`` (and, for Hutch++, the exact parts per operator)."""
    fam = family(ops)
    out = _driver.run(program_of(fam.recipes), fam.atoms, key, fam.coefficients)
    dtype = ops[0].dtype
    parts = tuple(tuple(_finalized(r, dtype) for r in _per_statistic(raw)) for raw in out["raw"])
    return parts, out.get("exact")


def trace(
    op: LinearOperator | tuple[LinearOperator, ...],
    /,
    *,
    num_matvecs: int,
    key: jax.Array,
    method: str = "hutch++",
    probe_batch_size: int | None = None,
) -> TraceResult | tuple[TraceResult, ...]:
    """Estimate ``tr(A)`` with its standard error from ``num_matvecs`` matvecs.

    Args:
      op: an operator, or a tuple of operators of one layout, estimated on shared probes (see
        the module docstring); then a tuple of results, in order.
      num_matvecs: the budget of products per operator.
      key: PRNG key for the probes (and the Hutch++ sketch).
      method: ``"hutch++"`` (default; needs ``num_matvecs >= 4``) or ``"hutchinson"``
        (``num_matvecs >= 2``). See the module docstring for both and their standard errors.
      probe_batch_size: probes per block, vmapped (more memory, shared forward passes); memory
        is ``O(probe_batch_size * n)`` plus, for Hutch++, its ``num_matvecs / 3`` sketch
        vectors. Default: one at a time (vmapping probes was slower on CPU).

    Cost: ``num_matvecs`` products with each distinct operator (with a tuple, Hutch++ sketches
    only the first one: the others take ``num_matvecs - num_matvecs // 3``, and their results'
    ``num_matvecs`` say so).
    """
    ops, single = _operators(op, "trace")
    check_key(key)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    minimum = 4 if method == "hutch++" else 2
    num_matvecs = positive_int(num_matvecs, "num_matvecs")
    block = block_size(num_matvecs, probe_batch_size)
    if num_matvecs < minimum:
        raise ValueError(
            f"{method} needs num_matvecs >= {minimum} for a standard error, got {num_matvecs!r}"
        )
    n = ops[0].size
    if method == "hutch++" and num_matvecs // 3 > n:
        raise ValueError(f"hutch++ sketch of {num_matvecs // 3} exceeds the dimension n={n}")
    if method == "hutchinson":
        return _hutchinson(op, ("trace",), num_matvecs, key, probe_batch_size, "trace")[0]
    sketch = num_matvecs // 3
    check_vectors(
        ops[0],
        2 * sketch + 4 * block,
        "trace",
        f"Hutch++'s sketch ({sketch} vectors, held twice while it is built) and a block of "
        f"{block} probes",
        "fewer num_matvecs (the sketch is a third of them); method='hutchinson', which holds "
        "one block of probes whatever their number; a smaller probe_batch_size",
    )
    program = functools.partial(_hutch_plus_plus_program, num_matvecs, block)
    parts, exact = _estimate(program, ops, key)
    parts = tuple((e + p[0][0], p[0][1]) for e, p in zip(exact, parts, strict=True))
    # Each result counts the products made with its own operator: the first sketches, so the
    # others skip the sketch's products (num_matvecs // 3 of them).
    counts = [num_matvecs] + [num_matvecs - sketch] * (len(parts) - 1)
    results = tuple(
        TraceResult(v, e, jnp.asarray(c)) for (v, e), c in zip(parts, counts, strict=True)
    )
    for result in results:
        check_finite_result(result.value, "trace")
    return results[0] if single else results


def frobenius_norm_squared(
    op: LinearOperator | tuple[LinearOperator, ...],
    /,
    *,
    num_matvecs: int,
    key: jax.Array,
    probe_batch_size: int | None = None,
) -> TraceResult | tuple[TraceResult, ...]:
    """Estimate ``||A||_F^2 = tr(A^T A) = E ||A z||^2`` (Rademacher ``z``) with its standard error.

    ``op`` may be a tuple of operators of one shape (e.g. ``(H, G, H - G)``): their estimates
    share the probes, which cancels much of the noise in their ratios, and ``H - G`` costs no
    product of its own. Off-diagonal blocks (:func:`~curvature.restrict` with ``cols``) are
    accepted. Cost: ``num_matvecs`` products with each distinct operator."""
    return _hutchinson(
        op, ("frobenius",), num_matvecs, key, probe_batch_size, "frobenius_norm_squared"
    )[0]


def diagonal(
    op: LinearOperator | tuple[LinearOperator, ...],
    /,
    *,
    num_matvecs: int | None = None,
    key: jax.Array | None = None,
    method: str = "bekas",
    probe_batch_size: int | None = None,
    progress: bool | None = None,
) -> DiagonalResult | tuple[DiagonalResult, ...]:
    """``diag(A)`` (flat, ``(n,)``; ``op.unravel`` gives per-parameter maps).

    Args:
      op: an operator, or a tuple of operators of one layout (a tuple of results, on shared
        probes: the operators' diagonals differ by the probes' noise of their difference only).
      method: ``"bekas"`` (default): each entry is the mean of ``z_i (A z)_i`` over
        ``num_matvecs`` Rademacher probes (``key``), with its standard error; the variance of
        entry ``i`` is ``sum_{j != i} A_ij^2``, small for diagonally dominant operators.
        ``"exact"``: the exact diagonal, standard errors zero. For a Gauss-Newton operator or an
        empirical Fisher (and combinations, blocks and preconditioned forms of them) it comes
        from per-example Jacobians (a few gradients' cost, memory of a chunk's Jacobians); for
        any other operator from ``n`` matvecs with the unit vectors, ``probe_batch_size`` at a
        time (default 16, fewer when a block would take a quarter of the available memory):
        one compiled program for every block, progress on stderr between blocks
        (``progress=None``: when the run looks longer than 5 seconds; a warning first above
        20,000 products) and Ctrl-C honoured between blocks.
    """
    ops, single = _operators(op, "diagonal")
    if method == "exact":
        results = tuple(_exact(o, probe_batch_size, progress) for o in ops)
        for result in results:
            check_finite_result(result.diagonal, "diagonal")
        return results[0] if single else results
    if method != "bekas":
        raise ValueError(f"method must be 'bekas' or 'exact', got {method!r}")
    if num_matvecs is None or key is None:
        raise ValueError("diagonal(method='bekas') needs num_matvecs and key")
    return _hutchinson(op, ("diagonal",), num_matvecs, key, probe_batch_size, "diagonal")[0]


_RESULTS = {"trace": TraceResult, "diagonal": DiagonalResult, "frobenius": TraceResult}


def hutchinson(
    op: LinearOperator | tuple[LinearOperator, ...],
    statistics: tuple[str, ...],
    /,
    *,
    num_matvecs: int,
    key: jax.Array,
    probe_batch_size: int | None = None,
) -> dict:
    """Several Hutchinson-family statistics on the same probes, one product a probe: the trace
    (``z^T A z``), the diagonal (``z * A z``, Bekas et al.) and the squared Frobenius norm
    (``||A z||^2``), each with its standard error.

    With the same ``key`` each equals :func:`trace` (``method="hutchinson"``), :func:`diagonal`
    and :func:`frobenius_norm_squared` alone; together they cost ``num_matvecs`` products
    instead of one run each, and their errors are correlated as the probes are shared (e.g. the
    mean of the diagonal is ``trace / n`` exactly, with the trace's standard error over ``n``).

    Args:
      op: an operator or a tuple of operators of one layout (as for :func:`trace`).
      statistics: names among ``"trace"``, ``"diagonal"``, ``"frobenius"``.

    Returns ``{name: result}`` with a :class:`TraceResult` (trace, frobenius) or
    :class:`DiagonalResult` (diagonal) per name; for a tuple of operators, a tuple of results.
    """
    statistics = tuple(statistics)
    unknown = [name for name in statistics if name not in SAMPLES]
    if unknown or not statistics or len(set(statistics)) != len(statistics):
        raise ValueError(
            f"hutchinson: statistics must be distinct names among {tuple(SAMPLES)}, got "
            f"{statistics!r}"
        )
    results = _hutchinson(op, statistics, num_matvecs, key, probe_batch_size, "hutchinson")
    return dict(zip(statistics, results, strict=True))


def _hutchinson(op, statistics: tuple[str, ...], num_matvecs, key, probe_batch_size, what: str):
    """Per statistic, a result (or a tuple of results for a tuple of operators), after the
    checks every Hutchinson-family estimator makes."""
    square = "trace" in statistics or "diagonal" in statistics
    ops, single = _operators(op, what, square=square)
    check_key(key)
    num_matvecs = positive_int(num_matvecs, "num_matvecs")
    if num_matvecs < 2:
        raise ValueError(f"{what} needs num_matvecs >= 2 for a standard error, got {num_matvecs}")
    block = block_size(num_matvecs, probe_batch_size)
    program = functools.partial(_hutchinson_program, statistics, num_matvecs, block)
    parts, _ = _estimate(program, ops, key)  # per operator, per statistic
    count = jnp.asarray(num_matvecs)
    out = []
    for j, name in enumerate(statistics):
        results = tuple(_RESULTS[name](*per_op[j], count) for per_op in parts)
        for result in results:
            check_finite_result(result[0], what)
        out.append(results[0] if single else results)
    return out


def _exact(op: LinearOperator, probe_batch_size, progress) -> DiagonalResult:
    if op.has_fast_diagonal:
        d = op.exact_diagonal() if is_traced(op) else op.host_exact_diagonal()
        return DiagonalResult(d, jnp.zeros_like(d), jnp.asarray(0))
    if probe_batch_size is not None:
        probe_batch_size = positive_int(probe_batch_size, "probe_batch_size")
    what = "diagonal(method='exact')"
    d = unit_products(op, diagonal=True, block=probe_batch_size, progress=progress, what=what)
    return DiagonalResult(d, jnp.zeros_like(d), jnp.asarray(op.size))

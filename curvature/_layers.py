"""Dense layers found in a model's computation, and the model run with its layers opened up.

K-FAC needs, per dense layer ``s = a @ W + b``, the layer's input ``a`` and the gradient of the
outputs in its pre-activation ``s``. Models here are plain functions ``model(params, batch)`` (a
flax NNX or linen model is one too, through :mod:`curvature.flax`), so the layers are found where
every such model agrees: in its jaxpr. :func:`find_dense_layers` traces the model once and walks
the equations (inlining ``jit`` calls and ``checkpoint``), following each parameter leaf through
dtype conversions, transposes, reshapes and broadcasts:

* a ``dot_general`` that contracts the last axis of a data-dependent operand (``a``, any leading
  axes) with one axis of a 2-D parameter leaf used nowhere else is a dense layer's kernel, stored
  ``(fan_in, fan_out)`` (``x @ W``, flax's convention) or ``(fan_out, fan_in)`` (``x @ W.T``);
* its output's only consumer, an ``add`` of a 1-D parameter leaf (used nowhere else) broadcast
  along the last axis, is its bias; the sum is the pre-activation ``s``.

A leaf used twice (tied weights), inside a ``scan`` / ``while`` / custom-derivative function, or
in any other operation is not part of a dense layer; K-FAC gives it its exact diagonal.

:func:`opened` evaluates the traced model equation by equation with ``deltas`` added to every
layer's pre-activation and returns the layer inputs too: the gradient in ``deltas`` of a
function of the outputs is that function's gradient in the pre-activations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

PyTree = Any

# Call primitives whose body is the same computation: the walk inlines them.
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "checkpoint", "remat"})
# Primitives that move or retype a parameter without mixing its entries.
_KERNEL_VIEWS = frozenset({"convert_element_type", "copy", "copy_p", "transpose"})
_BIAS_VIEWS = frozenset({"convert_element_type", "copy", "copy_p", "reshape", "broadcast_in_dim"})


@dataclasses.dataclass(frozen=True)
class DenseLayer:
    """One dense layer ``s = a @ W + b`` found in a model (:func:`find_dense_layers`).

    Attributes:
      name: the kernel's path in the parameter pytree without its last key (``"layers/0"``,
        ``"Dense_1"``); the kernel's own path when it has one key (a top-level ``"w"``) or when
        two layers would share a name.
      kernel: the kernel's leaf index in the flattened parameters.
      bias: the bias' leaf index, or ``None``.
      transposed: the kernel is stored ``(fan_out, fan_in)`` (``x @ W.T``).
      fan_in, fan_out: the layer's input and output widths.
      positions: how many rows ``a`` has per example (1 for an MLP; the sequence length when a
        layer is applied to every token).
    """

    name: str
    kernel: int
    bias: int | None
    transposed: bool
    fan_in: int
    fan_out: int
    positions: int
    shape: tuple[int, ...] = dataclasses.field(repr=False)  # s for a batch of one example
    # Where the layer sits in the model's jaxpr (the paths of its dot_general and of the
    # equation giving s): not compared, so that K-FAC operators of models that differ only
    # elsewhere (another activation) share compiled programs.
    dot: tuple[int, ...] = dataclasses.field(repr=False, compare=False)
    output: tuple[int, ...] = dataclasses.field(repr=False, compare=False)

    @property
    def rows(self) -> int:
        """The input factor's size: ``fan_in``, plus one for the bias."""
        return self.fan_in + (self.bias is not None)


@dataclasses.dataclass(frozen=True)
class _View:
    """A parameter leaf seen through views: transposed an odd number of times (a kernel), or its
    one axis at position ``axis`` (a vector)."""

    leaf: int
    prims: frozenset
    transposed: bool = False
    axis: int = 0


def _sub_jaxpr(eqn) -> tuple[Jaxpr, Sequence]:
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(inner, ClosedJaxpr):
        return inner.jaxpr, inner.consts
    return inner, ()


def _is_call(eqn) -> bool:
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    return eqn.primitive.name in _CALLS and isinstance(inner, ClosedJaxpr | Jaxpr)


def _view_of(eqn, view: _View, shape_in, shape_out) -> _View | None:
    name = eqn.primitive.name
    prims = view.prims | {name}
    if name == "transpose":
        if len(shape_in) != 2:
            return None
        return dataclasses.replace(view, prims=prims, transposed=not view.transposed)
    if name == "reshape":
        wide = [i for i, d in enumerate(shape_out) if d != 1]
        if len(wide) > 1:
            return None
        return dataclasses.replace(view, prims=prims, axis=wide[0] if wide else len(shape_out) - 1)
    if name == "broadcast_in_dim":
        return dataclasses.replace(
            view, prims=prims, axis=eqn.params["broadcast_dimensions"][view.axis]
        )
    return dataclasses.replace(view, prims=prims)


class _Walk:
    """One pass over a traced model: parameter views, data dependence, uses per leaf, and the
    candidate layers (kernel and bias leaves, checked for other uses at the end)."""

    def __init__(self, shapes: Sequence[tuple[int, ...]]):
        self.shapes = shapes
        self.uses = [0] * len(shapes)
        self.candidates: list[dict] = []

    def use(self, info) -> None:
        view = info[0]
        if view is not None:
            self.uses[view.leaf] += 1

    def run(self, jaxpr: Jaxpr, infos: list, path: tuple[int, ...]) -> list:
        env: dict = {}

        def read(v):
            return (None, False) if isinstance(v, Literal) else env[v]

        for var, info in zip(jaxpr.invars, infos, strict=True):
            env[var] = info
        for var in jaxpr.constvars:
            env[var] = (None, False)
        consumers: dict = {}
        for idx, eqn in enumerate(jaxpr.eqns):
            for v in eqn.invars:
                if not isinstance(v, Literal):
                    consumers.setdefault(v, []).append(idx)
        for v in jaxpr.outvars:
            if not isinstance(v, Literal):
                consumers.setdefault(v, []).append(None)

        pending: list = []
        for idx, eqn in enumerate(jaxpr.eqns):
            here = path + (idx,)
            ins = [read(v) for v in eqn.invars]
            data = any(d for _, d in ins)
            name = eqn.primitive.name
            if _is_call(eqn):
                sub, _ = _sub_jaxpr(eqn)
                outs = self.run(sub, ins, here)
            elif name in _KERNEL_VIEWS | _BIAS_VIEWS and ins[0][0] is not None and not data:
                view = _view_of(eqn, ins[0][0], eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape)
                if view is None:
                    self.use(ins[0])
                outs = [(view, False)]
            elif name == "dot_general" and self._dense(eqn, ins, here, consumers, pending):
                outs = [(None, True)]
            else:
                for info in ins:
                    self.use(info)
                outs = [(None, data)] * len(eqn.outvars)
            for var, info in zip(eqn.outvars, outs, strict=True):
                env[var] = info
        for candidate, out_var, user in pending:
            self._bias(candidate, out_var, jaxpr.eqns[user], path + (user,), env)
        results = [read(v) for v in jaxpr.outvars]
        if not path:  # the model returns a parameter: a use
            for info in results:
                self.use(info)
        return results

    def _dense(self, eqn, ins, here, consumers, pending) -> bool:
        (lhs, rhs), (lb, rb) = eqn.params["dimension_numbers"]
        (act_view, act_data), (ker_view, _) = ins
        if lb or rb or len(lhs) != 1 or act_view is not None or not act_data or ker_view is None:
            return False
        if not ker_view.prims <= _KERNEL_VIEWS or len(self.shapes[ker_view.leaf]) != 2:
            return False
        act_shape = eqn.invars[0].aval.shape
        if lhs[0] != len(act_shape) - 1:
            return False
        contracted = rhs[0]  # the axis of the (viewed) kernel that meets the input
        transposed = (contracted == 1) != ker_view.transposed
        stored = self.shapes[ker_view.leaf]
        fan_in, fan_out = stored[::-1] if transposed else stored
        self.uses[ker_view.leaf] += 1
        positions = 1
        for d in act_shape[:-1]:
            positions *= d
        candidate = {
            "kernel": ker_view.leaf,
            "bias": None,
            "transposed": transposed,
            "fan_in": fan_in,
            "fan_out": fan_out,
            "positions": positions,
            "shape": tuple(eqn.outvars[0].aval.shape),
            "dot": here,
            "output": here,
        }
        self.candidates.append(candidate)
        users = consumers.get(eqn.outvars[0], [])
        if len(users) == 1 and users[0] is not None:
            pending.append((candidate, eqn.outvars[0], users[0]))
        return True

    def _bias(self, candidate, out_var, add, add_path, env) -> None:
        """The bias of a layer whose output's one consumer is ``add``: its other operand, a view
        of a vector leaf of ``fan_out`` entries along the last axis."""
        if add.primitive.name != "add":
            return
        other = add.invars[1] if add.invars[0] is out_var else add.invars[0]
        if isinstance(other, Literal):
            return
        view, data = env[other]
        if view is None or data or not view.prims <= _BIAS_VIEWS:
            return
        shape = other.aval.shape
        if self.shapes[view.leaf] != (candidate["fan_out"],) or view.axis != len(shape) - 1:
            return
        candidate["bias"], candidate["output"] = view.leaf, add_path


def _leaf_names(params: PyTree) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = []
    for path, _ in flat:
        keys = list(path)
        if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
            keys = keys[:-1]
        names.append(jax.tree_util.keystr(tuple(keys), simple=True, separator="/") or "params")
    return names


def trace(model: Callable, params: PyTree, example: PyTree) -> ClosedJaxpr:
    """The jaxpr of ``model(params, example)`` with the flat parameter leaves first."""
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def flat(leaves, batch):
        return model(jax.tree_util.tree_unflatten(treedef, leaves), batch)

    return jax.make_jaxpr(flat)(leaves, example)


def find_dense_layers(
    closed: ClosedJaxpr, params: PyTree
) -> tuple[tuple[DenseLayer, ...], tuple[int, ...]]:
    """The dense layers of a traced model (:func:`trace`), and the leaves in none of them."""
    leaves = jax.tree_util.tree_leaves(params)
    shapes = [tuple(jnp.shape(x)) for x in leaves]
    walk = _Walk(shapes)
    jaxpr = closed.jaxpr
    infos = [(_View(i, frozenset()), False) for i in range(len(leaves))]
    infos += [(None, True)] * (len(jaxpr.invars) - len(leaves))
    walk.run(jaxpr, infos, ())
    names = _leaf_names(params)
    layers, taken = [], set()
    for c in walk.candidates:
        if walk.uses[c["kernel"]] != 1:
            continue
        if c["bias"] is not None and walk.uses[c["bias"]] != 1:  # the bias is used elsewhere too
            c = {**c, "bias": None, "output": c["dot"]}
        kernel_path = names[c["kernel"]]
        name = kernel_path.rsplit("/", 1)[0] if "/" in kernel_path else kernel_path
        layers.append(DenseLayer(name=name, **c))
        taken.update({c["kernel"], c["bias"]} - {None})
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer.name] = counts.get(layer.name, 0) + 1
    layers = [
        dataclasses.replace(layer, name=names[layer.kernel]) if counts[layer.name] > 1 else layer
        for layer in layers
    ]
    rest = tuple(i for i in range(len(leaves)) if i not in taken)
    return tuple(layers), rest


def _bind(eqn, ins: list) -> list:
    """One equation evaluated, as ``jax.core.eval_jaxpr`` does (``get_bind_params`` returned
    ``(subfuns, params)`` in older JAX, the params alone from 0.10)."""
    bound = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
    if ctx is None:
        out = eqn.primitive.bind(*subfuns, *ins, **params)
    else:
        with ctx:
            out = eqn.primitive.bind(*subfuns, *ins, **params)
    return out if eqn.primitive.multiple_results else [out]


def opened(
    closed: ClosedJaxpr,
    layers: Sequence[DenseLayer],
    leaves: Sequence[jax.Array],
    batch_leaves: Sequence[jax.Array],
    deltas: Sequence[jax.Array],
) -> tuple[list[jax.Array], list[jax.Array]]:
    """The traced model's outputs with ``deltas[l]`` added to layer ``l``'s pre-activation, and
    each layer's input ``a``: the model evaluated equation by equation (it can be differentiated,
    vmapped and compiled like the model)."""
    dots = {layer.dot: i for i, layer in enumerate(layers)}
    outputs = {layer.output: i for i, layer in enumerate(layers)}
    inside = {
        path[:k]
        for layer in layers
        for path in (layer.dot, layer.output)
        for k in range(1, len(path))
    }
    inputs: list = [None] * len(layers)

    def run(jaxpr: Jaxpr, consts, args, path):
        env: dict = {}

        def read(v):
            return v.val if isinstance(v, Literal) else env[v]

        for var, val in zip(jaxpr.constvars, consts, strict=True):
            env[var] = val
        for var, val in zip(jaxpr.invars, args, strict=True):
            env[var] = val
        for idx, eqn in enumerate(jaxpr.eqns):
            here = path + (idx,)
            ins = [read(v) for v in eqn.invars]
            if here in inside:
                sub, sub_consts = _sub_jaxpr(eqn)
                outs = run(sub, sub_consts, ins, here)
            else:
                outs = _bind(eqn, ins)
            if here in dots:
                inputs[dots[here]] = ins[0]
            if here in outputs:
                outs = [outs[0] + deltas[outputs[here]].astype(outs[0].dtype)]
            for var, val in zip(eqn.outvars, outs, strict=True):
                env[var] = val
        return [read(v) for v in jaxpr.outvars]

    results = run(closed.jaxpr, closed.consts, list(leaves) + list(batch_leaves), ())
    return results, inputs

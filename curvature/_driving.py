"""How estimators run: one compiled program for in-memory data, host-driven for streamed data.

* :func:`compiled`: ``jax.jit`` that stays on inside a host-driven estimator, for the work
  between two matvecs of its loops (a Lanczos update, a block of probes).
* :class:`host_driven`: wraps an estimator's jitted program; for a streamed operator it runs the
  same Python function under ``jax.disable_jit()``, so its loops run on the host and each matvec
  is a pass over the data (:mod:`curvature.streaming`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

__all__ = ["compiled", "host_driven"]


def compiled(fn: Callable | None = None, **jit_kwargs) -> Callable:
    """``jax.jit(fn)``, compiled also inside a host-driven estimator (where jit is otherwise
    disabled): the work between two matvecs of an estimator's loop (a Lanczos update, a block of
    probes) is one compiled step there. Inside a compiled estimator it is inlined as usual."""
    if fn is None:
        return functools.partial(compiled, **jit_kwargs)
    jitted = jax.jit(fn, **jit_kwargs)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with jax.disable_jit(False):
            return jitted(*args, **kwargs)

    return run


class host_driven:  # noqa: N801 (a decorator)
    """An estimator's compiled program that runs host-driven for a streamed operator.

    For in-memory data ``fn(op, ...)`` is the jit-compiled program. For a streamed operator (its
    first argument) the same function runs under ``jax.disable_jit()``: its loops run on the host
    op by op and each matvec is a pass of compiled batch products (:mod:`curvature.streaming`).
    Attributes (``lower``, ``_cache_size``) are the compiled function's."""

    def __init__(self, compiled: Callable):
        self.compiled = compiled
        functools.update_wrapper(self, compiled)

    def __call__(self, op, *args, **kwargs):
        if getattr(op, "streamed", False):
            with jax.disable_jit():
                return self.compiled(op, *args, **kwargs)
        return self.compiled(op, *args, **kwargs)

    def __getattr__(self, name):
        if name == "compiled":
            raise AttributeError(name)
        return getattr(self.compiled, name)

"""JAX's persistent compilation cache for the experiments: every program that takes longer than
:data:`MIN_COMPILE_SECONDS` to compile is written to disk, and a later process (a resumed run,
the next run of a config, ``load_run`` in a notebook after ``run``) loads it instead of
compiling it again.

The directory is ``$CURVATURE_JAX_CACHE``, else ``$XDG_CACHE_HOME/curvature/jax`` (by default
``~/.cache/curvature/jax``); ``CURVATURE_JAX_CACHE=off`` turns the cache off. A directory that
the process configured itself (``jax.config.update("jax_compilation_cache_dir", ...)``) is left
as it is. The command line and :func:`experiments.run.run` call :func:`enable`; library users
enable the cache with the same two ``jax.config.update`` lines (see the README).

JAX's own warning applies: a compilation cache is trusted code, so keep it in a directory only
you can write to.
"""

from __future__ import annotations

import os
import pathlib
import warnings

import jax

ENV = "CURVATURE_JAX_CACHE"
OFF = ("off", "")

# JAX's default (1 s) leaves out most of what a small network compiles: its Lanczos, Hutch++
# and training programs take 0.1-1 s each on a CPU, and there are dozens of them a run.
MIN_COMPILE_SECONDS = 0.1


def directory() -> pathlib.Path | None:
    """Where compiled programs are kept (``None``: the cache is off)."""
    chosen = os.environ.get(ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in OFF else pathlib.Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return pathlib.Path(base).expanduser() / "curvature" / "jax"


def enable() -> pathlib.Path | None:
    """Turn on JAX's persistent compilation cache in :func:`directory` (unless the process set a
    directory of its own, which is kept); returns the directory in use, or ``None`` when the
    cache is off or its directory cannot be written (a warning says so)."""
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return pathlib.Path(configured)
    path = directory()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        writable = os.access(path, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        warnings.warn(
            f"the compilation cache {path} cannot be written: every process compiles its "
            f"programs (set {ENV} to a writable directory, or to off)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path

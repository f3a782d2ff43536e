"""Command line, in the flax examples' convention.

    python -m experiments run  --config=configs/relu_vs_smooth.py --workdir=runs/relu_vs_smooth \
                               [--config.train.steps=500 ...] [--sweep=train.learning_rate=0.1,0.2 ...]
    python -m experiments plot --workdir=runs/relu_vs_smooth [--sigma=0.05]
    python -m experiments compare --runs=runs/a,runs/b --workdir=runs/a_vs_b

``run`` trains and measures (resuming whatever the workdir already holds); ``plot`` redraws the
summary, figures and report from a finished or partial run directory without recomputing
anything; ``compare`` overlays several run directories into ``--workdir``.
The console script ``curvature-experiments`` takes the same subcommands.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Path to a configs/*.py file; override fields with --config.a.b=value.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created, or resumed if it exists).")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress output.")
_SWEEP = flags.DEFINE_multi_string(
    "sweep",
    [],
    "Sweep a config field: --sweep=train.learning_rate=0.1,0.2 (repeatable; members are the "
    "product with activations and seeds). Added to the config's own `sweep`.",
)
_RUNS = flags.DEFINE_list("runs", [], "compare: the run directories to overlay.")
_SIGMA = flags.DEFINE_float(
    "sigma", None, "Density kernel width (standard deviation); default 1% of the spectrum's range."
)

COMMANDS = ("run", "plot", "compare")


def _main(argv):
    args = argv[1:]
    if len(args) != 1 or args[0] not in COMMANDS:
        raise app.UsageError(f"give one command: {' | '.join(COMMANDS)} (got {args or 'none'})")
    command = args[0]
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    from experiments.errors import ConfigError, DataError, RunDirError

    try:
        return _command(command)
    except KeyboardInterrupt:
        print(
            "interrupted: every finished measurement is kept; run the same command to resume",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:  # `... | head`: the reader left; nothing is wrong with the run
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ConfigError, DataError, RunDirError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a folder that vanished: the run keeps what it wrote
        where = f" ({err.filename})" if err.filename else ""
        print(
            f"error: cannot write the run directory{where}: {err.strerror or err}", file=sys.stderr
        )
        return 2


def _command(command):
    from experiments import report, run

    if command == "compare":
        if len(_RUNS.value) < 1:
            raise app.UsageError("compare needs --runs=DIR1,DIR2,...")
        from experiments import pages

        for path in pages.compare(_RUNS.value, _WORKDIR.value, sigma=_SIGMA.value):
            print(f"wrote {path}")
        return 0
    if command == "run":
        if _CONFIG.value is None:
            raise app.UsageError("run needs --config=configs/NAME.py")
        config = _CONFIG.value
        if _SWEEP.value:
            with config.unlocked():
                config.sweep = tuple(config.sweep) + tuple(_SWEEP.value)
        statuses = run.run(config, _WORKDIR.value, progress=run.Progress(enabled=not _QUIET.value))
        print(report.write_summary(_WORKDIR.value))
        _draw(_WORKDIR.value)
        failed = [k for k, v in statuses.items() if v.get("state") == "failed"]
        if failed:
            stopped = "; ".join(f"{k}: {statuses[k].get('message', '')}" for k in failed)
            print(
                f"{len(failed)} of {len(statuses)} runs stopped early: {stopped}", file=sys.stderr
            )
            return 1
        return 0
    print(report.write_summary(_WORKDIR.value))
    _draw(_WORKDIR.value)
    return 0


def _draw(workdir):
    from experiments import pages

    for path in pages.draw_all(workdir, sigma=_SIGMA.value):
        print(f"wrote {path}")


def _parse_flags(argv):
    """absl's parser, with a one-line error for an override of a config key that does not exist
    (ml_collections raises a KeyError from deep inside flag parsing), and for a config file that
    is missing or raises."""
    argv = [_expand_workdir(a) for a in argv]
    config_path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_path is not None and not os.path.isfile(os.path.expanduser(config_path)):
        print(f"error: config file {config_path} does not exist", file=sys.stderr)
        sys.exit(2)
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as err:
        inner = err
        while isinstance(inner, BaseException) and inner.args:
            inner = inner.args[0]  # AttributeError(KeyError("'key'\nDid you mean ...")) -> the text
        key, _, hint = str(inner).partition("\n")
        key = key.strip("'\"")
        overrides = [a.split("=")[0][len("--config.") :] for a in argv if a.startswith("--config.")]
        named = [o for o in overrides if o.split(".")[-1] == key] or overrides
        name = named[0] if named else key
        from experiments.config import MOVED_KEYS

        if name in MOVED_KEYS:
            hint = f"It moved to {MOVED_KEYS[name]}."
        print(f"error: config key {name} does not exist. {hint}".strip(), file=sys.stderr)
        sys.exit(2)
    except flags.Error as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # noqa: BLE001 - the user's config file raised while loading
        print(
            f"error: config file {config_path} failed to load: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}",
            file=sys.stderr,
        )
        sys.exit(2)


def _expand_workdir(arg: str) -> str:
    """``--workdir=~/x`` is expanded (the shell leaves a ``~`` after ``=`` alone)."""
    for flag in ("--workdir=", "--runs="):
        if arg.startswith(flag):
            return flag + ",".join(os.path.expanduser(p) for p in arg[len(flag) :].split(","))
    return arg


def main():
    logging.set_verbosity(logging.WARNING)
    app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
    main()

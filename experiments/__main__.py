"""Command line, in the flax examples' convention.

    python -m experiments run  --config=configs/relu_vs_smooth.py --workdir=runs/relu_vs_smooth \
                               [--config.train.steps=500 ...]
    python -m experiments plot --workdir=runs/relu_vs_smooth [--sigma=0.05]
    python -m experiments compare --runs=runs/a,runs/b --workdir=runs/a_vs_b

``run`` trains and measures (resuming whatever the workdir already holds); ``plot`` redraws the
summary, figures and report from a finished or partial run directory without recomputing
anything; ``compare`` overlays several run directories into ``--workdir``.
The console script ``curvature-experiments`` takes the same subcommands.
"""

from __future__ import annotations

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
    from experiments import report, run

    if command == "compare":
        if len(_RUNS.value) < 1:
            raise app.UsageError("compare needs --runs=DIR1,DIR2,...")
        from experiments import figures

        try:
            written = figures.compare(_RUNS.value, _WORKDIR.value, sigma=_SIGMA.value)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        for path in written:
            print(f"wrote {path}")
        return 0
    if command == "run":
        if _CONFIG.value is None:
            raise app.UsageError("run needs --config=configs/NAME.py")
        from experiments.errors import ConfigError, DataError

        try:
            statuses = run.run(
                _CONFIG.value, _WORKDIR.value, progress=run.Progress(enabled=not _QUIET.value)
            )
        except (ConfigError, DataError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(report.write_summary(_WORKDIR.value))
        _draw(_WORKDIR.value)
        failed = [k for k, v in statuses.items() if v.get("state") == "failed"]
        if failed:
            stopped = ", ".join(failed)
            print(
                f"{len(failed)} of {len(statuses)} runs stopped early: {stopped}", file=sys.stderr
            )
            return 1
        return 0
    try:
        print(report.write_summary(_WORKDIR.value))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _draw(_WORKDIR.value)
    return 0


def _draw(workdir):
    from experiments import figures

    for path in figures.draw_all(workdir, sigma=_SIGMA.value):
        print(f"wrote {path}")


def _parse_flags(argv):
    """absl's parser, with a one-line error for an override of a config key that does not exist
    (ml_collections raises a KeyError from deep inside flag parsing)."""
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
        print(
            f"error: config key {named[0] if named else key} does not exist. {hint}".strip(),
            file=sys.stderr,
        )
        sys.exit(2)
    except flags.Error as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def main():
    logging.set_verbosity(logging.WARNING)
    app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
    main()

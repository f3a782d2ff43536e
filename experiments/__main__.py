"""Command line, in the flax examples' convention: flags -> config -> ``run(config, workdir)``.

    python -m experiments run  --config=configs/relu_vs_smooth.py --workdir=runs/relu_vs_smooth \
                               [--config.train.steps=500 ...] [--sweep=train.learning_rate=0.1,0.2 ...]
    python -m experiments run  --workdir=runs/relu_vs_smooth      # resume with its stored config
    python -m experiments plot --workdir=runs/relu_vs_smooth [--sigma=0.05]
    python -m experiments plot --workdir=runs/lr --against=train.learning_rate \
                               --measurement=lambda_max [--step=600]
    python -m experiments compare --runs=runs/a,runs/b --workdir=runs/a_vs_b

``run`` trains and measures (resuming whatever the workdir already holds); ``plot`` redraws the
summary, figures and report from a finished or partial run directory without recomputing
anything; with ``--against`` it draws only one measurement against a swept field, one point per
swept value, seeds as error bars (:mod:`experiments.figures.study`), and prints the numbers;
``compare`` overlays several run directories into ``--workdir``.
The console script ``curvature-experiments`` takes the same subcommands; :mod:`experiments.cli`
turns errors into one line and an exit status.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli, pages, report, run

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

_AGAINST = flags.DEFINE_string(
    "against",
    None,
    "plot: draw --measurement against this swept field (train.learning_rate, or its last part, "
    "or activation), one point per value at the last step every seed reached, seeds as error "
    "bars; only this figure is drawn.",
)
_MEASUREMENT = flags.DEFINE_string(
    "measurement",
    None,
    "plot --against: what to draw, as a record names it (lambda_max, sharpness, trace, "
    "test_accuracy, gauss_newton.trace, top_eigenvalues.1, a measurement of your own ...).",
)
_STEP = flags.DEFINE_integer(
    "step", None, "plot --against: at this step (default: the last step every seed reached)."
)

COMMANDS = ("run", "plot", "compare")


def _main(argv) -> int:
    command = cli.command(argv, COMMANDS, workdir=_WORKDIR.value)
    workdir = _WORKDIR.value
    cli.check_study(command, _AGAINST.value, _MEASUREMENT.value, _STEP.value)
    if _AGAINST.value is not None:
        paths, numbers = pages.draw_study(
            workdir, _AGAINST.value, _MEASUREMENT.value, step=_STEP.value
        )
        print(numbers)
        return cli.wrote(paths)
    if command == "compare":
        return cli.wrote(pages.compare(cli.runs(_RUNS.value), workdir, sigma=_SIGMA.value))
    statuses = {}
    if command == "run":
        config = cli.config_to_run(_CONFIG.value, workdir, _SWEEP.value)
        statuses = run.run(config, workdir, progress=run.Progress(enabled=not _QUIET.value))
    print(report.write_summary(workdir))
    cli.wrote(pages.draw_all(workdir, sigma=_SIGMA.value))
    return cli.exit_status(statuses)


def main():
    logging.set_verbosity(logging.WARNING)
    app.run(cli.one_line_errors(_main), flags_parser=cli.parse_flags)


if __name__ == "__main__":
    main()

"""What the command line (:mod:`experiments.__main__`) needs besides its flags: flag parsing with
one-line errors (a misspelt or moved config key, a missing config file, a deprecated key renamed),
the config to run, and exit statuses."""

from __future__ import annotations

import functools
import os
import sys
import types

import ml_collections
from absl import app, flags

from experiments import config as config_lib
from experiments.errors import ConfigError, DataError, RequestError, RunDirError


def command(argv, commands: tuple[str, ...], *, workdir: str | None) -> str:
    """The one command of ``argv``; :class:`absl.app.UsageError` otherwise."""
    args = argv[1:]
    if len(args) != 1 or args[0] not in commands:
        raise app.UsageError(f"give one command: {' | '.join(commands)} (got {args or 'none'})")
    if not workdir:
        raise app.UsageError("--workdir is required")
    return args[0]


def check_study(command: str, against, measurement, step) -> None:
    """``--against``, ``--measurement`` and ``--step`` go together, with ``plot``."""
    if against is None and measurement is None and step is None:
        return
    if command != "plot":
        raise app.UsageError("--against, --measurement and --step go with plot")
    if against is None:
        raise app.UsageError("--measurement and --step choose what --against=FIELD draws")
    if measurement is None:
        raise app.UsageError("--against needs --measurement=NAME (lambda_max, trace, ...)")


def runs(workdirs: list[str]) -> list[str]:
    if len(workdirs) < 1:
        raise app.UsageError("compare needs --runs=DIR1,DIR2,...")
    return workdirs


def config_to_run(config, workdir: str, sweeps: list[str]):
    """``--config`` with the ``--sweep`` flags added to its own; without ``--config``, the
    config stored in ``workdir`` (resuming its run)."""
    if config is None:
        config = config_lib.stored(workdir)
        if config is None:
            raise app.UsageError(
                "run needs --config=configs/NAME.py (or a --workdir holding a run to resume)"
            )
    if sweeps:
        with config.unlocked():
            config.sweep = tuple(config.sweep) + tuple(sweeps)
    return config


def wrote(paths) -> int:
    for path in paths:
        print(f"wrote {path}")
    return 0


def exit_status(statuses: dict) -> int:
    """1 when a member stopped early (each named, with its reason, on stderr), else 0."""
    failed = [k for k, v in statuses.items() if v.get("state") == "failed"]
    if not failed:
        return 0
    stopped = "; ".join(f"{k}: {statuses[k].get('message', '')}" for k in failed)
    print(f"{len(failed)} of {len(statuses)} runs stopped early: {stopped}", file=sys.stderr)
    return 1


def one_line_errors(main):
    """``main`` with an interrupt, a closed pipe, a bad config, data file or run directory, and
    an unwritable disk reported in one line and an exit status instead of a traceback."""

    @functools.wraps(main)
    def guarded(argv):
        try:
            return main(argv)
        except KeyboardInterrupt:
            print(
                "interrupted: every finished measurement is kept; run the same command to resume",
                file=sys.stderr,
            )
            return 130
        except BrokenPipeError:  # `... | head`: the reader left; nothing is wrong with the run
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except (ConfigError, DataError, RequestError, RunDirError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except OSError as err:  # a full disk, a folder that vanished: the run keeps what it wrote
            where = f" ({err.filename})" if err.filename else ""
            print(
                f"error: cannot write the run directory{where}: {err.strerror or err}",
                file=sys.stderr,
            )
            return 2

    return guarded


def parse_flags(argv):
    """absl's parser, with ``~`` expanded in paths, deprecated config keys renamed (with a
    warning), and a one-line error for an override of a config key that does not exist
    (ml_collections raises a KeyError from deep inside flag parsing), and for a config file that
    is missing, raises, has no ``get_config`` or whose ``get_config`` returns no ConfigDict."""
    argv = [_renamed(_expand_workdir(a)) for a in argv]
    sys.argv[:] = argv  # ml_collections reads the --config.* overrides from sys.argv itself
    config_path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    # ml_collections passes what follows a colon to get_config: configs/transformers.py:cnn
    file_part = config_path.split(":", 1)[0] if config_path is not None else None
    if file_part is not None and not os.path.isfile(os.path.expanduser(file_part)):
        _exit(f"config file {file_part} does not exist")
    try:
        parsed = flags.FLAGS(argv)
    except (KeyError, AttributeError) as err:
        if _lacks_get_config(err, config_path):
            _exit(
                f"config file {config_path} defines no get_config() (a function that returns the "
                "config, as in configs/smoke.py)"
            )
        if isinstance(err, AttributeError) and not (err.args and isinstance(err.args[0], KeyError)):
            _exit(_failed_to_load(config_path, err))  # not ConfigDict's missing key: the file's
        inner = err
        while isinstance(inner, BaseException) and inner.args:
            inner = inner.args[0]  # AttributeError(KeyError("'key'\nDid you mean ...")) -> the text
        key, _, hint = str(inner).partition("\n")
        key = key.strip("'\"")
        overrides = [a.split("=")[0][len("--config.") :] for a in argv if a.startswith("--config.")]
        named = [o for o in overrides if o.split(".")[-1] == key] or overrides
        name = named[0] if named else key
        if name in config_lib.MOVED_KEYS:
            hint = f"It moved to {config_lib.MOVED_KEYS[name]}."
        _exit(f"config key {name} does not exist. {hint}".strip())
    except flags.Error as err:
        _exit(str(err))
    except Exception as err:  # noqa: BLE001 - the user's config file raised while loading
        _exit(_failed_to_load(config_path, err))
    config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
    if config_path is not None and not isinstance(config, ml_collections.ConfigDict):
        _exit(
            f"config file {config_path}: get_config() returned {type(config).__name__}, not an "
            "ml_collections.ConfigDict (start from experiments.config.base_config())"
        )
    return parsed


def _exit(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _failed_to_load(config_path, err: BaseException) -> str:
    first = str(err).splitlines()[0] if str(err) else ""
    return f"config file {config_path} failed to load: {type(err).__name__}: {first}"


def _lacks_get_config(err: BaseException, config_path: str | None) -> bool:
    """Whether ``err`` is ml_collections' ``module.get_config`` on the config file itself (not an
    override of a missing key, nor an error inside the file's own ``get_config``)."""
    module = getattr(err, "obj", None)
    if config_path is None or getattr(err, "name", None) != "get_config":
        return False
    if not isinstance(module, types.ModuleType) or not getattr(module, "__file__", None):
        return False
    path = os.path.expanduser(config_path.split(":", 1)[0])
    return os.path.realpath(module.__file__) == os.path.realpath(path)


def _expand_workdir(arg: str) -> str:
    """``--workdir=~/x`` is expanded (the shell leaves a ``~`` after ``=`` alone)."""
    for flag in ("--workdir=", "--runs="):
        if arg.startswith(flag):
            return flag + ",".join(os.path.expanduser(p) for p in arg[len(flag) :].split(","))
    return arg


def _renamed(arg: str) -> str:
    """``--config.measure.trace.matvecs=30`` -> ``--config.measure.trace.num_matvecs=30``, with
    a ``FutureWarning``: a deprecated key overridden on the command line sets its new name."""
    if not arg.startswith("--config."):
        return arg
    key, eq, value = arg[len("--config.") :].partition("=")
    return f"--config.{config_lib.current_key(key)}{eq}{value}"

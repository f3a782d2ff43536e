"""MkDocs hooks: pages whose text the build produces from the code, so that they cannot go
stale. ``<!-- cli-help -->`` becomes the flags of ``python -m experiments`` (absl's ``--help``),
``<!-- config-defaults -->`` the default config (``experiments.config.base_config()``),
``<!-- registries -->`` the names registered in each registry."""

from __future__ import annotations

import subprocess
import sys


def _cli_help() -> str:
    # absl's --help exits with status 1 after printing the usage; the text is what counts.
    out = subprocess.run(
        [sys.executable, "-m", "experiments", "--help"], capture_output=True, text=True
    ).stdout
    if "\nflags:\n" not in out:
        raise RuntimeError(f"python -m experiments --help printed no flags:\n{out}")
    flags = out.split("\nflags:\n", 1)[1].split("\nTry --helpfull", 1)[0]
    lines = [line for line in flags.strip("\n").splitlines() if not line.endswith("__main__.py:")]
    return "```text\n" + "\n".join(lines) + "\n```"


def _flat(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _config_defaults() -> str:
    from experiments.config import base_config

    rows = [f"--config.{key}={value!r}" for key, value in _flat(base_config().to_dict())]
    return "```text\n" + "\n".join(rows) + "\n```"


def _registries() -> str:
    from experiments import data, measurements, models, optimizers

    rows = ["| registry | config key | names |", "|---|---|---|"]
    for name, registry in (
        ("`experiments.models.MODELS`", models.MODELS),
        ("`experiments.models.ACTIVATIONS`", models.ACTIVATIONS),
        ("`experiments.models.LOSSES`", models.LOSSES),
        ("`experiments.data.SOURCES`", data.SOURCES),
        ("`experiments.optimizers.OPTIMIZERS`", optimizers.OPTIMIZERS),
        ("`experiments.measurements.MEASUREMENTS`", measurements.MEASUREMENTS),
    ):
        names = ", ".join(f"`{n}`" for n in registry.names())
        rows.append(f"| {name} | `{registry.key}` | {names} |")
    return "\n".join(rows)


_MARKERS = {
    "<!-- cli-help -->": _cli_help,
    "<!-- config-defaults -->": _config_defaults,
    "<!-- registries -->": _registries,
}


def on_page_markdown(markdown: str, page, config, files) -> str:
    for marker, render in _MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    return markdown

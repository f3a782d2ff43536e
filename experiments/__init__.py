"""Config-driven experiments: train networks that differ in their activation (and in any swept
config field) and measure how the curvature of their loss surface differs, along training.
See ``python -m experiments`` and :func:`load_run`."""

from experiments.load import load_run
from experiments.measurements import register_measurement

__all__ = ["load_run", "register_measurement"]

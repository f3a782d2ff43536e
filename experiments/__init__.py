"""Config-driven experiments: train networks that differ in their activation (and in any swept
config field) and measure how the curvature of their loss surface differs, along training.
See ``python -m experiments`` and :func:`load_run`."""


def load_run(workdir):
    """The run in ``workdir``; see :func:`experiments.load.load_run`."""
    from experiments.load import load_run as _load_run

    return _load_run(workdir)


def __getattr__(name):
    if name == "register_measurement":
        from experiments.measure import register_measurement

        return register_measurement
    raise AttributeError(name)

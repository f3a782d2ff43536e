"""Where the main job's time goes: compile, members, figures (writes results/main_job_cpu.json).

    python benchmarks/bench_main_job.py [--config=configs/relu_vs_smooth.py]

Runs the config into a fresh temporary run directory and times its phases within one process:
preparing (data, models, validation), compiling every program once (the warm-up), training and
measuring the members, and drawing the figures and report. Also records the share of the
members' time each measurement took, from the records' own timings.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/relu_vs_smooth.py")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "main_job_cpu.json"))
    args = parser.parse_args()
    t_start = time.perf_counter()
    import jax

    from experiments import load, measure, pages, run

    t_import = time.perf_counter() - t_start
    spec = importlib.util.spec_from_file_location("config", ROOT / args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.lock()
    phases = {"import": t_import}
    real_prepare, real_warm_up = run.prepare, measure.warm_up

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
            return out

        return wrapper

    run.prepare = timed("prepare", real_prepare)
    measure.warm_up = timed("compile (warm-up)", real_warm_up)
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        run.run(config, workdir, progress=run.Progress(enabled=False))
        total_run = time.perf_counter() - t0
        phases["members"] = total_run - phases["prepare"] - phases.get("compile (warm-up)", 0.0)
        t0 = time.perf_counter()
        pages.draw_all(workdir)
        phases["figures and report"] = time.perf_counter() - t0
        per_measurement = collections.Counter()
        for member in load.load_run(workdir).members.values():
            for record in member.records:
                per_measurement.update(record.timings)
    phases["total"] = time.perf_counter() - t_start
    busy = sum(per_measurement.values())
    result = {
        "config": args.config,
        "seconds": {k: round(v, 2) for k, v in phases.items()},
        "measurement_share": {k: round(v / busy, 3) for k, v in per_measurement.most_common()},
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()

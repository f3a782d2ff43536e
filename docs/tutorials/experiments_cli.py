# %% [markdown]
# # The experiments command line
#
# The `experiments` package turns a config file into a run directory: it trains every member of
# a sweep, measures the Hessian along training, and writes records, kept parameters, a summary
# and figures. Here you run a small learning-rate sweep through the real command line, read the
# run back with `experiments.load_run`, measure again from the kept parameters (also something
# the run did not measure), draw a measurement against the swept value, and see how a run
# directory resumes and refuses a different config. The whole page runs in under a minute on
# 2 CPU cores, most of it in four short Python processes that each start JAX.

# %% [markdown]
# ## The config
#
# A config is a Python file whose `get_config()` returns an `ml_collections.ConfigDict`.
# `configs/smoke.py` is the smallest one: two activations (ReLU and tanh), one seed, 8-wide MLPs
# on 200 digits, 20 full-batch gradient-descent steps, curvature measured every 10 steps. The
# notebook finds the `configs/` folder next to the installed `experiments` package and writes
# only into a temporary folder.

# %%
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

import curvature as cv
import curvature.plotting
import experiments

configs = pathlib.Path(experiments.__file__).resolve().parents[1] / "configs"
smoke = configs / "smoke.py"
workdir = pathlib.Path(tempfile.mkdtemp()) / "smoke_lr"
print(smoke.read_text())


# %% [markdown]
# ## Run a sweep
#
# `--sweep=train.learning_rate=0.1,0.3` makes two members per activation and seed; any config
# field can be swept or overridden (`--config.section.key=value`). To keep the page quick, the
# measurement plan is cut to the top Hessian eigenvalues (Lanczos, with residuals and
# `converged` flags) and the Hutch++ trace (with a standard error): 3 × (20 + 20 + 3) + 30
# Hessian-vector products per measured step, at steps 0, 10 and 20. From a shell, at the
# repository root:
#
# ```bash
# python -m experiments run --config=configs/smoke.py --workdir=runs/smoke_lr \
#     --sweep=train.learning_rate=0.1,0.3 \
#     --config.measure.quantities="('top_eigenvalues','trace')" --quiet
# ```
#
# The notebook runs the same command with `subprocess`; `--quiet` leaves only the summary
# table it prints at the end (the same table is `summary.md` in the run directory).


# %%
def experiments_cli(*args):
    """Run `python -m experiments ARGS` in a fresh process; return the finished process."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "experiments", *args], capture_output=True, text=True
    )
    print(f"[exit status {done.returncode}, {time.perf_counter() - start:.1f} s]")
    return done


run_args = [
    "run",
    f"--config={smoke}",
    f"--workdir={workdir}",
    "--sweep=train.learning_rate=0.1,0.3",
    "--config.measure.quantities=('top_eigenvalues','trace')",
]
first = experiments_cli(*run_args, "--quiet")
print(first.stdout)
assert first.returncode == 0, first.stderr

# %% [markdown]
# Each row is a group (activation and swept values; the mean over seeds, here one): final
# loss and test accuracy, the gradient-equivalents training spent, the top eigenvalue
# λmax(H) (a `†` would mark one not converged), tr H ± its standard error, and λmax over the
# edge of stability 2/η of gradient descent.
#
# ## The run directory
#
# Everything lands under `--workdir`: the config, a summary and report, figures, and one folder
# per member with its records (`metrics.jsonl`), its status, the arrays of each measurement
# (`spectra/`), the parameters and optimizer state at every measured step (`checkpoints/`) and
# the per-step training log.


# %%
def tree(folder, indent="", show_all=1):
    """Print a folder's tree; in `members/`, only the first `show_all` members in full."""
    entries = sorted(folder.iterdir(), key=lambda p: (p.is_file(), p.name))
    for i, entry in enumerate(entries):
        if folder.name == "members" and i >= show_all:
            print(f"{indent}... and {len(entries) - show_all} more members like it")
            break
        print(f"{indent}{entry.name}{'/' if entry.is_dir() else ''}")
        if entry.is_dir():
            tree(entry, indent + "    ", show_all)


print(f"{workdir.name}/")
tree(workdir, "    ")

# %% [markdown]
# ## Read the run back
#
# `experiments.load_run(workdir)` reads the records from disk alone and rebuilds each member's
# model, loss, data and parameters on first use (checking the data against the run's
# fingerprint). Members are named by their activation, swept values and seed. A record is typed:
# the top eigenvalues come with their recomputed residual norms and `converged` flags, the trace
# with its standard error and the number of Hessian-vector products it cost.

# %%
run = experiments.load_run(workdir)
print("members:", list(run.members))
member = run.members["tanh-learning_rate=0.3-seed0"]
print("measured steps:", member.steps, " kept parameters at:", member.checkpoint_steps)
for record in member.records:
    top, tr = record.top_eigenvalues, record.trace
    print(
        f"step {record.step:2d}: train loss {record.train_loss:.4f}, "
        f"test accuracy {record.test_accuracy:.2f}, "
        f"tr H = {tr.value:.2f} ± {tr.standard_error:.2f} ({tr.num_matvecs} matvecs)"
    )
    for i, (value, residual, ok) in enumerate(
        zip(top.values, top.residuals, top.converged, strict=True)
    ):
        print(f"    λ{i + 1} = {value:.6f}  residual {residual:.1e}  converged {ok}")

# %% [markdown]
# ## Measure again from the kept parameters
#
# The parameters of every measured step are kept, so any measurement can be repeated or
# extended later without retraining. At step 10, `member.loss` (the mean training loss) on
# `member.measure_data` (the fixed measurement set the records used) is the same Hessian the run
# measured. A fresh Lanczos run from another start vector (`k=3`, 30 steps: 30 + 3 + 30
# matvecs, rank check included) finds the same eigenvalues to within their residuals: a
# converged Ritz value lies within its residual norm of an eigenvalue, and float32 round-off
# adds a few parts in a million.

# %%
step = 10
record = member.record(step)
params = member.params(step)
H = cv.hessian(member.loss, params, member.measure_data)
print(f"n = {H.shape[0]} parameters, {member.measure_data['x'].shape[0]} measurement examples")

again = cv.eigsh(H, k=3, num_steps=30, key=jax.random.key(42))
stored = record.top_eigenvalues
print("      stored       recomputed   difference  converged (stored, recomputed)")
for i in range(3):
    a, b = stored.values[i], float(again.eigenvalues[i])
    print(
        f"λ{i + 1}  {a:.7f}  {b:.7f}  {b - a:+.1e}     "
        f"{stored.converged[i]}, {bool(again.converged[i])}"
    )
    if stored.converged[i] and again.converged[i]:
        bound = stored.residuals[i] + float(again.residual_norms[i]) + 1e-5 * abs(a)
        assert abs(b - a) <= bound, (i, a, b, bound)

# %% [markdown]
# The run did not measure the spectral density. Stochastic Lanczos quadrature at the same step
# (4 probes × 40 steps = 160 matvecs) gives it, with two checks that come with error bars: its
# trace (a Hutchinson estimate on the same probes) agrees with the run's Hutch++ trace within
# their combined standard errors, and the spectral mass below zero says how much of the
# spectrum is negative at step 10.

# %%
density = cv.spectral_density(H, num_probes=4, num_steps=40, key=jax.random.key(7))
slq_trace, negative = density.trace(), density.mass_below()
print(
    f"tr H: SLQ {float(slq_trace.value):.2f} ± {float(slq_trace.standard_error):.2f}, "
    f"the run's Hutch++ {record.trace.value:.2f} ± {record.trace.standard_error:.2f}"
)
print(
    f"negative mass: {float(negative.value):.3f} ± {float(negative.standard_error):.3f} "
    "of the spectrum"
)
combined = np.hypot(float(slq_trace.standard_error), record.trace.standard_error)
assert abs(float(slq_trace.value) - record.trace.value) < 4 * combined

fig, ax = plt.subplots(figsize=(6, 3.5))
curvature.plotting.plot_density(ax, density, sigma=0.02, rug=True, label=f"step {step}")
ax.set_xlabel("Hessian eigenvalue")
ax.set_ylabel("spectral density")
ax.set_title(f"{member.name}: SLQ density at step {step}")
ax.legend()
plt.show()

# %% [markdown]
# ## A measurement against the swept value
#
# `plot` redraws from disk without recomputing anything. With `--against=FIELD
# --measurement=NAME` it draws one figure: one point per learning rate at the last step, one
# series per activation, error bars the spread over seeds (with one seed: the estimator's
# standard error; eigenvalues have none, an unconverged one is marked `†`), and prints the
# numbers. `NAME` is a field of the records: this run's largest eigenvalue is
# `top_eigenvalues.0` (the `lambda_max` name belongs to the cheaper `lambda_max` measurement,
# which this run did not make; `sharpness` names the largest eigenvalue from whichever of the
# two a run made), and `trace` would plot tr H ± SE.
#
# ```bash
# python -m experiments plot --workdir=runs/smoke_lr --against=train.learning_rate \
#     --measurement=top_eigenvalues.0
# ```

# %%
plotted = experiments_cli(
    "plot",
    f"--workdir={workdir}",
    "--against=train.learning_rate",
    "--measurement=top_eigenvalues.0",
)
print(plotted.stdout)
assert plotted.returncode == 0, plotted.stderr
display(Image(filename=workdir / "figures" / "top_eigenvalues.0_vs_learning_rate.png"))

# %% [markdown]
# ## Resume, and refuse what does not belong
#
# Running the same command again resumes the run: finished members are skipped (an unfinished
# one would continue from its last checkpoint and give the same numbers as an uninterrupted
# run). Without `--quiet` it reports each member as done; only the summary and figures are
# written again, and the records are unchanged.

# %%
resumed = experiments_cli(*run_args)
print(resumed.stderr.strip())
assert resumed.returncode == 0, resumed.stderr
assert resumed.stderr.count(": done") == len(run.members)
assert experiments.load_run(workdir).members[member.name].records == member.records

# %% [markdown]
# Every record, checkpoint and member carries a fingerprint of its config and data, checked
# before anything is written. A different sweep into the same directory is refused with a
# one-line error that names what differs, and exit status 2; nothing on disk changes.

# %%
other = [arg.replace("0.1,0.3", "0.1,0.2") for arg in run_args]
refused = experiments_cli(*other)
print(refused.stderr.strip())
assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1

# %% [markdown]
# ## Next
#
# The [experiments guide](../../guide/experiments/) lists every config section, measurement
# and subcommand; [run directories](../../guide/run_directories/) says what a run directory
# guarantees. A full study is the same command with a bigger config, e.g.
# `configs/relu_vs_smooth.py` on the [main job](../../studies/relu_vs_smooth/).

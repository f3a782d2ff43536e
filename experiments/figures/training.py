"""Training curves: the training loss and test accuracy against step, seeds as thin lines around
their mean (``training``)."""

from __future__ import annotations

from curvature import plotting
from experiments.figures import common


def training_figure(run):
    plt = common.pyplot()
    groups = common.groups(run)
    with plt.rc_context(common.PAPER_RC):
        fig, axes = plt.subplots(1, 2, figsize=(common.WIDTH, 2.6), layout="constrained")
        for key, ax, ylabel in (
            ("train_loss", axes[0], "training loss (measurement set)"),
            ("test_accuracy", axes[1], "test accuracy"),
        ):
            for i, (group, members) in enumerate(groups):
                style = plotting.series_style(i)
                steps, mean, per_seed = common.series(members, lambda r, k=key: getattr(r, k))
                for s, v in per_seed:
                    ax.plot(
                        s,
                        v,
                        color=style["color"],
                        linestyle=style["linestyle"],
                        linewidth=0.5,
                        alpha=0.5,
                    )
                (line,) = plotting.plot_trajectories(ax, steps, mean, label=group, style=style)
                line.set_gid(f"{key}/{group}")
            ax.set_xlabel("training step")
            ax.set_ylabel(ylabel)
        axes[0].set_yscale("log")
        axes[1].legend(frameon=False, loc="lower right", fontsize=6)
    return fig


TRAINING = common.Figure(
    "training",
    lambda run, facts: training_figure(run),
    lambda r: True,
    "Training loss and test accuracy; thin lines: seeds, thick: mean.",
    rank=30,
)

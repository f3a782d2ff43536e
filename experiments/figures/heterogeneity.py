"""Block heterogeneity (``block_spectra``): per group (an activation and swept values) the
spectral densities of its parameter blocks overlaid, at the first and the last measured step,
each panel titled with the mean Jensen-Shannon distance between its blocks."""

from __future__ import annotations

from curvature import plotting
from experiments.figures import common


def spectra_file(member, step) -> dict | None:
    """The arrays of ``member``'s spectra file at ``step`` (``Member.spectra``), or ``None``."""
    try:
        return member.spectra(step)
    except KeyError:
        return None


def measured(member, field: str) -> list:
    """``member``'s records that hold ``field``, in step order."""
    return [r for r in member.records if getattr(r, field, None) is not None]


def block_spectra_figure(run, floor: float = 1e-5):
    plt = common.pyplot()
    rows = []
    for group, members in common.groups(run):
        member = members[0]  # the first seed: densities are per seed
        records = measured(member, "block_spectra")
        if records:
            ends = [records[0]] if len(records) == 1 else [records[0], records[-1]]
            rows.append((group, member, ends))
    if not rows:
        return None
    cols = max(len(ends) for _, _, ends in rows)
    with plt.rc_context(common.PAPER_RC):
        fig, axes = plt.subplots(
            len(rows),
            cols,
            figsize=(common.WIDTH, 2.4 * len(rows)),
            squeeze=False,
            layout="constrained",
        )
        for (group, member, ends), row in zip(rows, axes, strict=True):
            for ax, record in zip(row, ends, strict=False):
                arrays = spectra_file(member, record.step)
                if arrays is None or "block_slq_nodes" not in arrays:
                    ax.set_visible(False)
                    continue
                spectra = record.block_spectra
                densities = spectra.densities(arrays)
                plotting.plot_block_densities(ax, densities, sigma=spectra.sigma, floor=floor)
                js, shape = spectra.js_mean, spectra.js_shape_mean
                title = f"{group}, step {record.step}: JS {js.value:.3f} ± {js.standard_error:.3f}"
                if shape is not None:
                    title += f" (shape {shape.value:.2f})"
                ax.set_title(title)
                ax.legend(fontsize=5, ncol=2, frameon=False, loc="upper right")
            for ax in row[len(ends) :]:
                ax.set_visible(False)
    return fig


BLOCK_SPECTRA = common.Figure(
    "block_spectra",
    lambda run, facts: block_spectra_figure(run),
    lambda r: r.block_spectra,
    "Spectral densities of the parameter blocks (SLQ, one block per curve, Gaussian kernel of "
    "the recorded width), at the first and last measured step; titles: the mean Jensen-Shannon "
    "distance between the blocks' densities ± its bootstrap SE (Zhang et al. 2024: large for "
    "heterogeneous blocks), and in brackets the same with each density on its own scale.",
    rank=75,
)

"""Plotting helpers for researchers who use the library directly. matplotlib is imported only
when a function here is called (``pip install matplotlib``); each draws onto an axis you pass.

Styles survive greyscale printing: every series differs in line style and marker as well as in
colour (the Okabe-Ito palette, safe for colour-blind readers).
"""

from __future__ import annotations

import numpy as np

from curvature.density import common_grid, default_sigma

__all__ = [
    "density_grid",
    "plot_block_densities",
    "plot_density",
    "plot_landscape",
    "plot_trajectories",
    "series_style",
]

# The eight of Okabe and Ito, then a grey: a transformer's nine kinds of block, each its own.
OKABE_ITO = (
    "#000000",
    "#E69F00",
    "#56B4E9",
    "#009E73",
    "#D55E00",
    "#0072B2",
    "#CC79A7",
    "#F0E442",
    "#999999",
)
LINESTYLES = (
    "-",
    "--",
    "-.",
    ":",
    (0, (5, 1, 1, 1, 1, 1)),
    (0, (3, 1)),
    (0, (1, 2)),
    (0, (8, 2)),
    (0, (2, 1, 6, 1)),
)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h")


def series_style(i: int) -> dict:
    """Colour, line style and marker of series ``i``: distinguishable in colour and in grey."""
    return {
        "color": OKABE_ITO[i % len(OKABE_ITO)],
        "linestyle": LINESTYLES[i % len(LINESTYLES)],
        "marker": MARKERS[i % len(MARKERS)],
    }


def density_grid(
    densities, *, sigma: float, num_points: int = 2000, margin: float = 5.0
) -> np.ndarray:
    """One grid covering every density's nodes with ``margin`` kernel widths on each side, so
    overlaid densities share their grid (and each integrates to 1 over it)."""
    return common_grid(densities, sigma=sigma, num_points=num_points, margin=margin)


def plot_density(
    ax,
    density,
    *,
    sigma: float,
    grid: np.ndarray | None = None,
    floor: float = 1e-5,
    log: bool = True,
    rug: bool = False,
    label: str | None = None,
    **style,
):
    """Draw a :class:`curvature.SpectralDensity` smoothed with a Gaussian of standard deviation
    ``sigma`` on ``ax``: signed eigenvalue axis, density on a log axis clipped below at ``floor``.

    With ``rug=True`` the raw Ritz nodes are marked along the bottom (their weights are not shown).
    Returns ``(grid, values)``, the unclipped smoothed density that was drawn.
    """
    grid, values = density.density(grid, sigma=sigma)
    shown = np.maximum(values, floor) if log else values
    (line,) = ax.plot(grid, shown, label=label, **{**style, "marker": None})
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
    if rug:
        nodes = np.asarray(density.nodes).ravel()
        ax.plot(
            nodes,
            np.full_like(nodes, floor if log else 0.0),
            "|",
            color=line.get_color(),
            markersize=8,
            alpha=0.6,
        )
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel(f"spectral density (σ = {sigma:.3g})")
    return grid, values


def plot_trajectories(
    ax, steps, values, *, label: str | None = None, style: dict | None = None, **kwargs
):
    """Draw ``values`` (shape ``(steps,)`` or ``(steps, k)``) against ``steps``; the first column
    carries the label. Returns the drawn lines."""
    values = np.asarray(values, float)
    if values.ndim == 1:
        values = values[:, None]
    style = {**(style or {}), **kwargs}
    lines = []
    for j in range(values.shape[1]):
        (line,) = ax.plot(
            steps, values[:, j], label=label if j == 0 else None, markersize=3, **style
        )
        lines.append(line)
    return lines


def plot_landscape(
    ax,
    landscape,
    *,
    label: str | None = None,
    log: bool = False,
    levels: int = 20,
    colorbar: bool = True,
    **style,
):
    """Draw a :class:`curvature.Landscape` on ``ax``: the loss at the grid's coefficients as
    computed, nothing interpolated.

    One direction: the loss against ``s`` (a line, ``**style`` passed to ``ax.plot``) with the
    centre, the loss at the parameters, marked at ``s = 0``; ``log`` puts the loss on a log
    axis. Two directions: filled contours of the loss over ``(s, r)`` (``levels`` levels, on a
    log scale with ``log``; ``**style`` passed to ``ax.contourf``), thin contour lines, the
    centre marked at the origin and, with ``colorbar``, a colour bar of the loss. The axes read
    "s (direction 1)" and "r (direction 2)".

    Returns the artists: ``(line, centre)`` in 1-D, ``(filled, lines, centre, colour bar or
    None)`` in 2-D.
    """
    loss = np.asarray(landscape.loss)
    coefficients = [np.asarray(c) for c in landscape.coefficients]
    if loss.ndim == 1:
        (line,) = ax.plot(coefficients[0], loss, label=label, **{"color": "k", **style})
        (centre,) = ax.plot([0.0], [landscape.center], "o", color=line.get_color(), label="centre")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("s (direction 1)")
        ax.set_ylabel("loss")
        return line, centre
    from matplotlib import colors

    norm = None
    if log:
        low, high = max(float(loss[loss > 0].min(initial=np.inf)), 1e-300), float(loss.max())
        levels = np.geomspace(low, high, levels) if high > low else levels
        norm = colors.LogNorm(vmin=low, vmax=high)
    # Rows of ``loss`` follow s: transposed so that s runs along the x axis.
    s, r = coefficients
    filled = ax.contourf(s, r, loss.T, levels=levels, norm=norm, **{"cmap": "viridis", **style})
    lines = ax.contour(s, r, loss.T, levels=filled.levels, colors="k", linewidths=0.4, norm=norm)
    (centre,) = ax.plot([0.0], [0.0], "x", color="w", label=label or "centre")
    bar = ax.figure.colorbar(filled, ax=ax, label="loss") if colorbar else None
    ax.set_xlabel("s (direction 1)")
    ax.set_ylabel("r (direction 2)")
    return filled, lines, centre, bar


def plot_block_densities(
    ax,
    densities,
    *,
    sigma: float | None = None,
    floor: float = 1e-5,
    names=None,
):
    """Overlay the spectral densities of blocks (``{name: SpectralDensity}``, as
    :func:`curvature.block_densities` returns) on one shared grid, log density axis clipped
    below at ``floor``, one :func:`series_style` per block and a legend.

    ``sigma`` (the Gaussian kernel's standard deviation) defaults to that of
    :func:`curvature.jensen_shannon`: 1% of the spread of all nodes. ``names`` picks and orders
    the blocks drawn (default: all, in order). Returns ``(grid, values)``: the grid and a
    ``{name: smoothed density}`` dict of what was drawn (unclipped).
    """
    if names is None:
        names = list(densities)
    missing = [n for n in names if n not in densities]
    if missing:
        raise KeyError(f"names {missing} are not among the densities {list(densities)}")
    chosen = [densities[n] for n in names]
    if sigma is None:
        sigma = default_sigma(chosen)
    grid = density_grid(chosen, sigma=sigma)
    values = {}
    for i, (name, density) in enumerate(zip(names, chosen, strict=True)):
        style = series_style(i)
        _, values[name] = plot_density(
            ax, density, sigma=sigma, grid=grid, floor=floor, label=str(name), **style
        )
    ax.legend()
    return grid, values

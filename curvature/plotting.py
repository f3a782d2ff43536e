"""Plotting helpers for researchers who use the library directly. matplotlib is imported only
when a function here is called (``pip install matplotlib``); each draws onto an axis you pass.

Styles survive greyscale printing: every series differs in line style and marker as well as in
colour (the Okabe-Ito palette, safe for colour-blind readers).
"""

from __future__ import annotations

import numpy as np

__all__ = ["density_grid", "plot_density", "plot_trajectories", "series_style"]

OKABE_ITO = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#F0E442")
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (3, 1)), (0, (1, 2)), (0, (8, 2)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


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
    nodes = np.concatenate([np.asarray(d.nodes).ravel() for d in densities])
    return np.linspace(nodes.min() - margin * sigma, nodes.max() + margin * sigma, num_points)


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

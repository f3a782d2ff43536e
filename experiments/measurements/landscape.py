"""``landscape``: the loss along the top Hessian eigenvectors (PyHessian's 1-D and 2-D plots) or
along filter-normalised random directions (Li et al. 2018), on a grid of ``num_points``
coefficients in ``[-radius, radius]`` per direction. The grid's losses are saved in the step's
spectra file (``landscape_loss``, ``landscape_coefficients``); the record keeps the loss at the
centre and the curvature the grid shows there (a second difference), which along an eigenvector
should match its eigenvalue while the loss is near-quadratic over one grid spacing."""

from __future__ import annotations

import dataclasses

import numpy as np

import curvature as cv
from experiments.figures import geometry
from experiments.measurements.base import Context, Measurement, eigenvalues
from experiments.record import Eigenvalues

DIRECTIONS = ("top", "random")
NORMALIZE = ("", "filter", "layer")


@dataclasses.dataclass(frozen=True)
class Landscape:
    """The loss on a grid along ``directions`` (``top``: the top Hessian eigenvectors, whose Ritz
    pairs are ``eigenvalues``; ``random``: Gaussian directions) normalised as ``normalize``
    (``""``: as they are; ``filter`` / ``layer``: Li et al. 2018). ``center``: the loss at the
    parameters; ``curvature[i]``: the second difference of the grid's loss at the centre along
    direction i (per squared coefficient), ``spacing`` the grid's step."""

    directions: str
    normalize: str
    radius: float
    num_points: int
    center: float
    curvature: tuple[float, ...]
    spacing: float
    eigenvalues: Eigenvalues | None = None

    def grid(self, arrays: dict) -> cv.Landscape:
        """The library's :class:`curvature.Landscape` from the step's spectra file (its
        directions are not stored: empty)."""
        loss = np.asarray(arrays["landscape_loss"])
        axes = tuple(np.asarray(arrays["landscape_coefficients"]) for _ in range(loss.ndim))
        return cv.Landscape(axes, loss, self.center, ())


def landscape(ctx: Context) -> Landscape:
    """The loss on a grid of ``num_points`` coefficients in [-radius, radius] along
    ``num_directions`` (1 or 2) directions: the top Hessian eigenvectors (``directions="top"``,
    Lanczos of ``num_steps`` steps) or Gaussian ones (``"random"``), normalised as
    ``normalize`` (``filter``: Li et al. 2018). One compiled program for the grid. Cost:
    num_points^num_directions forward passes over the measurement set, and the Lanczos run."""
    s = ctx.settings
    eig = None
    if s.directions == "top":
        H = ctx.hessian()
        out = cv.eigsh(
            H, k=s.num_directions, which="LA", num_steps=s.num_steps, key=ctx.key_for("landscape")
        )
        directions = [out.eigenvectors[:, i] for i in range(s.num_directions)]
        eig = eigenvalues(out)
    else:
        directions = list(
            cv.random_directions(
                ctx.params, ctx.key_for("landscape"), num=s.num_directions, normalize=None
            )
        )
    coefficients = np.linspace(-s.radius, s.radius, s.num_points)
    result = cv.loss_landscape(
        ctx.loss,
        ctx.params,
        ctx.data,
        directions=directions,
        grid=coefficients if s.num_directions == 1 else (coefficients, coefficients),
        normalize=s.normalize or None,
        batch_size=ctx.batch_size,
    )
    loss = np.asarray(result.loss, np.float64)
    if not np.all(np.isfinite(loss)):
        bad = np.argwhere(~np.isfinite(loss))[0]
        raise FloatingPointError(
            f"landscape: the loss is not finite at coefficients {coefficients[bad].tolist()} "
            f"(radius={s.radius}): choose a smaller measure.landscape.radius"
        )
    ctx.spectra.update(landscape_loss=loss, landscape_coefficients=coefficients)
    h = float(coefficients[1] - coefficients[0])
    mid = s.num_points // 2
    lines = [loss] if loss.ndim == 1 else [loss[:, mid], loss[mid, :]]
    curvature = tuple(
        float((line[mid + 1] - 2 * line[mid] + line[mid - 1]) / h**2) for line in lines
    )
    return Landscape(
        directions=s.directions,
        normalize=s.normalize,
        radius=float(s.radius),
        num_points=s.num_points,
        center=float(result.center),
        curvature=curvature,
        spacing=h,
        eigenvalues=eig,
    )


def _check(s, info):
    if s.directions not in DIRECTIONS:
        return f"directions={s.directions!r} is not one of {', '.join(DIRECTIONS)}"
    if s.normalize not in NORMALIZE:
        return f"normalize={s.normalize!r} is not one of {NORMALIZE}"
    if s.num_directions not in (1, 2):
        return f"num_directions={s.num_directions!r} must be 1 or 2"
    if not isinstance(s.num_points, int) or s.num_points < 3 or s.num_points % 2 == 0:
        return f"num_points={s.num_points!r} must be an odd integer >= 3 (the centre is a point)"
    if not isinstance(s.radius, int | float) or not s.radius > 0:
        return f"radius={s.radius!r} must be a positive number"
    if s.directions == "top" and (not isinstance(s.num_steps, int) or s.num_steps < 2):
        return f"num_steps={s.num_steps!r} must be an integer >= 2"
    if "num_params" in info and s.directions == "top" and s.num_steps > info["num_params"]:
        return f"num_steps={s.num_steps} exceeds the {info['num_params']} parameters"
    return None


LANDSCAPE = Measurement(
    "landscape",
    landscape,
    defaults={
        "directions": "top",  # top (Hessian eigenvectors) | random (Gaussian)
        "num_directions": 1,  # 1: a curve; 2: a surface
        "normalize": "",  # "" | filter | layer (Li et al. 2018)
        "radius": 1.0,  # coefficients in [-radius, radius]
        "num_points": 21,  # per direction, odd
        "num_steps": 40,  # Lanczos steps for the top eigenvectors
    },
    check=_check,
    record_type=Landscape,
    figures=(geometry.LANDSCAPE,),
    spectra=True,
    cost=1,
)

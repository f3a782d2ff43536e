"""``density``: the SLQ spectral density of the Hessian (Ubaru, Chen & Saad 2017), its nodes and
weights saved per probe, and the negative spectral mass."""

from __future__ import annotations

import dataclasses

import numpy as np

import curvature as cv
from experiments.figures import spectra
from experiments.measurements.base import Context, Measurement, steps_check
from experiments.record import Estimate
from experiments.table import Column


@dataclasses.dataclass(frozen=True)
class Density:
    """A summary of an SLQ spectral density; nodes and weights are in the step's spectra file."""

    negative_mass: Estimate
    num_probes: int
    num_steps: int

    def coarse(self) -> bool:
        """Fewer than 20 Lanczos nodes per probe: the negative mass is a smoothing artefact."""
        return self.num_steps < 20


def density(ctx: Context) -> Density:
    """SLQ spectral density (Ubaru, Chen & Saad 2017): nodes and weights saved per probe, and the
    negative spectral mass (below -sqrt(eps)·max|node|, so exact zeros do not count)."""
    s = ctx.settings
    slq = cv.spectral_density(
        ctx.hessian(),
        num_probes=s.num_probes,
        num_steps=s.num_steps,
        key=ctx.key_for("slq"),
        probe_batch_size=s.probe_batch_size or None,
    )
    ctx.spectra.update(
        slq_nodes=np.asarray(slq.nodes),
        slq_weights=np.asarray(slq.weights),
        dimension=np.asarray(ctx.hessian().size),
    )
    mass, se, _ = slq.mass_below()
    return Density(
        Estimate(float(mass), float(se), s.num_probes * s.num_steps), s.num_probes, s.num_steps
    )


def _check(s, info):
    if not isinstance(s.num_probes, int) or s.num_probes < 1:
        return f"num_probes={s.num_probes!r} must be an integer >= 1"
    return steps_check(k_key=None)(s, info) or (
        None if s.num_steps >= 2 else "num_steps must be >= 2"
    )


DENSITY = Measurement(
    "density",
    density,
    # probe_batch_size: probes run together (vmapped); 0: one after another (least memory).
    defaults={"num_probes": 4, "num_steps": 60, "probe_batch_size": 4},
    check=_check,
    record_type=Density,
    columns=(
        Column(
            "neg. mass",
            lambda r: r.density.negative_mass if r.density else None,
            rank=130,
            legend="neg. mass: SLQ spectral mass below −√eps·max|node| (exact zeros excluded)",
            coarse=lambda r: r.density.coarse(),
        ),
    ),
    figures=(spectra.DENSITY,),
    spectra=True,
    cost=1,
    renamed={"probes": "num_probes", "lanczos_steps": "num_steps"},
)

"""Figures of a run directory, drawn from what is on disk (never re-measured), by concept:

* :mod:`~experiments.figures.common`: the paper style, the data of a run by group, the
  :class:`~experiments.figures.common.Figure` declaration;
* :mod:`~experiments.figures.spectra`: the SLQ spectral ``density`` and the top eigenvalues
  against their index (``spectrum``);
* :mod:`~experiments.figures.sharpness`: eigenvalues against step (``eigenvalues``) and λmax
  over the edge of stability (``edge_of_stability``);
* :mod:`~experiments.figures.structure`: tr H against tr G and the residual share (``trace``),
  and where R = H − G lives by layer (``blocks``);
* :mod:`~experiments.figures.training`: training curves (``training``);
* :mod:`~experiments.figures.parameter`: curvature against an activation's parameter
  (``activation_parameter``);
* :mod:`~experiments.figures.optim`: optimizers compared (``optimizers``, and the cost table);
* :mod:`~experiments.figures.preconditioner`: the second moment against the curvature
  (``preconditioner``);
* :mod:`~experiments.figures.approximations`: K-FAC and other approximations against H and G
  (``approximations``);
* :mod:`~experiments.figures.heterogeneity`: the spectral densities of the parameter blocks
  overlaid, with their Jensen-Shannon distances (``block_spectra``);
* :mod:`~experiments.figures.geometry`: the gradient's share of the top eigenspace along
  training (``gradient_overlap``) and the loss along directions (``landscape``);
* :mod:`~experiments.figures.study`: any measurement against a swept value, seeds as error bars
  (``plot --against``; drawn on request, not with the report).

A measurement's figures are listed in its declaration (:mod:`experiments.measurements`); the
others, and drawing them all with the report, in :mod:`experiments.pages`. This package imports
nothing: a measurement that names its figure does not pull in the pages that draw a run.
"""

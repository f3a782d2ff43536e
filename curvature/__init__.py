"""curvature: matrix-free Hessian spectra of neural-network losses in JAX.

Build an operator from a loss, parameters and data (:func:`hessian`, :func:`gauss_newton`), then
estimate: :func:`eigsh` / :func:`lanczos` / :func:`power_iteration` for eigenpairs, :func:`trace`,
:func:`diagonal` and :func:`frobenius_norm_squared` with standard errors, and
:func:`spectral_density` (stochastic Lanczos quadrature; :func:`trace_function` and
:func:`logdet` from it). :func:`kfac` and :func:`ekfac` approximate the Gauss-Newton matrix by
Kronecker factors per dense layer; :func:`inverse` applies a damped inverse; :func:`compare` and :func:`subspace_overlap`
measure an approximation against the operator; :func:`compare_diagonals`,
:func:`preconditioned` and :func:`compare_conditioning` measure a diagonal preconditioner (Adam's
second moment) against the curvature. :func:`loss_landscape` evaluates the loss along one or two
directions (top eigenvectors, or :func:`random_directions` normalised by filter);
:func:`gradient_overlap` measures the gradient's share of the top-k eigenspace;
:func:`jensen_shannon` the distances between (block) spectral densities. :func:`batches` (and any ``lambda: loader`` as data) streams
data that do not fit in memory (:mod:`curvature.streaming`). Plotting helpers live in
:mod:`curvature.plotting` (imports matplotlib only when used); optimisers in
:mod:`curvature.optim` (imports optax only when used): :func:`curvature.optim.hessian_free`.
"""

from curvature._closures import Closure as Closure
from curvature._closures import closure as closure
from curvature.blocks import BlockEigenvalues as BlockEigenvalues
from curvature.blocks import BlockOperator as BlockOperator
from curvature.blocks import BlockSummary as BlockSummary
from curvature.blocks import Restricted as Restricted
from curvature.blocks import block_densities as block_densities
from curvature.blocks import block_eigenvalues as block_eigenvalues
from curvature.blocks import block_summary as block_summary
from curvature.blocks import layer_groups as layer_groups
from curvature.blocks import restrict as restrict
from curvature.builders import GaussNewton as GaussNewton
from curvature.builders import Hessian as Hessian
from curvature.builders import LossOperator as LossOperator
from curvature.builders import gauss_newton as gauss_newton
from curvature.builders import hessian as hessian
from curvature.comparison import Comparison as Comparison
from curvature.comparison import compare as compare
from curvature.comparison import subspace_overlap as subspace_overlap
from curvature.density import JensenShannon as JensenShannon
from curvature.density import SpectralDensity as SpectralDensity
from curvature.density import jensen_shannon as jensen_shannon
from curvature.density import logdet as logdet
from curvature.density import spectral_density as spectral_density
from curvature.density import trace_function as trace_function
from curvature.fisher import EmpiricalFisher as EmpiricalFisher
from curvature.fisher import MonteCarloFisher as MonteCarloFisher
from curvature.fisher import empirical_fisher as empirical_fisher
from curvature.fisher import monte_carlo_fisher as monte_carlo_fisher
from curvature.fisher import per_example_gradients as per_example_gradients
from curvature.geometry import GradientOverlap as GradientOverlap
from curvature.geometry import Landscape as Landscape
from curvature.geometry import gradient_overlap as gradient_overlap
from curvature.geometry import loss_landscape as loss_landscape
from curvature.geometry import random_directions as random_directions
from curvature.inverse import CGInverse as CGInverse
from curvature.inverse import inverse as inverse
from curvature.kfac import KFAC as KFAC
from curvature.kfac import DenseLayer as DenseLayer
from curvature.kfac import KroneckerEigen as KroneckerEigen
from curvature.kfac import KroneckerFactors as KroneckerFactors
from curvature.kfac import ekfac as ekfac
from curvature.kfac import kfac as kfac
from curvature.krylov import EigshResult as EigshResult
from curvature.krylov import LanczosResult as LanczosResult
from curvature.krylov import eigsh as eigsh
from curvature.krylov import lanczos as lanczos
from curvature.krylov import tridiagonal as tridiagonal
from curvature.linear_operator import Combination as Combination
from curvature.linear_operator import Diagonal as Diagonal
from curvature.linear_operator import FunctionOperator as FunctionOperator
from curvature.linear_operator import Layout as Layout
from curvature.linear_operator import LinearOperator as LinearOperator
from curvature.linear_operator import Matrix as Matrix
from curvature.linear_operator import dense as dense
from curvature.linear_operator import from_diagonal as from_diagonal
from curvature.linear_operator import from_function as from_function
from curvature.linear_operator import from_matrix as from_matrix
from curvature.linear_operator import operator_type as operator_type
from curvature.linear_operator import static as static
from curvature.low_rank import LowRankPlusDiagonal as LowRankPlusDiagonal
from curvature.low_rank import low_rank_plus_diagonal as low_rank_plus_diagonal
from curvature.power import PowerIterationResult as PowerIterationResult
from curvature.power import power_iteration as power_iteration
from curvature.preconditioning import Conditioning as Conditioning
from curvature.preconditioning import ConditioningComparison as ConditioningComparison
from curvature.preconditioning import DiagonalComparison as DiagonalComparison
from curvature.preconditioning import DiagonalCorrelation as DiagonalCorrelation
from curvature.preconditioning import Preconditioned as Preconditioned
from curvature.preconditioning import compare_conditioning as compare_conditioning
from curvature.preconditioning import compare_diagonals as compare_diagonals
from curvature.preconditioning import conditioning as conditioning
from curvature.preconditioning import preconditioned as preconditioned
from curvature.stochastic_trace import DiagonalResult as DiagonalResult
from curvature.stochastic_trace import TraceResult as TraceResult
from curvature.stochastic_trace import diagonal as diagonal
from curvature.stochastic_trace import frobenius_norm_squared as frobenius_norm_squared
from curvature.stochastic_trace import hutchinson as hutchinson
from curvature.stochastic_trace import rademacher as rademacher
from curvature.stochastic_trace import trace as trace
from curvature.streaming import Streamed as Streamed
from curvature.streaming import batches as batches

__version__ = "0.1.0"

__all__ = [
    "BlockEigenvalues",
    "BlockOperator",
    "BlockSummary",
    "CGInverse",
    "Closure",
    "Combination",
    "Comparison",
    "Conditioning",
    "ConditioningComparison",
    "DiagonalComparison",
    "DiagonalCorrelation",
    "DenseLayer",
    "Diagonal",
    "DiagonalResult",
    "EigshResult",
    "EmpiricalFisher",
    "FunctionOperator",
    "GaussNewton",
    "GradientOverlap",
    "Hessian",
    "JensenShannon",
    "KFAC",
    "KroneckerEigen",
    "KroneckerFactors",
    "LanczosResult",
    "Landscape",
    "Layout",
    "LinearOperator",
    "LowRankPlusDiagonal",
    "LossOperator",
    "Matrix",
    "MonteCarloFisher",
    "PowerIterationResult",
    "Preconditioned",
    "Restricted",
    "SpectralDensity",
    "Streamed",
    "TraceResult",
    "batches",
    "block_densities",
    "block_eigenvalues",
    "block_summary",
    "closure",
    "compare",
    "compare_conditioning",
    "compare_diagonals",
    "conditioning",
    "dense",
    "diagonal",
    "eigsh",
    "ekfac",
    "empirical_fisher",
    "frobenius_norm_squared",
    "from_diagonal",
    "from_function",
    "from_matrix",
    "gauss_newton",
    "gradient_overlap",
    "hutchinson",
    "hessian",
    "inverse",
    "jensen_shannon",
    "kfac",
    "lanczos",
    "logdet",
    "loss_landscape",
    "low_rank_plus_diagonal",
    "monte_carlo_fisher",
    "layer_groups",
    "operator_type",
    "per_example_gradients",
    "power_iteration",
    "preconditioned",
    "rademacher",
    "random_directions",
    "restrict",
    "spectral_density",
    "static",
    "subspace_overlap",
    "trace",
    "trace_function",
    "tridiagonal",
]

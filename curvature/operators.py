"""Matrix-free curvature operators: the names of :mod:`curvature.linear_operator` (the operator
types, their layout and algebra), :mod:`curvature.builders` (the Hessian and Gauss-Newton
builders) and the batching helpers, in one module as before the split."""

from curvature._batching import Batching as Batching
from curvature._batching import data_mean as data_mean
from curvature._checks import positive_int as positive_int
from curvature._checks import require_square as require_square
from curvature._deprecations import warn_once
from curvature.builders import gauss_newton as gauss_newton
from curvature.builders import hessian as hessian
from curvature.builders import loss_operator as loss_operator
from curvature.linear_operator import Layout as Layout
from curvature.linear_operator import LinearOperator as LinearOperator
from curvature.linear_operator import dense as dense
from curvature.linear_operator import from_matrix as from_matrix
from curvature.linear_operator import map_rows as map_rows

__all__ = ["Layout", "LinearOperator", "dense", "from_matrix", "gauss_newton", "hessian"]


def apply_rows(op, rows, batch_size=None):
    """Deprecated: :func:`curvature.linear_operator.map_rows` (``lax.map`` over rows), renamed so
    that it no longer shares its name with the method :meth:`LinearOperator.apply_rows`
    (``vmap``)."""
    warn_once(
        "curvature.operators.apply_rows is deprecated: use curvature.linear_operator.map_rows"
    )
    return map_rows(op, rows, batch_size)

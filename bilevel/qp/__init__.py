"""Differentiable quadratic programs: a batched interior-point solver and KKT differentiation.

* :func:`qp` -- ``min 1/2 x'Qx + p'x s.t. Ax = b, Gx <= h``, batched, differentiable
  w.r.t. every input (exposed as ``bilevel.qp``);
* :class:`QPLayer` -- the same as an ``nn.Module`` (also ``bilevel.nn.QPLayer``);
* :func:`interior_point` -- the forward solver's options; :class:`QPError` -- its failures;
* :func:`make_kkt_optimality_fn` -- KKT residuals of general smooth constrained problems,
  for :func:`bilevel.root` / :func:`bilevel.custom_root`.
"""

from bilevel.qp.kkt import QPFunction, duals_from_primal
from bilevel.qp.layer import QPLayer
from bilevel.qp.optimality import make_kkt_optimality_fn
from bilevel.qp.primal_dual import InteriorPoint, IPMResult, interior_point
from bilevel.qp.problem import QPData, QPError, as_qp_data
from bilevel.qp.solve import qp

__all__ = [
    "IPMResult",
    "InteriorPoint",
    "QPData",
    "QPError",
    "QPFunction",
    "QPLayer",
    "as_qp_data",
    "duals_from_primal",
    "interior_point",
    "make_kkt_optimality_fn",
    "qp",
]

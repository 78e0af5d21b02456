"""bilevel: bi-level differentiable optimization for PyTorch.

Two engines: :func:`unroll` differentiates through T optimizer steps (five modes), and
:func:`argmin` / :func:`root` / :func:`fixed_point` / :func:`custom_root` differentiate an
inner solution through its optimality condition (implicit function theorem).
"""

from bilevel import constraints, distributed, linalg, nn, optim, prox, solvers, stateful
from bilevel.check import HypergradCheckError, HypergradReport, hypergradcheck
from bilevel.implicit import (
    CompileFallbackWarning,
    ImplicitDiagnostics,
    WarmStart,
    argmin,
    custom_fixed_point,
    custom_root,
    fixed_point,
    hypergrad,
    proximal_argmin,
    root,
)
from bilevel.qp import QPError, make_kkt_optimality_fn
from bilevel.qp import qp as qp  # the function; `from bilevel.qp import ...` reaches the package
from bilevel.unroll import NonFiniteLossError, ReversibleReport, UnrollResult, unroll

# bilevel.qp is the function; it also carries the package's names, so that
# bilevel.qp.interior_point(...), bilevel.qp.QPError and bilevel.qp.QPLayer work as written
_qp_package = __import__("sys").modules["bilevel.qp"]
for _name in _qp_package.__all__:
    setattr(qp, _name, getattr(_qp_package, _name))
del _name, _qp_package

__version__ = "0.1.0"
__all__ = [
    "CompileFallbackWarning",
    "HypergradCheckError",
    "HypergradReport",
    "ImplicitDiagnostics",
    "NonFiniteLossError",
    "QPError",
    "ReversibleReport",
    "UnrollResult",
    "WarmStart",
    "argmin",
    "constraints",
    "custom_fixed_point",
    "custom_root",
    "distributed",
    "fixed_point",
    "hypergrad",
    "hypergradcheck",
    "linalg",
    "make_kkt_optimality_fn",
    "nn",
    "optim",
    "prox",
    "proximal_argmin",
    "qp",
    "root",
    "solvers",
    "stateful",
    "unroll",
]

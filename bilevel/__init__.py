"""bilevel: bi-level differentiable optimization for PyTorch.

Two engines: :func:`unroll` differentiates through T optimizer steps (five modes), and
:func:`argmin` / :func:`root` / :func:`fixed_point` / :func:`custom_root` differentiate an
inner solution through its optimality condition (implicit function theorem).
"""

from bilevel import constraints, distributed, linalg, nn, optim, solvers, stateful
from bilevel.check import HypergradCheckError, HypergradReport, hypergradcheck
from bilevel.implicit import (
    ImplicitDiagnostics,
    WarmStart,
    argmin,
    custom_root,
    fixed_point,
    hypergrad,
    root,
)
from bilevel.unroll import NonFiniteLossError, UnrollResult, unroll

__version__ = "0.1.0"
__all__ = [
    "HypergradCheckError",
    "HypergradReport",
    "ImplicitDiagnostics",
    "NonFiniteLossError",
    "UnrollResult",
    "WarmStart",
    "argmin",
    "constraints",
    "custom_root",
    "distributed",
    "fixed_point",
    "hypergrad",
    "hypergradcheck",
    "linalg",
    "nn",
    "optim",
    "root",
    "solvers",
    "stateful",
    "unroll",
]

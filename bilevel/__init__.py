"""bilevel: bi-level differentiable optimization for PyTorch."""

from bilevel import optim, stateful
from bilevel.check import HypergradCheckError, HypergradReport, hypergradcheck
from bilevel.unroll import NonFiniteLossError, UnrollResult, unroll

__version__ = "0.1.0"
__all__ = [
    "HypergradCheckError",
    "HypergradReport",
    "NonFiniteLossError",
    "UnrollResult",
    "hypergradcheck",
    "optim",
    "stateful",
    "unroll",
]

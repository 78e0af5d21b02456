"""bilevel: bi-level differentiable optimization for PyTorch."""

from bilevel import optim

__version__ = "0.1.0"
__all__ = ["optim"]

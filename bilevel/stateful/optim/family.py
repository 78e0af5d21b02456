"""One differentiable optimizer per ``torch.optim`` class (higher's names).

Adding an optimizer is one declaration: its torch class and its :mod:`bilevel.optim`
factory. Each one has exactly the semantics of its ``torch.optim`` namesake (where higher
deviated from torch.optim, e.g. Adam's ``eps`` and ``maximize``, this follows torch.optim).
"""

from __future__ import annotations

import torch

from bilevel import optim as _optim
from bilevel.stateful.optim.functional import FunctionalDifferentiableOptimizer as _Base


class DifferentiableSGD(_Base, torch_type=torch.optim.SGD, functional=_optim.sgd):
    """Differentiable :class:`torch.optim.SGD` (momentum, dampening, nesterov, weight
    decay, maximize)."""


class DifferentiableAdam(
    _Base, torch_type=torch.optim.Adam, functional=_optim.adam, decoupled=_optim.adamw
):
    """Differentiable :class:`torch.optim.Adam` (amsgrad, maximize, weight decay, and
    ``decoupled_weight_decay=True`` as AdamW). ``eps`` is added after the bias correction,
    as torch does (higher added it before)."""


class DifferentiableAdamW(_Base, torch_type=torch.optim.AdamW, functional=_optim.adamw):
    """Differentiable :class:`torch.optim.AdamW` (not in higher)."""


class DifferentiableRMSprop(_Base, torch_type=torch.optim.RMSprop, functional=_optim.rmsprop):
    """Differentiable :class:`torch.optim.RMSprop` (centered, momentum, weight decay,
    maximize); the derivative of ``sqrt`` where the average is 0 is taken as 0."""


class DifferentiableAdagrad(_Base, torch_type=torch.optim.Adagrad, functional=_optim.adagrad):
    """Differentiable :class:`torch.optim.Adagrad` (lr decay, initial accumulator, weight
    decay, maximize)."""


__all__ = [
    "DifferentiableAdagrad",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableRMSprop",
    "DifferentiableSGD",
]

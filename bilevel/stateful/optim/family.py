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


class DifferentiableAdadelta(_Base, torch_type=torch.optim.Adadelta, functional=_optim.adadelta):
    """Differentiable :class:`torch.optim.Adadelta`."""


class DifferentiableAdamax(_Base, torch_type=torch.optim.Adamax, functional=_optim.adamax):
    """Differentiable :class:`torch.optim.Adamax`."""


class DifferentiableASGD(_Base, torch_type=torch.optim.ASGD, functional=_optim.asgd):
    """Differentiable :class:`torch.optim.ASGD` (the averaged weights ``ax`` are state)."""


class DifferentiableRprop(_Base, torch_type=torch.optim.Rprop, functional=_optim.rprop):
    """Differentiable :class:`torch.optim.Rprop` (its update uses the gradient's sign only)."""


class DifferentiableRAdam(_Base, torch_type=torch.optim.RAdam, functional=_optim.radam):
    """Differentiable :class:`torch.optim.RAdam` (not in higher)."""


class DifferentiableNAdam(_Base, torch_type=torch.optim.NAdam, functional=_optim.nadam):
    """Differentiable :class:`torch.optim.NAdam` (not in higher)."""


__all__ = [
    "DifferentiableASGD",
    "DifferentiableAdadelta",
    "DifferentiableAdamax",
    "DifferentiableNAdam",
    "DifferentiableRAdam",
    "DifferentiableRprop",
    "DifferentiableAdagrad",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableRMSprop",
    "DifferentiableSGD",
]

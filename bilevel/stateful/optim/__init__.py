"""higher's ``optim`` module: differentiable optimizers built from ``torch.optim`` ones.

Example:
    >>> import torch
    >>> from bilevel import stateful as higher
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.Adam(model.parameters(), lr=0.1)
    >>> fmodel = higher.monkeypatch(model)
    >>> diffopt = higher.optim.DifferentiableAdam(opt, model.parameters(), fmodel=fmodel)
    >>> new = diffopt.step(fmodel(torch.ones(3, 2)).sum())
    >>> [p.shape for p in new]
    [torch.Size([1, 2]), torch.Size([1])]
"""

from bilevel.stateful.optim.base import DifferentiableOptimizer
from bilevel.stateful.optim.family import (
    DifferentiableAdadelta,
    DifferentiableAdagrad,
    DifferentiableAdam,
    DifferentiableAdamax,
    DifferentiableAdamW,
    DifferentiableASGD,
    DifferentiableNAdam,
    DifferentiableRAdam,
    DifferentiableRMSprop,
    DifferentiableRprop,
    DifferentiableSGD,
)
from bilevel.stateful.optim.functional import FunctionalDifferentiableOptimizer
from bilevel.stateful.optim.hyperparams import (
    apply_trainable_opt_params,
    get_trainable_opt_params,
)
from bilevel.stateful.optim.registry import create_diff_optim, get_diff_optim, register_optim

__all__ = [
    "DifferentiableASGD",
    "DifferentiableAdadelta",
    "DifferentiableAdagrad",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "DifferentiableAdamax",
    "DifferentiableNAdam",
    "DifferentiableOptimizer",
    "DifferentiableRAdam",
    "DifferentiableRMSprop",
    "DifferentiableRprop",
    "DifferentiableSGD",
    "FunctionalDifferentiableOptimizer",
    "apply_trainable_opt_params",
    "create_diff_optim",
    "get_diff_optim",
    "get_trainable_opt_params",
    "register_optim",
]

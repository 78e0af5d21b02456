"""The gradient of a scalar with respect to one plain CPU tensor, without
``torch.autograd.grad``'s Python layer.

``torch.autograd.grad(f, x)`` spends about 40-60 µs per call in Python before and after the
engine (argument normalisation, ``grad_outputs`` made and checked, the ``__torch_function__``
dispatch test): a third of an evaluation of a small objective, which L-BFGS makes once per
line-search trial. :func:`lean_grad` calls the same engine entry
(``torch.autograd.graph._engine_run_backward``, with its context stash and logging hooks)
with the same seed, ``ones_like(f)``, so the gradient is the same bits; it does so only
where that layer would do nothing else: a real floating 0-d ``f`` that requires grad, plain
CPU tensors, no ``__torch_function__`` override or mode active, outside ``torch.func``
transforms. Otherwise, and when the
private entry is missing (another torch version), it is ``torch.autograd.grad``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.overrides import has_torch_function

from bilevel._engine import engine_run_backward


def lean_grad(f: Tensor, x: Tensor) -> Tensor | None:
    """``torch.autograd.grad(f, x, allow_unused=True)[0]`` (None where ``f`` does not
    depend on ``x``); ``f`` must require grad."""
    if (
        engine_run_backward is not None
        and type(f) is Tensor
        and type(x) is Tensor
        and f.dim() == 0
        and f.is_floating_point()
        and f.device.type == "cpu"
        and x.device.type == "cpu"
        and not has_torch_function((f, x))
        and torch._C._functorch.peek_interpreter_stack() is None
    ):
        (g,) = engine_run_backward(
            (f,), (torch.ones_like(f),), False, False, (x,), True, accumulate_grad=False
        )
        return g
    (g,) = torch.autograd.grad(f, x, allow_unused=True)
    return g

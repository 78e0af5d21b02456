"""higher's ``innerloop_ctx``: a functional model and its differentiable optimizer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from bilevel.stateful.module import FunctionalModule
from bilevel.stateful.optim.base import DifferentiableOptimizer
from bilevel.stateful.optim.registry import get_diff_optim
from bilevel.stateful.patch import monkeypatch


@contextlib.contextmanager
def innerloop_ctx(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    override: Mapping[str, Any] | None = None,
    track_higher_grads: bool = True,
) -> Iterator[tuple[FunctionalModule, DifferentiableOptimizer]]:
    """Yield ``(fmodel, diffopt)`` for a differentiable inner loop (higher's API).

    ``fmodel`` runs ``model`` on fast weights (``copy_initial_weights=False``: the model's
    parameters are the initial weights, so the outer loss differentiates them, as in MAML);
    ``diffopt`` is ``opt`` made differentiable, with its settings and state (momentum,
    moments, step counts) copied. ``override`` replaces settings (one value or one per
    param group; tensors to learn them). ``track_higher_grads=False`` runs the loop without
    a graph through the steps. The user's module and optimizer are not modified.

    Example:
        >>> import torch
        >>> from bilevel import stateful as higher
        >>> model = torch.nn.Linear(3, 1)
        >>> inner_opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fm, do):
        ...     for _ in range(3):
        ...         _ = do.step(torch.nn.functional.mse_loss(fm(x), y))
        ...     torch.nn.functional.mse_loss(fm(x), y).backward()
        >>> model.weight.grad is not None
        True
    """
    fmodel = monkeypatch(
        model,
        device,
        copy_initial_weights=copy_initial_weights,
        track_higher_grads=track_higher_grads,
    )
    diffopt = get_diff_optim(
        opt,
        model.parameters(),
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
    )
    yield fmodel, diffopt

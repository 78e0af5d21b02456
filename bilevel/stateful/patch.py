"""higher's ``patch`` module: ``monkeypatch``, ``make_functional``, ``buffer_sync``.

The names are higher's; nothing is monkeypatched. The functional model calls a structural
copy of the module with ``torch.func.functional_call`` (see ``bilevel.stateful.module``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from bilevel.stateful import utils
from bilevel.stateful.module import FunctionalModule, _copy_buffer, functional_module

# higher's name for the functional model's base class (used in type annotations).
_MonkeyPatchBase = FunctionalModule

__all__ = ["buffer_sync", "make_functional", "monkeypatch"]


def monkeypatch(
    module: nn.Module,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    track_higher_grads: bool = True,
) -> FunctionalModule:
    """A functional version of ``module`` holding its own fast weights (higher's API).

    ``copy_initial_weights=True``: the fast weights start as detached copies of the module's
    parameters (no gradient reaches them). ``False``: they start as ``p.clone()``, part of
    the graph, so the outer loss differentiates the module's parameters (MAML). Buffers
    (BatchNorm statistics) are copied; the module itself is never modified.

    Example:
        >>> import torch
        >>> from bilevel import stateful as higher
        >>> model = torch.nn.Linear(2, 1)
        >>> fmodel = higher.monkeypatch(model, copy_initial_weights=False)
        >>> fmodel(torch.ones(3, 2)).sum().backward()
        >>> model.weight.grad
        tensor([[3., 3.]])
    """
    if not isinstance(module, nn.Module) or isinstance(module, FunctionalModule):
        raise TypeError(
            f"module must be a torch.nn.Module (not a functional model), got {type(module).__name__}"
        )
    if not isinstance(copy_initial_weights, bool):
        raise TypeError(f"copy_initial_weights must be a bool, got {copy_initial_weights!r}")
    if copy_initial_weights:
        params = utils.get_func_params(module, device=device)
    else:
        params = [
            p.clone() if device is None else p.clone().to(device) for p in module.parameters()
        ]
    fmodel = functional_module(module, params, device)
    fmodel.track_higher_grads = track_higher_grads
    return fmodel


def make_functional(
    module: nn.Module,
    encapsulator: Callable[[FunctionalModule, nn.Module], None] | None = None,
) -> FunctionalModule:
    """A functional version of ``module`` without fast weights: pass ``params=`` to calls.

    Example:
        >>> import torch
        >>> from bilevel.stateful.patch import make_functional
        >>> fmodel = make_functional(torch.nn.Linear(2, 1))
        >>> fmodel(torch.ones(1, 2), params=[torch.ones(1, 2), torch.zeros(1)])
        tensor([[2.]])
    """
    fmodel = functional_module(module, None)
    if encapsulator is not None:
        encapsulator(fmodel, module)
    return fmodel


def buffer_sync(
    module: nn.Module, fmodule: FunctionalModule, device: torch.device | str | None = None
) -> None:
    """Copy ``module``'s buffers into ``fmodule`` (one-off, as in higher).

    Example:
        >>> import torch
        >>> from bilevel.stateful.patch import buffer_sync, monkeypatch
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> fmodel = monkeypatch(bn)
        >>> with torch.no_grad():
        ...     bn.running_mean += 1
        >>> buffer_sync(bn, fmodel)
        >>> fmodel.running_mean
        tensor([1., 1.])
    """
    if not isinstance(fmodule, FunctionalModule):
        raise TypeError(f"fmodule must be a functional model, got {type(fmodule).__name__}")
    root = fmodule._fm_root
    names = root.layout.buffer_names
    source: dict[str, Tensor] = dict(module.named_buffers(remove_duplicate=False))
    missing = [n for n in names if n not in source]
    if missing:
        raise KeyError(f"module has no buffer(s) {missing} that the functional model has")
    root.buffers[:] = [_copy_buffer(source[n], device) for n in names]

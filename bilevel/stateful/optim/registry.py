"""higher's constructors: ``get_diff_optim``, ``create_diff_optim``, ``register_optim``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from bilevel.stateful.module import FunctionalModule
from bilevel.stateful.optim import family  # noqa: F401  (declares the built-in mapping)
from bilevel.stateful.optim.base import DifferentiableOptimizer
from bilevel.stateful.optim.functional import _opt_mapping


def _lookup(opt_type: type) -> type[DifferentiableOptimizer]:
    # by exact type, as higher: a subclass of a torch optimizer may change its update
    if opt_type not in _opt_mapping:
        known = sorted(t.__name__ for t in _opt_mapping)
        raise ValueError(
            f"optimizer type {opt_type.__name__} has no differentiable counterpart; supported: "
            f"{known}; add one with bilevel.stateful.register_optim"
        )
    return _opt_mapping[opt_type]


def get_diff_optim(
    opt: torch.optim.Optimizer,
    reference_params: Iterable[Tensor],
    fmodel: FunctionalModule | None = None,
    device: torch.device | str | None = None,
    override: Mapping[str, Any] | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """A differentiable copy of ``opt`` (settings and state), higher's ``get_diff_optim``.

    Example:
        >>> import torch
        >>> from bilevel import stateful as higher
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> fmodel = higher.monkeypatch(model)
        >>> diffopt = higher.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
        >>> type(diffopt).__name__, diffopt.param_groups[0]["momentum"]
        ('DifferentiableSGD', 0.9)
    """
    return _lookup(type(opt))(
        opt,
        reference_params,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def create_diff_optim(
    opt_type: type[torch.optim.Optimizer],
    opt_kwargs: Mapping[str, Any] | None = None,
    params: Iterable[Any] | None = None,
    fmodel: FunctionalModule | None = None,
    device: torch.device | str | None = None,
    override: Mapping[str, Any] | None = None,
    track_higher_grads: bool = True,
    **kwargs: Any,
) -> DifferentiableOptimizer:
    """A new differentiable optimizer of type ``opt_type`` (higher's ``create_diff_optim``).

    ``params`` (tensors, or param-group dicts) or ``fmodel`` give the shapes; the weights
    to step are then passed to ``step(params=...)`` or taken from ``fmodel``.

    Example:
        >>> import torch
        >>> from bilevel import stateful as higher
        >>> w = torch.ones(2, requires_grad=True)
        >>> diffopt = higher.create_diff_optim(torch.optim.SGD, {"lr": 0.5}, params=[w])
        >>> diffopt.step((w ** 2).sum(), params=[w])[0].detach()
        tensor([0., 0.])
    """
    cls = _lookup(opt_type)
    if params is not None:
        given = list(params)
        if not given:
            raise ValueError("params is empty")
        if isinstance(given[0], Mapping):
            groups = []
            for g in given:
                group = dict(g)
                tensors = (
                    [group["params"]] if isinstance(group["params"], Tensor) else group["params"]
                )
                group["params"] = [torch.zeros_like(p, requires_grad=True) for p in tensors]
                groups.append(group)
            dummy: list[Any] = groups
            reference = [p for g in groups for p in g["params"]]
        else:
            dummy = [torch.zeros_like(p, requires_grad=True) for p in given]
            reference = dummy
    elif fmodel is not None:
        fast = fmodel.fast_params
        if fast is None:
            raise ValueError("fmodel has no fast weights to take the shapes from")
        dummy = [torch.zeros_like(p, requires_grad=True) for p in fast]
        reference = dummy
    else:
        raise ValueError("give params= or fmodel= (the weights the optimizer will step)")
    opt = opt_type(dummy, **dict(opt_kwargs or {}))
    return cls(
        opt,
        reference,
        fmodel=fmodel,
        device=device,
        override=override,
        track_higher_grads=track_higher_grads,
        **kwargs,
    )


def register_optim(
    optim_type: type[torch.optim.Optimizer], diff_optim_type: type[DifferentiableOptimizer]
) -> None:
    """Use ``diff_optim_type`` for optimizers of type ``optim_type`` (higher's API).

    Example:
        >>> import torch
        >>> from bilevel import stateful as higher
        >>> class MySGD(torch.optim.SGD):
        ...     pass
        >>> higher.register_optim(MySGD, higher.optim.DifferentiableSGD)
    """
    if not (isinstance(optim_type, type) and issubclass(optim_type, torch.optim.Optimizer)):
        raise TypeError(f"optim_type must be a torch.optim.Optimizer subclass, got {optim_type!r}")
    if not (
        isinstance(diff_optim_type, type) and issubclass(diff_optim_type, DifferentiableOptimizer)
    ):
        raise TypeError(
            "diff_optim_type must be a subclass of bilevel.stateful.optim.DifferentiableOptimizer,"
            f" got {diff_optim_type!r}"
        )
    _opt_mapping[optim_type] = diff_optim_type

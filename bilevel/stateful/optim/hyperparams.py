"""Learnable optimizer settings: higher's ``get_trainable_opt_params`` and
``apply_trainable_opt_params``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from bilevel.stateful import utils


def get_trainable_opt_params(
    opt: torch.optim.Optimizer, device: torch.device | str | None = None
) -> dict[str, list[Any]]:
    """An override dict of leaf tensors (requiring grad) for every numeric setting of ``opt``.

    One entry per setting, one value per param group, in higher's override format. Python
    bools (``nesterov``, ``amsgrad``, ``maximize``...) switch the update's structure and are
    left out (higher turned them into tensors too).

    Example:
        >>> import torch
        >>> from bilevel import stateful as higher
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1, momentum=0.9)
        >>> override = higher.optim.get_trainable_opt_params(opt)
        >>> override["lr"], "nesterov" in override
        ([tensor(0.1000, requires_grad=True)], False)
    """
    override: dict[str, list[Any]] = {}

    def leaf(x: Any) -> Tensor:
        if isinstance(x, Tensor):
            return x.detach().clone().requires_grad_()
        return torch.tensor(float(x), device=device, requires_grad=True)

    for group in opt.param_groups:
        for key, value in group.items():
            if key == "params":
                continue
            leaves = utils.flatten(value)
            if leaves and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in leaves
            ):
                override.setdefault(key, []).append(utils._recursive_map(value, leaf))
    return override


def apply_trainable_opt_params(opt: torch.optim.Optimizer, override: Mapping[str, Any]) -> None:
    """Write learned settings back into ``opt``'s param groups (in place, as in higher).

    Example:
        >>> import torch
        >>> from bilevel import stateful as higher
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> higher.optim.apply_trainable_opt_params(opt, {"lr": [torch.tensor(0.05)]})
        >>> opt.param_groups[0]["lr"]
        0.05000000074505806
    """
    n = len(opt.param_groups)
    for key, values in override.items():
        values = list(values)
        if len(values) not in (1, n):
            raise ValueError(
                f"override[{key!r}] has {len(values)} values but the optimizer has {n} param "
                "groups; give one value or one per group"
            )
        for i, group in enumerate(opt.param_groups):
            if key not in group:
                raise KeyError(f"param group {i} has no setting {key!r}")
            group[key] = _apply(values[0] if len(values) == 1 else values[i], group[key], key)


def _apply(replacement: Any, target: Any, key: str) -> Any:
    if isinstance(replacement, Tensor) and isinstance(target, Tensor):
        with torch.no_grad():
            target.copy_(replacement.to(target.device))
        return target
    if isinstance(replacement, Tensor) and not utils._is_container(target):
        return type(target)(replacement.item())  # outside any loop: one read per setting
    if isinstance(target, (list, tuple)) and isinstance(replacement, (list, tuple)):
        if len(target) != len(replacement):
            raise ValueError(f"override[{key!r}] has the wrong length for {target!r}")
        return type(target)(_apply(r, t, key) for r, t in zip(replacement, target))
    if isinstance(target, dict) and isinstance(replacement, Mapping):
        return {k: _apply(replacement[k], t, key) for k, t in target.items()}
    if not isinstance(replacement, Tensor) and not utils._is_container(replacement):
        return replacement
    raise ValueError(
        f"cannot apply override[{key!r}] of type {type(replacement).__name__} to a setting of "
        f"type {type(target).__name__}"
    )

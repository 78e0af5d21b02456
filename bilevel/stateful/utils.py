"""higher's ``utils``: ``flatten``, ``get_func_params`` and the container helpers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["flatten", "get_func_params"]


def _copy_tensor(t: Tensor, safe_copy: bool, device: torch.device | str | None = None) -> Tensor:
    """A detached tensor (a copy if ``safe_copy``) with ``t``'s ``requires_grad``."""
    out = (t.clone() if safe_copy else t).detach().requires_grad_(t.requires_grad)
    return out if device is None else out.to(device)


def _recursive_map(target: Any, map_fn: Callable[[Any], Any]) -> Any:
    """``map_fn`` applied to every leaf of nested lists, tuples, dicts and sets."""
    if isinstance(target, (list, tuple, set)):
        return type(target)(_recursive_map(x, map_fn) for x in target)
    if isinstance(target, dict):
        return type(target)({k: _recursive_map(v, map_fn) for k, v in target.items()})
    return map_fn(target)


def _recursive_copy_and_cast(target: Any, device: torch.device | str | None) -> Any:
    """Nested containers with every tensor replaced by a detached copy (on ``device``)."""
    return _recursive_map(
        target, lambda x: _copy_tensor(x, True, device) if isinstance(x, Tensor) else x
    )


def _is_container(target: Any) -> bool:
    return isinstance(target, (list, tuple, dict, set))


def _find_param_in_list(param: Tensor, tensors: Iterable[Tensor]) -> int | None:
    """The index of ``param`` in ``tensors`` by identity, or ``None``."""
    for i, t in enumerate(tensors):
        if t is param:
            return i
    return None


def _get_param_mapping(module: nn.Module, seen: list[Tensor], mapping: list[int]) -> list[int]:
    """For each parameter slot of ``module`` (recursively, duplicates included), the index
    of its tensor among the distinct ones (higher's layout of shared weights)."""
    for p in module._parameters.values():
        if p is None:
            continue
        found = _find_param_in_list(p, seen)
        if found is None:
            mapping.append(len(seen))
            seen.append(p)
        else:
            mapping.append(found)
    for child in module._modules.values():
        if child is not None:
            _get_param_mapping(child, seen, mapping)
    return mapping


def flatten(x: Any) -> list[Any]:
    """The leaves of nested dicts, lists, tuples and sets, in order.

    Example:
        >>> flatten({"a": [1, (2, 3)], "b": 4})
        [1, 2, 3, 4]
    """
    if isinstance(x, dict):
        return [leaf for v in x.values() for leaf in flatten(v)]
    if isinstance(x, (list, tuple, set)):
        return [leaf for v in x for leaf in flatten(v)]
    return [x]


def get_func_params(
    module: nn.Module, device: torch.device | str | None = None, safe_copy: bool = True
) -> list[Tensor]:
    """Detached copies of ``module.parameters()``, each with its ``requires_grad``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> w, b = get_func_params(model)
        >>> w is model.weight, w.requires_grad, w.grad_fn is None
        (False, True, True)
    """
    return [_copy_tensor(p, safe_copy, device) for p in module.parameters()]

"""A structural copy of a module tree, and where each parameter and buffer lives in it.

The functional model never calls the user's module: it calls a *skeleton*, a shallow copy
of every submodule (same class, same attributes, same hooks, shared submodules still shared)
whose parameter and buffer dicts are its own. Fast weights are swapped into the skeleton
only for the duration of a call (``torch.func.functional_call``), so the user's module, its
``Parameter`` objects and its ``training`` flags are never touched, not even during a call,
and ``fmodel.train()`` / ``fmodel.eval()`` change the skeleton's flags only (as in higher).

Fast weights are bound by *place* — ``(submodule, attribute)`` — not by name: a submodule
shared by two parents is one place reached by two paths and is bound once (torch's
``functional_call(tie_weights=True)`` path replaces such shared ``Parameter``s in the
module itself, pytorch/pytorch#164759, so it is never used), and a ``Parameter`` tied
between two different submodules fills both places with the same fast tensor.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Place = tuple[int, str]  # (id of a skeleton submodule, attribute name)


def skeleton(module: nn.Module) -> nn.Module:
    """A structural copy of ``module``: new module objects, the same tensors.

    Example:
        >>> import torch
        >>> shared = torch.nn.Linear(2, 2)
        >>> model = torch.nn.Sequential(shared, torch.nn.Tanh(), shared)
        >>> skel = skeleton(model)
        >>> skel is model, skel[0] is skel[2], skel[0].weight is shared.weight
        (False, True, True)
    """
    memo: dict[int, nn.Module] = {}

    def copy_tree(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        if not hasattr(m, "__dict__") or isinstance(m, torch.jit.ScriptModule):
            raise TypeError(
                f"bilevel.stateful cannot make a functional copy of {type(m).__name__} "
                "(a module without an instance __dict__, or a TorchScript module)"
            )
        # not copy.copy: parametrized modules refuse to be pickled (their __getstate__ raises)
        new = object.__new__(type(m))
        new.__dict__.update(m.__dict__)
        memo[id(m)] = new
        # Own dicts, so a tensor swapped into the copy never shows in the original.
        new.__dict__["_parameters"] = OrderedDict(m._parameters)
        new.__dict__["_buffers"] = OrderedDict(m._buffers)
        new.__dict__["_modules"] = OrderedDict(
            (k, None if c is None else copy_tree(c)) for k, c in m._modules.items()
        )
        return new

    return copy_tree(module)


@dataclass(frozen=True)
class Layout:
    """Where the parameters and buffers of a skeleton live.

    ``param_places[place]`` is the index of the parameter in ``module.parameters()`` order
    (each distinct ``Parameter`` once), ``buffer_places[place]`` the index of the buffer in
    ``module.buffers()`` order; ``param_names`` / ``buffer_names`` the first name of each.
    """

    param_places: dict[Place, int]
    buffer_places: dict[Place, int]
    param_names: list[str]
    buffer_names: list[str]


def layout(skel: nn.Module) -> Layout:
    """The places of every parameter and buffer of a skeleton (see :class:`Layout`).

    Example:
        >>> import torch
        >>> shared = torch.nn.Linear(2, 2)
        >>> lay = layout(skeleton(torch.nn.Sequential(shared, torch.nn.Tanh(), shared)))
        >>> lay.param_names, sorted(set(lay.param_places.values()))
        (['0.weight', '0.bias'], [0, 1])
    """
    param_index: dict[int, int] = {}
    buffer_index: dict[int, int] = {}
    param_names: list[str] = []
    buffer_names: list[str] = []
    param_places: dict[Place, int] = {}
    buffer_places: dict[Place, int] = {}
    for prefix, m in skel.named_modules(remove_duplicate=True):
        dot = f"{prefix}." if prefix else ""
        for attr, p in m._parameters.items():
            if p is None:
                continue
            if id(p) not in param_index:
                param_index[id(p)] = len(param_names)
                param_names.append(dot + attr)
            param_places[(id(m), attr)] = param_index[id(p)]
        for attr, b in m._buffers.items():
            if b is None:
                continue
            if id(b) not in buffer_index:
                buffer_index[id(b)] = len(buffer_names)
                buffer_names.append(dot + attr)
            buffer_places[(id(m), attr)] = buffer_index[id(b)]
    return Layout(param_places, buffer_places, param_names, buffer_names)


def bindings(module: nn.Module, places: dict[Place, int]) -> list[tuple[str, int]]:
    """``(name relative to module, index)`` for every place of ``places`` inside ``module``.

    Example:
        >>> import torch
        >>> skel = skeleton(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)))
        >>> bindings(skel[1], layout(skel).param_places)
        [('weight', 2), ('bias', 3)]
    """
    out: list[tuple[str, int]] = []
    for prefix, m in module.named_modules(remove_duplicate=True):
        dot = f"{prefix}." if prefix else ""
        for attr in list(m._parameters) + list(m._buffers):
            index = places.get((id(m), attr))
            if index is not None:
                out.append((dot + attr, index))
    return out


def weights_dict(names: list[tuple[str, int]], tensors: list[Tensor]) -> dict[str, Tensor]:
    """The ``{name: tensor}`` dict for ``functional_call`` from :func:`bindings`.

    Example:
        >>> import torch
        >>> weights_dict([("weight", 1)], [torch.zeros(1), torch.ones(1)])
        {'weight': tensor([1.])}
    """
    return {name: tensors[i] for name, i in names}

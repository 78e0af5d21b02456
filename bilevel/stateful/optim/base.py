"""higher's ``DifferentiableOptimizer``: a torch optimizer's settings and state, stepped
differentiably on a functional model's fast weights.

Subclasses implement ``_update(grouped_grads)`` as in higher: for each group ``g``,
``self.param_groups[g]["params"][i]`` is the current fast weight of the group's ``i``-th
parameter, ``grouped_grads[g][i]`` its gradient (``None`` where it has none), and
``self.state[g][i]`` its state dict; ``_update`` replaces the entries of ``"params"`` with
the new weights. The built-in subclasses (:mod:`bilevel.stateful.optim.functional`) run
:mod:`bilevel.optim`'s functional optimizers; custom ones are registered with
:func:`bilevel.stateful.register_optim`.
"""

from __future__ import annotations

import abc
import collections
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel.stateful import utils
from bilevel.stateful.module import FunctionalModule

Override = Mapping[str, Any]
GradCallback = Callable[[list[Tensor | None]], Sequence[Tensor | None]]

# Settings whose value is a tuple (a pair), so that a bare pair is one value for all groups.
_PAIRS = ("betas", "etas", "step_sizes")


def _per_group(key: str, value: Any, n_groups: int) -> list[Any]:
    """higher's override format (a list of one value, or one per group) as one per group.

    A bare value (not in a list) is accepted as one value for all groups; for the pair
    settings (``betas``, ``etas``, ``step_sizes``) a bare pair is one pair for all groups.
    """
    if isinstance(value, (list, tuple)):
        if key in _PAIRS and value and not isinstance(value[0], (list, tuple)):
            values = [tuple(value)]
        else:
            values = list(value)
    else:
        values = [value]
    if len(values) == 1:
        return values * n_groups
    if len(values) != n_groups:
        raise ValueError(
            f"override[{key!r}] has {len(values)} values but the optimizer has {n_groups} "
            "parameter groups; give one value (for all groups) or one per group"
        )
    return values


class DifferentiableOptimizer(abc.ABC):
    """A differentiable copy of a ``torch.optim`` optimizer (higher's constructor).

    ``other``: the torch optimizer; its param groups (settings) and its state (momentum
    buffers, moments, step counts) are copied, so an inner loop can branch off a partly
    trained optimizer. ``reference_params``: the module's parameters, in order (the fast
    weights are matched to them by position). ``override``: settings replacing the groups'
    (one value, or a list with one per group), tensors to learn them. ``track_higher_grads``:
    build the graph through each step (``False``: first-order "test mode").

    Only the parameters ``other`` holds, and that require grad, are stepped; a parameter
    without a gradient (unused by the loss) is not updated and its state does not advance
    (``torch.optim`` semantics).

    Example:
        >>> import torch
        >>> from bilevel import stateful as higher
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([w], lr=0.5, momentum=0.9)
        >>> (w ** 2).sum().backward(); opt.step()  # a torch step: momentum buffer 2 * w
        >>> diffopt = higher.optim.DifferentiableSGD(opt, [w])
        >>> diffopt.state[0][0]["momentum_buffer"]
        tensor([2., 2.])
        >>> v = w.detach().clone().requires_grad_()
        >>> diffopt.step((v ** 2).sum(), params=[v])[0].detach()  # buf = 0.9 * 2 + 2 * 0
        tensor([-0.9000, -0.9000])
    """

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params: Iterable[Tensor],
        fmodel: FunctionalModule | None = None,
        device: torch.device | str | None = None,
        override: Mapping[str, Any] | None = None,
        grad_callback: Callable[[list[Tensor | None]], Sequence[Tensor | None]] | None = None,
        track_higher_grads: bool = True,
        **kwargs: Any,
    ) -> None:
        if not isinstance(other, torch.optim.Optimizer):
            raise TypeError(f"other must be a torch.optim.Optimizer, got {type(other).__name__}")
        if not isinstance(track_higher_grads, bool):
            raise TypeError(f"track_higher_grads must be a bool, got {track_higher_grads!r}")
        if fmodel is not None and not isinstance(fmodel, FunctionalModule):
            raise TypeError(f"fmodel must be a functional model, got {type(fmodel).__name__}")
        reference = list(reference_params)
        self.param_groups: list[dict[str, Any]] = []
        self.state: list[collections.defaultdict[int, dict[str, Any]]] = []
        self._group_to_param_list: list[list[int]] = []
        for group in other.param_groups:
            copied = {k: v for k, v in group.items() if k != "params"}
            indices = []
            state: collections.defaultdict[int, dict[str, Any]] = collections.defaultdict(dict)
            for i, p in enumerate(group["params"]):
                index = utils._find_param_in_list(p, reference)
                if index is None:
                    raise ValueError(
                        f"parameter {i} of param group {len(self.param_groups)} (shape "
                        f"{tuple(p.shape)}) is not among reference_params; pass the parameters "
                        "of the module the optimizer was built for"
                    )
                indices.append(index)
                if p in other.state:
                    state[i] = {
                        k: utils._recursive_copy_and_cast(v, device)
                        for k, v in other.state[p].items()
                    }
            copied["params"] = [None] * len(indices)
            self.param_groups.append(copied)
            self.state.append(state)
            self._group_to_param_list.append(indices)
        self._n_reference = len(reference)
        if override is not None:
            self._apply_override(override)
        self._grad_callback = grad_callback
        self._fmodel = fmodel
        self._track_higher_grads = track_higher_grads

    def _apply_override(self, override: Override) -> None:
        """Replace settings in every group (kept for later steps, as in higher)."""
        if not isinstance(override, Mapping):
            raise TypeError(f"override must be a dict, got {type(override).__name__}")
        for key, value in override.items():
            values = _per_group(key, value, len(self.param_groups))
            for group, v in zip(self.param_groups, values):
                group[key] = v

    def step(
        self,
        loss: Tensor,
        params: Iterable[Tensor] | None = None,
        override: Mapping[str, Any] | None = None,
        grad_callback: Callable[[list[Tensor | None]], Sequence[Tensor | None]] | None = None,
        **kwargs: Any,
    ) -> list[Tensor]:
        """One differentiable step on ``loss``; returns all the new fast weights.

        ``params``: the fast weights to differentiate ``loss`` against (default: the
        functional model's current ones; given, they replace them). ``override``: settings
        for this and later steps (higher's semantics). ``grad_callback``: maps the list of
        gradients (``None`` for a weight without one) before the update, e.g. clipping.
        """
        if override is not None:
            self._apply_override(override)
        if params is None:
            if self._fmodel is None or self._fmodel.fast_params is None:
                raise ValueError(
                    "params must be passed to step when the differentiable optimizer has no "
                    "functional model with fast weights (fmodel=...)"
                )
            params = self._fmodel.fast_params
        params = list(params)
        if len(params) != self._n_reference:
            raise ValueError(
                f"params has {len(params)} tensors but the optimizer was built for "
                f"{self._n_reference} reference parameters"
            )
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("loss must be a tensor with a single element")
        # A frozen weight (requires_grad=False) is differentiated as an unused dummy, so its
        # gradient is None and it is not stepped.
        targets = [p if p.requires_grad else torch.empty(0, requires_grad=True) for p in params]
        grads: list[Tensor | None] = list(
            torch.autograd.grad(
                loss, targets, create_graph=self._track_higher_grads, allow_unused=True
            )
        )
        callback = grad_callback if grad_callback is not None else self._grad_callback
        if callback is not None:
            grads = list(callback(grads))
            if len(grads) != len(params):
                raise ValueError(
                    f"grad_callback returned {len(grads)} gradients for {len(params)} weights"
                )
        grouped: list[list[Tensor | None]] = []
        for group, mapping in zip(self.param_groups, self._group_to_param_list):
            group["params"] = [params[i] for i in mapping]
            grouped.append([grads[i] for i in mapping])
        with torch.set_grad_enabled(self._track_higher_grads and torch.is_grad_enabled()):
            self._update(grouped)
        new = params[:]
        for group, mapping in zip(self.param_groups, self._group_to_param_list):
            for p, i in zip(group["params"], mapping):
                if self._track_higher_grads:
                    new[i] = p
                else:
                    # a frozen weight stays frozen (higher made it trainable from step 2 on)
                    new[i] = p.detach().requires_grad_(params[i].requires_grad)
        if self._fmodel is not None:
            self._fmodel.update_params(new)
        return new

    @abc.abstractmethod
    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        """Replace ``self.param_groups[g]["params"][i]`` by the stepped weights."""

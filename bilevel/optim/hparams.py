"""Hyperparameter values: their kinds, the explicit wrappers, and resolution at one step.

A hyperparameter value can be

* a number or a 0-d tensor (shared by every parameter, every step);
* a 1-D tensor: a per-step schedule, indexed by the step count;
* a callable ``fn(step) -> value``: a schedule given as a function;
* a mapping ``{param_name: value}``: one value per parameter tensor, where each
  value is a number, a 0-d tensor, a tensor shaped like the parameter (per
  element), a tensor of shape ``(T, *param.shape)`` or ``(T,)`` (a per-step
  schedule of that parameter), or a callable of the step;
* :func:`schedule` ``(values)`` or :func:`per_element` ``(tensor)``: the explicit forms.

Inside a mapping, a 1-D tensor whose length equals that of its 1-D parameter could be
either a schedule or per-element values: it is rejected, asking for ``schedule(t)`` or
``per_element(t)``. A tensor shaped like a parameter of two or more dimensions is
per-element. Both wrappers are pytree nodes, so the tensors they hold stay visible to
``checkpoint`` and ``forward`` unrolls.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch.utils._pytree as _pytree
from torch import Tensor

# A hyperparameter resolved for one step: a number or a 0-d tensor shared by every
# parameter tensor, or a list with one value (number / tensor) per parameter tensor.
Resolved = Any


class Schedule:
    """A per-step schedule: ``values[step]`` at each step (see :func:`schedule`)."""

    __slots__ = ("values",)

    def __init__(self, values: Tensor) -> None:
        self.values = values

    def __repr__(self) -> str:
        return f"schedule({self.values!r})"


class PerElement:
    """One value per element of a parameter tensor (see :func:`per_element`)."""

    __slots__ = ("values",)

    def __init__(self, values: Tensor) -> None:
        self.values = values

    def __repr__(self) -> str:
        return f"per_element({self.values!r})"


def schedule(values: Tensor) -> Schedule:
    """Mark a tensor as a per-step schedule: step ``t`` uses ``values[t]``.

    ``values`` has shape ``(T,)`` (one value per step) or, inside a per-parameter mapping,
    ``(T, *param.shape)``. Needed only where a 1-D tensor could also be read as per-element
    values (a mapping entry of a 1-D parameter of the same length); accepted everywhere.

    Example:
        >>> import torch, bilevel
        >>> opt = bilevel.optim.sgd()
        >>> params = {"b": torch.zeros(3)}
        >>> lr = {"b": bilevel.optim.schedule(torch.tensor([0.1, 0.2, 0.3]))}
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, {"b": torch.ones(3)}, state, {"lr": lr})
        >>> params["b"]
        tensor([-0.1000, -0.1000, -0.1000])
    """
    if not isinstance(values, Tensor) or values.ndim < 1:
        raise TypeError(
            "schedule(values): values must be a tensor with a leading step dimension, got "
            + (
                f"shape {tuple(values.shape)}"
                if isinstance(values, Tensor)
                else type(values).__name__
            )
        )
    return Schedule(values)


def per_element(values: Tensor) -> PerElement:
    """Mark a tensor as one value per element of its parameter (inside a mapping).

    Example:
        >>> import torch, bilevel
        >>> opt = bilevel.optim.sgd()
        >>> params = {"b": torch.zeros(3)}
        >>> lr = {"b": bilevel.optim.per_element(torch.tensor([0.1, 0.2, 0.3]))}
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, {"b": torch.ones(3)}, state, {"lr": lr})
        >>> params["b"]
        tensor([-0.1000, -0.2000, -0.3000])
    """
    if not isinstance(values, Tensor):
        raise TypeError(
            f"per_element(values): values must be a tensor, got {type(values).__name__}"
        )
    return PerElement(values)


def _flatten(w: Schedule | PerElement) -> tuple[list[Tensor], None]:
    return [w.values], None


_pytree.register_pytree_node(
    Schedule,
    _flatten,
    lambda leaves, _ctx: Schedule(list(leaves)[0]),
    serialized_type_name="bilevel.optim.Schedule",
)
_pytree.register_pytree_node(
    PerElement,
    _flatten,
    lambda leaves, _ctx: PerElement(list(leaves)[0]),
    serialized_type_name="bilevel.optim.PerElement",
)


def is_fn(value: Any) -> bool:
    """A schedule given as a function of the step (not a tensor, not a wrapper)."""
    return callable(value) and not isinstance(value, Tensor)


def is_ambiguous(value: Tensor, param: Tensor) -> bool:
    """A bare 1-D tensor for a 1-D parameter of the same length: schedule or per element?"""
    return value.ndim == 1 and param.ndim == 1 and value.shape == param.shape


def ambiguity_error(setting: str, where: str) -> ValueError:
    return ValueError(
        f"hyperparameter {setting!r}{where} is a 1-D tensor as long as its parameter: it could "
        "be a per-step schedule or one value per element; say which with "
        "bilevel.optim.schedule(t) or bilevel.optim.per_element(t)"
    )


def index(value: Tensor, step: int, setting: str, where: str = "") -> Tensor:
    """``value[step]``, with an error naming the setting when the schedule is too short."""
    if step >= value.shape[0]:
        raise ValueError(
            f"hyperparameter {setting!r}{where} is a schedule of length {value.shape[0]} but "
            f"step {step} was requested; give at least {step + 1} values"
        )
    return value[step]


def pick(value: Any, step: int, param_name: str, param: Tensor, setting: str) -> Any:
    """Resolve one hyperparameter value for one parameter tensor at one step."""
    if is_fn(value):
        value = value(step)
    if isinstance(value, Schedule):
        return index(value.values, step, setting)
    if isinstance(value, Mapping):
        if param_name not in value:
            raise ValueError(
                f"hyperparameter {setting!r} is given per parameter tensor but has no entry for "
                f"parameter {param_name!r} (has {sorted(value)})"
            )
        where = f"[{param_name!r}]"
        value = value[param_name]
        if is_fn(value):
            value = value(step)
        if isinstance(value, Schedule):
            return index(value.values, step, setting, where)
        if isinstance(value, PerElement):
            return value.values
        if isinstance(value, Tensor) and value.ndim > 0 and value.shape != param.shape:
            return index(value, step, setting, where)
        if isinstance(value, Tensor) and is_ambiguous(value, param):
            raise ambiguity_error(setting, where)
        return value
    if isinstance(value, Tensor) and value.ndim > 0:
        return index(value, step, setting)
    return value


def resolve(
    value: Any, setting: str, step: int, names: list[str], params: list[Tensor]
) -> Resolved:
    """Resolve a raw hyperparameter value for all parameter tensors at one step.

    Returns the shared value (number or 0-d tensor) when the value is not given per
    parameter tensor, else a list aligned with ``names``.
    """
    t = type(value)
    if t is float or t is int:  # the common case first, without ABC checks
        return value
    if isinstance(value, Tensor):
        return index(value, step, setting) if value.ndim > 0 else value
    if isinstance(value, Schedule):
        return index(value.values, step, setting)
    if is_fn(value):
        value = value(step)
        if isinstance(value, Tensor) and value.ndim > 0:
            raise ValueError(
                f"hyperparameter {setting!r} is a function of the step that returned a tensor "
                f"of shape {tuple(value.shape)}; it must return a number, a 0-d tensor or a "
                "mapping {param_name: value}"
            )
    if t is dict or isinstance(value, Mapping):
        return [pick(value, step, n, p, setting) for n, p in zip(names, params)]
    return value


def hmap(fn: Callable[..., Any], *values: Resolved) -> Resolved:
    """Apply ``fn`` to resolved hyperparameters, once if all are shared, else per parameter."""
    n = -1
    for v in values:
        if type(v) is list:
            n = len(v)
            break
    if n < 0:
        return fn(*values)
    return [fn(*(v[i] if type(v) is list else v for v in values)) for i in range(n)]


def contains_tensor(value: Any) -> bool:
    """Whether a raw value holds a tensor anywhere (a function of the step: at step 0)."""
    if is_fn(value):
        value = value(0)
    if isinstance(value, (Tensor, Schedule, PerElement)):
        return True
    if isinstance(value, Mapping):
        return any(contains_tensor(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return any(contains_tensor(v) for v in value)
    return False

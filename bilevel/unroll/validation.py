"""Early, named errors for ``unroll``'s arguments (before any step runs)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from bilevel._tree import tree_flatten
from bilevel.optim.base import Optimizer

MODES = ("reverse", "truncated", "checkpoint", "forward", "first_order", "auto", "reversible")


def validate_problem(
    inner_loss: Any, params: Any, hparams: Any, optimizer: Any, steps: Any
) -> None:
    """The inner problem: a callable loss, a dict of float params, hyperparameters on the
    params' device and dtype, a bilevel optimizer that accepts them, a positive step count."""
    if not callable(inner_loss):
        raise TypeError(f"inner_loss must be callable, got {type(inner_loss).__name__}")
    if not isinstance(params, Mapping) or not params:
        raise TypeError(
            "params must be a non-empty dict of tensors, e.g. dict(model.named_parameters()); "
            f"got {type(params).__name__}"
        )
    for name, p in params.items():
        if not isinstance(p, Tensor) or not p.is_floating_point():
            raise TypeError(f"params[{name!r}] must be a floating-point tensor, got {p!r:.60}")
    if not isinstance(hparams, Mapping):
        raise TypeError(f"hparams must be a dict, got {type(hparams).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            "optimizer must be a bilevel.optim optimizer (e.g. bilevel.optim.sgd()), "
            f"got {type(optimizer).__name__}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive int, got {steps!r}")


def validate_mode(mode: Any, steps: int, truncate: Any, segments: Any, memory_budget: Any) -> None:
    """The mode and the options that belong to it (each only with its own mode)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        if (
            isinstance(memory_budget, bool)
            or not isinstance(memory_budget, int)
            or memory_budget <= 0
        ):
            raise ValueError(
                "mode='auto' needs memory_budget=, the bytes autograd may keep for the "
                f"backward pass, a positive int; got {memory_budget!r}"
            )
    elif memory_budget is not None:
        raise ValueError(f"memory_budget is only used with mode='auto' (mode={mode!r})")
    if mode == "truncated":
        if (
            isinstance(truncate, bool)
            or not isinstance(truncate, int)
            or not 1 <= truncate <= steps
        ):
            raise ValueError(
                f"mode='truncated' needs truncate=K, the number of last steps to differentiate, "
                f"an int in [1, steps={steps}]; got {truncate!r}"
            )
    elif truncate is not None:
        raise ValueError(f"truncate is only used with mode='truncated' (mode={mode!r})")
    if segments is not None:
        if mode != "checkpoint":
            raise ValueError(f"segments is only used with mode='checkpoint' (mode={mode!r})")
        if (
            isinstance(segments, bool)
            or not isinstance(segments, int)
            or not 1 <= segments <= steps
        ):
            raise ValueError(f"segments must be an int in [1, steps={steps}], got {segments!r}")


def validate_placement(params: Mapping[str, Tensor], hparams: Any, buffers: Any) -> None:
    """Buffers are a dict; hyperparameter tensors live on the params' device and dtype."""
    if buffers is not None and not isinstance(buffers, Mapping):
        raise TypeError(f"buffers must be a dict of tensors or None, got {type(buffers).__name__}")

    ref = next(iter(params.values()))
    leaves = tree_flatten(dict(hparams))[0]
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            if leaf.device != ref.device:
                raise ValueError(
                    f"a hyperparameter tensor is on {leaf.device} but the params are on "
                    f"{ref.device}; move hparams with .to({str(ref.device)!r})"
                )
            if leaf.is_floating_point() and leaf.dtype != ref.dtype:
                raise ValueError(
                    f"a hyperparameter tensor has dtype {leaf.dtype} but the params have "
                    f"{ref.dtype}; cast hparams with .to({ref.dtype})"
                )

"""The range check of tensor hyperparameters at the start of an unroll (one device sync).

Python numbers are range-checked by the optimizer when it validates its settings; tensors
are not (a check needs their values, so a synchronisation), and a negative learning rate,
a momentum above 1 or ``beta2 = 1.5`` would run and end in NaNs far from the cause. Every
tensor setting is checked here against the optimizer's own valid interval, all of them in one
reduction and one transfer, and only when ``check_finite`` allows synchronising.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

# the valid interval of common settings, for an optimizer that does not declare its own
DEFAULT_RANGES: dict[str, tuple[float, float, bool]] = {
    "lr": (0.0, math.inf, True),
    "momentum": (0.0, 1.0, True),
    "dampening": (0.0, 1.0, True),
    "betas": (0.0, 1.0, False),
    "alpha": (0.0, 1.0, True),
    "eps": (0.0, math.inf, True),
    "weight_decay": (0.0, math.inf, True),
    "lr_decay": (0.0, math.inf, True),
}


def _bounds(optimizer: Any, setting: str) -> tuple[float, float, bool] | None:
    """The optimizer's declared interval intersected with the table's (momentum above 1
    diverges whatever an optimizer accepts from Python numbers)."""
    declared = getattr(optimizer, "_number_range", None)
    own = declared(setting) if callable(declared) else None
    table = DEFAULT_RANGES.get(setting)
    if own is None or table is None:
        return own or table
    low = max(own[0], table[0])
    if own[1] < table[1]:
        return (low, own[1], own[2])
    if table[1] < own[1]:
        return (low, table[1], table[2])
    return (low, own[1], own[2] and table[2])


class RangeCheck:
    """The range check of every tensor setting, queued on the device: ``ok`` is a 0-d bool
    tensor (no synchronisation yet), :meth:`raise_error` explains a violation."""

    def __init__(self, optimizer: Any, checks: list[tuple[str, Tensor, tuple[float, float, bool]]]):
        self.optimizer = optimizer
        self.checks = checks
        self.bad = torch.stack(
            [
                (t.isnan() | (t < low) | (t > high) | ((t == high) & (not inclusive))).any()
                for _, t, (low, high, inclusive) in checks
            ]
        )
        self.ok = ~self.bad.any()

    def raise_error(self) -> None:
        """Raise ``ValueError`` naming the first setting out of range (synchronises)."""
        for (label, t, (low, high, inclusive)), is_bad in zip(self.checks, self.bad.tolist()):
            if not is_bad:
                continue
            name = getattr(self.optimizer, "name", type(self.optimizer).__name__)
            interval = f"[{low}, {high}{']' if inclusive else ')'}"
            if bool(t.isnan().any()):
                raise ValueError(f"{name}: hyperparameter {label!r} (a tensor) contains NaN")
            lo, hi = float(t.min()), float(t.max())
            where = f"values down to {lo:g}" if lo < low else f"values up to {hi:g}"
            raise ValueError(
                f"{name}: hyperparameter {label!r} (a tensor) has {where}, outside {interval}"
            )


def tensor_range_check(optimizer: Any, hparams: Mapping[str, Any]) -> RangeCheck | None:
    """The :class:`RangeCheck` of the optimizer's tensor settings (None: no tensor setting)."""
    checks: list[tuple[str, Tensor, tuple[float, float, bool]]] = []
    flags = set(getattr(optimizer, "flags", ()))
    for setting in getattr(optimizer, "defaults", {}):
        if setting in flags:
            continue
        bounds = _bounds(optimizer, setting)
        if bounds is None:
            continue
        value = optimizer.raw(setting, hparams)
        parts = list(enumerate(value)) if isinstance(value, (tuple, list)) else [(None, value)]
        for i, part in parts:
            label = setting if i is None else f"{setting}[{i}]"
            for leaf in tree_flatten(part)[0]:
                if isinstance(leaf, Tensor) and leaf.is_floating_point() and leaf.numel():
                    checks.append((label, leaf.detach(), bounds))
    return RangeCheck(optimizer, checks) if checks else None


def check_tensor_ranges(optimizer: Any, hparams: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the setting when a tensor value is outside its range
    (one synchronisation; ``unroll`` instead rides on its first finiteness check).

    Example:
        >>> import torch, bilevel
        >>> opt = bilevel.optim.adam(betas=(0.9, torch.tensor(1.5)))
        >>> try:
        ...     check_tensor_ranges(opt, {"lr": torch.tensor(0.1)})
        ... except ValueError as exc:
        ...     print(exc)
        adam: hyperparameter 'betas[1]' (a tensor) has values up to 1.5, outside [0.0, 1.0)
    """
    check = tensor_range_check(optimizer, hparams)
    if check is not None and not bool(check.ok):
        check.raise_error()

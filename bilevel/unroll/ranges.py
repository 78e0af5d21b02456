"""The range check of tensor hyperparameters at the start of an unroll (one device sync).

Python numbers are range-checked by the optimizer when it validates its settings; tensors
are not (a check needs their values, so a synchronisation), and a negative learning rate,
a momentum above 1 or ``beta2 = 1.5`` would run and end in NaNs far from the cause. Every
tensor setting is checked here against the optimizer's own ``ranges``
(:mod:`bilevel.optim.validation`), narrowed where ``torch.optim`` is looser than
convergence allows, all in one reduction, read once before the first step (skipped with ``check_finite=False``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from bilevel.optim.validation import Range

# limits beyond those an optimizer declares for Python numbers (``torch.optim`` accepts any
# momentum >= 0 but above 1 it diverges), for a tensor that nothing else checks
EXTRA_RANGES: dict[str, Range] = {
    "momentum": Range(0.0, 1.0),
    "dampening": Range(0.0, 1.0),
    "alpha": Range(0.0, 1.0),
}


def _intersect(a: Range | None, b: Range | None) -> Range | None:
    if a is None or b is None:
        return a or b
    if a.low > b.low or (a.low == b.low and not a.low_inclusive):
        low, low_inc = a.low, a.low_inclusive
    else:
        low, low_inc = b.low, b.low_inclusive
    if a.high < b.high or (a.high == b.high and not a.high_inclusive):
        high, high_inc = a.high, a.high_inclusive
    else:
        high, high_inc = b.high, b.high_inclusive
    return Range(low, high, low_inc, high_inc)


def _bounds(optimizer: Any, setting: str, label: str) -> Range | None:
    """The optimizer's declared range of ``label`` (``"betas[1]"``) or ``setting``,
    narrowed by :data:`EXTRA_RANGES`."""
    declared = getattr(optimizer, "ranges", {}) or {}
    own = declared.get(label, declared.get(setting))
    return _intersect(own, EXTRA_RANGES.get(setting))


class RangeCheck:
    """The range check of every tensor setting, queued on the device: ``ok`` is a 0-d bool
    tensor (no synchronisation yet), :meth:`raise_error` explains a violation."""

    def __init__(self, optimizer: Any, checks: list[tuple[str, Tensor, Range]]):
        self.optimizer = optimizer
        self.checks = checks
        self.bad = torch.stack([(~bounds.contains(t)).any() for _, t, bounds in checks])
        self.ok = ~self.bad.any()

    def raise_error(self) -> None:
        """Raise ``ValueError`` naming the first setting out of range (synchronises)."""
        for (label, t, bounds), is_bad in zip(self.checks, self.bad.tolist()):
            if not is_bad:
                continue
            name = getattr(self.optimizer, "name", type(self.optimizer).__name__)
            interval = str(bounds)
            if bool(t.isnan().any()):
                raise ValueError(f"{name}: hyperparameter {label!r} (a tensor) contains NaN")
            lo, hi = float(t.min()), float(t.max())
            below = lo < bounds.low or (lo == bounds.low and not bounds.low_inclusive)
            where = f"values down to {lo:g}" if below else f"values up to {hi:g}"
            raise ValueError(
                f"{name}: hyperparameter {label!r} (a tensor) has {where}, outside {interval}"
            )


def tensor_range_check(optimizer: Any, hparams: Mapping[str, Any]) -> RangeCheck | None:
    """The :class:`RangeCheck` of the optimizer's tensor settings (None: no tensor setting)."""
    checks: list[tuple[str, Tensor, Range]] = []
    flags = set(getattr(optimizer, "flags", ()))
    for setting in getattr(optimizer, "defaults", {}):
        if setting in flags:
            continue
        value = optimizer.raw(setting, hparams)
        parts = list(enumerate(value)) if isinstance(value, (tuple, list)) else [(None, value)]
        for i, part in parts:
            label = setting if i is None else f"{setting}[{i}]"
            bounds = _bounds(optimizer, setting, label)
            if bounds is None:
                continue
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

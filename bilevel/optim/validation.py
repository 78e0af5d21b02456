"""Checks of optimizer settings: kinds, shapes, devices, dtypes and valid ranges.

Every optimizer declares ``ranges``: a mapping ``setting -> Range`` of the values
``torch.optim`` accepts (a pair setting such as ``betas`` has ``betas[0]`` and
``betas[1]``). Python numbers are checked against it when the optimizer is built (as
``torch.optim`` does) and again at the first step for values read from ``hparams``;
tensors are not read here (that would synchronise with the device), but the mapping is
public so that a caller can check tensor values once, at a point of its choosing
(``Range.contains`` works on tensors and returns a boolean tensor).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from bilevel.optim.hparams import PerElement, Schedule, is_ambiguous, is_fn


@dataclass(frozen=True)
class Range:
    """The valid values of a setting: ``low <= x <= high`` with open ends where flagged.

    Example:
        >>> from bilevel.optim.validation import Range
        >>> beta = Range(0.0, 1.0, high_inclusive=False)
        >>> beta.contains(0.9), beta.contains(1.0), str(beta)
        (True, False, '[0.0, 1.0)')
    """

    low: float = -math.inf
    high: float = math.inf
    low_inclusive: bool = True
    high_inclusive: bool = True

    def contains(self, x: Any) -> Any:
        """``x`` in range: a bool for a number, a boolean tensor (no sync) for a tensor."""
        above = x >= self.low if self.low_inclusive else x > self.low
        below = x <= self.high if self.high_inclusive else x < self.high
        if isinstance(x, Tensor):
            return above & below & ~x.isnan()
        return bool(above and below)

    def __str__(self) -> str:
        left = "[" if self.low_inclusive else "("
        right = "]" if self.high_inclusive else ")"
        return f"{left}{self.low}, {self.high}{right}"


NON_NEGATIVE = Range(0.0)
UNIT_OPEN = Range(0.0, 1.0, high_inclusive=False)  # betas: [0, 1)
UNIT_CLOSED = Range(0.0, 1.0)  # Adadelta's rho: [0, 1]


def check_number(name: str, label: str, value: Any, bounds: Range | None, where: str = "") -> None:
    """Raise naming the setting when a Python number is a bool, NaN or out of range."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: hyperparameter {label!r}{where} is a bool")
    if math.isnan(value):
        raise ValueError(f"{name}: hyperparameter {label!r}{where} is NaN")
    if bounds is not None and not bounds.contains(value):
        raise ValueError(
            f"{name}: hyperparameter {label!r}{where} = {value} is outside {bounds} "
            "(torch.optim rejects it too)"
        )


def numbers_in(value: Any) -> list[tuple[str, Any]]:
    """The Python numbers in a raw value, with where they sit (for construction checks)."""
    if isinstance(value, bool) or isinstance(value, Tensor):
        return []
    if isinstance(value, numbers.Real):
        return [("", value)]
    if isinstance(value, Mapping):
        return [
            (f"[{k!r}]", v)
            for k, v in value.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool)
        ]
    return []


def check_params(name: str, params: Any, steps: int | None) -> None:
    """A non-empty dict of real floating-point tensors, and a positive number of steps."""
    if not isinstance(params, Mapping) or not params:
        raise ValueError(f"{name}: params must be a non-empty dict of tensors")
    for key, p in params.items():
        if not isinstance(p, Tensor):
            raise TypeError(f"{name}: params[{key!r}] is a {type(p).__name__}, expected a tensor")
        if not p.is_floating_point():
            raise TypeError(
                f"{name}: params[{key!r}] has dtype {p.dtype}; expected a real floating-point "
                "tensor"
            )
    if steps is not None and (not isinstance(steps, int) or steps <= 0):
        raise ValueError(f"{name}: steps must be a positive int, got {steps!r}")


@dataclass(frozen=True)
class _Where:
    """Where a value being checked sits: label, setting, optimizer name, its parameter."""

    optimizer: str
    label: str
    setting: str
    where: str = ""
    param: Tensor | None = None


class Checker:
    """Checks one optimizer's raw values against the params (see :meth:`check_value`)."""

    def __init__(self, optimizer: Any, params: Mapping[str, Tensor], steps: int | None) -> None:
        self.opt = optimizer
        self.params = params
        self.ref = next(iter(params.values()))
        self.steps = steps

    def check_value(self, at: _Where, value: Any) -> None:
        name, label, where, param = at.optimizer, at.label, at.where, at.param
        if is_fn(value):
            self._check_fn(at, value)
            return
        if isinstance(value, Schedule):
            self._check_tensor(at, value.values, schedule=True)
            return
        if isinstance(value, PerElement):
            if param is None or value.values.shape != param.shape:
                raise ValueError(
                    f"{name}: hyperparameter {label!r}{where} is per_element(...) of shape "
                    f"{tuple(value.values.shape)}; it must sit in a mapping {{param_name: "
                    "values}} and have its parameter's shape"
                    + (f" {tuple(param.shape)}" if param is not None else "")
                )
            self._check_tensor(at, value.values, schedule=False)
            return
        if isinstance(value, Mapping):
            self._check_mapping(at, value)
            return
        if isinstance(value, Tensor):
            self._check_tensor(at, value, schedule=None)
            return
        if isinstance(value, numbers.Real):
            check_number(name, label, value, self.opt.ranges.get(label), where)
            return
        raise TypeError(
            f"{name}: hyperparameter {label!r}{where} is a {type(value).__name__}; expected "
            "a number, a tensor, a mapping {param_name: value}, a function of the step, "
            "schedule(...) or per_element(...)"
        )

    def _check_fn(self, at: _Where, value: Any) -> None:
        name, label, where, param = at.optimizer, at.label, at.where, at.param
        last = self.steps - 1 if self.steps is not None else 0
        for s in sorted({0, last}):
            try:
                v = value(s)
            except Exception as e:  # the user's schedule failed: say which one
                raise ValueError(
                    f"{name}: hyperparameter {label!r}{where} is a function of the step "
                    f"and raised {type(e).__name__}: {e} at step {s}"
                ) from e
            if is_fn(v):
                raise TypeError(
                    f"{name}: hyperparameter {label!r}{where} is a function returning a function"
                )
            if isinstance(v, Tensor) and v.ndim > 0 and (param is None or v.shape != param.shape):
                raise ValueError(
                    f"{name}: hyperparameter {label!r}{where} is a function of the step "
                    f"that returned a tensor of shape {tuple(v.shape)}; it must return a "
                    "number, a 0-d tensor, a per-element tensor or a mapping"
                )
            # A schedule's value is the value at that step: no further schedule.
            saved, self.steps = self.steps, None
            try:
                self.check_value(at, v)
            finally:
                self.steps = saved

    def _check_mapping(self, at: _Where, value: Mapping[str, Any]) -> None:
        name, label = at.optimizer, at.label
        if at.param is not None:
            raise TypeError(
                f"{name}: hyperparameter {label!r}{at.where} is a nested mapping; give one "
                "value per parameter tensor"
            )
        missing = [n for n in self.params if n not in value]
        if missing:
            raise ValueError(
                f"{name}: hyperparameter {label!r} is given per parameter tensor but "
                f"misses parameter(s) {missing}"
            )
        extra = [n for n in value if n not in self.params]
        if extra:
            raise ValueError(
                f"{name}: hyperparameter {label!r} is given per parameter tensor but "
                f"names unknown parameter(s) {extra}; the params are {list(self.params)}"
            )
        for pname, v in value.items():
            sub = _Where(name, label, at.setting, f"[{pname!r}]", self.params[pname])
            self.check_value(sub, v)

    def _check_tensor(self, at: _Where, t: Tensor, schedule: bool | None) -> None:
        name, label, where, param, ref = at.optimizer, at.label, at.where, at.param, self.ref
        if t.device != ref.device:
            raise ValueError(
                f"{name}: hyperparameter {label!r}{where} is on {t.device} but the params are "
                f"on {ref.device}; move it with .to({str(ref.device)!r})"
            )
        if t.is_complex() or (t.is_floating_point() and t.dtype != ref.dtype):
            raise ValueError(
                f"{name}: hyperparameter {label!r}{where} has dtype {t.dtype} but the params "
                f"have {ref.dtype}; cast it with .to({ref.dtype})"
            )
        if schedule is False or (schedule is None and t.ndim == 0):
            return
        short = self.steps is not None and t.shape[0] < self.steps
        if schedule is None and param is None and t.ndim == 1 and not short:
            clash = [n for n, p in self.params.items() if p.shape == t.shape]
            if clash:
                raise ValueError(
                    f"{name}: hyperparameter {label!r} is a 1-D tensor of length {t.shape[0]}, "
                    f"as long as parameter(s) {clash}: it could be a per-step schedule or "
                    "values per element; say which: bilevel.optim.schedule(t), or "
                    "{param_name: bilevel.optim.per_element(t)}"
                )
        if schedule is None and param is None and t.ndim > 1:
            raise ValueError(
                f"{name}: hyperparameter {label!r} has shape {tuple(t.shape)}: a tensor "
                "outside a per-parameter mapping must be 0-d (a constant) or 1-D (a per-step "
                "schedule); give per-element values as {param_name: tensor}"
            )
        if schedule is None and param is not None:
            if is_ambiguous(t, param):
                raise ValueError(
                    f"{name}: hyperparameter {label!r}{where} is a 1-D tensor as long as its "
                    "parameter: it could be a per-step schedule or one value per element; say "
                    "which with bilevel.optim.schedule(t) or bilevel.optim.per_element(t)"
                )
            if t.shape == param.shape:
                return  # per element
        if param is not None and t.ndim > 1 and t.shape[1:] != param.shape:
            raise ValueError(
                f"{name}: hyperparameter {label!r}{where} has shape {tuple(t.shape)}: expected "
                f"{tuple(param.shape)} (per element), (T,) or (T, *{tuple(param.shape)}) (a "
                "schedule)"
            )
        if param is None and t.ndim > 1 and schedule:
            raise ValueError(
                f"{name}: hyperparameter {label!r} is schedule(...) of shape {tuple(t.shape)} "
                "outside a per-parameter mapping; it must be 1-D"
            )
        if self.steps is not None and t.shape[0] < self.steps:
            raise ValueError(
                f"{name}: hyperparameter {label!r}{where} is a schedule of length "
                f"{t.shape[0]} but {self.steps} steps are run; give at least {self.steps} values"
            )


def check_numbers(opt: Any, setting: str, value: Any) -> None:
    """Range checks of the Python numbers of one raw value of ``opt`` (at construction)."""
    if setting in opt.pairs:
        if not (isinstance(value, (tuple, list)) and len(value) == 2):
            raise TypeError(
                f"{opt.name}: hyperparameter {setting!r} must be a pair, got "
                f"{type(value).__name__}"
                + (
                    " (give a mapping per entry, not a mapping of pairs)"
                    if isinstance(value, Mapping)
                    else ""
                )
            )
        for i, v in enumerate(value):
            label = f"{setting}[{i}]"
            for where, x in numbers_in(v):
                check_number(opt.name, label, x, opt.ranges.get(label), where)
        return
    for where, x in numbers_in(value):
        check_number(opt.name, setting, x, opt.ranges.get(setting), where)


def check_given_twice(opt: Any, hparams: Mapping[str, Any]) -> None:
    """Raise when a setting is given both to ``opt``'s constructor and in ``hparams``."""
    for setting, value in opt.settings.items():
        if value is not None and hparams.get(setting) is not None:
            raise ValueError(
                f"{opt.name}: setting {setting!r} is given both to the constructor "
                f"({value!r}) and in hparams; give it in one place (the constructor's "
                "value would win silently)"
            )

"""List kernels shared by the optimizers: one per-tensor loop, one over ``torch._foreach_*``.

Every function takes lists of tensors (one per parameter tensor) and resolved
hyperparameters ``h``: a number or a 0-d tensor shared by all tensors, or a list
with one value (number or tensor) per tensor. All are out of place and
differentiable (reverse, double backward and forward mode); the loop versions also
work under ``torch.func.vmap``, which the foreach kernels do not support.
"""

from __future__ import annotations

from numbers import Number
from typing import Any

import torch
from torch import Tensor

TensorList = list[Tensor]


def _tiny(dtype: torch.dtype) -> float:
    # sqrt has an infinite derivative at 0; clamping to a value far below any eps keeps the
    # forward value (sqrt(tiny) + eps == eps) and gives a zero derivative where v == 0.
    # float16's smallest normal (6e-5) is too large for that, so take its smallest subnormal.
    if dtype == torch.float16:
        return 2.0**-24
    return torch.finfo(dtype).tiny


_TINY = {d: _tiny(d) for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def _at(h: Any, i: int) -> Any:
    return h[i] if type(h) is list else h


def _is_number(h: Any) -> bool:
    t = type(h)
    if t is float or t is int:  # the common case, without an ABC check
        return True
    if t is bool or t is list or isinstance(h, Tensor):
        return False
    return isinstance(h, Number)


class Loop:
    """Per-tensor kernels (any transform, any mix of hyperparameter kinds)."""

    name = "loop"

    @staticmethod
    def neg(xs: TensorList) -> TensorList:
        return [-x for x in xs]

    @staticmethod
    def sub(xs: TensorList, ys: TensorList) -> TensorList:
        return [x - y for x, y in zip(xs, ys)]

    @staticmethod
    def add(xs: TensorList, h: Any) -> TensorList:
        """``x + h``."""
        return [x + _at(h, i) for i, x in enumerate(xs)]

    @staticmethod
    def mul(xs: TensorList, h: Any) -> TensorList:
        """``x * h``."""
        return [x * _at(h, i) for i, x in enumerate(xs)]

    @staticmethod
    def div(xs: TensorList, h: Any) -> TensorList:
        """``x / h``."""
        return [x / _at(h, i) for i, x in enumerate(xs)]

    @staticmethod
    def axpy(xs: TensorList, ys: TensorList, h: Any, sign: int = 1) -> TensorList:
        """``x + sign * h * y``."""
        out = []
        for i, (x, y) in enumerate(zip(xs, ys)):
            a = _at(h, i)
            if isinstance(a, Tensor):
                out.append(torch.addcmul(x, a, y, value=sign))
            else:
                out.append(torch.add(x, y, alpha=sign * a))
        return out

    @staticmethod
    def addcmul(
        xs: TensorList, ys: TensorList, zs: TensorList, h: Any, sign: int = 1
    ) -> TensorList:
        """``x + sign * h * y * z``."""
        out = []
        for i, (x, y, z) in enumerate(zip(xs, ys, zs)):
            a = _at(h, i)
            if isinstance(a, Tensor):
                out.append(torch.addcmul(x, y * a, z, value=sign))
            else:
                out.append(torch.addcmul(x, y, z, value=sign * a))
        return out

    @staticmethod
    def addcdiv(
        xs: TensorList, ys: TensorList, zs: TensorList, h: Any, sign: int = 1
    ) -> TensorList:
        """``x + sign * h * y / z``."""
        out = []
        for i, (x, y, z) in enumerate(zip(xs, ys, zs)):
            a = _at(h, i)
            if isinstance(a, Tensor):
                out.append(torch.addcdiv(x, y * a, z, value=sign))
            else:
                out.append(torch.addcdiv(x, y, z, value=sign * a))
        return out

    @staticmethod
    def lerp(xs: TensorList, ys: TensorList, w: Any) -> TensorList:
        """``x + w * (y - x)``."""
        out = []
        for i, (x, y) in enumerate(zip(xs, ys)):
            a = _at(w, i)
            if isinstance(a, Tensor):
                out.append(torch.addcmul(x, a, y - x))
            else:
                out.append(torch.lerp(x, y, a))
        return out

    @staticmethod
    def sqrt(xs: TensorList) -> TensorList:
        """``sqrt(x)`` for ``x >= 0`` with a finite (zero) derivative at 0."""
        return [x.clamp_min(_TINY[x.dtype]).sqrt() for x in xs]

    @staticmethod
    def maximum(xs: TensorList, ys: TensorList) -> TensorList:
        return [torch.maximum(x, y) for x, y in zip(xs, ys)]

    @staticmethod
    def abs(xs: TensorList) -> TensorList:
        return [x.abs() for x in xs]

    @staticmethod
    def square(xs: TensorList) -> TensorList:
        return [x * x for x in xs]

    @staticmethod
    def dot(xs: TensorList, ys: TensorList) -> Tensor:
        """``sum_i <x_i, y_i>`` as a 0-d tensor."""
        return torch.stack([(x * y).sum() for x, y in zip(xs, ys)]).sum()


def _fe_arg(h: Any, n: int) -> Any:
    """A foreach 'other' argument for ``h``, or ``None`` when only the loop can take it."""
    if type(h) is list:
        if all(isinstance(a, Tensor) for a in h):
            return h
        if all(_is_number(a) for a in h):
            return h
        return None
    if isinstance(h, Tensor):
        # The foreach ``Tensor`` overloads cannot back-propagate into the scalar tensor;
        # the broadcasting list overloads can (and support forward mode).
        return [h] * n
    return h


class Foreach:
    """Kernels over ``torch._foreach_*`` (one dispatch for all tensors)."""

    name = "foreach"

    @staticmethod
    def neg(xs: TensorList) -> TensorList:
        return list(torch._foreach_neg(xs))

    @staticmethod
    def sub(xs: TensorList, ys: TensorList) -> TensorList:
        return list(torch._foreach_sub(xs, ys))

    @staticmethod
    def add(xs: TensorList, h: Any) -> TensorList:
        a = _fe_arg(h, len(xs))
        if a is None:
            return Loop.add(xs, h)
        return list(torch._foreach_add(xs, a))

    @staticmethod
    def mul(xs: TensorList, h: Any) -> TensorList:
        a = _fe_arg(h, len(xs))
        if a is None:
            return Loop.mul(xs, h)
        return list(torch._foreach_mul(xs, a))

    @staticmethod
    def div(xs: TensorList, h: Any) -> TensorList:
        a = _fe_arg(h, len(xs))
        if a is None:
            return Loop.div(xs, h)
        return list(torch._foreach_div(xs, a))

    @staticmethod
    def axpy(xs: TensorList, ys: TensorList, h: Any, sign: int = 1) -> TensorList:
        if _is_number(h):
            return list(torch._foreach_add(xs, ys, alpha=sign * h))
        a = _fe_arg(h, len(xs))
        if a is None:
            return Loop.axpy(xs, ys, h, sign)
        scaled = torch._foreach_mul(ys, a)
        if sign > 0:
            return list(torch._foreach_add(xs, scaled))
        return list(torch._foreach_sub(xs, scaled))

    @staticmethod
    def addcmul(
        xs: TensorList, ys: TensorList, zs: TensorList, h: Any, sign: int = 1
    ) -> TensorList:
        if _is_number(h):
            return list(torch._foreach_addcmul(xs, ys, zs, value=sign * h))
        a = _fe_arg(h, len(xs))
        if a is None:
            return Loop.addcmul(xs, ys, zs, h, sign)
        return list(torch._foreach_addcmul(xs, torch._foreach_mul(ys, a), zs, value=sign))

    @staticmethod
    def addcdiv(
        xs: TensorList, ys: TensorList, zs: TensorList, h: Any, sign: int = 1
    ) -> TensorList:
        # Not torch._foreach_addcdiv: its backward fails (IndexError in
        # ForeachAddcdivBackward0Scalar, torch 2.13) when back-propagating through
        # several chained steps whose inputs depend on earlier outputs.
        return Foreach.axpy(xs, list(torch._foreach_div(ys, zs)), h, sign)

    @staticmethod
    def lerp(xs: TensorList, ys: TensorList, w: Any) -> TensorList:
        if _is_number(w):
            return list(torch._foreach_lerp(xs, ys, w))
        return Foreach.axpy(xs, Foreach.sub(ys, xs), w)

    @staticmethod
    def sqrt(xs: TensorList) -> TensorList:
        return list(torch._foreach_sqrt(torch._foreach_clamp_min(xs, _TINY[xs[0].dtype])))

    @staticmethod
    def maximum(xs: TensorList, ys: TensorList) -> TensorList:
        return list(torch._foreach_maximum(xs, ys))

    @staticmethod
    def abs(xs: TensorList) -> TensorList:
        return list(torch._foreach_abs(xs))

    @staticmethod
    def square(xs: TensorList) -> TensorList:
        return list(torch._foreach_mul(xs, xs))

    @staticmethod
    def dot(xs: TensorList, ys: TensorList) -> Tensor:
        return Loop.dot(xs, ys)


class ExactLoop(Loop):
    """The per-tensor kernels with a plain ``sqrt``: for steps nothing differentiates, so
    they round exactly as ``torch.optim``'s for-loop implementations."""

    name = "exact-loop"

    @staticmethod
    def sqrt(xs: TensorList) -> TensorList:
        return [x.sqrt() for x in xs]


def sqrt(x: Tensor, exact: bool) -> Tensor:
    """One tensor's ``sqrt``: plain when ``exact``, else with a finite derivative at 0."""
    return x.sqrt() if exact else x.clamp_min(_TINY[x.dtype]).sqrt()


def scalar_dtype() -> torch.dtype:
    # torch.optim keeps some per-parameter scalars (ASGD's eta and mu, NAdam's mu_product)
    # in tensors of this dtype, so they are rounded to float32 unless the default dtype is
    # float64; mirroring that keeps the Python-number path bitwise equal to torch.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def as_scalar(x: float) -> float:
    """``x`` rounded as ``torch.optim`` stores it in a scalar state tensor (CPU, no sync)."""
    return torch.tensor(x, dtype=scalar_dtype()).item()


def as_scalar_product(x: float, y: float) -> float:
    """``x * y`` as torch computes ``scalar_tensor(x) *= y`` (NAdam's ``mu_product``)."""
    return (torch.tensor(x, dtype=scalar_dtype()) * y).item()


LOOP = Loop()
EXACT_LOOP = ExactLoop()
FOREACH = Foreach()

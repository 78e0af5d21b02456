"""SGD with momentum in exact fixed-point arithmetic, one step forward and its exact inverse.

Weights and velocities are int64 tensors holding ``value · 2**radix_bits``. One step at
the weights ``w`` (``g`` the float gradient at them after ``maximize`` and weight decay,
torch's order of operations; ``n/d`` the momentum)::

    v = (v div d)·n + pop(n), after push(v mod d, d)      exact v·n/d (bits back)
    v = v + q((1 - dampening)·g)                          q: round to the fixed-point grid
    w = w - q(lr · v)

As :class:`torch.optim.SGD`, a parameter's first update sets ``v = q(g)``, and a parameter
without a gradient at a step (unused by the loss) is left as it is. :func:`reverse_step`
undoes the three lines in the opposite order: it adds ``q(lr · v)`` back (the same float
number from the same ``v``), recomputes ``g`` at the weights so recovered, subtracts
``q(...)`` and divides by the momentum with the mirror image ``(v div n)·d + pop(d)``
after ``push(v mod n, n)``. Nothing is approximate: the trajectory is retraced bit for bit
as long as the inner loss and the data give the same gradient at the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from bilevel.optim.base import HParams, Optimizer
from bilevel.unroll.bitbuffer import BitBuffer

# |value| < 2**62 after scaling: a sum of two such values still fits in int64
_INT_BITS = 62


@dataclass(frozen=True)
class FixedPoint:
    """The grid ``k · 2**-radix_bits`` for int64 ``k``, values below ``2**(62 - radix_bits)``.

    Example:
        >>> fp = FixedPoint(4)
        >>> fp.to_int(torch.tensor([0.3, -1.0])).tolist()
        [5, -16]
        >>> fp.to_float(torch.tensor([5]), torch.float64).tolist()
        [0.3125]
    """

    radix_bits: int

    @property
    def limit(self) -> float:
        """The largest magnitude the grid holds (exclusive)."""
        return 2.0 ** (_INT_BITS - self.radix_bits)

    def to_int(self, x: Tensor) -> Tensor:
        """Round float ``x`` to the grid (values out of range are caught by :meth:`bad`)."""
        scaled = x.double() * 2.0**self.radix_bits  # a power of two: exact
        return scaled.round().clamp(-(2.0**_INT_BITS), 2.0**_INT_BITS).to(torch.int64)

    def to_float(self, k: Tensor, dtype: torch.dtype) -> Tensor:
        """The value of grid points ``k`` in ``dtype``."""
        return (k.double() * 2.0**-self.radix_bits).to(dtype)

    def bad(self, x: Tensor) -> Tensor:
        """Whether any element of float ``x`` is out of range or not finite (0-d bool)."""
        return ~(x.double().abs() < self.limit).all()


@dataclass(frozen=True)
class QuantisedSGD:
    """What a fixed-point step computes with: the SGD settings (read with the optimizer's
    own resolution: numbers, tensors, schedules, mappings), the momentum ``n/d``, the grid
    and the gradient of the inner loss at float weights."""

    optimizer: Optimizer
    hparams: HParams
    momentum: Fraction
    grid: FixedPoint
    # gradient(weights, batch, step) -> (loss, {name: gradient or None}), weights in the
    # params' dtypes
    gradient: Callable[[dict[str, Tensor], Any, int], tuple[Tensor, dict[str, Tensor | None]]]
    dtypes: Mapping[str, torch.dtype]

    def setting(self, name: str, index: int, param: str, like: Tensor) -> Any:
        value = self.optimizer.hparam(name, self.hparams, index, param, like)
        return value.detach().double() if isinstance(value, Tensor) else float(value)

    def increment(self, name: str, g: Tensor, w: Tensor, index: int, first: bool) -> Tensor:
        """The float term added to the velocity: ``(1 - dampening)·g`` (``g`` at the first
        update), ``g`` with ``maximize`` and weight decay applied, in float64."""
        g = g.double()
        if self.optimizer.flag("maximize", self.hparams):
            g = -g
        if self.optimizer.is_active("weight_decay", self.hparams):
            g = g + self.setting("weight_decay", index, name, w) * w.double()
        if first:
            return g
        return (1 - self.setting("dampening", index, name, w)) * g

    def floats(self, w_int: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: self.grid.to_float(v, self.dtypes[k]) for k, v in w_int.items()}


@dataclass
class Trajectory:
    """The fixed-point weights and velocities, each parameter's update count, one bit
    buffer per parameter, and a device flag raised by a value off the grid's range."""

    w: dict[str, Tensor]
    v: dict[str, Tensor]
    counts: dict[str, int]
    buffers: dict[str, BitBuffer]
    bad: Tensor
    first_bad: Tensor


def _flag(traj: Trajectory, bad: Tensor, step: int) -> None:
    traj.first_bad = torch.where(bad & ~traj.bad, step, traj.first_bad)
    traj.bad = traj.bad | bad


def _multiply(v: Tensor, buffer: BitBuffer, n: int, d: int) -> Tensor:
    """``v · n/d`` exactly: the remainder of the division is pushed, the low digits of the
    product popped (a mirror image with ``n`` and ``d`` swapped divides)."""
    flat = v.reshape(-1)
    buffer.push(torch.remainder(flat, d), d)
    product = torch.div(flat, d, rounding_mode="floor") * n + buffer.pop(n)
    return product.reshape(v.shape)


def forward_step(
    sgd: QuantisedSGD, traj: Trajectory, batch: Any, index: int, step: int
) -> tuple[Tensor, list[str]]:
    """One step in place on ``traj`` (``index`` indexes schedules); the loss and the names
    of the parameters updated."""
    weights = sgd.floats(traj.w)
    loss, grads = sgd.gradient(weights, batch, step)
    n, d = sgd.momentum.numerator, sgd.momentum.denominator
    used = [k for k, g in grads.items() if g is not None]
    for k in used:
        g = grads[k]
        assert g is not None
        first = traj.counts[k] == 0
        u = sgd.increment(k, g, weights[k], index, first)
        v = traj.v[k]
        v = (
            sgd.grid.to_int(u)
            if first
            else _multiply(v, traj.buffers[k], n, d) + sgd.grid.to_int(u)
        )
        dw = sgd.setting("lr", index, k, weights[k]) * sgd.grid.to_float(v, torch.float64)
        _flag(traj, sgd.grid.bad(u) | sgd.grid.bad(dw) | (v.abs() >= 2**_INT_BITS).any(), step)
        w = traj.w[k] - sgd.grid.to_int(dw)
        _flag(traj, (w.abs() >= 2**_INT_BITS).any(), step)
        traj.v[k], traj.w[k] = v, w
        traj.counts[k] += 1
    return loss, used


def undo_weights(sgd: QuantisedSGD, traj: Trajectory, index: int, used: list[str]) -> None:
    """The first half of :func:`reverse_step`: the weights before the step."""
    for k in used:
        traj.counts[k] -= 1
        like = traj.w[k]
        dw = sgd.setting("lr", index, k, like) * sgd.grid.to_float(traj.v[k], torch.float64)
        traj.w[k] = traj.w[k] + sgd.grid.to_int(dw)


def undo_velocities(
    sgd: QuantisedSGD,
    traj: Trajectory,
    index: int,
    used: list[str],
    weights: Mapping[str, Tensor],
    grads: Mapping[str, Tensor | None],
) -> None:
    """The second half: the velocities before the step, from the gradient at the weights
    before it (recomputed by the caller, who also differentiates through it)."""
    n, d = sgd.momentum.numerator, sgd.momentum.denominator
    for k in used:
        g = grads[k]
        if g is None:
            raise RuntimeError(
                f"mode='reversible': parameter {k!r} had a gradient at this step in the "
                "forward pass but none when the step was recomputed: the inner loss is not "
                "deterministic"
            )
        first = traj.counts[k] == 0
        v = traj.v[k] - sgd.grid.to_int(
            sgd.increment(k, g.detach(), weights[k].detach(), index, first)
        )
        # a first update replaced the velocity (torch's semantics): v is zero here, which
        # the end-of-backward check confirms
        traj.v[k] = v if first else _multiply(v, traj.buffers[k], d, n)


def reverse_step(
    sgd: QuantisedSGD, traj: Trajectory, batch: Any, index: int, step: int, used: list[str]
) -> None:
    """Undo :func:`forward_step` in place (without differentiating; see
    :mod:`bilevel.unroll.reversible` for the differentiated form)."""
    undo_weights(sgd, traj, index, used)
    weights = sgd.floats(traj.w)
    _, grads = sgd.gradient(weights, batch, step)
    undo_velocities(sgd, traj, index, used, weights, grads)

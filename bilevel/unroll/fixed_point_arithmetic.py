"""SGD with momentum in exact fixed-point arithmetic, one step forward and its exact inverse.

Weights and velocities are int64 vectors (all parameters end to end) holding
``value · 2**radix_bits``. One step at the weights ``w`` (``g`` the float gradient at them
after ``maximize`` and weight decay, torch's order of operations; ``n/d`` the momentum)::

    v = (v div d)·n + pop(n), after push(v mod d, d)      exact v·n/d (bits back)
    v = v + q((1 - dampening)·g)                          q: round to the fixed-point grid
    w = w - q(lr · v)

As :class:`torch.optim.SGD`, a parameter's first update sets ``v = q(g)``, and a parameter
without a gradient at a step (unused by the loss) is left as it is. The inverse undoes the
three lines in the opposite order: it adds ``q(lr · v)`` back (the same float number from
the same ``v``), recomputes ``g`` at the weights so recovered, subtracts ``q(...)`` and
divides by the momentum with the mirror image ``(v div n)·d + pop(d)`` after
``push(v mod n, n)``. Nothing is approximate: the trajectory is retraced bit for bit as
long as the inner loss and the data give the same gradient at the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from bilevel.optim.base import HParams, Optimizer
from bilevel.unroll.bitbuffer import BitBuffer

# |value| < 2**62 after scaling: a sum of two such values still fits in int64
_INT_BITS = 62
_LIMIT = 2**_INT_BITS


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

    def to_int(self, x: Tensor) -> Tensor:
        """Round float ``x`` to the grid; values out of range or not finite become
        ``±2**62``, which :func:`out_of_range` reports."""
        scaled = x.double() * 2.0**self.radix_bits  # a power of two: exact
        scaled = scaled.nan_to_num(nan=float(_LIMIT)).clamp(-float(_LIMIT), float(_LIMIT))
        return scaled.round().to(torch.int64)

    def to_float(self, k: Tensor, dtype: torch.dtype) -> Tensor:
        """The value of grid points ``k`` in ``dtype``."""
        return (k.double() * 2.0**-self.radix_bits).to(dtype)


def out_of_range(*ks: Tensor) -> Tensor:
    """Whether any grid point reached ``±2**62`` (0-d bool): a value the grid cannot hold."""
    return torch.stack([k.abs().max() for k in ks]).max() >= _LIMIT


@dataclass(frozen=True)
class Layout:
    """Where each parameter lies in the flat vectors."""

    names: list[str]
    shapes: list[torch.Size]
    dtypes: list[torch.dtype]
    device: torch.device
    # storage-free stand-ins of the parameters, for resolving per-element settings
    likes: list[Tensor]
    masks: dict[Any, Tensor] = field(default_factory=dict, compare=False)

    @staticmethod
    def of(params: Mapping[str, Tensor]) -> Layout:
        ref = next(iter(params.values()))
        return Layout(
            list(params),
            [p.shape for p in params.values()],
            [p.dtype for p in params.values()],
            ref.device,
            [torch.empty(p.shape, dtype=p.dtype, device="meta") for p in params.values()],
        )

    @property
    def sizes(self) -> list[int]:
        return [s.numel() for s in self.shapes]

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """Per-parameter tensors in their dtypes (copies, never views of ``flat``)."""
        parts = flat.split(self.sizes)
        return {
            k: x.reshape(s).to(dt, copy=True)
            for k, x, s, dt in zip(self.names, parts, self.shapes, self.dtypes)
        }

    def join(self, tensors: Mapping[str, Tensor | None], dtype: torch.dtype) -> Tensor:
        """One flat vector; zeros for a missing (``None``) tensor."""
        return torch.cat(
            [
                torch.zeros(s.numel(), dtype=dtype, device=self.device)
                if tensors.get(k) is None
                else tensors[k].reshape(-1).to(dtype)  # type: ignore[union-attr]
                for k, s in zip(self.names, self.shapes)
            ]
        )

    def mask(self, names: frozenset[str]) -> Tensor | None:
        """The elements of ``names`` (None: all of them)."""
        if names.issuperset(self.names):
            return None
        if names not in self.masks:
            parts = [
                torch.full((n,), k in names, device=self.device)
                for k, n in zip(self.names, self.sizes)
            ]
            self.masks[names] = torch.cat(parts)
        return self.masks[names]


@dataclass(frozen=True)
class QuantisedSGD:
    """What a fixed-point step computes with: the SGD settings (read with the optimizer's
    own resolution: numbers, tensors, schedules, mappings), the momentum ``n/d``, the grid,
    the parameters' layout and the gradient of the inner loss at float weights."""

    optimizer: Optimizer
    hparams: HParams
    momentum: Fraction
    grid: FixedPoint
    # gradient(weights, batch, step) -> (loss, {name: gradient or None}), weights in the
    # params' dtypes
    gradient: Callable[[dict[str, Tensor], Any, int], tuple[Tensor, dict[str, Tensor | None]]]
    layout: Layout

    def setting(self, name: str, index: int) -> Any:
        """A setting at step ``index``: a float or a 0-d float64 tensor, or a flat float64
        vector when it is given per parameter or per element."""
        layout = self.layout
        value = self.optimizer.resolve(name, self.hparams, index, layout.names, layout.likes)
        if not isinstance(value, list):
            return value.detach().double() if isinstance(value, Tensor) else float(value)
        parts = [
            x.detach().to(layout.device, torch.float64).expand(shape).reshape(-1)
            if isinstance(x, Tensor)
            # a fill, not a copy from the host
            else torch.full((shape.numel(),), float(x), dtype=torch.float64, device=layout.device)
            for x, shape in zip(value, layout.shapes)
        ]
        return torch.cat(parts)

    def floats(self, k: Tensor) -> dict[str, Tensor]:
        """Per-parameter float tensors of the flat grid points ``k``."""
        return self.layout.split(self.grid.to_float(k, torch.float64))

    def increment(
        self,
        grads: Mapping[str, Tensor | None],
        weights: dict[str, Tensor],
        index: int,
        first: Tensor | None,
        any_first: bool,
    ) -> Tensor:
        """The float term added to the velocities: ``(1 - dampening)·g``, ``g`` itself at a
        first update (elements in ``first``), with ``maximize`` and weight decay applied."""
        g = self.layout.join(grads, torch.float64)
        opt, hp = self.optimizer, self.hparams
        if opt.flag("maximize", hp):
            g = -g
        if opt.is_active("weight_decay", hp):
            w = self.layout.join(weights, torch.float64)
            g = g + self.setting("weight_decay", index) * w
        if not opt.is_active("dampening", hp):
            return g
        damped = (1 - self.setting("dampening", index)) * g
        if not any_first:
            return damped
        return g if first is None else torch.where(first, g, damped)


@dataclass
class Trajectory:
    """The flat fixed-point weights and velocities, each parameter's update count, the bit
    buffer, and a device flag per step raised by a value off the grid's range."""

    w: Tensor
    v: Tensor
    counts: dict[str, int]
    buffer: BitBuffer
    flags: list[Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class _Masks:
    """Which elements a step updates, and which of them it updates for the first time."""

    used: list[str]
    updated: Tensor | None  # None: every element
    first: Tensor | None
    any_first: bool
    any_later: bool
    later: Tensor | None  # updated and not first


def _masks(sgd: QuantisedSGD, traj: Trajectory, used: list[str]) -> _Masks:
    layout = sgd.layout
    first_names = frozenset(k for k in used if traj.counts[k] == 0)
    later_names = frozenset(used) - first_names
    return _Masks(
        used,
        layout.mask(frozenset(used)),
        layout.mask(first_names) if first_names else None,
        bool(first_names),
        bool(later_names),
        layout.mask(later_names) if later_names else None,
    )


def _multiply(v: Tensor, buffer: BitBuffer, n: int, d: int, where: Tensor | None) -> Tensor:
    """``v · n/d`` exactly where ``where`` is set (everywhere if None): the remainder of the
    division is pushed, the low digits of the product popped (the mirror image, ``n`` and
    ``d`` swapped, divides)."""
    buffer.push(torch.remainder(v, d), d, where)
    product = torch.div(v, d, rounding_mode="floor") * n + buffer.pop(n, where)
    return product if where is None else torch.where(where, product, v)


def _only(where: Tensor | None, x: Tensor) -> Tensor:
    return x if where is None else torch.where(where, x, torch.zeros_like(x))


def forward_step(
    sgd: QuantisedSGD, traj: Trajectory, batch: Any, index: int, step: int
) -> tuple[Tensor, list[str]]:
    """One step in place on ``traj`` (``index`` indexes schedules); the loss and the names
    of the parameters updated."""
    weights = sgd.floats(traj.w)
    loss, grads = sgd.gradient(weights, batch, step)
    used = [k for k, g in grads.items() if g is not None]
    if not used:
        return loss, used
    m = _masks(sgd, traj, used)
    u = sgd.grid.to_int(sgd.increment(grads, weights, index, m.first, m.any_first))
    v = traj.v
    if m.any_later:
        ratio = sgd.momentum
        v = _multiply(v, traj.buffer, ratio.numerator, ratio.denominator, m.later)
    v = v + _only(m.updated, u)
    if m.any_first:  # a first update replaces the velocity (torch's semantics)
        v = u if m.first is None else torch.where(m.first, u, v)
    step_size = sgd.setting("lr", index) * sgd.grid.to_float(v, torch.float64)
    dw = _only(m.updated, sgd.grid.to_int(step_size))
    traj.v, traj.w = v, traj.w - dw
    traj.flags.append(out_of_range(u, dw, traj.v, traj.w))
    for k in used:
        traj.counts[k] += 1
    return loss, used


def undo_weights(sgd: QuantisedSGD, traj: Trajectory, index: int, used: list[str]) -> None:
    """The first half of the inverse of :func:`forward_step`: the weights before the step
    (the backward pass then recomputes the gradient there and calls
    :func:`undo_velocities`)."""
    if not used:
        return
    for k in used:
        traj.counts[k] -= 1
    dw = sgd.grid.to_int(sgd.setting("lr", index) * sgd.grid.to_float(traj.v, torch.float64))
    traj.w = traj.w + _only(sgd.layout.mask(frozenset(used)), dw)


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
    if not used:
        return
    missing = [k for k in used if grads.get(k) is None]
    if missing:
        raise RuntimeError(
            f"mode='reversible': parameters {missing} had a gradient at this step in the "
            "forward pass but none when the step was recomputed: the inner loss is not "
            "deterministic"
        )
    m = _masks(sgd, traj, used)
    plain = {k: None if g is None else g.detach() for k, g in grads.items()}
    w = {k: x.detach() for k, x in weights.items()}
    u = sgd.grid.to_int(sgd.increment(plain, w, index, m.first, m.any_first))
    v = traj.v - _only(m.updated, u)
    # elements updated for the first time: v is zero now (the end-of-backward check
    # confirms it); the others are divided by the momentum
    if m.any_later:
        ratio = sgd.momentum
        v = _multiply(v, traj.buffer, ratio.denominator, ratio.numerator, m.later)
    traj.v = v

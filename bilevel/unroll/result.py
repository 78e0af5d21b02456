"""What :func:`bilevel.unroll` returns, and the error it raises on a non-finite inner loss."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from torch import Tensor

from bilevel.optim.base import Params, State


@dataclass
class UnrollResult:
    """What :func:`bilevel.unroll` returns.

    Attributes:
        params: the final parameters, differentiable w.r.t. the hyperparameters under the mode.
        state: the final optimizer state (differentiable in the reverse-type modes; detached
            in ``"forward"`` mode).
        losses: the inner loss at each step, detached, shape ``(steps,)``, on the params' device.
        buffers: the final buffers (e.g. BatchNorm running statistics) when ``buffers`` was
            given, else ``None``; the caller's buffers are never written to.
        auto: with ``mode="auto"``, the :class:`~bilevel.unroll.auto.AutoChoice` (the mode
            run and the memory estimates behind it); else ``None``.
        reversible: with ``mode="reversible"``, the :class:`ReversibleReport` (what the bit
            buffer holds); else ``None``.

    Example:
        >>> import torch
        >>> r = UnrollResult({"w": torch.zeros(2)}, {}, torch.zeros(3))
        >>> r.buffers is None and r.losses.shape == (3,)
        True
    """

    params: Params
    state: State
    losses: Tensor
    buffers: dict[str, Tensor] | None = None
    auto: Any = None
    reversible: ReversibleReport | None = None


@dataclass(frozen=True)
class ReversibleReport:
    """What a ``mode="reversible"`` unroll stored (``UnrollResult.reversible``).

    Attributes:
        momentum: the ratio of integers ``n/d`` the velocities were multiplied by.
        radix_bits: the fixed-point grid is ``2**-radix_bits``.
        weights: the number of parameter elements P.
        steps: the number of inner steps T.
        bits_per_weight_step: the information the buffer holds beyond its initial state,
            divided by P·T: about ``log2(1/momentum)`` (a parameter's first update stores
            nothing, so (T-1)/T of it from a fresh state).
        expected_bits_per_weight_step: ``log2(d/n)``.
        buffer_bytes: the bytes the buffer allocates: a fixed ``overhead_bits_per_weight``
            (an 8-byte state and a 4-byte height per weight) plus its spill table.
        saved_bytes: all the backward pass keeps besides its inputs: the buffer, the final
            fixed-point weights and velocities (16 bytes per weight) and the batches of
            ``data`` given as an iterator.
        overhead_bits_per_weight: the buffer's fixed cost per weight, whatever T.

    Example:
        >>> r = ReversibleReport(Fraction(9, 10), 44, 100, 10, 0.15, 0.152, 1600, 3200)
        >>> round(r.storage_bits_per_weight_step, 2)
        12.8
    """

    momentum: Fraction
    radix_bits: int
    weights: int
    steps: int
    bits_per_weight_step: float
    expected_bits_per_weight_step: float
    buffer_bytes: int
    saved_bytes: int
    overhead_bits_per_weight: int = 96

    @property
    def storage_bits_per_weight_step(self) -> float:
        """``buffer_bytes`` in bits per weight per step (the fixed overhead included)."""
        return 8 * self.buffer_bytes / (self.weights * self.steps)


class NonFiniteLossError(FloatingPointError):
    """The inner loss became NaN or Inf."""

"""What :func:`bilevel.unroll` returns, and the error it raises on a non-finite inner loss."""

from __future__ import annotations

from dataclasses import dataclass
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


class NonFiniteLossError(FloatingPointError):
    """The inner loss became NaN or Inf."""

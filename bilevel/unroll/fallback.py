"""Forward mode without forward-mode AD: a step's tangents from reverse mode alone.

Used by :mod:`bilevel.unroll.forward` when an op of the inner loss has no (or a broken)
forward-mode formula (``huber_loss``; ``mse_loss``'s raises "ZeroTensors are immutable"):
the unroll warns once and computes the remaining steps' Jacobian-vector products as the
vjp of the step's vjp (:func:`bilevel.forward_ad.linearize_by_double_vjp`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bilevel.forward_ad import linearize_by_double_vjp, warn_fallback
from bilevel.optim.base import Params


class Fallback:
    """Whether this unroll computes its tangents from reverse mode (after forward-mode AD
    failed on an op once): switched, with one warning, at most once per call."""

    def __init__(self) -> None:
        self.on = False

    def switch(self, err: BaseException) -> None:
        self.on = True
        warn_fallback("unroll(mode='forward')", err, stacklevel=6)


def reverse_mode_step(
    step_fn: Any, primals: tuple[Any, ...], tangents: tuple[Params, list[Tensor], list[Tensor]]
) -> tuple[Any, Any, Any]:
    """One step and its tangents (leading direction axis) from reverse mode alone. One graph
    per step, freed before the next: memory stays flat in T."""
    out, jvp, aux = linearize_by_double_vjp(step_fn, primals, has_aux=True)
    float_buf = primals[3]
    p_tan, s_tan, hyper_tangents = tangents

    def one(pt: Params, st: list[Tensor], ht: list[Tensor]) -> Any:
        return jvp(pt, st, ht, {k: torch.zeros_like(v) for k, v in float_buf.items()})

    out_t = torch.func.vmap(one)(p_tan, s_tan, hyper_tangents)
    return out, out_t, aux

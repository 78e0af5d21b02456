"""A compiled loop's carried state as two flat buffers instead of a tuple of tensors.

``torch.while_loop`` under inductor's C++ wrapper allocates every carried output and wraps
every carried input in a new tensor handle at each pass: with the L-BFGS loop's 31 state
tensors that bookkeeping (about 70 allocations and as many handles a pass) cost more than
the pass's arithmetic at a few unknowns. Here the state travels as one buffer of the
problem's floating dtype and one of ``int64`` (counters, codes and flags; a flag is stored as
0 or 1): the body takes views of them (offsets in the generated kernel, no copies) and
writes its new state by one ``torch.cat`` per buffer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class _Slot:
    shape: tuple[int, ...]
    dtype: torch.dtype  # the field's own dtype (bool, long, or the float buffer's)
    start: int  # offset in its buffer
    size: int


@dataclasses.dataclass(frozen=True)
class _Packing:
    """Where each field of a state tuple lives in the float and the integer buffer."""

    slots: tuple[_Slot, ...]
    float_dtype: torch.dtype

    @staticmethod
    def of(state: Sequence[Tensor], float_dtype: torch.dtype) -> _Packing:
        """The packing of ``state``'s fields (each of ``float_dtype``, bool or long)."""
        slots, ends = [], {True: 0, False: 0}
        for t in state:
            floating = t.dtype.is_floating_point
            if floating and t.dtype != float_dtype or not floating and t.dtype not in _INTS:
                raise TypeError(f"state of dtype {t.dtype} in a {float_dtype} loop")
            size = math.prod(t.shape)
            slots.append(_Slot(tuple(t.shape), t.dtype, ends[floating], size))
            ends[floating] += size
        return _Packing(tuple(slots), float_dtype)

    def pack(self, state: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """``(floats, ints)``: the fields flattened into the two buffers."""
        floats = [t.reshape(-1) for t, s in zip(state, self.slots) if s.dtype.is_floating_point]
        ints = [
            t.reshape(-1).to(torch.long)
            for t, s in zip(state, self.slots)
            if not s.dtype.is_floating_point
        ]
        return _cat(floats, self.float_dtype, state[0]), _cat(ints, torch.long, state[0])

    def unpack(self, floats: Tensor, ints: Tensor) -> tuple[Tensor, ...]:
        """The fields again, as views of the buffers (a flag: ``ints != 0``)."""
        out = []
        for s in self.slots:
            if s.dtype.is_floating_point:
                out.append(floats[s.start : s.start + s.size].reshape(s.shape))
                continue
            field = ints[s.start : s.start + s.size].reshape(s.shape)
            out.append(field != 0 if s.dtype == torch.bool else field)
        return tuple(out)


_INTS = (torch.bool, torch.long)


def _cat(parts: list[Tensor], dtype: torch.dtype, like: Tensor) -> Tensor:
    # one element at least: an empty carried tensor is refused by some torch versions
    if not parts:
        return torch.zeros(1, dtype=dtype, device=like.device)
    return torch.cat(parts)

"""An exact, compact store of small integers, one stack per tensor element (rANS-style).

Reversible learning (Maclaurin, Duvenaud and Adams 2015) multiplies the velocity by a
momentum ``n/d`` in integer arithmetic and must keep the remainders the division throws
away. :class:`BitBuffer` keeps them at their information content, ``log2(M)`` bits for a
value in ``[0, M)``, with no per-value rounding up to whole bits:

* each element has a state ``x`` in ``[L, 2**32 · L)`` (int64); ``push(s, M)`` is
  ``x = x·M + s`` and ``pop(M)`` is ``s = x mod M, x = x div M`` (a uniform rANS code,
  the big-integer ``BitStore`` of the paper made finite);
* before a push that would leave the interval, the low 32 bits of ``x`` go to the
  element's spill stack (a dense ``(capacity, numel)`` int32 table and a height per
  element); after a pop that falls under ``L`` they come back. ``L`` is a multiple of every
  modulus, so the two decisions mirror each other exactly (Duda's b-uniqueness) and any
  sequence of pushes and pops is undone by its mirror image;
* popping a value one did not push ("bits back") draws it from the information already
  stored: ``x·n/d`` as ``(x div d)·n + pop(n)`` after ``push(x mod d, d)`` costs
  ``log2(d) - log2(n) = log2(1/momentum)`` bits, not ``log2(d)``.

Everything is elementwise int64 work on the tensors' device, with no host synchronisation.
The fixed cost is the 8-byte state and the 4-byte height of each element (96 bits),
plus fewer than 32 bits of the state not yet spilled.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

WORD_BITS = 32
_WORD = 1 << WORD_BITS
_HALF = 1 << (WORD_BITS - 1)
# the largest L: x < 2**32 · L must fit in int64 (2**32 · L itself too, as a bound)
_L_MAX = (1 << 31) - 1
# bits a state holds in [L, 2**32 · L) beyond log2(L): what the fixed cost leaves unspilled
OVERHEAD_BITS = 64 + 32


def lower_bound(moduli: tuple[int, ...]) -> int:
    """The interval's lower end L: the largest multiple of every modulus below 2**31.

    Example:
        >>> lower_bound((9, 10)) % 90, lower_bound((9, 10)) < 2**31
        (0, True)
    """
    if not moduli or any(not isinstance(m, int) or m < 1 or m > _WORD for m in moduli):
        raise ValueError(f"moduli must be ints in [1, 2**32], got {moduli!r}")
    lcm = math.lcm(*moduli)
    if lcm > _L_MAX:
        raise ValueError(
            f"the moduli {moduli} have a least common multiple {lcm} of 2**31 or more: use a "
            "momentum with a smaller denominator"
        )
    return lcm * (_L_MAX // lcm)


class BitBuffer:
    """A LIFO store of integers ``0 <= s < M`` for each element of a tensor shape.

    ``moduli`` are every ``M`` that will be pushed or popped; ``max_bits`` bounds the bits
    the buffer will hold beyond its start (per element, at any time), which sizes the
    spill table: ``floor(max_bits / 32)`` words per element (a state holds the rest).

    Example:
        >>> buf = BitBuffer(3, moduli=(9, 10), max_bits=100, device="cpu")
        >>> buf.push(torch.tensor([1, 7, 9]), 10)
        >>> buf.pop(9).tolist()    # bits back: three values drawn from what is stored
        [1, 7, 0]
        >>> buf.push(torch.tensor([1, 7, 0]), 9)
        >>> buf.pop(10).tolist()   # the mirror image restores the pushed values
        [1, 7, 9]
        >>> buf.is_empty().item()
        True
    """

    def __init__(
        self, numel: int, moduli: tuple[int, ...], max_bits: float, device: torch.device | str
    ) -> None:
        self.low = lower_bound(moduli)
        self.moduli = tuple(moduli)
        self.numel = int(numel)
        self.state = torch.full((self.numel,), self.low, dtype=torch.int64, device=device)
        self.height = torch.zeros(self.numel, dtype=torch.int32, device=device)
        # the bits held are log2(x / L) >= 0 plus 32 per spilled word, and a spill loses
        # none, so an element never has more than floor(max_bits / 32) words spilled
        capacity = max(1, math.floor(max_bits / WORD_BITS))
        self.stack = torch.zeros((capacity, self.numel), dtype=torch.int32, device=device)
        # set (on the device) if a push found the spill table full, or a pop took more
        # than the buffer held
        self.overflowed = torch.zeros((), dtype=torch.bool, device=device)

    def push(self, values: Tensor, modulus: int, where: Tensor | None = None) -> None:
        """Store ``values`` (int64, each in ``[0, modulus)``), one per element (only
        where the bool mask ``where`` is set, when given)."""
        x = self.state
        spill = x >= (self.low // modulus) * _WORD
        if where is not None:
            spill = spill & where
        row = self.height.long()[None]
        self.overflowed = self.overflowed | (spill & (row[0] >= self.stack.shape[0])).any()
        row = row.clamp(max=self.stack.shape[0] - 1)
        word = ((x & (_WORD - 1)) - _HALF).to(torch.int32)  # the low 32 bits, signed
        # a slot a pop freed is written again: the mirror image of that pop rewrites it
        kept = self.stack.gather(0, row)[0]
        self.stack.scatter_(0, row, torch.where(spill, word, kept)[None])
        self.height = self.height + spill.to(torch.int32)
        x = torch.where(spill, x >> WORD_BITS, x)
        pushed = x * modulus + values
        self.state = pushed if where is None else torch.where(where, pushed, x)

    def pop(self, modulus: int, where: Tensor | None = None) -> Tensor:
        """The last values pushed with this modulus (or, bits back, values drawn from the
        store: each is uniquely undone by pushing it back); only where ``where`` is set,
        when given (elsewhere the values returned mean nothing)."""
        x = self.state
        values = torch.remainder(x, modulus)
        y = torch.div(x, modulus, rounding_mode="floor")
        refill = y < self.low
        if where is not None:
            refill = refill & where
        self.height = self.height - refill.to(torch.int32)
        self.overflowed = self.overflowed | (self.height < 0).any()
        # read where no refill is due too (the result is discarded): keep the index in range
        row = self.height.long().clamp(0, self.stack.shape[0] - 1)[None]
        word = self.stack.gather(0, row)[0].to(torch.int64) + _HALF
        y = torch.where(refill, (y << WORD_BITS) | word, y)
        self.state = y if where is None else torch.where(where, y, x)
        return values

    def is_empty(self) -> Tensor:
        """Whether every element is back at its initial state (a 0-d bool tensor)."""
        return ((self.state == self.low) & (self.height == 0)).all()

    def payload_bits(self) -> Tensor:
        """The bits stored beyond the initial state, summed over elements (0-d float64)."""
        bits = self.state.double().log2() - math.log2(self.low)
        return bits.sum() + WORD_BITS * self.height.double().sum()

    def with_tensors(self, state: Tensor, height: Tensor, stack: Tensor) -> BitBuffer:
        """A copy of this buffer over copies of the given tensors (as unpacked from
        autograd's saved tensors), so that undoing it leaves them intact."""
        twin = object.__new__(BitBuffer)
        twin.__dict__.update(self.__dict__)
        twin.state, twin.height, twin.stack = state.clone(), height.clone(), stack.clone()
        return twin

    @property
    def tensors(self) -> tuple[Tensor, ...]:
        """The tensors holding the buffer (for accounting and saving)."""
        return (self.state, self.height, self.stack)

    @property
    def nbytes(self) -> int:
        """Bytes the buffer allocates."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

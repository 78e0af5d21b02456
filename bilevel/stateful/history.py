"""The fast weights of every step, kept only as long as something else keeps them.

higher stores every step's fast weights in a list, so a long inner loop holds T copies of
the weights after the graph that needed them is gone (higher#37's growth pattern). Here the
initial and the latest weights are held; the weights of the steps in between are held
through weak references, so they live exactly as long as the autograd graph (or the user)
keeps them, and ``parameters(time=t)`` for a step whose weights were freed says so.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from torch import Tensor


class History:
    """Fast weights by step: strong for step 0 and the latest step, weak in between.

    With ``track=False`` only the latest weights exist (higher's ``track_higher_grads=False``).

    Example:
        >>> import torch
        >>> h = History()
        >>> w0, w1, w2 = torch.zeros(2), torch.ones(2), torch.full((2,), 2.0)
        >>> h.record([w0]); h.record([w1]); h.record([w2])
        >>> len(h), h.at(-1)[0] is w2, h.at(1)[0] is w1
        (3, True, True)
        >>> del w1
        >>> h.available(1)
        False
    """

    def __init__(self) -> None:
        self._first: list[Tensor] | None = None
        self._latest: list[Tensor] | None = None
        self._middle: list[list[weakref.ref[Tensor]]] = []
        self.track = True

    def __len__(self) -> int:
        if self._first is None:
            return 0
        return 1 + len(self._middle) + (self._latest is not None)

    def record(self, params: Sequence[Tensor]) -> None:
        """Append a step (or, when not tracking, replace the only one)."""
        params = list(params)
        if self._first is None or not self.track:
            self._first, self._latest, self._middle = params, None, []
            return
        if self._latest is not None:
            self._middle.append([weakref.ref(t) for t in self._latest])
        self._latest = params

    def latest(self) -> list[Tensor] | None:
        """The current fast weights (``None`` before any were given)."""
        return self._latest if self._latest is not None else self._first

    def _index(self, time: int) -> int:
        n = len(self)
        t = time + n if time < 0 else time
        if not 0 <= t < n:
            raise IndexError(f"time={time} is out of range: {n} sets of fast weights exist")
        return t

    def available(self, time: int) -> bool:
        """Whether the weights of step ``time`` are still alive."""
        t = self._index(time)
        if t == 0 or t == len(self) - 1:
            return True
        return all(r() is not None for r in self._middle[t - 1])

    def at(self, time: int) -> list[Tensor]:
        """The fast weights of step ``time`` (negative counts from the latest)."""
        t = self._index(time)
        if t == 0:
            assert self._first is not None
            return list(self._first)
        if t == len(self) - 1:
            latest = self.latest()
            assert latest is not None
            return list(latest)
        tensors = [r() for r in self._middle[t - 1]]
        if any(x is None for x in tensors):
            raise RuntimeError(
                f"the fast weights of step {t} were freed: nothing (no autograd graph, no "
                "reference of yours) held them any more. bilevel.stateful keeps the initial and "
                "the latest fast weights, and the ones in between only while something else "
                "does (higher kept every step alive, higher#37); to keep them, store "
                "list(fmodel.parameters()) after each step yourself"
            )
        return [x for x in tensors if x is not None]

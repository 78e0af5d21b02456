"""The fast weights of every step, kept only as long as something else keeps their memory.

higher stores every step's fast weights in a list, so a long inner loop holds T copies of
the weights even where the autograd graph does not need them (a bias, an embedding table:
``p_{t+1} = p_t - lr * g_t`` saves neither for backward), and keeps all of them after the
backward pass has freed the graph (higher#37's growth pattern). Here the initial and the
latest weights are held; a weight of a step in between is held only while its memory is
also held by someone else (the autograd graph saves it, or a view of it, for backward; or
the user keeps it): each time a step is recorded, weights whose storage nobody else uses
any more are let go (and again when a backward pass has run through that step).
``parameters(time=t)`` for a step whose weights were let go says so.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def _storage_users(t: Tensor) -> int | None:
    """How many tensors share ``t``'s memory (``None`` where it cannot be told)."""
    try:
        return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata)) - _PROBE_OVERHEAD
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return None  # a tensor subclass without storage: keep it (as higher does)


def _probe_overhead() -> int:
    # the probe itself holds a reference while it counts: measure how many, once
    try:
        t = torch.empty(1)
        return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata)) - 1
    except (AttributeError, RuntimeError):
        return 0


_PROBE_OVERHEAD = _probe_overhead()


class _Entry:
    """One weight of an intermediate step: strong while shared, weak afterwards."""

    __slots__ = ("strong", "weak", "__weakref__")

    def __init__(self, t: Tensor) -> None:
        self.strong: Tensor | None = t
        self.weak = weakref.ref(t)
        node = t.grad_fn
        if node is not None:
            # In a backward pass every node that saved this weight (its consumers) runs, and
            # releases what it saved, before the node that produced it: let go right then,
            # not only at the next recorded step. A weak reference avoids a cycle through
            # the C++ graph, which Python's garbage collector cannot see.
            me = weakref.ref(self)

            def prune_at_backward(grad_outputs: Any) -> None:
                entry = me()
                if entry is not None:
                    entry.prune()

            node.register_prehook(prune_at_backward)

    def prune(self) -> None:
        if self.strong is not None and _storage_users(self.strong) == 1:
            self.strong = None  # only we hold its memory; the tensor may still live on

    def get(self) -> Tensor | None:
        return self.strong if self.strong is not None else self.weak()


class History:
    """Fast weights by step: strong for step 0 and the latest step, shared-only in between.

    With ``track=False`` only the latest weights exist (higher's ``track_higher_grads=False``).

    Example:
        >>> import torch
        >>> h = History()
        >>> w0, w1, w2 = torch.zeros(2), torch.ones(2), torch.full((2,), 2.0)
        >>> h.record([w0]); h.record([w1]); h.record([w2])
        >>> len(h), h.at(-1)[0] is w2, h.at(1)[0] is w1
        (3, True, True)
        >>> del w1  # nothing else holds step 1's weight any more
        >>> h.record([torch.full((2,), 3.0)])
        >>> h.available(1), h.available(2)
        (False, True)
    """

    def __init__(self) -> None:
        self._first: list[Tensor] | None = None
        self._latest: list[Tensor] | None = None
        self._middle: list[list[_Entry]] = []
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
            self._middle.append([_Entry(t) for t in self._latest])
        self._latest = params
        self.prune()

    def prune(self) -> None:
        """Let go of intermediate weights whose memory nobody else holds."""
        for frame in self._middle:
            for entry in frame:
                entry.prune()

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
        return all(e.get() is not None for e in self._middle[t - 1])

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
        tensors = [e.get() for e in self._middle[t - 1]]
        freed = [i for i, x in enumerate(tensors) if x is None]
        if freed:
            raise RuntimeError(
                f"the fast weights {freed} of step {t} were let go: nothing (no autograd graph, "
                "no reference of yours) held their memory any more. bilevel.stateful keeps the "
                "initial and the latest fast weights, and the ones in between only while "
                "something else does (higher kept every step alive, higher#37); to keep them, "
                "store list(fmodel.parameters()) after each step yourself"
            )
        return [x for x in tensors if x is not None]

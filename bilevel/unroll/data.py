"""Data sources: every accepted form of ``unroll``'s ``data`` as one function step -> batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor


def batch_source(data: Any, steps: int) -> Callable[[int], Any]:
    """A function step -> batch for every accepted form of ``data``.

    Example:
        >>> batch_at = batch_source([10, 20, 30], steps=3)
        >>> batch_at(1)
        20
    """
    if data is None:
        return lambda t: None
    if isinstance(data, (Tensor, tuple, Mapping)):
        return lambda t: data
    if callable(data):
        return data
    if isinstance(data, Sequence):
        if len(data) < steps:
            raise ValueError(
                f"data is a sequence of {len(data)} batches but steps={steps}; give at least "
                "one batch per step, a function of the step, or an iterable"
            )
        return lambda t: data[t]
    if isinstance(data, Iterable):
        iterator = iter(data)
        restartable = iterator is not data

        def next_batch(t: int) -> Any:
            nonlocal iterator
            try:
                return next(iterator)
            except StopIteration:
                if not restartable:
                    raise ValueError(
                        f"data ran out of batches at step {t} of {steps}; pass a re-iterable "
                        "(list, DataLoader) or a longer iterator"
                    ) from None
                iterator = iter(data)
                return next(iterator)

        return next_batch
    raise TypeError(
        "data must be None, a batch (tensor, tuple or dict), a sequence or iterable of "
        f"batches, or a function of the step; got {type(data).__name__}"
    )

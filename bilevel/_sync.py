"""Count host-device synchronisations of a piece of code (tests and benchmarks).

On CUDA, :func:`count_syncs` turns on ``torch.cuda.set_sync_debug_mode("warn")``, under which
every operation that makes the host wait for the device (a ``.item()``, a ``bool(tensor)``, a
device-to-host copy, a ``nonzero``) warns, and counts those warnings. On the CPU nothing
synchronises; there it counts instead the *host reads of tensor values* that Python code
makes (``item``, ``tolist``, ``bool``/``float``/``int`` of a tensor, ``numpy``, ``nonzero``,
...): each of them would be a synchronisation on a GPU, so the count is a CPU-side estimate of
the CUDA one (it misses syncs inside C++ ops, which only the CUDA count sees).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# The message torch gives every synchronising operation under sync debug mode "warn".
CUDA_SYNC_MESSAGE = "called a synchronizing CUDA operation"

# Tensor methods and torch functions whose result needs the tensor's values on the host.
_TENSOR_HOST_READS = (
    "item",
    "tolist",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "nonzero",
    "masked_select",
    "unique",
    "equal",
)
_TORCH_HOST_READS = ("nonzero", "masked_select", "unique", "equal")


@dataclass
class SyncCount:
    """The synchronisations seen inside :func:`count_syncs`: ``count`` and where they were.

    ``kind`` is ``"cuda"`` (counted by torch's sync debug mode) or ``"host_reads"`` (the CPU
    estimate). ``sites`` counts them by operation name (CPU) or warning text (CUDA).
    """

    kind: str
    count: int = 0
    sites: Counter[str] = field(default_factory=Counter)


def _counting(record: SyncCount, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        record.count += 1
        record.sites[name] += 1
        return func(*args, **kwargs)

    return counted


@contextlib.contextmanager
def _count_host_reads(record: SyncCount) -> Iterator[None]:
    # Patched on the classes, not through a TorchFunctionMode: modes are thread-local and the
    # autograd engine runs backward functions without them.
    saved: list[tuple[Any, str, Any]] = []
    try:
        for owner, names in ((torch.Tensor, _TENSOR_HOST_READS), (torch, _TORCH_HOST_READS)):
            for name in names:
                original = getattr(owner, name)
                saved.append((owner, name, original))
                setattr(owner, name, _counting(record, name, original))
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


@contextlib.contextmanager
def count_syncs(device: torch.device | str) -> Iterator[SyncCount]:
    """Count the synchronisations of the code in the ``with`` block on ``device``.

    CUDA: torch's own count (sync debug mode ``"warn"``, restored afterwards; the device is
    synchronised first so pending work is not attributed to the block). CPU: the host reads
    of tensor values made from Python, the syncs they would be on a GPU. The record is
    complete when the block exits.

    Example:
        >>> import torch
        >>> x = torch.arange(4.0)
        >>> with count_syncs("cpu") as syncs:
        ...     y = x * 2                      # stays on the device
        ...     converged = bool(y.sum() > 1)  # reads a value: one sync on a GPU
        >>> syncs.count, dict(syncs.sites)
        (1, {'__bool__': 1})
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        record = SyncCount("cuda")
        torch.cuda.synchronize(dev)
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield record
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        for w in caught:
            text = str(w.message)
            if CUDA_SYNC_MESSAGE in text:
                record.count += 1
                record.sites[text.splitlines()[0][:120]] += 1
            else:  # not ours: hand it on
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return
    if dev.type != "cpu":
        raise ValueError(f"count_syncs supports cpu and cuda devices, got {dev}")
    record = SyncCount("host_reads")
    with _count_host_reads(record):
        yield record

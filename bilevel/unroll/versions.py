"""In-place changes between a checkpointed segment's forward pass and its recomputation.

Reverse mode gets autograd's own error when a saved tensor was modified in place before
``backward()``; a checkpointed segment saves only its inputs and recomputes the rest, so
without this check it would silently recompute with the new values. Each segment records the
version counters of the tensors it reads (data, buffers, tensors the inner loss captures,
found on the first step) and its backward compares them before recomputing.
"""

from __future__ import annotations

import weakref

from torch import Tensor


def tensor_versions(tensors: list[Tensor]) -> list[tuple[weakref.ReferenceType[Tensor], int]]:
    """Weak references and version counters of ``tensors`` (for in-place detection).

    Example:
        >>> import torch
        >>> x = torch.zeros(2)
        >>> recorded = tensor_versions([x])
        >>> check_versions(recorded, "a segment")      # unchanged: nothing happens
        >>> x.add_(1.0)
        tensor([1., 1.])
        >>> try:
        ...     check_versions(recorded, "a segment")
        ... except RuntimeError as exc:
        ...     print(str(exc)[:58])
        one of the tensors a segment read (shape (2,), torch.float
    """
    return [(weakref.ref(t), t._version) for t in tensors]


def check_versions(recorded: list[tuple[weakref.ReferenceType[Tensor], int]], what: str) -> None:
    """Raise autograd's kind of error if a recorded tensor was modified in place since
    (see :func:`tensor_versions`)."""
    for ref, version in recorded:
        t = ref()
        if t is not None and t._version != version:
            raise RuntimeError(
                f"one of the tensors {what} read (shape {tuple(t.shape)}, {t.dtype}) has been "
                f"modified by an inplace operation: it is at version {t._version}; expected "
                f"version {version} instead. The recomputation in backward would silently use "
                "the new values: do not modify data or captured tensors in place before "
                "backward(), or pass a copy (.clone())"
            )

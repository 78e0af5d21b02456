"""The batched QP ``min 1/2 x'Qx + p'x  s.t.  Ax = b, Gx <= h``: input checks and broadcasting."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["QPData", "QPError", "as_qp_data"]


class QPError(ValueError):
    """A QP that could not be solved: infeasible, unbounded or not converged.

    ``elements`` lists the batch elements concerned.
    """

    def __init__(self, message: str, elements: list[int]) -> None:
        super().__init__(message)
        self.elements = elements


@dataclass(frozen=True)
class QPData:
    """A batch of ``B`` QPs with ``n`` variables, ``me`` equalities, ``mi`` inequalities.

    Every field carries the batch in dimension 0 (broadcast views when an input was
    shared); ``unbatched`` records that the caller gave no batch dimension at all.
    """

    Q: Tensor  # (B, n, n)
    p: Tensor  # (B, n)
    A: Tensor  # (B, me, n)
    b: Tensor  # (B, me)
    G: Tensor  # (B, mi, n)
    h: Tensor  # (B, mi)
    unbatched: bool

    @property
    def batch(self) -> int:
        return self.p.shape[0]

    @property
    def sizes(self) -> tuple[int, int, int]:
        return self.p.shape[1], self.b.shape[1], self.h.shape[1]


def _check(name: str, value: object, ndim: int) -> Tensor:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise TypeError(f"qp: {name} must be a floating tensor, got {type(value).__name__}")
    if value.ndim not in (ndim, ndim + 1):
        raise ValueError(
            f"qp: {name} must have {ndim} dimensions (or {ndim + 1} with a leading batch "
            f"dimension), got shape {tuple(value.shape)}"
        )
    return value


def as_qp_data(
    Q: Tensor,
    p: Tensor,
    A: Tensor | None,
    b: Tensor | None,
    G: Tensor | None,
    h: Tensor | None,
) -> QPData:
    """Check shapes, dtypes and devices; broadcast every input to the common batch size."""
    Q = _check("Q", Q, 2)
    p = _check("p", p, 1)
    n = p.shape[-1]
    dtype, device = p.dtype, p.device
    for pair, (m, v) in (("A, b", (A, b)), ("G, h", (G, h))):
        if (m is None) != (v is None):
            raise ValueError(f"qp: give both of {pair} or neither")
    empty_m = torch.zeros(0, n, dtype=dtype, device=device)
    empty_v = torch.zeros(0, dtype=dtype, device=device)
    A_ = empty_m if A is None else _check("A", A, 2)
    b_ = empty_v if b is None else _check("b", b, 1)
    G_ = empty_m if G is None else _check("G", G, 2)
    h_ = empty_v if h is None else _check("h", h, 1)
    tensors = {"Q": Q, "p": p, "A": A_, "b": b_, "G": G_, "h": h_}
    for name, t in tensors.items():
        if t.dtype != dtype or t.device != device:
            raise TypeError(
                f"qp: {name} is {t.dtype} on {t.device} but p is {dtype} on {device}; "
                "give every input the same dtype and device"
            )
    if Q.shape[-2:] != (n, n):
        raise ValueError(f"qp: Q must be ({n}, {n}) to match p, got {tuple(Q.shape[-2:])}")
    for mat, vec, what in (("A", "b", "equality"), ("G", "h", "inequality")):
        M, v = tensors[mat], tensors[vec]
        if M.shape[-1] != n or M.shape[-2] != v.shape[-1]:
            raise ValueError(
                f"qp: {mat} must be (m, {n}) with m = len({vec}) (the {what} constraints), "
                f"got {mat} {tuple(M.shape)} and {vec} {tuple(v.shape)}"
            )
    core = {"Q": 2, "p": 1, "A": 2, "b": 1, "G": 2, "h": 1}
    given = {k: t for k, t in tensors.items() if t.ndim > core[k]}
    sizes = {t.shape[0] for t in given.values()}
    if len(sizes) > 1:
        raise ValueError(
            "qp: batch sizes differ: "
            + ", ".join(f"{k} has {t.shape[0]}" for k, t in given.items())
            + "; give every batched input the same leading size"
        )
    B = sizes.pop() if sizes else 1
    out = {
        k: (t if t.ndim > core[k] else t.unsqueeze(0)).expand(B, *t.shape[-core[k] :])
        for k, t in tensors.items()
    }
    return QPData(**out, unbatched=not given)

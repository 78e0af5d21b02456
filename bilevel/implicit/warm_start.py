"""Warm starts of the backward linear solve across outer steps: a small state the user carries."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel.linalg.preconditioner import PreconditionerMemory


class WarmStart:
    """The latest solution of each implicit layer's linear solve, to start the next one from.

    In an outer loop the hyperparameters move a little per step, and so does the solution
    ``u`` of the backward system ``(dF/dw)^T u = -g``: starting the next solve from the
    previous ``u`` saves iterations (the answer is the same to the solver's tolerance: the
    stopping rule stays relative to ``||b||``, and a start further away than zero is
    dropped for zero). Pass one object per layer (``warm_start=``) and keep it across steps. A
    stored solution is used only when the new right-hand side has the same shapes, dtypes
    and devices; solves under ``torch.func.vmap`` and second-order solves start cold.

    It also remembers the linear solver's preconditioner: with
    ``cg(preconditioner=bilevel.linalg.jacobi(every=N))`` the Hutchinson estimate of the
    Hessian's diagonal is made once and reused for ``N`` solves (the ``preconditioners`` attribute;
    :meth:`refresh_preconditioner` asks for a new estimate at the next solve).

    Example:
        >>> import torch
        >>> from bilevel import argmin
        >>> ws = WarmStart()
        >>> for lam in (1.0, 1.01):
        ...     h = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
        ...     w = argmin(lambda w, h: ((w - 1) ** 2).sum() + h * (w**2).sum(),
        ...                torch.full((3,), 1 / (1 + lam), dtype=torch.float64), h, warm_start=ws)
        ...     w.sum().backward()
        >>> sorted(ws.solutions)
        ['vjp']
    """

    def __init__(self) -> None:
        self.solutions: dict[str, list[Tensor]] = {}
        self.preconditioners: dict[str, PreconditionerMemory] = {}
        self._lock = threading.Lock()

    def memory(self, kind: str) -> PreconditionerMemory:
        """The preconditioner memory of the ``kind`` solves (created empty)."""
        with self._lock:
            return self.preconditioners.setdefault(kind, PreconditionerMemory())

    def refresh_preconditioner(self) -> None:
        """Estimate every remembered preconditioner afresh at its next solve."""
        with self._lock:
            for memory in self.preconditioners.values():
                memory.refresh()

    def start(self, kind: str, b: Sequence[Tensor]) -> list[Tensor] | None:
        """The stored solution for ``kind`` if it matches ``b``, else None."""
        with self._lock:
            x = self.solutions.get(kind)
        if x is None or len(x) != len(b):
            return None
        for xi, bi in zip(x, b):
            if xi.shape != bi.shape or xi.dtype != bi.dtype or xi.device != bi.device:
                return None
        return x

    def store(self, kind: str, x: Sequence[Tensor]) -> None:
        with self._lock:
            self.solutions[kind] = [xi.detach().clone() for xi in x]

    def state_dict(self) -> dict[str, Any]:
        """What this object remembers, as tensors, ints and dicts/lists of them (loadable by
        ``torch.load(..., weights_only=True)``): the stored solutions and each
        preconditioner memory (its diagonal estimate, uses and estimate count). Saved with a
        checkpoint and restored by :meth:`load_state_dict`, a resumed outer loop makes the
        same solves, bit for bit, as one that was not interrupted.

        Example:
            >>> import torch
            >>> ws = WarmStart()
            >>> ws.store("vjp", [torch.ones(2)])
            >>> again = WarmStart()
            >>> again.load_state_dict(ws.state_dict())
            >>> again.solutions["vjp"], again.preconditioners
            ([tensor([1., 1.])], {})
        """
        with self._lock:
            return {
                "solutions": {k: list(v) for k, v in self.solutions.items()},
                "preconditioners": {
                    k: {
                        "diagonal": None if m.diagonal is None else list(m.diagonal),
                        "uses": m.uses,
                        "estimates": m.estimates,
                    }
                    for k, m in self.preconditioners.items()
                },
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace what this object remembers by ``state`` (from :meth:`state_dict`)."""
        if not isinstance(state, dict) or set(state) != {"solutions", "preconditioners"}:
            raise ValueError(
                "WarmStart.load_state_dict: expected a dict with the keys 'solutions' and "
                f"'preconditioners' (from WarmStart.state_dict()), got {state!r:.80}"
            )
        solutions = {k: [t.detach() for t in v] for k, v in state["solutions"].items()}
        memories = {}
        for k, m in state["preconditioners"].items():
            diagonal = m["diagonal"]
            memories[k] = PreconditionerMemory(
                None if diagonal is None else [t.detach() for t in diagonal],
                int(m["uses"]),
                int(m["estimates"]),
            )
        with self._lock:
            self.solutions = solutions
            self.preconditioners = memories

    def clear(self) -> None:
        """Forget every stored solution and preconditioner (the next solves start afresh)."""
        with self._lock:
            self.solutions.clear()
            self.preconditioners.clear()


def is_wrapped(tensors: Sequence[Tensor]) -> bool:
    """True under functorch transforms (vmap, grad), where a stored value would leak."""
    fz = torch._C._functorch
    return any(fz.is_functorch_wrapped_tensor(t) for t in tensors)

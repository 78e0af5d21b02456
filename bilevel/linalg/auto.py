"""The automatic choice between an exact dense solve (few unknowns) and an iterative one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bilevel.linalg._vec import Vec
from bilevel.linalg.base import LinearSolver, _check_positive_int
from bilevel.linalg.dense import CHOLESKY, Dense
from bilevel.linalg.info import LinearSolveInfo


class Auto(LinearSolver):
    """Dense LU for at most ``max_dense`` unknowns, else ``iterative`` (see :func:`auto`)."""

    name = "auto"

    def __init__(self, iterative: LinearSolver, max_dense: int) -> None:
        super().__init__()
        if not isinstance(iterative, LinearSolver):
            raise TypeError(
                f"iterative must be a bilevel.linalg solver, got {type(iterative).__name__}"
            )
        _check_positive_int(max_dense, "max_dense")
        self.iterative = iterative
        self.max_dense = max_dense
        self.damping = getattr(iterative, "damping", 0.0)
        self.symmetric = iterative.symmetric
        self.dense = Dense(damping=0.0)  # the operator given to _solve is already damped

    def _options(self) -> dict[str, Any]:
        return dict(iterative=self.iterative, max_dense=self.max_dense)

    def forms_matrix(self, n: int) -> bool:
        return n <= self.max_dense

    def _solve(
        self, A: Callable[[Vec], Vec], b: Vec, x0: Vec | None
    ) -> tuple[Vec, LinearSolveInfo]:
        n = sum(t.numel() for t in b)
        if n <= self.max_dense:
            try:
                x, info = self.dense._solve(A, b, x0)
            except torch.linalg.LinAlgError as err:
                x, info = self.iterative._solve(A, b, x0)
                info.message = _joined(
                    info.message,
                    f"auto: {info.method} after dense LU found the operator singular ({err})",
                )
                return x, info
            info.message = dense_note(info.message, n, self.max_dense)
            return x, info
        x, info = self.iterative._solve(A, b, x0)
        info.message = iterative_note(info.message, n, self.max_dense, info.method)
        return x, info


def dense_note(message: str, n: int, max_dense: int) -> str:
    """The message of ``auto``'s dense solve: which factorisation solved (Cholesky for a
    positive definite operator that promised it, else LU) and why dense."""
    if message == CHOLESKY:
        return f"auto: dense Cholesky for n={n} <= {max_dense}"
    return _joined(message, f"auto: dense LU for n={n} <= {max_dense}")


def iterative_note(message: str, n: int, max_dense: int, method: str) -> str:
    """The message of ``auto``'s iterative solve: which solver ran and why."""
    return _joined(message, f"auto: {method} for n={n} > max_dense={max_dense}")


def _joined(message: str, note: str) -> str:
    return f"{message}; {note}" if message else note


def auto(iterative: LinearSolver | None = None, max_dense: int = 64) -> Auto:
    """An exact dense solve when the unknowns are few, else an iterative solver.

    With ``n <= max_dense`` unknowns the operator is formed by applying it to the ``n``
    basis vectors at once (its own ``matmat`` when it has one, as the implicit layers'
    plain backward does, else ``torch.func.vmap``) and solved by LU (by Cholesky when
    the operator promises to be positive definite, as an argmin's Hessian does, and is): one batched product and
    a factorisation instead of up to ``n`` sequential products with their Python and
    synchronisation overhead, which dominate small problems. A singular matrix falls
    back to ``iterative``. Larger problems go to ``iterative`` (default :func:`cg`,
    which assumes a symmetric positive definite operator; pass ``gmres()`` for a
    general one). ``info.method`` names the solver that ran and ``info.message`` says
    why it was chosen. ``damping`` is the iterative solver's.

    Example:
        >>> from bilevel.linalg import gmres
        >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
        >>> x, info = auto(gmres())(lambda v: A @ v, torch.tensor([3.0, 3.0], dtype=torch.float64))
        >>> x, info.method, info.message
        (tensor([1., 1.], dtype=torch.float64), 'dense', 'auto: dense LU for n=2 <= 64')
    """
    if iterative is None:
        from bilevel.linalg.cg import cg

        iterative = cg()
    return Auto(iterative, max_dense)


_SHARED: list[Auto] = []


def _shared_auto() -> Auto:
    """One default ``auto()`` for every call that names no linear solver: building the
    solvers' option checks per call costs more than a 3-unknown solve. Its only state is
    ``last_info``, which then is the latest default solve's."""
    if not _SHARED:
        _SHARED.append(auto())
    return _SHARED[0]

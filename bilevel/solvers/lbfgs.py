"""Limited-memory BFGS with a strong Wolfe line search, for one problem or a stack of them."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import Tree
from bilevel.solvers._flat import _Flat
from bilevel.solvers._host_search import _HOST_DTYPES
from bilevel.solvers._lbfgs_batch import _lbfgs, _LBFGSSettings, _value_and_grad
from bilevel.solvers._lbfgs_compiled import _Layout, compiled_lbfgs
from bilevel.solvers._lbfgs_single import _Evaluate, _lbfgs_single
from bilevel.solvers._lean_grad import lean_grad
from bilevel.solvers._stack import _flat_rows, _rows_tree, _unravel_rows
from bilevel.solvers.base import (
    _NO_PATH,
    Objective,
    Solver,
    SolverInfo,
    _check_int,
    _check_tol,
    _scalar,
)
from bilevel.solvers.line_search import _WolfeOptions


class LBFGS(Solver):
    """Limited-memory BFGS over the flattened parameters with a strong Wolfe line search
    (see :func:`lbfgs`; ``compiled=True``: one problem's loop as one compiled call)."""

    method = "lbfgs"

    def __init__(
        self,
        tol: float = 1e-8,
        maxiter: int = 500,
        history_size: int = 20,
        line_search: str | None = "strong_wolfe",
        c1: float = 1e-4,
        c2: float = 0.9,
        max_evals_per_iter: int = 25,
        compiled: bool = False,
    ) -> None:
        super().__init__()
        self.tol = _check_tol(tol)
        self.maxiter = _check_int(maxiter, "maxiter")
        self.history_size = _check_int(history_size, "history_size")
        if line_search not in ("strong_wolfe", "backtracking", None):
            raise ValueError(
                f"line_search must be 'strong_wolfe' or 'backtracking'; got {line_search!r}"
            )
        self.line_search = line_search or "backtracking"
        if not 0 < c1 < c2 < 1:
            raise ValueError(f"line search constants need 0 < c1 < c2 < 1; got c1={c1}, c2={c2}")
        self.c1, self.c2 = float(c1), float(c2)
        self.max_evals_per_iter = _check_int(max_evals_per_iter, "max_evals_per_iter")
        if not isinstance(compiled, bool):
            raise TypeError(f"compiled must be True or False; got {compiled!r}")
        self.compiled = compiled

    def _settings(self) -> dict[str, Any]:
        return {
            "tol": self.tol,
            "maxiter": self.maxiter,
            "history_size": self.history_size,
            "line_search": self.line_search,
            **({"compiled": True} if self.compiled else {}),
        }

    def _options(self) -> _LBFGSSettings:
        wolfe = _WolfeOptions(
            self.line_search == "strong_wolfe", self.c1, self.c2, self.max_evals_per_iter
        )
        return _LBFGSSettings(self.tol, self.maxiter, self.history_size, wolfe)

    def _run(
        self, values: Callable[[Tensor], Tensor], X: Tensor, evaluate: _Evaluate | None = None
    ) -> tuple[Tensor, list[SolverInfo]]:
        settings = self._options()
        if X.shape[0] == 1 and X.dtype in _HOST_DTYPES:
            # a stack of one keeps its bookkeeping on the host (the same steps, fewer launches)
            if evaluate is None:
                evaluate = functools.partial(_value_and_grad, values)
            out = _lbfgs_single(evaluate, X, settings)
        else:
            out = _lbfgs(values, X, settings)
        return out.X, out.infos(self.method, self.tol, self.maxiter, self.line_search)

    def _solve(self, objective: Objective, init: Tree) -> tuple[Tree, SolverInfo]:
        # one problem is a stack of one, through the same code: vmap equals a loop
        flat = _Flat(init)
        x = flat.ravel(init).detach().clone().unsqueeze(0)

        shape = init.shape if isinstance(init, Tensor) else None

        def point(row: Tensor) -> Tree:
            # one tensor: its row is the point (no tree to rebuild at each evaluation)
            return row.reshape(shape) if shape is not None else flat.unravel(row)

        def values(X: Tensor) -> Tensor:
            return _scalar(objective(point(X[0]))).reshape(1)

        def evaluate(X: Tensor) -> tuple[Tensor, Tensor]:
            # the value and gradient of values(X), with the row itself as the leaf (the
            # same values and gradient bits, a few autograd nodes fewer)
            with torch.enable_grad():
                row = X[0].detach().requires_grad_(True)
                f = _scalar(objective(point(row)))
                if not f.requires_grad:
                    raise ValueError(_NO_PATH)
                g = lean_grad(f, row)  # torch.autograd.grad's bits, less Python
            if g is None:
                raise ValueError(_NO_PATH)
            return f.detach().to(X.dtype).reshape(1), g.detach().reshape(1, -1)

        if self.compiled and _compilable(x):
            layout = _Layout(
                tuple(tuple(s) for s in flat.shapes),
                tuple(flat.dtypes),
                None if shape is not None else flat.spec,
            )
            scalar = lambda w: _scalar(objective(w))  # noqa: E731
            out = compiled_lbfgs(scalar, layout, x, self._options(), lambda: evaluate(x))
            if out is not None:
                (info,) = out.infos(self.method, self.tol, self.maxiter, self.line_search)
                info.message += "; compiled (inductor)"
                info.extra["compiled"] = True
                return flat.output(out.X[0]), info

        X, infos = self._run(values, x, evaluate)
        return flat.output(X[0]), infos[0]

    def solve_batch(
        self, values: Callable[[Tree], Tensor], init: Tree
    ) -> tuple[Tree, list[SolverInfo]]:
        """Minimise ``B`` independent objectives at once (the ``vmap`` rule of the layers).

        ``values(W)`` returns the ``(B,)`` objective values of a tree ``W`` whose leaves
        carry the problems in dimension 0, each value depending on its own slice only (as
        ``torch.func.vmap`` of one objective does). Every problem keeps its own iterate,
        curvature pairs, line search and stopping decision (the iterates and pairs rows of
        batched tensors, the decisions masks over host rows, three small reads a pass): a
        problem that converged or stopped is frozen while the others go on, and the loop
        ends when all are done; where ``values(W, rows)`` evaluates the problems ``rows``
        only (``W`` holds their rows; flagged ``values.selectable = True``, as the ``vmap``
        rule's stacks are), stopped problems are not evaluated. Element ``i``'s answer and info record are what a single
        call on it gives (up to rounding), whatever its batch-mates do. Returns the
        solutions stacked like ``init`` and one :class:`SolverInfo` per problem.

        Example:
            >>> import torch
            >>> c = torch.tensor([[1.0], [-2.0], [30.0]], dtype=torch.float64)
            >>> loss = lambda W: ((W - c) ** 4).sum(1) + (W ** 2).sum(1)
            >>> w, infos = lbfgs(tol=1e-10).solve_batch(loss, torch.zeros(3, 1, dtype=torch.float64))
            >>> w1, info1 = lbfgs(tol=1e-10)(lambda v: ((v - c[1]) ** 4).sum() + (v ** 2).sum(),
            ...                              torch.zeros(1, dtype=torch.float64))
            >>> [i.converged for i in infos], infos[1].iterations == info1.iterations
            ([True, True, True], True)
            >>> bool(torch.allclose(w[1], w1, rtol=1e-12, atol=0))
            True
        """
        if not callable(values):
            raise TypeError(f"values must be callable; got {type(values).__name__}")
        flat, X, spec = _flat_rows(init)

        def stacked(Z: Tensor, rows: Tensor | None = None) -> Tensor:
            # with rows (values.selectable), Z holds those problems only: stopped ones are
            # not evaluated
            W = _unravel_rows(flat, Z)
            return values(W) if rows is None else values(W, rows)  # type: ignore[call-arg]

        stacked.selectable = getattr(values, "selectable", False)  # type: ignore[attr-defined]

        start = time.perf_counter()
        with torch.no_grad():
            X, infos = self._run(stacked, X.clone())
        elapsed = time.perf_counter() - start
        for info in infos:
            info.time = elapsed
        self.last_info = infos[-1]
        return _rows_tree(flat, X), infos


def _compilable(x: Tensor) -> bool:
    """Whether the compiled loop can run here: a float32/float64 problem outside
    ``torch.func`` transforms (under them the eager solver runs; under ``vmap`` the layers
    call :meth:`LBFGS.solve_batch`, which is eager too)."""
    return x.dtype in _HOST_DTYPES and torch._C._functorch.peek_interpreter_stack() is None


def lbfgs(
    tol: float = 1e-8,
    maxiter: int = 500,
    history_size: int = 20,
    line_search: str | None = "strong_wolfe",
    c1: float = 1e-4,
    c2: float = 0.9,
    max_evals_per_iter: int = 25,
    compiled: bool = False,
) -> LBFGS:
    """L-BFGS with a strong Wolfe line search, run to gradient norm <= ``tol``.

    Works on the parameters flattened into one vector (leaves of mixed floating
    dtypes are promoted, then cast back). Near the optimum, where differences of
    objective values are below rounding error, steps are accepted on the slope
    (approximate Wolfe conditions), which lets it reach gradient norms near machine
    precision (1e-12 on well-conditioned float64 problems). ``line_search`` can be
    ``"backtracking"`` (Armijo only). The search direction comes from the compact form of
    the L-BFGS matrix over the last ``history_size`` pairs. One problem runs as a stack of
    one through the code of :meth:`LBFGS.solve_batch`, which minimises many at once with
    per-problem line searches and stopping; under ``torch.func.vmap``,
    :func:`bilevel.argmin` with this solver uses it, so every element gets the answer a
    single call gives.

    ``compiled=True`` runs a single float32/float64 problem's whole loop as one
    ``torch.compile``d ``torch.while_loop`` (inductor): the same line search, history and
    stopping rules on fixed-shape tensors, with ``R^-1`` of the compact form kept up to date
    instead of two triangular solves per direction, so the answer equals the eager one to
    rounding (the iteration and evaluation counts usually agree; rounding can change them on
    a hard problem). The host reads one flag per evaluation (is it still running?) and the
    results once. The first call per objective code, shapes, dtype and settings compiles
    (10-40 s; ``tol`` and ``maxiter`` are inputs and do not recompile); ``info.message``
    ends in ``compiled (inductor)`` when it ran. An objective that cannot be compiled warns
    :class:`bilevel.CompileFallbackWarning` once and runs eagerly; under ``torch.func``
    transforms, and for stacks (:meth:`LBFGS.solve_batch`, the ``vmap`` rule), the eager
    solver runs.

    Example:
        >>> import torch
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 1.0], dtype=torch.float64)
        >>> w, info = lbfgs(tol=1e-12)(lambda w: 0.5 * w @ A @ w - b @ w, torch.zeros(2, dtype=torch.float64))
        >>> torch.allclose(w, torch.linalg.solve(A, b)), info.converged
        (True, True)
        >>> fast = lbfgs(tol=1e-12, compiled=True)  # compiles on its first call
        >>> fast.compiled, "compiled" in repr(fast)
        (True, True)
    """
    return LBFGS(tol, maxiter, history_size, line_search, c1, c2, max_evals_per_iter, compiled)

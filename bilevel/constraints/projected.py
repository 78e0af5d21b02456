"""The projected-gradient solver and the differentiable constrained argmin.

A minimizer of ``f(w)`` over a convex set ``C`` is a fixed point of one projected
gradient step, ``w = P_C(w - eta grad f(w))`` for any ``eta > 0``. The implicit
function theorem applied to that fixed point (:func:`bilevel.fixed_point`) gives
the hypergradient of constrained problems; it needs the projection's generalized
Jacobian, which autograd gives for every projection in
:mod:`bilevel.constraints.projections`.

* :func:`projected_gradient` -- an inner solver, ``solver(objective, init)``;
* :func:`projected_argmin` -- the differentiable constrained argmin.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import Tree, tree_flatten, tree_unflatten
from bilevel.constraints.projections import project_nonnegative  # noqa: F401 (doctests)
from bilevel.solvers._stack import Oracle, _keep, _single_oracle, _stack_oracle, _stacked, _timed

__all__ = ["ProjectedGradient", "projected_argmin", "projected_gradient"]


def _projection_caller(projection: Callable[..., Tree]) -> Callable[[Tree, Any], Tree]:
    """``projection(w)`` or ``projection(w, hparams)``, decided once from its signature."""
    if not callable(projection):
        raise TypeError(f"projection must be callable, got {type(projection).__name__}")
    try:
        params = inspect.signature(projection).parameters.values()
        positional = [
            p
            for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
        varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
        takes_h = len(positional) >= 2 or varargs
    except (TypeError, ValueError):
        takes_h = True
    if takes_h:
        return lambda w, h: projection(w, h)
    return lambda w, h: projection(w)


# --------------------------------------------------------------------------- solver


class ProjectedGradient:
    """Projected gradient descent ``w <- P(w - step_size grad f(w))`` (see :func:`projected_gradient`)."""

    method = "projected_gradient"
    kind = "minimize"

    def __init__(
        self,
        projection: Callable[[Tree], Tree],
        step_size: float,
        tol: float,
        maxiter: int,
        check_every: int,
    ) -> None:
        if not callable(projection):
            raise TypeError(
                f"projection must be callable projection(w), got {type(projection).__name__}"
            )
        if not (isinstance(step_size, (int, float)) and step_size > 0 and math.isfinite(step_size)):
            raise ValueError(f"step_size must be a positive number, got {step_size!r}")
        if not (isinstance(tol, (int, float)) and tol >= 0):
            raise ValueError(f"tol must be a non-negative number, got {tol!r}")
        for name, v in (("maxiter", maxiter), ("check_every", check_every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.projection = projection
        self.step_size = float(step_size)
        self.tol = float(tol)
        self.maxiter = maxiter
        self.check_every = check_every
        self.last_info: Any = None

    def __repr__(self) -> str:
        return (
            f"projected_gradient(step_size={self.step_size}, tol={self.tol}, "
            f"maxiter={self.maxiter}, check_every={self.check_every})"
        )

    def __call__(self, objective: Callable[[Tree], Tensor], init: Tree) -> tuple[Tree, Any]:
        if not callable(objective):
            raise TypeError(f"objective must be callable, got {type(objective).__name__}")
        leaves, spec = _floating_tree(init)
        start = time.perf_counter()
        # one problem is a stack of one, through the same code: vmap equals a loop
        with torch.no_grad():
            oracle = _single_oracle(objective, spec)
            out, infos = self._descend(oracle, [x.detach() for x in leaves], spec, None)
        info = _timed(infos, start)[0]
        self.last_info = info
        return tree_unflatten(out, spec), info

    def solve_batch(self, values: Callable[[Tree], Tensor], init: Tree) -> tuple[Tree, list[Any]]:
        """Minimise ``B`` independent objectives over the set at once (the ``vmap`` rule).

        ``values(W)`` returns the ``(B,)`` objective values of a tree ``W`` whose leaves
        carry the problems in dimension 0, each depending on its own slice only; the
        projection is applied to each problem's slice (``torch.func.vmap`` of it). Each
        problem checks its own residual every ``check_every`` iterations and is frozen
        when it converged; element ``i``'s answer and record are a single call's. A ``values`` that can also
        evaluate a subset, ``values(W, rows)`` with ``W`` holding the rows of the problems
        ``rows`` (a long tensor), and says so with ``values.selectable = True`` (the
        ``vmap`` rule's stacks do) is called on the running problems only after each
        check, so stopped problems cost nothing.

        Example:
            >>> c = torch.tensor([[1.0, -1.0], [2.0, 3.0]], dtype=torch.float64)
            >>> solver = projected_gradient(project_nonnegative, step_size=0.5)
            >>> W, infos = solver.solve_batch(lambda W: ((W - c) ** 2).sum(1), torch.zeros(2, 2, dtype=torch.float64))
            >>> W, [i.converged for i in infos]
            (tensor([[1., 0.],
                    [2., 3.]], dtype=torch.float64), [True, True])
        """
        if not callable(values):
            raise TypeError(f"values must be callable, got {type(values).__name__}")
        _floating_tree(init)
        leaves, spec, batch = _stacked(init)
        start = time.perf_counter()
        with torch.no_grad():
            oracle = _stack_oracle(values, spec, batch)
            out, infos = self._descend(oracle, [x.detach() for x in leaves], spec, batch)
        self.last_info = infos[-1]
        return tree_unflatten(out, spec), _timed(infos, start)

    def _descend(
        self, oracle: Oracle, w: list[Tensor], spec: Any, batch: int | None
    ) -> tuple[list[Tensor], list[Any]]:
        """The iterations on ``batch`` stacked problems, or on one whose leaves have no
        batch dimension (``batch=None``), each with its own stopping decision."""
        from bilevel.solvers import SolverInfo

        eta = self.step_size
        B = 1 if batch is None else batch
        if batch is None:

            def project(leaves: list[Tensor]) -> list[Tensor]:
                moved = tree_unflatten(list(leaves), spec)
                return [x.detach() for x in tree_flatten(self.projection(moved))[0]]

        else:
            each = torch.func.vmap(
                lambda *ls: tuple(tree_flatten(self.projection(tree_unflatten(list(ls), spec)))[0])
            )

            def project(leaves: list[Tensor]) -> list[Tensor]:
                return [x.detach() for x in each(*leaves)]

        def step(x: list[Tensor]) -> list[Tensor]:
            _, g = oracle(x)
            return project([xi - eta * gi for xi, gi in zip(x, g)])

        device = w[0].device
        live = torch.ones(B, dtype=torch.bool, device=device)
        stopped_at = torch.full((B,), self.maxiter, dtype=torch.long, device=device)
        w = step([x.clone() for x in w])  # feasible from the first iterate on
        res: Tensor | None = None
        it = 1
        while it < self.maxiter:
            new = step(w)
            it += 1
            if it % self.check_every == 0 or it == self.maxiter:
                # gradient mapping norm ||w - P(w - eta g)|| / eta: zero exactly at a KKT point
                r = _row_dist(new, w, B) / eta
                res = r if res is None else torch.where(live, r, res)
                w = new if B == 1 else [_keep(live, a, b) for a, b in zip(new, w)]
                stop = live & (r <= self.tol)
                stopped_at = torch.where(stop, it, stopped_at)
                live = live & ~stop
                running = live.tolist()  # the loop's only host read
                if not any(running):
                    break
                oracle.narrow(running)
            else:
                w = new if B == 1 else [_keep(live, a, b) for a, b in zip(new, w)]
        if res is None:  # maxiter == 1: the residual of one more step, not taken
            res = _row_dist(step(w), w, B) / eta
        oracle.narrow([True] * B)  # every problem's value at its answer
        f = oracle(w)[0]
        counts = stopped_at.tolist()
        floats = torch.stack([res, f.to(res.dtype)]).tolist()
        infos = []
        for k, r_i, f_i in zip(counts, *floats):
            converged = r_i <= self.tol
            infos.append(
                SolverInfo(
                    self.method,
                    k,
                    converged,
                    r_i,
                    f_i,
                    "projected-gradient residual <= tol"
                    if converged
                    else f"reached maxiter={self.maxiter}; raise maxiter or step_size (<= 1/L)",
                    tol=self.tol,
                    evaluations=k,
                )
            )
        return w, infos


def _floating_tree(init: Tree) -> tuple[list[Tensor], Any]:
    leaves, spec = tree_flatten(init)
    if not leaves or not all(isinstance(x, Tensor) and x.is_floating_point() for x in leaves):
        raise TypeError("init must be a floating tensor or a non-empty tree of floating tensors")
    return leaves, spec


def _row_dist(a: list[Tensor], b: list[Tensor], B: int) -> Tensor:
    """``||a_i - b_i||`` over all leaves per row ``(B,)`` (row-wise sums: batch-independent)."""
    return (
        torch.stack([((x - y) ** 2).reshape(B, -1).sum(1) for x, y in zip(a, b)], 1).sum(1).sqrt()
    )


def projected_gradient(
    projection: Callable[[Tree], Tree],
    step_size: float,
    tol: float = 1e-10,
    maxiter: int = 10000,
    check_every: int = 10,
) -> ProjectedGradient:
    """An inner solver: projected gradient descent run to a gradient-mapping tolerance.

    ``solution, info = solver(objective, init)``. Convergence is
    ``||w - P(w - step_size grad f(w))|| / step_size <= tol``, read on the host every
    ``check_every`` iterations. ``info.grad_norm`` holds that residual. For an
    ``L``-smooth objective take ``step_size <= 1 / L``. Under ``torch.func.vmap``,
    :func:`projected_argmin` minimises the stack at once with
    :meth:`ProjectedGradient.solve_batch` (the projection vmapped over the problems; a
    single call shares its code), each problem stopping on its own residual.

    Example:
        >>> solver = projected_gradient(project_nonnegative, step_size=0.5)
        >>> w, info = solver(lambda w: ((w - torch.tensor([1.0, -1.0], dtype=torch.float64)) ** 2).sum(),
        ...                  torch.zeros(2, dtype=torch.float64))
        >>> w, info.converged
        (tensor([1., 0.], dtype=torch.float64), True)
    """
    return ProjectedGradient(projection, step_size, tol, maxiter, check_every)


# --------------------------------------------------------------------------- argmin


def projected_argmin(
    inner_loss: Callable[..., Tensor],
    solution_or_init: Tree,
    hparams: Any,
    data: Any = None,
    *,
    projection: Callable[..., Tree],
    step_size: float,
    solver: Any = None,
    linear_solver: Any = None,
    diagnostics: Any = None,
    strict: bool = False,
) -> Tree:
    """``argmin_{w in C} inner_loss(w, hparams[, data])``, differentiable by the IFT.

    The optimality condition is the fixed point of one projected gradient step,
    ``w = P(w - step_size grad_w inner_loss(w, ...))``, differentiated with
    :func:`bilevel.fixed_point` (GMRES by default: its Jacobian is not symmetric
    where constraints are active).

    Args:
        inner_loss: ``inner_loss(w, hparams)`` or ``inner_loss(w, hparams, data)``.
        solution_or_init: the constrained solution (``solver=None``) or a start.
        hparams, data: as in :func:`bilevel.argmin`.
        projection: ``projection(w)`` or ``projection(w, hparams)`` (bounds may be
            hyperparameters), e.g. :func:`project_box`; it must handle the tree ``w``.
        step_size: ``eta`` of the step; any positive value gives the same fixed
            points, ``1/L`` keeps the fixed-point Jacobian well conditioned.
        solver: ``None``; a minimization solver ``solver(objective, init)`` that
            respects the constraints (:func:`projected_gradient`,
            ``bilevel.solvers.scipy_minimize(bounds=...)``); or a fixed-point solver
            (``kind == "fixed_point"``: ``fixed_point_iteration``, ``anderson``) that
            then iterates the projected gradient map itself.
        linear_solver: default ``bilevel.linalg.auto(bilevel.linalg.gmres())``.
        diagnostics: an :class:`bilevel.ImplicitDiagnostics`.
        strict: a solver reporting ``converged=False`` raises
            :class:`bilevel.solvers.NotStationaryError` instead of warning.

    Example:
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> h = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
        >>> loss = lambda w, h: 0.5 * w @ A @ w - h @ w
        >>> w = projected_argmin(loss, torch.zeros(2, dtype=torch.float64), h,
        ...                      projection=project_nonnegative, step_size=0.4,
        ...                      solver=projected_gradient(project_nonnegative, 0.4))
        >>> w.detach()
        tensor([0.5000, 0.0000], dtype=torch.float64)
        >>> w.sum().backward(); h.grad       # d w1 / d h1 = 1/2; w2 stays at its bound
        tensor([0.5000, 0.0000], dtype=torch.float64)
    """
    from bilevel import implicit
    from bilevel.implicit.fixed_point import _constrained_argmin

    if not callable(inner_loss):
        raise TypeError(f"inner_loss must be callable, got {type(inner_loss).__name__}")
    if isinstance(step_size, Tensor):
        if step_size.numel() != 1:
            raise ValueError(
                f"step_size must be a positive number, got a tensor of shape {tuple(step_size.shape)}"
            )
        step_size = float(step_size)
    if not (isinstance(step_size, (int, float)) and step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size must be a positive number, got {step_size!r}")
    project = _projection_caller(projection)
    with_data = data is not None

    def loss3(w: Any, h: Any, d: Any) -> Tensor:
        out = inner_loss(w, h, d) if with_data else inner_loss(w, h)
        if not isinstance(out, Tensor) or out.numel() != 1:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"inner_loss must return a scalar (0-d tensor), got {shape}")
        return out.reshape(())

    def step_map(w: Any, h: Any, d: Any) -> Any:
        g = torch.func.grad(lambda ww: loss3(ww, h, d))(w)
        wl, spec = tree_flatten(w)
        gl, _ = tree_flatten(g)
        return project(tree_unflatten([x - step_size * gx for x, gx in zip(wl, gl)], spec), h)

    if solver is None or getattr(solver, "kind", "minimize") == "fixed_point":
        # without data the map takes (w, h): the data slot is filled with None
        map_fn = step_map if with_data else (lambda w, h: step_map(w, h, None))
        return implicit.fixed_point(
            map_fn,
            solution_or_init,
            hparams,
            *((data,) if with_data else ()),
            solver=solver,
            linear_solver=linear_solver,
            diagnostics=diagnostics,
            strict=strict,
        )
    if not callable(solver):
        raise TypeError(f"solver must be a solver(objective, init), got {type(solver).__name__}")
    return _constrained_argmin(
        loss3,
        step_map,
        solution_or_init,
        hparams,
        data,
        solver=solver,
        linear_solver=linear_solver,
        diagnostics=diagnostics,
        strict=strict,
    )

"""A stack of independent problems, each solved on its own: the ``vmap`` rule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import tree_flatten, tree_unflatten
from bilevel.implicit._stacked_operator import stacked_hvp
from bilevel.implicit.linear_problem import _LinearProblem
from bilevel.implicit.problem import _Problem
from bilevel.implicit.user_problem import _UserProblem
from bilevel.linalg.base import LinearSolver


def _vmap_over(fn: Callable[..., Any], in_dims: tuple[Any, ...]) -> Callable[..., Any]:
    return torch.func.vmap(fn, in_dims=in_dims)


def _level(tensors: Sequence[Tensor]) -> int:
    """The innermost functorch level of the first tensor (-1 for a plain tensor)."""
    return int(torch._C._functorch.maybe_get_level(tensors[0]))


def _flattens(linear: _LinearProblem, rhs: Sequence[Tensor]) -> bool:
    """Whether a stack's linear solves may run on one flat vector per problem: a bilevel
    solver with no preconditioner and no warm start (both see the tree's leaves), and
    several leaves of one dtype."""
    solver = linear.linear_solver
    return (
        isinstance(solver, LinearSolver)
        and getattr(solver, "preconditioner", None) is None
        and linear.warm_start is None
        and len(rhs) > 1
        and len({t.dtype for t in rhs}) == 1
    )


def _run_flat(
    linear: _LinearProblem,
    matvec: Callable[[Any], Any],
    rhs: Sequence[Tensor],
    x0: Sequence[Tensor],
    flat_product: Callable[[Tensor], Tensor | None] | None = None,
) -> list[Tensor]:
    """``linear.run`` on the leaves joined into one vector: under ``vmap`` each vector
    operation of the solver is then one batched kernel, not one per leaf (iMAML's six
    leaves, 25 tasks: the backward CG took 57 ms instead of 76 for 23 iterations). The
    same iterations to rounding (the inner products sum the same terms)."""
    sizes, shapes = [t.numel() for t in rhs], [t.shape for t in rhs]

    def leaves(v: Tensor) -> list[Tensor]:
        return [part.view(shape) for part, shape in zip(torch.split(v, sizes), shapes)]

    def joined(tree: Any) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tree_flatten(tree)[0]])

    def matvec_flat(v: Any) -> list[Tensor]:
        (flat,) = tree_flatten(v)[0]
        # a product that takes the joined vector splits and joins it on the whole stack
        out = flat_product(flat) if flat_product is not None else None
        return [out if out is not None else joined(matvec(leaves(flat)))]

    (x,) = linear.run((matvec_flat, [joined(rhs)]), [joined(x0)])
    return [leaf.clone() for leaf in leaves(x)]  # outputs of their own, not views of x


class _BatchedProblem(_Problem):
    """A stack of independent instances of ``base`` (the ``vmap`` rule).

    Solutions carry the batch in dimension 0; parameters carry it in dimension 0 or are
    shared (``None``). ``vmap(f)`` means ``f`` on each element, so every instance is
    solved on its own: the linear solves of backward and jvp passes run vectorised under
    ``torch.func.vmap``, each problem with its own step sizes, masks and stopping decision
    (the loop ends when every problem is done). An inner solver with a ``solve_batch``
    method (:func:`bilevel.solvers.lbfgs`, ``gradient_descent``, ``newton_cg``,
    ``proximal_gradient``, :func:`bilevel.constraints.projected_gradient`) minimises the
    stack at once, each problem with its own iterate, step sizes, line search and stopping
    decision, and a fixed-point solver with one (:func:`bilevel.solvers.fixed_point_iteration`,
    :func:`bilevel.solvers.anderson`) iterates the stack of maps of ``fixed_point`` at once;
    other inner solvers run once per instance. Either way element ``i``'s answer does not
    depend on the other elements.
    """

    def __init__(self, base: _Problem, theta_dims: Sequence[int | None], batch_size: int) -> None:
        self.base = base
        self.dims = list(theta_dims)
        self.batch_size = batch_size
        self.kind = base.kind
        self._share(base)

    def residual(self, sol: Sequence[Tensor], theta: Sequence[Tensor]) -> list[Tensor]:
        return list(_vmap_over(self.base.residual, (0, self.dims))(list(sol), list(theta)))

    def matvec(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor], v: Sequence[Tensor]
    ) -> list[Tensor]:
        return list(
            _vmap_over(self.base.matvec, (0, self.dims, 0))(list(sol), list(theta), list(v))
        )

    def rmatvec(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor], v: Sequence[Tensor]
    ) -> list[Tensor]:
        return list(
            _vmap_over(self.base.rmatvec, (0, self.dims, 0))(list(sol), list(theta), list(v))
        )

    @property
    def sol_spec(self) -> Any:
        return getattr(self.base, "sol_spec", None)

    def solve(self, init: Sequence[Tensor], theta: Sequence[Tensor]) -> list[Tensor]:
        if self.kind == "linear":
            return self._solve_linear(list(init), list(theta))
        if self._batch_solver() is not None:
            return self._solve_stack(init, theta)
        base = self.base
        if isinstance(base, _UserProblem) and base.solver is None and base.kind != "opaque":
            if base.stationarity_tol is None:
                return base.run(None, list(init))  # the solutions are given: the stack at once
        outs = []
        for i in range(self.batch_size):
            th = [t[i] if d is not None else t for t, d in zip(theta, self.dims)]
            outs.append(self.base.solve([x[i] for x in init], th))
        return [torch.stack(col) for col in zip(*outs)]

    def _solve_linear(self, init: list[Tensor], theta: list[Tensor]) -> list[Tensor]:
        """Each problem's own linear solve, vectorised; Hessian products of a stack of argmin
        problems on one reused first-order graph (:mod:`bilevel.implicit._stacked_operator`)."""
        base = self.base
        fast = None
        if isinstance(base, _LinearProblem):
            parent = base.parent
            if isinstance(parent, _UserProblem) and parent.objective is not None:
                p, s = parent.n_theta, parent.n_sol
                # reverse-mode products (as the single-problem path), each problem its own
                # solution (under jacfwd of one problem the solution is shared: plain path)
                if not parent.switch.ok and all(d == 0 for d in self.dims[p : p + s]):
                    fast = stacked_hvp(
                        parent._objective_leaves, theta[p : p + s], theta[:p], self.dims[:p]
                    )
        if fast is None:
            return list(_vmap_over(base.solve_plain, (0, self.dims))(init, theta))
        assert isinstance(base, _LinearProblem)
        linear = base

        def one(x0: list[Tensor], th: list[Tensor]) -> list[Tensor]:
            rhs = linear._split(th)[2]
            level = _level(rhs)
            plain, _ = linear.plain_target(th)

            def matvec(v: Any) -> Any:
                # a solver that vmaps its products again (dense: over basis vectors) gets
                # the vmappable products; the stacked graph serves this vmap's level only
                return fast(v) if _level(tree_flatten(v)[0]) == level else plain(v)

            if not _flattens(linear, rhs):
                return linear.run((matvec, rhs), x0)

            def flat_product(v: Tensor) -> Tensor | None:
                return fast.flat(v) if _level([v]) == level else None  # type: ignore[attr-defined]

            return _run_flat(linear, matvec, rhs, x0, flat_product)

        return list(_vmap_over(one, (0, self.dims))(init, theta))

    def _batch_solver(self) -> Callable[..., Any] | None:
        """The inner solver's ``solve_batch`` when this stack can be solved at once: a
        minimiser of a stack of objectives, or a fixed-point solver (``kind`` of the solver
        ``"fixed_point"``) of a stack of maps (``fixed_point``; ``root`` refuses those solvers)."""
        base = self.base
        if self.kind not in ("objective", "composite", "map") or not isinstance(base, _UserProblem):
            return None
        if not base.returns_info or base.solver is None:
            return None
        if self.kind == "map" and getattr(base.solver, "kind", None) != "fixed_point":
            return None
        if not getattr(base.solver, "supports_batch", True):
            return None
        return getattr(base.solver, "solve_batch", None)

    def _stack_target(self, theta: Sequence[Tensor]) -> Any:
        """What ``solve_batch`` solves: the ``(B,)`` values of a stacked tree, the stacked
        images of a fixed-point map, or for a composite problem a batched
        :class:`bilevel.solvers.Composite`."""
        base = self.base
        assert isinstance(base, _UserProblem)
        spec = base.sol_spec
        theta = list(theta)

        def one(sol: list[Tensor], th: list[Tensor]) -> Any:
            target = base.target(th)
            if self.kind == "map":  # a fixed-point map: the image of the problem's own row
                return target(tree_unflatten(sol, spec))
            objective = target.objective if self.kind == "composite" else target
            return objective(tree_unflatten(sol, spec)).reshape(())

        stacked = _vmap_over(one, (0, self.dims))
        chosen: list[Any] = [None, theta]  # the latest subset of problems and its theta

        def values(W: Any, rows: Tensor | None = None) -> Any:
            """The stack's values; with ``rows``, those of these problems only (``W`` holds
            their rows): a solver skips its stopped problems."""
            if rows is None:
                return stacked(tree_flatten(W)[0], theta)
            if chosen[0] is not rows:  # sliced once per subset, not per evaluation
                part = [
                    t if d is None else t.index_select(d, rows) for t, d in zip(theta, self.dims)
                ]
                chosen[:] = [rows, part]
            return stacked(tree_flatten(W)[0], chosen[1])

        values.selectable = True  # type: ignore[attr-defined]
        if self.kind != "composite":
            return values
        from bilevel.solvers.proximal_gradient import Composite

        prox_one = _vmap_over(lambda w, th, step: base.target(th).prox(w, step), (0, self.dims, 0))
        return Composite(values, lambda W, step: prox_one(W, theta, step), batch=self.batch_size)

    def _solve_stack(self, init: Sequence[Tensor], theta: Sequence[Tensor]) -> list[Tensor]:
        base = self.base
        assert isinstance(base, _UserProblem)
        spec = base.sol_spec
        solve_batch = self._batch_solver()
        assert solve_batch is not None
        out, infos = solve_batch(self._stack_target(theta), tree_unflatten(list(init), spec))
        if base.stationarity_tol is None:
            # nothing to evaluate per problem: the stack is checked and taken as a whole,
            # and each problem's record kept and checked (iMAML's 25 tasks: ~600 row
            # selections, detaches and stacks saved)
            sol = base._finish(out, list(init), None, None)
            for info in infos:
                base._report_forward(info)
            return sol
        leaves = tree_flatten(out)[0]
        sols = []
        for i, info in enumerate(infos):
            th = [t[i] if d is not None else t for t, d in zip(theta, self.dims)]
            target = base.target(th)
            sol_i = tree_unflatten([leaf[i] for leaf in leaves], spec)
            sols.append(base._finish(sol_i, [x[i] for x in init], target, info))
        return [torch.stack(col) for col in zip(*sols)]

    def solve_plain(self, init: Sequence[Tensor], theta: Sequence[Tensor]) -> list[Tensor]:
        return self.solve(init, theta)

"""Problems defined by user functions over trees: argmin, root, fixed point, custom_root."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import tree_unflatten
from bilevel.implicit._exact import dense_plan, exact_vjp
from bilevel.implicit._leaves import LEAF_SPEC, _check_like, _Packer
from bilevel.implicit._plain_cg import cg_vjp, plain_cg
from bilevel.implicit._products import _ForwardModeSwitch, _jvp, _plain_grad, _Products
from bilevel.implicit.diagnostics import ImplicitDiagnostics, _record
from bilevel.implicit.problem import _Problem
from bilevel.implicit.warm_start import is_wrapped


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What one implicit layer is, apart from its tensors: built once per public call.

    Attributes:
        name: the public function's name, used in messages.
        residual: the optimality function ``F(w, hparams, data)`` over trees.
        target: ``target(hparams, data)`` is what the solver is given (an objective or a
            map), or None when the solver is an opaque function (``custom_root``).
        kind: how the solver's target batches under vmap: ``"objective"``, ``"map"`` or
            ``"opaque"``.
        solver: the forward solver, or None when the solution is given.
        linear_solver: the :mod:`bilevel.linalg` solver of backward and jvp passes.
        symmetric: whether ``dF/dw`` is symmetric.
        diagnostics: where the solves' info records go.
        objective: the inner loss (argmin): products use Hessian-vector products.
        stationarity_tol, strict: the stationarity check at the solution (argmin).
        returns_info: whether the solver returns ``(solution, info)``.
        hvp: ``"forward"`` or ``"reverse"`` products.
        warm_start: a :class:`bilevel.WarmStart` for the linear solves, or None.
        compiled: the inner loss for the compiled exact backward (``argmin(...,
            compiled=True)``), or None.
    """

    name: str
    residual: Callable[[Any, Any, Any], Any]
    target: Callable[[Any, Any], Any] | None
    kind: str
    solver: Callable[..., Any] | None
    linear_solver: Any
    symmetric: bool
    diagnostics: ImplicitDiagnostics | None
    objective: Callable[[Any, Any, Any], Tensor] | None = None
    stationarity_tol: float | None = None
    strict: bool = False
    returns_info: bool = True
    hvp: str = "forward"
    warm_start: Any = None
    compiled: Any = None


class _UserProblem(_Problem):
    """A problem defined by user functions over trees: argmin, root, fixed point, custom_root."""

    def __init__(
        self, layer: LayerSpec, sol_like: Sequence[Tensor], sol_spec: Any, packer: _Packer
    ) -> None:
        self.name = layer.name
        self._residual = layer.residual
        self._target = layer.target
        self.kind = layer.kind
        self.sol_spec = sol_spec
        self.packer = packer
        self.solver = layer.solver
        self.linear_solver = layer.linear_solver
        self.symmetric = layer.symmetric
        self.diagnostics = layer.diagnostics
        self.objective = layer.objective
        self.stationarity_tol = layer.stationarity_tol
        self.strict = layer.strict
        self.returns_info = layer.returns_info
        self.switch = _ForwardModeSwitch(forward=layer.hvp == "forward", name=layer.name)
        self.minimum = layer.objective is not None
        self.warm_start = layer.warm_start
        self.compiled = layer.compiled
        self.given = self.solver is None and self.stationarity_tol is None and self.kind != "opaque"
        self.n_sol = len(sol_like)
        self.n_theta = len(packer.tensors)
        # the inner loss's graph at the given solution, built by check_objective
        self._graph: tuple[list[Tensor], list[Tensor], Tensor, list[bool]] | None = None

    def _trees(self, sol: Sequence[Tensor], theta: Sequence[Tensor]) -> tuple[Any, Any, Any]:
        w = tree_unflatten(list(sol), self.sol_spec)
        h, d = self.packer.unpack(theta)
        return w, h, d

    def residual(self, sol: Sequence[Tensor], theta: Sequence[Tensor]) -> list[Tensor]:
        w, h, d = self._trees(sol, theta)
        out = self._residual(w, h, d)
        return _check_like(out, sol, self.sol_spec, f"the optimality function of {self.name}")

    def _objective_leaves(self, theta: Sequence[Tensor]) -> Callable[[list[Tensor]], Tensor]:
        assert self.objective is not None
        h, d = self.packer.unpack(theta)
        obj = self.objective
        spec = self.sol_spec
        if spec is LEAF_SPEC:
            return lambda s: obj(s[0], h, d)
        return lambda s: obj(tree_unflatten(list(s), spec), h, d)

    def matvec(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor], v: Sequence[Tensor]
    ) -> list[Tensor]:
        if self.objective is None:
            return super().matvec(sol, theta, v)
        # Hessian-vector product: forward-over-reverse, reverse-over-reverse as fallback
        g = torch.func.grad(self._objective_leaves(theta))
        return list(_jvp(g, [list(sol)], [list(v)], self.switch))

    def rmatvec(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor], v: Sequence[Tensor]
    ) -> list[Tensor]:
        if self.objective is None:
            return super().rmatvec(sol, theta, v)
        return self.matvec(sol, theta, v)

    def reused_operator(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor]
    ) -> Callable[[Sequence[Tensor]], list[Tensor]] | None:
        """Hessian-vector products on one first-order graph, built once per linear solve.

        Each product is then a single backward pass through the gradient's graph, instead
        of a fresh forward, backward and double backward (measured 2-5x fewer seconds per
        product than rebuilding; TorchOpt and higher-style code do the same). Used only in
        reverse mode and outside functorch transforms: the solve's own derivatives (double
        backward, jvp, vmap) still go through :meth:`matvec`.
        """
        if self.objective is None or self.switch.ok:
            return None
        with torch.enable_grad():
            s = [x.detach().requires_grad_() for x in sol]
            loss = self._objective_leaves([t.detach() for t in theta])(s)
            grads = torch.autograd.grad(loss, s, create_graph=True, allow_unused=True)
        if any(g is None or not g.requires_grad for g in grads):
            return None  # a loss linear in some leaf: let the general path handle it

        def hvp(v: Sequence[Tensor]) -> list[Tensor]:
            with torch.enable_grad():
                out = torch.autograd.grad(grads, s, list(v), retain_graph=True, allow_unused=True)
            return [torch.zeros_like(x) if o is None else o.detach() for x, o in zip(s, out)]

        def batched(V: Sequence[Tensor]) -> list[Tensor]:
            """Products with vectors stacked along dim 0 (a preconditioner's probes), at once."""
            with torch.enable_grad():
                out = torch.autograd.grad(
                    grads, s, list(V), retain_graph=True, allow_unused=True, is_grads_batched=True
                )
            return [torch.zeros_like(v) if o is None else o.detach() for v, o in zip(V, out)]

        hvp.batched = batched  # type: ignore[attr-defined]
        return hvp

    def check_objective(self, init: Sequence[Tensor], theta: Sequence[Tensor]) -> None:
        """Fail early on a loss that is not a scalar (before any solve).

        With the solution given (``solver=None``) and hyperparameters that require grad,
        the evaluation is the first half of the backward pass: its graph is kept for
        :meth:`plain_vjp` instead of being built again there.
        """
        theta = list(theta)
        if (
            self.solver is None
            and self.compiled is None
            and not self.switch.ok
            and torch.is_grad_enabled()
            and any(t.requires_grad for t in theta)
            and not is_wrapped([*init, *theta])
        ):
            self._graph = self._loss_graph(init, theta, [t.requires_grad for t in theta])
            return
        with torch.no_grad():
            self._objective_leaves(theta)(list(init))

    def _loss_graph(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor], keep: Sequence[bool]
    ) -> tuple[list[Tensor], list[Tensor], Tensor, list[bool]]:
        """The inner loss at ``sol`` on fresh leaves (``theta[i]`` differentiable where
        ``keep[i]``): ``(sol leaves, theta leaves, loss, keep)``."""
        with torch.enable_grad():
            s = [x.detach().requires_grad_() for x in sol]
            th = [
                t.detach().requires_grad_() if k and t.is_floating_point() else t.detach()
                for t, k in zip(theta, keep)
            ]
            loss = self._objective_leaves(th)(s)
        return s, th, loss, list(keep)

    def plain_vjp(
        self,
        sol: Sequence[Tensor],
        theta: Sequence[Tensor],
        g: Sequence[Tensor],
        which: Sequence[int],
    ) -> list[Tensor] | None:
        """The backward pass on one graph of ``F``: built once, then each product of the
        linear solve is one backward through it (``dense``/``auto`` form the matrix with
        one batched backward and solve it inlined, :mod:`bilevel.implicit._exact`; plain
        ``cg`` runs its CPU loop on these products directly,
        :mod:`bilevel.implicit._plain_cg`), and the hypergradient is one more.

        About half the cost of the general path on small problems, whose time is per-call
        set-up (``torch.func`` transforms, a nested autograd Function). Only for a plain
        backward: a double backward, a functorch transform or ``hvp="forward"`` take
        the general path, which differentiates its own linear solve.
        """
        if self.objective is not None and self.switch.ok:
            return None
        if self.compiled is not None:
            from bilevel.implicit.compiled import compiled_vjp

            fast = compiled_vjp(self, sol, theta, g, which)
            if fast is not None:
                return fast
        n = sum(x.numel() for x in sol)
        graph = self._graph
        if graph is not None and not all(graph[3][i] for i in which):
            graph = None  # (cannot happen: backward asks for a subset of what required grad)
        if self.objective is not None:
            if graph is None:
                keep = [i in which for i in range(len(theta))]
                graph = self._loss_graph(sol, theta, keep)
            s, th, loss, _ = graph
            with torch.enable_grad():
                # the forward's graph may serve several backward passes (retain_graph)
                F = _plain_grad(
                    [loss], s, [torch.ones_like(loss)], create_graph=True, retain_graph=True
                )
        else:
            chosen = set(which)
            with torch.enable_grad():
                s = [x.detach().requires_grad_() for x in sol]
                th = [
                    t.detach().requires_grad_() if i in chosen else t for i, t in enumerate(theta)
                ]
                F = tuple(self.residual(s, th))
        if any(f is None or not f.requires_grad for f in F):
            return None  # F constant in some leaf: the general path handles it

        def vjp(v: Sequence[Tensor], batched: bool = False) -> list[Tensor]:
            out = _plain_grad(F, s, v, retain_graph=True, batched=batched)
            return [torch.zeros_like(vi) if o is None else o for vi, o in zip(v, out)]

        plan = None if self.warm_start is not None else dense_plan(self.linear_solver, n)
        u = None if plan is None else exact_vjp(self, vjp, sol, g, plan)
        if u is None and self.warm_start is None:
            cg = plain_cg(self.linear_solver, sol)
            if cg is not None:
                u = cg_vjp(self, cg, vjp, g, None if self.objective is None else (F, s))
        if u is None:
            operator = _Products(
                lambda v: vjp(v), lambda V: vjp(V, batched=True), definite=self.minimum
            )
            from bilevel.implicit.linear_problem import _LinearProblem

            lin = _LinearProblem(self, transpose=True)
            u = lin.run((operator, list(g)), [torch.zeros_like(x) for x in sol])
        sel = [th[i] for i in which]
        # the forward's graph stays usable for another backward (retain_graph=True upstream)
        out = _plain_grad(F, sel, u, retain_graph=self._graph is not None)
        return [torch.zeros_like(t) if o is None else o for t, o in zip(sel, out)]

    def target(self, theta: Sequence[Tensor]) -> Any:
        if self._target is None:
            return None
        h, d = self.packer.unpack(theta)
        return self._target(h, d)

    def solve(self, init: Sequence[Tensor], theta: Sequence[Tensor]) -> list[Tensor]:
        if self.kind == "opaque":
            # custom_root: the user's solver_fn(init, hparams, *args) returns the solution
            w0 = tree_unflatten(list(init), self.sol_spec)
            h, d = self.packer.unpack(theta)
            assert self.solver is not None
            out, info = _solution_and_info(self.solver(w0, h, *d))
            sol = self._finish(out, init, None, info)
            if self.stationarity_tol is not None:
                self._check_residual(sol, theta)
            return sol
        if self.solver is None and self.stationarity_tol is None:
            # the solution given and nothing to check it against: the Function's output is
            # a copy (init's shapes were checked by the public function)
            return [x.detach().clone() for x in init]
        return self.run(self.target(theta), init)

    def run(self, target: Any, init: Sequence[Tensor]) -> list[Tensor]:
        init = list(init)
        if self.solver is None:
            info = None
            out: Any = [x.clone() for x in init]
            out = tree_unflatten(out, self.sol_spec)
        else:
            w0 = tree_unflatten(init, self.sol_spec)
            result = self.solver(target, w0)
            if self.returns_info:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise TypeError(
                        f"solver must return (solution, info), got {type(result).__name__}; "
                        "wrap a function returning only the solution with custom_root instead"
                    )
                out, info = result
            else:
                out, info = result, None
        return self._finish(out, init, target, info)

    def _finish(self, out: Any, init: Sequence[Tensor], target: Any, info: Any) -> list[Tensor]:
        leaves = _check_like(
            out, init, self.sol_spec, f"the solution returned by the solver of {self.name}"
        )
        sol = []
        for x, x0 in zip(leaves, init):
            x = x.detach()
            if x is x0 or (x.dtype != x0.dtype):
                x = x.to(x0.dtype).clone()
            sol.append(x)
        if info is not None:
            _record(self.diagnostics, "forward", info)
        self._check_solved(target, sol, info)
        return sol

    def _report_forward(self, info: Any) -> None:
        """A forward solve's record, kept and checked (one problem of a stack whose
        solution is checked as a whole; no stationarity check of its own)."""
        _record(self.diagnostics, "forward", info)
        self._check_solved(None, [], info)

    def _check_solved(self, target: Any, sol: list[Tensor], info: Any) -> None:
        """Warn (raise when strict) if the forward solve is not what the theorem assumes."""
        from bilevel.solvers import NotStationaryError, NotStationaryWarning, check_stationarity

        if self.stationarity_tol is not None and self.kind == "objective" and target is not None:
            check_stationarity(
                target,
                tree_unflatten(list(sol), self.sol_spec),
                self.stationarity_tol,
                strict=self.strict,
            )
            return
        if info is None or getattr(info, "converged", True):
            return
        norm = float(getattr(info, "grad_norm", math.nan))
        if self.kind == "objective":
            what, point = "gradient norm", "a stationary point"
        else:
            what, point = "residual", "an exact solution of its optimality condition"
        msg = (
            f"{self.name}: the inner solver did not converge: {what} {norm:.3e} at the returned "
            f"point ({info}). The implicit hypergradient assumes {point}: raise the solver's "
            "maxiter or loosen its tol"
        )
        if self.strict:
            raise NotStationaryError(msg)
        warnings.warn(msg, NotStationaryWarning, stacklevel=2)

    def _check_residual(self, sol: list[Tensor], theta: Sequence[Tensor]) -> None:
        """``||F(solution)|| <= stationarity_tol`` for a solver that reports nothing (custom_root)."""
        from bilevel.solvers import NotStationaryError, NotStationaryWarning

        assert self.stationarity_tol is not None
        res = self.residual(sol, theta)
        norm = float(
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(r) for r in res]))
        )
        if norm <= self.stationarity_tol:
            return
        msg = (
            f"{self.name}: the solution is not a root of the optimality function: ||F|| "
            f"{norm:.3e} > stationarity_tol {self.stationarity_tol:.1e}. The implicit "
            "hypergradient assumes an exact root: solve more accurately"
        )
        if self.strict:
            raise NotStationaryError(msg)
        warnings.warn(msg, NotStationaryWarning, stacklevel=2)


def _solution_and_info(out: Any) -> tuple[Any, Any]:
    """A custom_root solver returns the solution, or ``(solution, info)`` with ``info.converged``."""
    if (
        isinstance(out, tuple)
        and len(out) == 2
        and not isinstance(out[1], (Tensor, dict, list, tuple))
        and hasattr(out[1], "converged")
    ):
        return out[0], out[1]
    return out, None

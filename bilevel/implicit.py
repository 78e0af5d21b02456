"""The implicit engine: hypergradients of solutions through their optimality conditions.

Solve an inner problem by any means, then differentiate the solution ``w*(h)`` with
the implicit function theorem applied to an optimality condition ``F(w*, h) = 0``::

    dw*/dh = -(dF/dw)^(-1) dF/dh

A backward pass solves ``(dF/dw)^T u = -v`` matrix-free (Hessian-vector products or
vector-Jacobian products inside a :mod:`bilevel.linalg` solver) and returns
``u^T dF/dh``; a forward-mode pass solves ``(dF/dw) x = -(dF/dh) dh``. Neither forms
a matrix unless the user picks :func:`bilevel.linalg.dense`.

Public entry points:

* :func:`argmin` -- ``F = grad_w inner_loss`` (symmetric Hessian; CG by default);
* :func:`root` -- any ``F``; :func:`fixed_point` -- ``F(w) = map_fn(w) - w``
  (GMRES by default);
* :func:`custom_root` -- a decorator making any solver function differentiable;
* :class:`ImplicitDiagnostics`, :func:`last_backward_info` -- what the linear solves did;
* :func:`hypergrad` -- gradients of an outer value w.r.t. a tree of hyperparameters.

How it composes with autograd and ``torch.func``: every solution is the output of one
``torch.autograd.Function`` (``setup_context`` style) whose forward runs the solver,
whose ``backward`` and ``jvp`` apply the theorem, and whose ``vmap`` rule turns a batch
of problems into one block-diagonal problem (solved by the same solver on the batched
tensors, so data-dependent loops in solvers stay legal under ``vmap``). The linear solve
of a backward or jvp is itself an instance of the same Function (the root of a linear
system), so hypergradients are differentiable again (double backward, ``jacfwd`` of
``jacrev``) and batch under ``vmap`` (``jacrev``, ``jacfwd``, batched tasks).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import Tree, tree_flatten, tree_leaves, tree_unflatten

__all__ = [
    "ImplicitDiagnostics",
    "argmin",
    "custom_root",
    "fixed_point",
    "hypergrad",
    "last_backward_info",
    "last_forward_info",
    "root",
]

# --------------------------------------------------------------------------- diagnostics

_GLOBAL_LOCK = threading.Lock()
_LAST: dict[str, Any] = {"forward": None, "backward": None}


@dataclasses.dataclass
class ImplicitDiagnostics:
    """What the solves of one implicit problem did (thread-safe record).

    Pass one to :func:`argmin`, :func:`root`, :func:`fixed_point` or
    :func:`custom_root` (``diagnostics=``); it collects the forward solver's info
    record and one :class:`bilevel.linalg.LinearSolveInfo` per linear solve made by
    a backward (``"vjp"``) or forward-mode (``"jvp"``) pass, in order.

    Attributes:
        forward: the inner solver's info record (``None`` with a given solution).
        backward: ``(kind, info)`` pairs, ``kind`` in ``{"vjp", "jvp"}``.

    Example:
        >>> h = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        >>> diag = ImplicitDiagnostics()
        >>> w = argmin(lambda w, h: ((w - 1) ** 2).sum() + h * (w**2).sum(),
        ...            torch.full((3,), 1 / 3, dtype=torch.float64), h, diagnostics=diag)
        >>> w.sum().backward()
        >>> diag.last_backward.converged
        True
    """

    forward: Any = None
    backward: list[tuple[str, Any]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    @property
    def last_backward(self) -> Any:
        """The info record of the latest linear solve (``None`` before any)."""
        with self._lock:
            return self.backward[-1][1] if self.backward else None

    def _record_forward(self, info: Any) -> None:
        with self._lock:
            self.forward = info

    def _record_linear(self, kind: str, info: Any) -> None:
        with self._lock:
            self.backward.append((kind, info))


def last_backward_info() -> Any:
    """The :class:`~bilevel.linalg.LinearSolveInfo` of the latest implicit linear solve.

    Process-wide and meant for interactive use; with several threads or problems
    at once, pass an :class:`ImplicitDiagnostics` to each call instead.

    Example:
        >>> h = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> w = argmin(lambda w, h: ((w - h) ** 2).sum(), torch.ones(2, dtype=torch.float64), h)
        >>> w.sum().backward()
        >>> last_backward_info().method
        'cg'
    """
    with _GLOBAL_LOCK:
        return _LAST["backward"]


def last_forward_info() -> Any:
    """The inner solver's info record of the latest implicit forward solve (or None)."""
    with _GLOBAL_LOCK:
        return _LAST["forward"]


def _record(diagnostics: ImplicitDiagnostics | None, kind: str, info: Any) -> None:
    with _GLOBAL_LOCK:
        _LAST["forward" if kind == "forward" else "backward"] = info
    if diagnostics is not None:
        if kind == "forward":
            diagnostics._record_forward(info)
        else:
            diagnostics._record_linear(kind, info)


# --------------------------------------------------------------------------- small helpers


def _is_forward_ad_gap(err: BaseException) -> bool:
    """True for errors that say an op has no forward-mode (jvp) formula."""
    msg = str(err).lower()
    keys = ("forward ad", "forward-mode", "forward mode", "jvp", "fwd_grad", "forward grad")
    return isinstance(err, (NotImplementedError, RuntimeError)) and any(k in msg for k in keys)


class _ForwardModeSwitch:
    """Shared flag: use forward-mode AD for this problem's products (until it fails once)."""

    def __init__(self, forward: bool = True) -> None:
        self.ok = forward


def _jvp(
    fn: Callable[..., Any],
    primals: Sequence[Any],
    tangents: Sequence[Any],
    switch: _ForwardModeSwitch,
) -> Any:
    """``J_fn(primals) @ tangents`` by forward mode, or reverse-over-reverse when an op lacks it."""
    # forward AD refuses tensors whose elements share memory (expanded batch dims)
    primals = [_dense(p) for p in primals]
    tangents = [_dense(t) for t in tangents]
    first_err: BaseException | None = None
    if switch.ok:
        try:
            return torch.func.jvp(fn, tuple(primals), tuple(tangents))[1]
        except (RuntimeError, NotImplementedError) as err:
            if not _is_forward_ad_gap(err):
                raise
            switch.ok = False
            first_err = err
    # J t = d/du <vjp(u), t>: the VJP is linear in u, so its own VJP applied to t is J t.
    try:
        out, vjp_fn = _vjp(fn, *primals)
        out_leaves, out_spec = tree_flatten(out)
        zeros = tree_unflatten([torch.zeros_like(x) for x in out_leaves], out_spec)
        _, vjp2 = _vjp(vjp_fn, zeros)
        return vjp2(tuple(tangents))[0]
    except Exception as err:
        if first_err is not None:
            raise err from first_err
        raise


def _vjp(fn: Callable[..., Any], *primals: Any) -> tuple[Any, Callable[..., Any]]:
    res = torch.func.vjp(fn, *primals)
    return res[0], res[1]


def _dense(tree: Any) -> Any:
    leaves, spec = tree_flatten(tree)
    return tree_unflatten(
        [x if not isinstance(x, Tensor) or x.is_contiguous() else x.contiguous() for x in leaves],
        spec,
    )


def _zeros_like_leaves(leaves: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(x) for x in leaves]


def _add_leaves(a: Sequence[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
    return [x + y for x, y in zip(a, b)]


def _check_like(got: Any, like: Sequence[Tensor], spec: Any, what: str) -> list[Tensor]:
    """Flatten ``got`` and check it has the structure and shapes of the solution."""
    leaves, got_spec = tree_flatten(got)
    if got_spec != spec:
        raise ValueError(
            f"{what} must have the structure of the solution/init: got {got_spec}, expected {spec}"
        )
    for x, ref in zip(leaves, like):
        if not isinstance(x, Tensor):
            raise TypeError(f"{what} must contain tensors, found {type(x).__name__}")
        if x.shape != ref.shape:
            raise ValueError(
                f"{what} must have the shapes of the solution/init: got a leaf of shape "
                f"{tuple(x.shape)}, expected {tuple(ref.shape)}"
            )
    return leaves


class _Packer:
    """Splits a tree of hyperparameters and data into tensors (differentiable) and constants."""

    def __init__(self, tree: Any) -> None:
        leaves, self.spec = tree_flatten(tree)
        self.tensor_idx = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
        self.constants = [None if isinstance(x, Tensor) else x for x in leaves]
        self.tensors: list[Tensor] = [leaves[i] for i in self.tensor_idx]

    def unpack(self, tensors: Sequence[Tensor]) -> Any:
        leaves = list(self.constants)
        for i, t in zip(self.tensor_idx, tensors):
            leaves[i] = t
        return tree_unflatten(leaves, self.spec)


def _scalar_loss(value: Any, where: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{where} must return a tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(
            f"{where} must return a scalar (0-d tensor), got a tensor of shape {tuple(value.shape)}; "
            "reduce it, e.g. with .sum() or .mean()"
        )
    return value.reshape(())


# --------------------------------------------------------------------------- problems
#
# A problem knows its optimality function F(sol, theta) over flat lists of tensors
# (sol: the solution's leaves, theta: the tensor leaves of hyperparameters and data),
# the products with dF/dsol and its transpose, and how to run its solver. Problems are
# the non-tensor first argument of _Implicit; _BatchedProblem is the same problem for a
# stack of instances (the vmap rule), _LinearProblem the linear system of a backward or
# jvp pass.


class _Problem:
    kind: str = "opaque"  # how the solver's target batches: objective | map | linear | opaque
    symmetric: bool = False
    linear_solver: Any = None
    diagnostics: ImplicitDiagnostics | None = None
    switch: _ForwardModeSwitch
    n_sol: int
    n_theta: int
    name: str = "implicit"

    def residual(self, sol: Sequence[Tensor], theta: Sequence[Tensor]) -> list[Tensor]:
        raise NotImplementedError  # pragma: no cover - abstract: every subclass defines it

    def matvec(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor], v: Sequence[Tensor]
    ) -> list[Tensor]:
        """``(dF/dsol) v``."""
        return list(_jvp(lambda s: self.residual(s, theta), [list(sol)], [list(v)], self.switch))

    def rmatvec(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor], v: Sequence[Tensor]
    ) -> list[Tensor]:
        """``(dF/dsol)^T v``."""
        _, fn = _vjp(lambda s: self.residual(s, theta), list(sol))
        return list(fn(list(v))[0])

    def target(self, theta: Sequence[Tensor]) -> Any:
        """What the solver is given (objective, map, (matvec, rhs)), closed over theta."""
        raise NotImplementedError  # pragma: no cover - abstract: every subclass defines it

    def run(self, target: Any, init: Sequence[Tensor]) -> list[Tensor]:
        """Run the solver on ``target`` from ``init``; detached solution leaves."""
        raise NotImplementedError  # pragma: no cover - abstract: every subclass defines it

    def solve(self, init: Sequence[Tensor], theta: Sequence[Tensor]) -> list[Tensor]:
        return self.run(self.target(theta), init)

    # the theta-side of the theorem -------------------------------------------------
    def vjp_theta(
        self,
        sol: Sequence[Tensor],
        theta: Sequence[Tensor],
        u: Sequence[Tensor],
        which: Sequence[int],
    ) -> list[Tensor]:
        """``(dF/dtheta_i)^T u`` for ``i in which``."""
        theta = list(theta)

        def f(*sel: Tensor) -> list[Tensor]:
            th = list(theta)
            for i, t in zip(which, sel):
                th[i] = t
            return self.residual(sol, th)

        _, fn = _vjp(f, *[theta[i] for i in which])
        return list(fn(list(u)))

    def jvp_theta(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor], tangents: Sequence[Tensor | None]
    ) -> list[Tensor]:
        """``sum_i (dF/dtheta_i) dtheta_i`` over the non-None tangents."""
        theta = list(theta)
        which = [i for i, t in enumerate(tangents) if t is not None]
        if not which:
            return _zeros_like_leaves(sol)

        def f(*sel: Tensor) -> list[Tensor]:
            th = list(theta)
            for i, t in zip(which, sel):
                th[i] = t
            return self.residual(sol, th)

        prim = [theta[i] for i in which]
        tang = [tangents[i] for i in which]
        return list(_jvp(f, prim, tang, self.switch))

    def linear(self, transpose: bool) -> _LinearProblem:
        return _LinearProblem(self, transpose)

    def reused_operator(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor]
    ) -> Callable[[Sequence[Tensor]], list[Tensor]] | None:
        """A faster ``v -> (dF/dsol) v`` for one linear solve's loop, or None."""
        return None


class _UserProblem(_Problem):
    """A problem defined by user functions over trees: argmin, root, fixed point, custom_root."""

    def __init__(
        self,
        *,
        name: str,
        residual: Callable[[Any, Any, Any], Any],
        target: Callable[[Any, Any], Any] | None,
        kind: str,
        sol_like: Sequence[Tensor],
        sol_spec: Any,
        packer: _Packer,
        solver: Callable[..., Any] | None,
        linear_solver: Any,
        symmetric: bool,
        diagnostics: ImplicitDiagnostics | None,
        objective: Callable[[Any, Any, Any], Tensor] | None = None,
        stationarity_tol: float | None = None,
        strict: bool = False,
        returns_info: bool = True,
        hvp: str = "forward",
    ) -> None:
        self.name = name
        self._residual = residual
        self._target = target
        self.kind = kind
        self.sol_spec = sol_spec
        self.packer = packer
        self.solver = solver
        self.linear_solver = linear_solver
        self.symmetric = symmetric
        self.diagnostics = diagnostics
        self.objective = objective
        self.stationarity_tol = stationarity_tol
        self.strict = strict
        self.returns_info = returns_info
        self.switch = _ForwardModeSwitch(forward=hvp == "forward")
        self.n_sol = len(sol_like)
        self.n_theta = len(packer.tensors)

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

        return hvp

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
            out = self.solver(w0, h, *d)
            return self._finish(out, init, None, None)
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
        if self.kind == "objective" and target is not None:
            self._check_stationary(target, sol, info)
        return sol

    def _check_stationary(
        self, objective: Callable[[Any], Tensor], sol: list[Tensor], info: Any
    ) -> None:
        from bilevel.solvers import NotStationaryError, NotStationaryWarning, check_stationarity

        if self.stationarity_tol is not None:
            check_stationarity(
                objective,
                tree_unflatten(list(sol), self.sol_spec),
                self.stationarity_tol,
                strict=self.strict,
            )
            return
        if info is None or getattr(info, "converged", True):
            return
        msg = (
            f"{self.name}: the inner solver did not converge: gradient norm "
            f"{float(getattr(info, 'grad_norm', math.nan)):.3e} at the returned point ({info}). "
            "The implicit hypergradient assumes a stationary point: raise the solver's maxiter "
            "or loosen its tol"
        )
        if self.strict:
            raise NotStationaryError(msg)
        warnings.warn(msg, NotStationaryWarning, stacklevel=2)


class _LinearProblem(_Problem):
    """``op(sol, theta) u + c = 0`` with ``op = dF/dsol`` (jvp) or its transpose (backward).

    Its parameters are ``[*theta, *sol, *c]`` of the parent problem, so differentiating
    through its solution differentiates the parent's hypergradient (double backward).
    """

    kind = "linear"

    def __init__(self, parent: _Problem, transpose: bool) -> None:
        self.parent = parent
        self.transpose = transpose
        self.symmetric = parent.symmetric
        self.linear_solver = parent.linear_solver
        self.diagnostics = parent.diagnostics
        self.switch = parent.switch
        self.n_sol = parent.n_sol
        self.n_theta = parent.n_theta + 2 * parent.n_sol
        self.name = parent.name

    def _split(self, theta: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        p, s = self.parent.n_theta, self.parent.n_sol
        theta = list(theta)
        return theta[:p], theta[p : p + s], theta[p + s :]

    def _op(self, transpose: bool) -> Callable[..., list[Tensor]]:
        return self.parent.rmatvec if transpose else self.parent.matvec

    def residual(self, sol: Sequence[Tensor], theta: Sequence[Tensor]) -> list[Tensor]:
        pth, psol, c = self._split(theta)
        return _add_leaves(self._op(self.transpose)(psol, pth, sol), c)

    def matvec(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor], v: Sequence[Tensor]
    ) -> list[Tensor]:
        pth, psol, _ = self._split(theta)
        return self._op(self.transpose)(psol, pth, v)

    def rmatvec(
        self, sol: Sequence[Tensor], theta: Sequence[Tensor], v: Sequence[Tensor]
    ) -> list[Tensor]:
        pth, psol, _ = self._split(theta)
        return self._op(not self.transpose)(psol, pth, v)

    def target(self, theta: Sequence[Tensor]) -> Any:
        pth, psol, c = self._split(theta)
        if self.parent.symmetric or not self.transpose:
            fast = self.parent.reused_operator(psol, pth)
            if fast is not None:
                return fast, c
        return self.plain_target(theta)

    def plain_target(self, theta: Sequence[Tensor]) -> Any:
        pth, psol, c = self._split(theta)
        op = self._op(self.transpose)
        return (lambda v: op(psol, pth, list(v))), c

    def run(self, target: Any, init: Sequence[Tensor]) -> list[Tensor]:
        matvec, c = target
        b = [-x for x in c]
        kind = "vjp" if self.transpose else "jvp"
        try:
            x, info = self.linear_solver(matvec, b)
        except torch.linalg.LinAlgError as err:
            raise torch.linalg.LinAlgError(
                f"{self.name}: the linear solve of implicit differentiation failed: {err}. "
                "dF/dw is singular at the solution (is the minimizer / root unique? is the "
                "inner problem strongly convex there?)"
            ) from err
        _record(self.diagnostics, kind, info)
        if _should_warn(info):
            warnings.warn(
                f"{self.name}: the {'backward' if self.transpose else 'forward-mode'} linear solve "
                f"of implicit differentiation did not converge ({info}); the hypergradient may be "
                "inaccurate. Hints: raise maxiter or loosen tol, add damping, use minres for a "
                "symmetric indefinite dF/dw (a saddle point) or gmres for a non-symmetric one, "
                "and check that the inner solution is accurate",
                RuntimeWarning,
                stacklevel=2,
            )
        return [t.detach() for t in tree_leaves(x)]


def _should_warn(info: Any) -> bool:
    """A failed linear solve, except a truncated (but not diverging) Neumann series."""
    if not getattr(info, "checked", True) or getattr(info, "converged", True):
        return False
    if getattr(info, "method", "") == "neumann":
        # truncation is the method's design (Lorraine et al. 2020); divergence is not
        msg = str(getattr(info, "message", "")).lower()
        return "diverg" in msg or not math.isfinite(float(getattr(info, "residual_norm", 0.0)))
    return True


def _vmap_over(fn: Callable[..., Any], in_dims: tuple[Any, ...]) -> Callable[..., Any]:
    return torch.func.vmap(fn, in_dims=in_dims)


class _BatchedProblem(_Problem):
    """A stack of independent instances of ``base`` (the ``vmap`` rule): one joint problem.

    Solutions carry the batch in dimension 0; parameters carry it in dimension 0 or are
    shared (``None``). The joint optimality function is block diagonal, so the joint
    solve (one L-BFGS run on the summed objective, one CG on the block-diagonal system,
    ...) returns every instance's solution.
    """

    def __init__(self, base: _Problem, theta_dims: Sequence[int | None], batch_size: int) -> None:
        self.base = base
        self.dims = list(theta_dims)
        self.batch_size = batch_size
        self.kind = base.kind
        self.symmetric = base.symmetric
        self.linear_solver = base.linear_solver
        self.diagnostics = base.diagnostics
        self.switch = base.switch
        self.n_sol = base.n_sol
        self.n_theta = base.n_theta
        self.name = base.name

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

    def target(self, theta: Sequence[Tensor]) -> Any:
        base, dims, theta = self.base, self.dims, list(theta)
        if self.kind == "linear":
            # the plain operator: the reused-graph one cannot run under vmap
            plain = getattr(base, "plain_target", base.target)
            mv = _vmap_over(lambda v, th: plain(th)[0](v), (0, dims))
            c = _vmap_over(lambda th: list(plain(th)[1]), (dims,))(theta)
            return (lambda v: list(mv(list(v), theta))), list(c)
        if isinstance(base, _UserProblem) and base._target is None:
            return None
        spec = getattr(base, "sol_spec", None)
        if spec is None:
            return None

        def one(w_leaves: list[Tensor], th: list[Tensor]) -> Any:
            return base.target(th)(tree_unflatten(list(w_leaves), spec))

        joint = _vmap_over(one, (0, dims))
        if self.kind == "objective":
            return lambda W: joint(tree_leaves(W), theta).sum()
        return lambda W: tree_unflatten(tree_leaves(joint(tree_leaves(W), theta)), spec)

    @property
    def sol_spec(self) -> Any:
        return getattr(self.base, "sol_spec", None)

    def run(self, target: Any, init: Sequence[Tensor]) -> list[Tensor]:
        return self.base.run(target, init)

    def solve(self, init: Sequence[Tensor], theta: Sequence[Tensor]) -> list[Tensor]:
        if self.kind != "opaque":
            return self.run(self.target(theta), init)
        # an arbitrary solver function cannot be batched: solve instance by instance
        outs = []
        for i in range(self.batch_size):
            th = [t[i] if d is not None else t for t, d in zip(theta, self.dims)]
            outs.append(self.base.solve([x[i] for x in init], th))
        return [torch.stack(col) for col in zip(*outs)]


# --------------------------------------------------------------------------- the Function


class _Implicit(torch.autograd.Function):
    """Solution of ``problem`` from ``init`` with parameters ``theta``; IFT derivatives."""

    generate_vmap_rule = False

    @staticmethod
    def forward(problem: _Problem, n_sol: int, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        init = [t.detach() for t in tensors[:n_sol]]
        theta = [t.detach() for t in tensors[n_sol:]]
        with torch.no_grad():
            sol = problem.solve(init, theta)
        return tuple(sol)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        problem, n_sol, *tensors = inputs
        theta = tensors[n_sol:]
        ctx.problem = problem
        ctx.n_sol = n_sol
        ctx.n_theta = len(theta)
        ctx.save_for_backward(*theta, *output)
        ctx.save_for_forward(*theta, *output)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        problem: _Problem = ctx.problem
        n_sol, n_theta = ctx.n_sol, ctx.n_theta
        saved = ctx.saved_tensors
        theta, sol = list(saved[:n_theta]), list(saved[n_theta:])
        needs = ctx.needs_input_grad[2 + n_sol :]
        which = [i for i, (t, n) in enumerate(zip(theta, needs)) if n and t.is_floating_point()]
        out: list[Tensor | None] = [None] * (2 + n_sol + n_theta)
        if not which:
            return tuple(out)
        g = [torch.zeros_like(s) if x is None else x for x, s in zip(grads, sol)]
        # u solves (dF/dw)^T u = -g; it is itself an implicit solution, so differentiable
        lin = problem.linear(transpose=True)
        u = _Implicit.apply(lin, n_sol, *_zeros_like_leaves(sol), *theta, *sol, *g)
        gtheta = problem.vjp_theta(sol, theta, list(u), which)
        for i, gt in zip(which, gtheta):
            out[2 + n_sol + i] = gt
        return tuple(out)

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> tuple[Tensor, ...]:  # type: ignore[override]
        problem: _Problem = ctx.problem
        n_sol, n_theta = ctx.n_sol, ctx.n_theta
        saved = ctx.saved_tensors
        theta, sol = list(saved[:n_theta]), list(saved[n_theta:])
        dtheta = list(tangents[2 + n_sol :])
        dtheta = [
            t if (t is not None and th.is_floating_point()) else None
            for t, th in zip(dtheta, theta)
        ]
        if all(t is None for t in dtheta):
            return tuple(_zeros_like_leaves(sol))
        c = problem.jvp_theta(sol, theta, dtheta)
        lin = problem.linear(transpose=False)
        x = _Implicit.apply(lin, n_sol, *_zeros_like_leaves(sol), *theta, *sol, *c)
        return tuple(x)

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[Any, ...], problem: _Problem, n_sol: int, *tensors: Tensor
    ) -> tuple[Any, Any]:
        B = info.batch_size
        dims = in_dims[2:]
        init = []
        for t, d in zip(tensors[:n_sol], dims[:n_sol]):
            init.append(t.unsqueeze(0).expand(B, *t.shape) if d is None else t.movedim(d, 0))
        theta, tdims = [], []
        for t, d in zip(tensors[n_sol:], dims[n_sol:]):
            theta.append(t if d is None else t.movedim(d, 0))
            tdims.append(None if d is None else 0)
        batched = _BatchedProblem(problem, tdims, B)
        out = _Implicit.apply(batched, n_sol, *init, *theta)
        return tuple(out), tuple(0 for _ in out)


# --------------------------------------------------------------------------- API


def _check_solution(value: Any, name: str) -> tuple[list[Tensor], Any]:
    leaves, spec = tree_flatten(value)
    if not leaves:
        raise ValueError(
            f"{name} must be a tensor or a non-empty dict/list/tuple of tensors, got {value!r}"
        )
    for x in leaves:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must contain only tensors, found a {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must contain floating-point tensors, found dtype {x.dtype}")
    return leaves, spec


def _check_hparams(hparams: Any) -> None:
    if not isinstance(hparams, (Tensor, Mapping)):
        raise TypeError(
            f"hparams must be a tensor or a dict of tensors (numbers allowed as constants), "
            f"got {type(hparams).__name__}"
        )


def _check_linear_solver(linear_solver: Any, symmetric: bool | None, name: str) -> tuple[Any, bool]:
    from bilevel import linalg

    if linear_solver is not None and not callable(linear_solver):
        raise TypeError(
            f"linear_solver must be a bilevel.linalg solver (e.g. bilevel.linalg.cg()), "
            f"got {type(linear_solver).__name__}"
        )
    solver_sym = bool(getattr(linear_solver, "symmetric", False))
    sname = getattr(linear_solver, "name", type(linear_solver).__name__)
    if symmetric is None:
        if linear_solver is None:
            return linalg.gmres(), False
        if solver_sym:
            warnings.warn(
                f"{name}: linear_solver={sname} assumes a symmetric dF/dw; treating the "
                "problem as symmetric. Pass symmetric=True to silence this, or use "
                "bilevel.linalg.gmres() for a non-symmetric Jacobian",
                UserWarning,
                stacklevel=3,
            )
        return linear_solver, solver_sym
    if linear_solver is None:
        return (linalg.cg() if symmetric else linalg.gmres()), bool(symmetric)
    if solver_sym and not symmetric:
        raise ValueError(
            f"{name}: linear_solver={sname} only handles symmetric operators but symmetric=False; "
            "use bilevel.linalg.gmres() (or dense()) for a non-symmetric dF/dw, or pass "
            "symmetric=True if dF/dw is symmetric"
        )
    return linear_solver, bool(symmetric)


def _call_implicit(problem: _Problem, init_leaves: list[Tensor], packer: _Packer, spec: Any) -> Any:
    tensors, packer.tensors = packer.tensors, []  # the graph keeps what backward needs; no more
    out = _Implicit.apply(problem, len(init_leaves), *[x.detach() for x in init_leaves], *tensors)
    return tree_unflatten(list(out), spec)


def _with_data(fn: Callable[..., Any], data_given: bool) -> Callable[[Any, Any, Any], Any]:
    if data_given:
        return lambda w, h, d: fn(w, h, d)
    return lambda w, h, d: fn(w, h)


def argmin(
    inner_loss: Callable[..., Tensor],
    solution_or_init: Tree,
    hparams: Any,
    data: Any = None,
    *,
    solver: Callable[..., Any] | None = None,
    linear_solver: Any = None,
    stationarity_tol: float | None = None,
    strict: bool = False,
    diagnostics: ImplicitDiagnostics | None = None,
    hvp: str = "reverse",
) -> Tree:
    """``argmin_w inner_loss(w, hparams[, data])``, differentiable w.r.t. hparams and data.

    Args:
        inner_loss: ``inner_loss(w, hparams)`` or, with ``data``, ``inner_loss(w, hparams,
            data)``; returns a scalar tensor.
        solution_or_init: with ``solver=None`` the solution, already computed (any way: a
            closed form, an external solver); otherwise the solver's starting point. A
            tensor or a dict/list/tuple of tensors of any shapes.
        hparams: a tensor or a dict of tensors / numbers / nested dicts. Gradients flow to
            every tensor in it that requires grad; numbers are constants.
        data: anything (e.g. a batch ``(x, y)``); its tensors are differentiable too.
        solver: ``solver(objective, init) -> (solution, info)`` minimizing ``objective(w)``,
            e.g. :func:`bilevel.solvers.lbfgs`; run without gradient tracking.
        linear_solver: the backward's linear solver (default :func:`bilevel.linalg.cg`);
            the operator is the Hessian ``d^2 inner_loss / dw^2`` by Hessian-vector products.
        stationarity_tol: if given, the gradient norm at the solution is checked against it
            (a ``RuntimeWarning`` naming the norm, or ``RuntimeError`` when ``strict``). Without
            it, a solver that reports ``converged=False`` triggers the same warning.
        strict: raise instead of warning when the solution is not stationary.
        diagnostics: an :class:`ImplicitDiagnostics` collecting the solves' info records.
        hvp: ``"reverse"`` (default): Hessian-vector products by reverse-over-reverse,
            measured 2.5-4x faster on CPU than forward-over-reverse for losses dominated by
            matrix products (torch's forward-mode formulas for ``mm``/``mv`` copy the
            matrix); ``"forward"``: forward-over-reverse (``torch.func.jvp`` of
            ``torch.func.grad``, no double backward; falls back to reverse-over-reverse,
            once, when an op has no forward-mode formula).

    Returns:
        The solution, shaped like ``solution_or_init``, attached to the autograd graph:
        backward, double backward, ``torch.func.jvp``/``jacfwd``/``jacrev``/``vmap`` work.

    Example:
        >>> X = torch.randn(20, 3, dtype=torch.float64); y = torch.randn(20, dtype=torch.float64)
        >>> l2 = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        >>> loss = lambda w, h: ((X @ w - y) ** 2).sum() + h * (w ** 2).sum()
        >>> w_star = torch.linalg.solve(X.T @ X + l2.detach() * torch.eye(3, dtype=torch.float64), X.T @ y)
        >>> w = argmin(loss, w_star, l2)            # solution given: closed form
        >>> w.sum().backward()
        >>> expected = -(torch.linalg.solve(X.T @ X + 0.5 * torch.eye(3, dtype=torch.float64), w_star)).sum()
        >>> bool(torch.allclose(l2.grad, expected))
        True
    """
    if not callable(inner_loss):
        raise TypeError(f"inner_loss must be callable, got {type(inner_loss).__name__}")
    if hvp not in ("forward", "reverse"):
        raise ValueError(f"hvp must be 'forward' or 'reverse', got {hvp!r}")
    _check_hparams(hparams)
    init_leaves, spec = _check_solution(solution_or_init, "solution_or_init")
    if solver is not None and not callable(solver):
        raise TypeError(
            f"solver must be callable solver(objective, init) or None, got {type(solver).__name__}"
        )
    from bilevel import linalg

    if linear_solver is None:
        linear_solver = linalg.cg()
    elif not callable(linear_solver):
        raise TypeError(
            f"linear_solver must be a bilevel.linalg solver, got {type(linear_solver).__name__}"
        )
    loss3 = _with_data(inner_loss, data is not None)

    def objective(w: Any, h: Any, d: Any) -> Tensor:
        return _scalar_loss(loss3(w, h, d), "inner_loss")

    # fail early on a non-scalar loss (shapes only; values are not read)
    with torch.no_grad():
        objective(solution_or_init, hparams, data)

    def residual(w: Any, h: Any, d: Any) -> Any:
        return torch.func.grad(lambda ww: objective(ww, h, d))(w)

    def target(h: Any, d: Any) -> Callable[[Any], Tensor]:
        return lambda w: objective(w, h, d)

    packer = _Packer((hparams, data))
    problem = _UserProblem(
        name="argmin",
        residual=residual,
        target=target,
        kind="objective",
        sol_like=init_leaves,
        sol_spec=spec,
        packer=packer,
        solver=solver,
        linear_solver=linear_solver,
        symmetric=True,
        diagnostics=diagnostics,
        objective=objective,
        stationarity_tol=stationarity_tol,
        strict=strict,
        hvp=hvp,
    )
    return _call_implicit(problem, init_leaves, packer, spec)


def _check_residual_shape(
    fn: Callable[[Any, Any, Any], Any],
    w: Any,
    h: Any,
    d: Any,
    leaves: list[Tensor],
    spec: Any,
    what: str,
) -> None:
    with torch.no_grad():
        _check_like(fn(w, h, d), leaves, spec, what)


def root(
    optimality_fn: Callable[..., Tree],
    solution_or_init: Tree,
    hparams: Any,
    data: Any = None,
    *,
    solver: Callable[..., Any] | None = None,
    linear_solver: Any = None,
    symmetric: bool | None = None,
    diagnostics: ImplicitDiagnostics | None = None,
) -> Tree:
    """A root ``w`` of ``optimality_fn(w, hparams[, data]) = 0``, differentiable by the IFT.

    Args:
        optimality_fn: returns a residual shaped like ``w``.
        solution_or_init: the root (``solver=None``) or the solver's starting point.
        hparams, data: as in :func:`argmin`.
        solver: ``solver(fn, init) -> (solution, info)`` finding a root of ``fn(w)``.
        linear_solver: default :func:`bilevel.linalg.gmres` (``cg`` when ``symmetric``).
        symmetric: whether ``dF/dw`` is symmetric. ``None`` infers it from the linear
            solver (with a warning for a symmetric-only one); ``False`` with ``cg``/
            ``minres`` is an error.
        diagnostics: an :class:`ImplicitDiagnostics`.

    Example:
        >>> h = torch.tensor([1.0, 4.0], dtype=torch.float64, requires_grad=True)
        >>> w = root(lambda w, h: w ** 2 - h, torch.sqrt(h.detach()), h)   # w = sqrt(h)
        >>> w.sum().backward()
        >>> h.grad                                                          # 1 / (2 sqrt(h))
        tensor([0.5000, 0.2500], dtype=torch.float64)
    """
    if not callable(optimality_fn):
        raise TypeError(f"optimality_fn must be callable, got {type(optimality_fn).__name__}")
    _check_hparams(hparams)
    init_leaves, spec = _check_solution(solution_or_init, "solution_or_init")
    if solver is not None and not callable(solver):
        raise TypeError(
            f"solver must be callable solver(fn, init) or None, got {type(solver).__name__}"
        )
    linear_solver, symmetric = _check_linear_solver(linear_solver, symmetric, "root")
    fn3 = _with_data(optimality_fn, data is not None)
    _check_residual_shape(
        fn3, solution_or_init, hparams, data, init_leaves, spec, "the output of optimality_fn"
    )
    packer = _Packer((hparams, data))
    problem = _UserProblem(
        name="root",
        residual=fn3,
        target=lambda h, d: lambda w: fn3(w, h, d),
        kind="map",
        sol_like=init_leaves,
        sol_spec=spec,
        packer=packer,
        solver=solver,
        linear_solver=linear_solver,
        symmetric=symmetric,
        diagnostics=diagnostics,
    )
    return _call_implicit(problem, init_leaves, packer, spec)


def fixed_point(
    map_fn: Callable[..., Tree],
    solution_or_init: Tree,
    hparams: Any,
    data: Any = None,
    *,
    solver: Callable[..., Any] | None = None,
    linear_solver: Any = None,
    symmetric: bool | None = None,
    diagnostics: ImplicitDiagnostics | None = None,
) -> Tree:
    """A fixed point ``w = map_fn(w, hparams[, data])``, differentiable by the IFT.

    The optimality function is ``F(w) = map_fn(w) - w``; ``dF/dw = J - I`` is in general
    not symmetric, so the default linear solver is :func:`bilevel.linalg.gmres`.

    Args:
        map_fn: returns a tree shaped like ``w``.
        solution_or_init: the fixed point (``solver=None``) or the starting point.
        solver: ``solver(map, init) -> (solution, info)``, e.g.
            :func:`bilevel.solvers.fixed_point_iteration` or :func:`bilevel.solvers.anderson`.
        linear_solver, symmetric, diagnostics: as in :func:`root`.

    Example:
        >>> h = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        >>> w = fixed_point(lambda w, h: 0.5 * w + h, 2 * h.detach(), h)   # w = 2 h
        >>> w.backward(); h.grad
        tensor(2., dtype=torch.float64)
    """
    if not callable(map_fn):
        raise TypeError(f"map_fn must be callable, got {type(map_fn).__name__}")
    _check_hparams(hparams)
    init_leaves, spec = _check_solution(solution_or_init, "solution_or_init")
    if solver is not None and not callable(solver):
        raise TypeError(
            f"solver must be callable solver(map_fn, init) or None, got {type(solver).__name__}"
        )
    linear_solver, symmetric = _check_linear_solver(linear_solver, symmetric, "fixed_point")
    map3 = _with_data(map_fn, data is not None)
    _check_residual_shape(
        map3, solution_or_init, hparams, data, init_leaves, spec, "the output of map_fn"
    )

    return _solve_fixed_point(
        "fixed_point",
        map3,
        lambda h, d: lambda w: map3(w, h, d),
        "map",
        init_leaves,
        spec,
        hparams,
        data,
        solver,
        linear_solver,
        symmetric,
        diagnostics,
    )


def _solve_fixed_point(
    name: str,
    map3: Callable[[Any, Any, Any], Any],
    target: Callable[[Any, Any], Any],
    kind: str,
    init_leaves: list[Tensor],
    spec: Any,
    hparams: Any,
    data: Any,
    solver: Any,
    linear_solver: Any,
    symmetric: bool,
    diagnostics: ImplicitDiagnostics | None,
) -> Tree:
    """The implicit layer of ``w = map(w)``, i.e. of the root of ``F(w) = map(w) - w``; the
    solver is given ``target(hparams, data)`` (the map itself, or an objective)."""

    def residual(w: Any, h: Any, d: Any) -> Any:
        mapped, mspec = tree_flatten(map3(w, h, d))
        wl, _ = tree_flatten(w)
        return tree_unflatten([m - x for m, x in zip(mapped, wl)], mspec)

    packer = _Packer((hparams, data))
    problem = _UserProblem(
        name=name,
        residual=residual,
        target=target,
        kind=kind,
        sol_like=init_leaves,
        sol_spec=spec,
        packer=packer,
        solver=solver,
        linear_solver=linear_solver,
        symmetric=symmetric,
        diagnostics=diagnostics,
    )
    return _call_implicit(problem, init_leaves, packer, spec)


def _constrained_argmin(
    loss3: Callable[[Any, Any, Any], Tensor],
    step_map: Callable[[Any, Any, Any], Any],
    solution_or_init: Tree,
    hparams: Any,
    data: Any,
    *,
    solver: Callable[..., Any],
    linear_solver: Any,
    diagnostics: ImplicitDiagnostics | None,
) -> Tree:
    """The fixed point of ``step_map`` found by minimizing ``loss3`` (constraints.projected_argmin)."""
    _check_hparams(hparams)
    init_leaves, spec = _check_solution(solution_or_init, "solution_or_init")
    linear_solver, symmetric = _check_linear_solver(linear_solver, None, "projected_argmin")
    _check_residual_shape(
        step_map, solution_or_init, hparams, data, init_leaves, spec, "the projected gradient step"
    )

    return _solve_fixed_point(
        "projected_argmin",
        step_map,
        lambda h, d: lambda w: loss3(w, h, d),
        "objective",
        init_leaves,
        spec,
        hparams,
        data,
        solver,
        linear_solver,
        symmetric,
        diagnostics,
    )


def custom_root(
    optimality_fn: Callable[..., Tree],
    linear_solver: Any = None,
    symmetric: bool | None = None,
    diagnostics: ImplicitDiagnostics | None = None,
) -> Callable[[Callable[..., Tree]], Callable[..., Tree]]:
    """Decorator: make ``solver_fn(init, hparams, *args) -> solution`` differentiable.

    The solution is differentiated by the implicit function theorem applied to
    ``optimality_fn(solution, hparams, *args) = 0`` (same extra arguments as the
    solver). The solver runs without gradient tracking, on detached inputs, and may be
    anything (closed form, scipy, a loop with early stopping). Under ``torch.func.vmap``
    the solver is called once per batch element.

    Args:
        optimality_fn: ``F(solution, hparams, *args)``, a tree shaped like the solution.
        linear_solver: the linear solver for backward/jvp passes (default ``gmres``, or
            ``cg`` when ``symmetric=True``).
        symmetric: whether ``dF/dw`` is symmetric (e.g. ``F`` is a gradient); see :func:`root`.
        diagnostics: an :class:`ImplicitDiagnostics` shared by every call.

    Example:
        >>> def optimality(w, h, X, y):           # gradient of the ridge objective
        ...     return X.T @ (X @ w - y) + h * w
        >>> @custom_root(optimality, symmetric=True)
        ... def ridge(init, h, X, y):
        ...     return torch.linalg.solve(X.T @ X + h * torch.eye(X.shape[1], dtype=X.dtype), X.T @ y)
        >>> X = torch.randn(10, 3, dtype=torch.float64); y = torch.randn(10, dtype=torch.float64)
        >>> h = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> w = ridge(torch.zeros(3, dtype=torch.float64), h, X, y)
        >>> w.sum().backward(); h.grad.shape
        torch.Size([])
    """
    if not callable(optimality_fn):
        raise TypeError(f"optimality_fn must be callable, got {type(optimality_fn).__name__}")
    lin, sym = _check_linear_solver(linear_solver, symmetric, "custom_root")

    def decorator(solver_fn: Callable[..., Tree]) -> Callable[..., Tree]:
        if not callable(solver_fn):
            raise TypeError(
                f"custom_root decorates a solver function, got {type(solver_fn).__name__}"
            )

        def wrapped(init: Tree, hparams: Any, *args: Any) -> Tree:
            _check_hparams(hparams)
            init_leaves, spec = _check_solution(init, "init")
            fn3 = lambda w, h, d: optimality_fn(w, h, *d)  # noqa: E731
            packer = _Packer((hparams, tuple(args)))
            problem = _UserProblem(
                name=getattr(solver_fn, "__name__", "custom_root"),
                residual=fn3,
                target=None,
                kind="opaque",
                sol_like=init_leaves,
                sol_spec=spec,
                packer=packer,
                solver=solver_fn,
                linear_solver=lin,
                symmetric=sym,
                diagnostics=diagnostics,
                returns_info=False,
            )
            return _call_implicit(problem, init_leaves, packer, spec)

        wrapped.__name__ = getattr(solver_fn, "__name__", "wrapped")
        wrapped.__doc__ = solver_fn.__doc__
        wrapped.__wrapped__ = solver_fn  # type: ignore[attr-defined]
        return wrapped

    return decorator


def hypergrad(
    outer_value: Tensor,
    hparams: Any,
    *,
    retain_graph: bool | None = None,
    create_graph: bool = False,
) -> Any:
    """Gradient of a scalar ``outer_value`` w.r.t. every tensor in ``hparams``, as a tree.

    Numbers in ``hparams`` are constants and get ``None``. A tensor that does not
    require grad is an error that names it (a hypergradient nobody can compute).

    Example:
        >>> l2 = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        >>> w = argmin(lambda w, h: ((w - 1) ** 2).sum() + h["l2"] * (w ** 2).sum(),
        ...            torch.full((2,), 0.5, dtype=torch.float64), {"l2": l2, "c": 3})
        >>> g = hypergrad(w.sum(), {"l2": l2, "c": 3})
        >>> float(g["l2"]), g["c"]
        (-0.5, None)
    """
    if not isinstance(outer_value, Tensor) or outer_value.numel() != 1:
        shape = (
            tuple(outer_value.shape)
            if isinstance(outer_value, Tensor)
            else type(outer_value).__name__
        )
        raise ValueError(f"outer_value must be a scalar tensor, got {shape}")
    _check_hparams(hparams)
    leaves, spec = tree_flatten(hparams)
    paths = _leaf_paths(hparams)
    idx = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
    frozen = [paths[i] for i in idx if not leaves[i].requires_grad]
    if frozen:
        raise ValueError(
            f"hyperparameter(s) {', '.join(frozen)} do not require grad, so they have no "
            "hypergradient: create them with requires_grad=True (or derive them from a leaf "
            "that does, e.g. log_l2.exp()), or pass them as Python numbers to mark them constant"
        )
    if not outer_value.requires_grad:
        raise ValueError(
            "outer_value does not depend on any hyperparameter through autograd (it does not "
            "require grad); was it computed under torch.no_grad(), or from a detached solution?"
        )
    grads = torch.autograd.grad(
        outer_value.reshape(()),
        [leaves[i] for i in idx],
        retain_graph=retain_graph,
        create_graph=create_graph,
        allow_unused=True,
    )
    out: list[Any] = [None] * len(leaves)
    for i, g in zip(idx, grads):
        out[i] = torch.zeros_like(leaves[i]) if g is None else g
    return tree_unflatten(out, spec)


def _leaf_paths(tree: Any) -> list[str]:
    """Readable names of the leaves, e.g. ``hparams['l2']``, in flatten order."""
    try:
        from torch.utils._pytree import keystr, tree_flatten_with_path

        flat, _ = tree_flatten_with_path(tree)
        return [f"hparams{keystr(path)}" for path, _ in flat]
    except ImportError:  # pragma: no cover - old torch
        return [f"hparams leaf {i}" for i in range(len(tree_leaves(tree)))]

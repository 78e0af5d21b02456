"""A bridge to :func:`scipy.optimize.minimize`, gradients and Hessian-vector products from torch."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bilevel._tree import Tree
from bilevel.solvers._flat import _Flat, _flat_value_and_grad
from bilevel.solvers.base import Objective, Solver, SolverInfo, _check_int, _check_tol
from bilevel.solvers.bounds import _bound_arrays, _projected_norm, _round_to
from bilevel.solvers.hvp import _HVP
from bilevel.solvers.lbfgs import LBFGS

_GRADIENT_FREE = {"nelder-mead", "powell", "cobyla", "cobyqa"}
_HESSP = {"newton-cg", "trust-ncg", "trust-krylov", "trust-constr"}
_BOUNDED = {"l-bfgs-b", "tnc", "slsqp", "trust-constr", "powell", "nelder-mead", "cobyla", "cobyqa"}


class ScipyMinimize(Solver):
    """Bridge to :func:`scipy.optimize.minimize` (float64 on the host)."""

    method = "scipy_minimize"

    def __init__(
        self,
        method: str = "L-BFGS-B",
        bounds: Any = None,
        tol: float = 1e-10,
        options: dict[str, Any] | None = None,
        maxiter: int | None = None,
        polish: bool = True,
        polish_maxiter: int = 200,
        hvp: str = "reverse",
    ) -> None:
        super().__init__()
        if hvp not in ("auto", "forward", "reverse"):
            raise ValueError(f"hvp must be 'auto', 'forward' or 'reverse'; got {hvp!r}")
        self.hvp = hvp
        self.polish = bool(polish)
        self.polish_maxiter = _check_int(polish_maxiter, "polish_maxiter")
        if not isinstance(method, str):
            raise TypeError(f"method must be a scipy.optimize.minimize method name; got {method!r}")
        self.scipy_method = method
        self.bounds = bounds
        self.tol = _check_tol(tol)
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"options must be a dict; got {type(options).__name__}")
        self.options = dict(options or {})
        self.maxiter = None if maxiter is None else _check_int(maxiter, "maxiter")
        if bounds is not None and method.lower() not in _BOUNDED:
            raise ValueError(
                f"scipy method {method!r} does not take bounds; use one of "
                "'L-BFGS-B', 'TNC', 'SLSQP', 'trust-constr'"
            )

    def _settings(self) -> dict[str, Any]:
        return {
            "method": self.scipy_method,
            "bounds": self.bounds,
            "tol": self.tol,
            "options": self.options,
        }

    def _scipy_options(self) -> dict[str, Any]:
        name = self.scipy_method.lower()
        opts: dict[str, Any] = {}
        if name == "l-bfgs-b":
            # scipy's ftol would stop on relative decrease of f long before the gradient
            # reaches tol; this bridge's contract is the gradient norm.
            opts.update(gtol=self.tol, ftol=1e3 * np.finfo(np.float64).eps, maxls=50)
        elif name in ("bfgs", "cg"):
            opts.update(gtol=self.tol)
        if self.maxiter is not None:
            opts["maxiter"] = self.maxiter
        opts.update(self.options)
        return opts

    def _solve(self, objective: Objective, init: Tree) -> tuple[Tree, SolverInfo]:
        import scipy.optimize

        flat = _Flat(init)
        x0t = flat.ravel(init).detach()
        x0 = x0t.cpu().double().numpy().copy()
        box = _bound_arrays(self.bounds, init, flat.size)
        if box is not None:
            x0 = np.clip(x0, box[0], box[1])
        evals = [0]
        products = _HVP(objective, flat, self.hvp)

        def to_tensor(z: np.ndarray) -> Tensor:
            return torch.as_tensor(z, dtype=torch.float64).to(device=flat.device, dtype=flat.dtype)

        def fun_grad(z: np.ndarray) -> tuple[float, np.ndarray]:
            evals[0] += 1
            f, g = _flat_value_and_grad(objective, flat, to_tensor(z))
            return float(f), g.double().cpu().numpy()

        def fun_only(z: np.ndarray) -> float:
            return fun_grad(z)[0]

        last: list[Any] = [None, None]

        def hessp(z: np.ndarray, v: np.ndarray) -> np.ndarray:
            # scipy's trust-region CG asks for many products at one point: build once.
            if last[0] is None or not np.array_equal(last[0], z):
                last[0], last[1] = np.array(z, copy=True), products.at(to_tensor(z))
            return last[1](to_tensor(v)).double().cpu().numpy()

        name = self.scipy_method.lower()
        kwargs: dict[str, Any] = {"method": self.scipy_method, "options": self._scipy_options()}
        if name in _GRADIENT_FREE:
            kwargs["fun"] = fun_only
        else:
            kwargs["fun"], kwargs["jac"] = fun_grad, True
        if name in _HESSP:
            kwargs["hessp"] = hessp
        if name not in ("l-bfgs-b", "bfgs", "cg"):
            kwargs["tol"] = self.tol
        if box is not None:
            kwargs["bounds"] = scipy.optimize.Bounds(box[0], box[1])
        with warnings.catch_warnings():
            # Float32 objectives make scipy's float64 line searches warn; reported below.
            warnings.simplefilter("ignore", RuntimeWarning)
            res = scipy.optimize.minimize(x0=x0, **kwargs)
        xd = np.asarray(res.x, dtype=np.float64)
        x = to_tensor(xd)
        f, g = _flat_value_and_grad(objective, flat, x)
        evals[0] += 1
        gnorm = _projected_norm(xd, g.double().cpu().numpy(), box)
        extra: dict[str, Any] = {
            "scipy_method": self.scipy_method,
            "scipy_success": bool(res.success),
            "scipy_status": int(getattr(res, "status", -1)),
            "scipy_gradient_norm": gnorm,
        }
        polished = False
        if self.polish and not gnorm <= self.tol and name not in _GRADIENT_FREE:
            better = self._polish(objective, flat, xd, g.double().cpu().numpy(), box)
            if better is not None:
                evals[0] += better[3]
                if better[2] < gnorm:
                    x, f, gnorm, polished = better[0], better[1], better[2], True
        extra["polished"] = polished
        what = "projected gradient norm" if box is not None else "gradient norm"
        scipy_msg = str(getattr(res, "message", ""))
        via = " after polishing with lbfgs on the free variables" if polished else ""
        converged = gnorm <= self.tol
        if converged:
            message = f"{what} <= tol{via} (scipy: {scipy_msg})"
        else:
            message = (
                f"{what} {gnorm:.3e} > tol {self.tol:.1e}{via} (scipy success="
                f"{bool(res.success)}: {scipy_msg})"
            )
        info = SolverInfo(
            self.method,
            int(getattr(res, "nit", 0) or 0),
            converged,
            gnorm,
            float(f),
            message,
            tol=self.tol,
            evaluations=evals[0],
            extra=extra,
        )
        return flat.output(x), info

    def _polish(
        self,
        objective: Objective,
        flat: _Flat,
        xd: np.ndarray,
        gd: np.ndarray,
        box: tuple[np.ndarray, np.ndarray] | None,
    ) -> tuple[Tensor, Tensor, float, int] | None:
        """Unconstrained L-BFGS on the variables no bound holds, from scipy's point.

        scipy's quasi-Newton codes stop when f stops decreasing in floating point,
        which leaves gradient norms near sqrt(eps) (about 1e-9 in float64); the
        implicit hypergradient wants a tighter optimum. Variables at a bound whose
        gradient pushes outwards stay fixed (the KKT active set); the result is
        kept only if it stays inside the box.
        """
        if box is None:
            free = np.ones(xd.shape, dtype=bool)
        else:
            lb, ub = box
            free = ~(((xd <= lb) & (gd >= 0)) | ((xd >= ub) & (gd <= 0)))
        if not free.any():
            return None
        x_fixed = torch.as_tensor(xd, dtype=torch.float64).to(device=flat.device, dtype=flat.dtype)
        idx = torch.as_tensor(np.flatnonzero(free), device=flat.device)

        def sub_objective(z: Tensor) -> Tensor:
            return objective(flat.unravel(x_fixed.index_put((idx,), z)))

        solver = LBFGS(tol=self.tol, maxiter=self.polish_maxiter)
        z, sub_info = solver._solve(sub_objective, x_fixed[idx])
        x_new = x_fixed.index_put((idx,), z)
        xn = x_new.double().cpu().numpy()
        if box is not None:
            # compare in the params' dtype: a float32 value at a bound (0.2 -> 0.200000003)
            # lies outside the float64 box by a rounding error, not by a step
            lb, ub = (_round_to(bound, flat.dtype) for bound in box)
            if (xn < lb).any() or (xn > ub).any():
                return None
        f, g = _flat_value_and_grad(objective, flat, x_new)
        gnorm = _projected_norm(xn, g.double().cpu().numpy(), box)
        return x_new, f, gnorm, sub_info.evaluations + 1


def scipy_minimize(
    method: str = "L-BFGS-B",
    bounds: Any = None,
    tol: float = 1e-10,
    options: dict[str, Any] | None = None,
    maxiter: int | None = None,
    polish: bool = True,
    polish_maxiter: int = 200,
    hvp: str = "reverse",
) -> ScipyMinimize:
    """Minimise with :func:`scipy.optimize.minimize`, gradients from torch.

    The params are flattened into one float64 numpy vector on the CPU; the objective
    and its gradient are evaluated with torch on the params' own device and dtype
    and moved back, so a float32 CUDA model is solved by scipy and returned as
    float32 on CUDA. ``bounds=(lower, upper)``: each ``None`` (unbounded), a number,
    or a tensor / tree shaped like the params (per element; a dict may omit keys,
    which are then unbounded); a :class:`scipy.optimize.Bounds` is accepted too.
    ``tol`` is the (projected, with bounds) gradient norm defining ``converged``;
    for L-BFGS-B it also sets scipy's ``gtol``, with ``ftol`` tightened to rounding
    level so scipy does not stop on a small relative decrease first (``options``
    overrides any of this). Methods that take ``hessp`` (``"trust-ncg"``,
    ``"trust-krylov"``, ``"Newton-CG"``, ``"trust-constr"``) get Hessian-vector
    products, computed as in :func:`newton_cg` (``hvp`` = ``"auto"``, ``"forward"``
    or ``"reverse"``).

    scipy's quasi-Newton codes stop once f no longer decreases in floating point,
    usually near gradient norm 1e-9 (float64), short of the default ``tol``; with a
    float32 objective much earlier, near gradient norm ``sqrt(eps32 * abs(f) * curvature)`` (about
    1e-4 for f of order 1), since a smaller decrease of f rounds to zero and scipy reports
    success ("RELATIVE REDUCTION OF F <= FACTR*EPSMCH"). With
    ``polish=True`` (default), such a result is refined by :func:`lbfgs` on the
    variables that no bound holds (at most ``polish_maxiter`` iterations); the
    refinement is kept only if it stays in the box (compared in the params' dtype, so
    a float32 value at a bound is inside) and lowers the (projected)
    gradient norm; ``info.extra["polished"]`` says whether it was, and
    ``info.extra["scipy_gradient_norm"]`` gives scipy's own result.

    Under ``torch.func.vmap`` (e.g. of :func:`bilevel.argmin`) this runs once per element:
    scipy solves one problem on the host at a time, so a stack is a loop of single calls.

    Example:
        >>> import torch
        >>> solver = scipy_minimize(bounds=(0.0, None), tol=1e-10)
        >>> w, info = solver(lambda w: ((w - torch.tensor([1.0, -1.0])) ** 2).sum(), torch.zeros(2))
        >>> w, w.dtype
        (tensor([1., 0.]), torch.float32)
    """
    return ScipyMinimize(method, bounds, tol, options, maxiter, polish, polish_maxiter, hvp)

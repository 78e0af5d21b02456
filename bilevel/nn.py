"""Modules that embed an inner optimization problem in a network.

* :class:`ArgMinLayer` -- ``forward(*inputs) = argmin_v objective(v, inputs, params)``:
  the course tutorial's argmin layer, generalised to any objective, any number of
  variable and parameter tensors of any shapes, any solver, and matrix-free implicit
  backward. Gradients reach both the layer's parameters and its inputs.
* :class:`RidgeRegression` (alias :class:`RidgeArgMin`) -- the tutorial's
  ridge-regression predictor as a layer: ``W = argmin ||X W - Y||^2 + lambda ||W||^2``
  per problem (closed form or CG forward, implicit backward) with a learnable
  log regularization weight.
* :class:`RidgePredictor` -- the tutorial's "postdiction" predictor: fit a ridge map
  from the first part of each embedded series to its last part, apply it to the end.
* :class:`QPLayer` -- a batched quadratic program as a layer (:func:`bilevel.qp`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bilevel._ridge import _GramCholesky, _ridge_optimality, _ridge_solve
from bilevel._tree import Tree, tree_flatten, tree_unflatten
from bilevel.implicit import ImplicitDiagnostics, argmin, custom_root
from bilevel.qp.layer import QPLayer

__all__ = ["ArgMinLayer", "QPLayer", "RidgeArgMin", "RidgePredictor", "RidgeRegression"]


class ArgMinLayer(nn.Module):
    """A layer whose output is ``argmin_v objective(v, inputs, params)``.

    Args:
        objective: ``objective(variables, inputs, params) -> scalar``. ``variables`` has
            the structure of ``init`` (a tensor or a dict of tensors); ``inputs`` is the
            single positional argument of :meth:`forward`, or the tuple of them when
            there are several; ``params`` is the dict of the layer's parameters.
        init: the solver's starting point: a tensor / dict of tensors (copied, not
            trained), or a function ``init(inputs, params)`` returning one (for shapes
            that depend on the batch).
        params: ``{name: tensor}``; each becomes a trainable ``nn.Parameter`` of the layer
            (pass an ``nn.Parameter(..., requires_grad=False)`` to freeze one).
        solver: the inner solver, ``solver(objective, init) -> (solution, info)``
            (default :func:`bilevel.solvers.lbfgs` with ``tol=1e-9``).
        linear_solver: the backward's linear solver (default :func:`bilevel.linalg.auto`;
            use ``minres`` for non-convex objectives, ``dense()`` for the tutorial's
            dense Hessian method).
        stationarity_tol, strict: as in :func:`bilevel.argmin`.
        warm_start: start each solve from the previous solution when shapes match.
        hvp: ``"forward"`` or ``"reverse"`` Hessian-vector products (see :func:`bilevel.argmin`).

    After each forward, ``layer.last_diagnostics`` (an :class:`bilevel.ImplicitDiagnostics`)
    holds the inner solver's record and, after a backward, the linear solve's.

    Example:
        >>> def objective(w, x, p):                  # a learnable-L2 least squares
        ...     X, y = x
        ...     return ((X @ w - y) ** 2).mean() + p["l2"] * (w ** 2).mean()
        >>> layer = ArgMinLayer(objective, torch.zeros(3, dtype=torch.float64),
        ...                     {"l2": torch.tensor(0.1, dtype=torch.float64)})
        >>> X = torch.randn(8, 3, dtype=torch.float64); y = torch.randn(8, dtype=torch.float64)
        >>> w = layer(X, y)
        >>> w.sum().backward()
        >>> layer.params["l2"].grad is not None
        True
    """

    def __init__(
        self,
        objective: Callable[[Tree, Any, dict[str, Tensor]], Tensor],
        init: Tree | Callable[[Any, dict[str, Tensor]], Tree],
        params: Mapping[str, Tensor] | None = None,
        *,
        solver: Callable[..., Any] | None = None,
        linear_solver: Any = None,
        stationarity_tol: float | None = None,
        strict: bool = False,
        warm_start: bool = False,
        hvp: str = "reverse",
    ) -> None:
        super().__init__()
        if hvp not in ("forward", "reverse"):
            raise ValueError(f"hvp must be 'forward' or 'reverse', got {hvp!r}")
        self.hvp = hvp
        if not callable(objective):
            raise TypeError(f"objective must be callable, got {type(objective).__name__}")
        self.objective = objective
        if callable(init) and not isinstance(init, Tensor):
            self._init_fn: Callable[..., Tree] | None = init
            self._init: Tree = None
        else:
            leaves, spec = tree_flatten(init)
            if not leaves or not all(
                isinstance(x, Tensor) and x.is_floating_point() for x in leaves
            ):
                raise TypeError(
                    "init must be a floating tensor, a dict of floating tensors, or a function "
                    "init(inputs, params) returning one"
                )
            self._init_fn = None
            self._init = tree_unflatten([x.detach().clone() for x in leaves], spec)
        self.params = nn.ParameterDict()
        for name, value in (params or {}).items():
            if not isinstance(value, Tensor):
                raise TypeError(f"params[{name!r}] must be a tensor, got {type(value).__name__}")
            if isinstance(value, nn.Parameter):
                self.params[name] = value
            else:
                self.params[name] = nn.Parameter(value.detach().clone())
        if solver is None:
            from bilevel import solvers

            solver = solvers.lbfgs(tol=1e-9)
        self.solver = solver
        self.linear_solver = linear_solver
        self.stationarity_tol = stationarity_tol
        self.strict = strict
        self.warm_start = warm_start
        self._last: Tree = None
        self.last_diagnostics: ImplicitDiagnostics | None = None

    def _initial(self, inputs: Any, params: dict[str, Tensor]) -> Tree:
        if self._init_fn is not None:
            with torch.no_grad():
                return self._init_fn(inputs, params)
        # the stored init is a plain attribute: follow the inputs' (or params') device
        refs = [t for t in tree_flatten(inputs)[0] if isinstance(t, Tensor)] + list(params.values())
        leaves, spec = tree_flatten(self._init)
        if refs:
            leaves = [x.to(refs[0].device) for x in leaves]
        return tree_unflatten(leaves, spec)

    def forward(self, *inputs: Any) -> Tree:
        """Solve the inner problem for these inputs; the result is differentiable."""
        x = inputs[0] if len(inputs) == 1 else inputs
        params = dict(self.params.items())
        init = self._initial(x, params)
        if self.warm_start and self._last is not None and _same_shapes(self._last, init):
            init = self._last
        diag = ImplicitDiagnostics()
        objective = self.objective
        out = argmin(
            lambda v, h, d: objective(v, d[0], h),
            init,
            params,
            (x,),
            solver=self.solver,
            linear_solver=self.linear_solver,
            stationarity_tol=self.stationarity_tol,
            strict=self.strict,
            diagnostics=diag,
            hvp=self.hvp,
        )
        self.last_diagnostics = diag
        if self.warm_start:
            leaves, spec = tree_flatten(out)
            self._last = tree_unflatten([v.detach() for v in leaves], spec)
        return out


def _same_shapes(a: Tree, b: Tree) -> bool:
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    return sa == sb and all(x.shape == y.shape for x, y in zip(la, lb))


# --------------------------------------------------------------------------- ridge


class RidgeRegression(nn.Module):
    """``W* = argmin_W ||X W - Y||^2 + lambda ||W||^2`` with a learnable ``log lambda``.

    ``forward(X, Y)`` takes ``X`` of shape ``(..., n, p)`` and ``Y`` of shape
    ``(..., n, k)`` (or ``(..., n)``) and returns ``W*`` of shape ``(..., p, k)``
    (or ``(..., p)``): one independent problem per leading index. The forward pass
    is exact (``method="solve"``: a ``p x p`` solve) or matrix-free (``"cg"``); the
    backward is implicit (CG on ``X^T X + lambda I``), so ``W*`` is differentiable
    w.r.t. ``lambda`` (``log_l2.grad``), ``X`` and ``Y``.

    Args:
        l2: initial ``lambda`` (> 0); a number, or a tensor of shape ``(p,)`` for one
            weight per feature.
        learnable: train ``log_l2`` (else it is a buffer).
        method: ``"solve"`` or ``"cg"`` for the forward pass.
        linear_solver: the backward's solver. Default: exact, a batched Cholesky
            factorisation of each problem's ``X^T X + lambda I`` (the operator is block
            diagonal, one ``p x p`` block per problem and column; as fast as autograd
            through the closed form); or any :mod:`bilevel.linalg` solver, e.g.
            ``cg(tol=1e-6)``, which treats all the unknowns as one system.

    Example:
        >>> ridge = RidgeRegression(l2=0.5).double()
        >>> X = torch.randn(4, 10, 3, dtype=torch.float64); Y = torch.randn(4, 10, 2, dtype=torch.float64)
        >>> W = ridge(X, Y); W.shape
        torch.Size([4, 3, 2])
        >>> (X @ W - Y).pow(2).mean().backward(); ridge.log_l2.grad.shape
        torch.Size([])
    """

    def __init__(
        self,
        l2: float | Tensor = 1.0,
        learnable: bool = True,
        method: str = "solve",
        linear_solver: Any = None,
    ) -> None:
        super().__init__()
        l2_t = torch.as_tensor(l2, dtype=torch.get_default_dtype()).detach().clone()
        if l2_t.ndim > 1 or not bool((l2_t > 0).all()):
            raise ValueError(
                f"l2 must be a positive number or a 1-d tensor of positive weights, got {l2!r}"
            )
        if method not in ("solve", "cg"):
            raise ValueError(f"method must be 'solve' or 'cg', got {method!r}")
        log_l2 = l2_t.log()
        if learnable:
            self.log_l2 = nn.Parameter(log_l2)
        else:
            self.register_buffer("log_l2", log_l2)
        self.method = method
        from bilevel import linalg

        self.linear_solver = linear_solver  # None: the exact block solve (_GramCholesky)
        self._cg = linalg.cg(tol=1e-12)
        self.last_diagnostics = ImplicitDiagnostics()

    @property
    def l2(self) -> Tensor:
        """The regularization weight ``exp(log_l2)``."""
        return self.log_l2.exp()

    def forward(self, X: Tensor, Y: Tensor) -> Tensor:
        """Solve the ridge problem(s) for ``X`` and ``Y``; differentiable."""
        if not isinstance(X, Tensor) or X.ndim < 2:
            raise ValueError(
                f"X must be a tensor of shape (..., n, p), got {getattr(X, 'shape', type(X))}"
            )
        if not isinstance(Y, Tensor) or Y.ndim < 1:
            raise ValueError(
                f"Y must be a tensor of shape (..., n[, k]), got {getattr(Y, 'shape', type(Y))}"
            )
        vector = Y.ndim == X.ndim - 1
        if vector:
            Y = Y.unsqueeze(-1)
        if Y.shape[-2] != X.shape[-2]:
            raise ValueError(
                f"X and Y must have the same number of rows n: X {tuple(X.shape)}, Y {tuple(Y.shape)}"
            )
        p = X.shape[-1]
        if self.log_l2.ndim == 1 and self.log_l2.shape[0] != p:
            raise ValueError(
                f"per-feature l2 has {self.log_l2.shape[0]} weights but X has p={p} features"
            )
        batch = torch.broadcast_shapes(X.shape[:-2], Y.shape[:-2])
        init = torch.zeros(*batch, p, Y.shape[-1], dtype=X.dtype, device=X.device)
        diag = ImplicitDiagnostics()
        method, cg_solver = self.method, self._cg

        lam = self.log_l2.to(X.dtype).exp()
        backward = self.linear_solver if self.linear_solver is not None else _GramCholesky(X, lam)

        @custom_root(_ridge_optimality, linear_solver=backward, symmetric=True, diagnostics=diag)
        def ridge(init: Tensor, h: dict[str, Tensor], X: Tensor, Y: Tensor) -> Tensor:
            return _ridge_solve(init, h, X, Y, method, cg_solver)

        W = ridge(init, {"log_l2": self.log_l2.to(X.dtype)}, X, Y)
        self.last_diagnostics = diag
        return W.squeeze(-1) if vector else W

    def extra_repr(self) -> str:
        shape = (
            "per-feature" if self.log_l2.ndim else f"l2={math.exp(float(self.log_l2.detach())):.3g}"
        )
        return f"{shape}, method={self.method!r}"


RidgeArgMin = RidgeRegression


class RidgePredictor(nn.Module):
    """The tutorial's predictor: fit ridge "postdiction" weights, then predict ahead.

    For an embedding ``x`` of shape ``(B, C, L)``, with ``m = L - target_len``: fit
    ``W = argmin ||X_e W - Y_e||^2 + lambda ||W||^2`` where the rows of ``X_e`` are
    ``x[..., :m]`` and of ``Y_e`` are ``x[..., m:]`` over every series in the batch
    (``shared=True``, the tutorial's choice: one ``W`` per batch) or per series
    (``shared=False``), then return ``x[..., -m:] @ W``, shape ``(B, C, target_len)``.

    Example:
        >>> pred = RidgePredictor(in_features=30, target_len=10).double()
        >>> pred(torch.randn(8, 4, 30, dtype=torch.float64)).shape
        torch.Size([8, 4, 10])
    """

    def __init__(
        self,
        in_features: int,
        target_len: int,
        l2: float = 1.0,
        shared: bool = True,
        method: str = "solve",
        linear_solver: Any = None,
    ) -> None:
        super().__init__()
        if not (0 < target_len < in_features):
            raise ValueError(
                f"need 0 < target_len < in_features, got {target_len} and {in_features}"
            )
        self.in_features = in_features
        self.target_len = target_len
        self.shared = shared
        self.ridge = RidgeRegression(l2=l2, method=method, linear_solver=linear_solver)

    def forward(self, x: Tensor) -> Tensor:
        """Postdict then predict; ``x`` of shape ``(..., L)`` with ``L = in_features``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have {self.in_features} steps in its last dim, got {tuple(x.shape)}"
            )
        m = self.in_features - self.target_len
        x_post, y_post, x_pred = x[..., :m], x[..., m:], x[..., -m:]
        if self.shared:
            W = self.ridge(x_post.reshape(-1, m), y_post.reshape(-1, self.target_len))
            return x_pred @ W
        lead = x.shape[:-1]
        W = self.ridge(x_post.reshape(-1, 1, m), y_post.reshape(-1, 1, self.target_len))
        return (x_pred.reshape(-1, 1, m) @ W).reshape(*lead, self.target_len)

"""Gradient descent with any :mod:`bilevel.optim` optimizer, to a gradient-norm tolerance."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import Tree, tree_unflatten
from bilevel.solvers._stack import (
    Oracle,
    _keep,
    _row_norms,
    _single_oracle,
    _stack_oracle,
    _stacked,
    _timed,
)
from bilevel.solvers.base import Objective, Solver, SolverInfo, _check_int, _check_tol, _check_tree


def _optimizer_names(init: Tree, leaves: list[Tensor]) -> list[str]:
    """Parameter names an optimizer sees (they key per-parameter settings)."""
    if isinstance(init, Tensor):
        return ["params"]
    if isinstance(init, Mapping) and all(isinstance(v, Tensor) for v in init.values()):
        return [str(k) for k in init]
    return [str(i) for i in range(len(leaves))]


class GradientDescent(Solver):
    """Runs a :mod:`bilevel.optim` optimizer until the gradient norm is <= ``tol``."""

    method = "gradient_descent"

    def __init__(
        self, optimizer: Any = None, tol: float = 1e-6, maxiter: int = 1000, check_every: int = 10
    ) -> None:
        super().__init__()
        if optimizer is None:
            from bilevel.optim import sgd

            optimizer = sgd(lr=0.1)
        if not (hasattr(optimizer, "init") and hasattr(optimizer, "step")):
            raise TypeError(
                "optimizer must be a bilevel.optim optimizer (with init and step); got "
                f"{type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.tol = _check_tol(tol)
        self.maxiter = _check_int(maxiter, "maxiter")
        self.check_every = _check_int(check_every, "check_every")

    def _settings(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "tol": self.tol,
            "maxiter": self.maxiter,
            "check_every": self.check_every,
        }

    @property
    def supports_batch(self) -> bool:
        """Whether :meth:`solve_batch` can step the stack at once: a :mod:`bilevel.optim`
        optimizer whose settings are the same for every element (numbers, 0-d tensors,
        per-parameter mappings of them, per-step schedules), except the
        hypergradient-descent ones, whose learning rate adapts from a dot product over all
        parameters (a stack would share it). Per-element settings have one problem's
        shape, not the stack's."""
        from bilevel.optim.base import Optimizer
        from bilevel.optim.hd import _HDMixin

        opt = self.optimizer
        if not isinstance(opt, Optimizer) or isinstance(opt, _HDMixin):
            return False
        return all(_same_for_every_element(v) for v in opt.settings.values())

    def _solve(self, objective: Objective, init: Tree) -> tuple[Tree, SolverInfo]:
        # one problem is a stack of one, through the same code: vmap equals a loop
        leaves, spec = _check_tree(init)
        oracle = _single_oracle(objective, spec)
        out, infos = self._descend(oracle, [x.detach() for x in leaves], 1, init)
        return tree_unflatten(out, spec), infos[0]

    def solve_batch(
        self, values: Callable[[Tree], Tensor], init: Tree
    ) -> tuple[Tree, list[SolverInfo]]:
        """Minimise ``B`` independent objectives at once (the ``vmap`` rule of the layers).

        ``values(W)`` returns the ``(B,)`` objective values of a tree ``W`` whose leaves
        carry the problems in dimension 0, each depending on its own slice only. The
        optimizer steps the stack as one set of parameters (its updates are elementwise,
        so each row gets its own step); each problem is checked every ``check_every``
        steps on its own gradient norm and frozen when it stops. Element ``i``'s answer
        and record are a single call's (up to rounding). Not for the hypergradient-descent
        optimizers nor per-element settings (:attr:`supports_batch`). A ``values`` that can also
        evaluate a subset, ``values(W, rows)`` with ``W`` holding the rows of the problems
        ``rows`` (a long tensor), and says so with ``values.selectable = True`` (the
        ``vmap`` rule's stacks do) is called on the running problems only after each
        check, so stopped problems cost nothing.

        Example:
            >>> import torch, bilevel
            >>> c = torch.tensor([[1.0], [-2.0], [30.0]], dtype=torch.float64)
            >>> solver = gradient_descent(bilevel.optim.sgd(lr=0.25), tol=1e-9, check_every=1)
            >>> w, infos = solver.solve_batch(lambda W: ((W - c) ** 2).sum(1), torch.zeros(3, 1, dtype=torch.float64))
            >>> [i.iterations for i in infos]
            [31, 32, 36]
            >>> w1, info1 = solver(lambda v: ((v - c[2]) ** 2).sum(), torch.zeros(1, dtype=torch.float64))
            >>> info1.iterations, bool(torch.equal(w1, w[2]))
            (36, True)
        """
        if not callable(values):
            raise TypeError(f"values must be callable; got {type(values).__name__}")
        if not self.supports_batch:
            raise ValueError(
                f"gradient_descent with {self.optimizer!r} cannot step a stack at once (a "
                "learning rate adapted from all parameters together, per-element settings, "
                "or an optimizer outside bilevel.optim): solve the problems one by one"
            )
        leaves, spec, batch = _stacked(init)
        row = tree_unflatten([x[0] for x in leaves], spec)  # for the parameter names
        start = time.perf_counter()
        with torch.no_grad():
            oracle = _stack_oracle(values, spec, batch)
            out, infos = self._descend(oracle, [x.detach() for x in leaves], batch, row)
        self.last_info = infos[-1]
        return tree_unflatten(out, spec), _timed(infos, start)

    def _descend(
        self, oracle: Oracle, leaves: list[Tensor], B: int, row: Tree
    ) -> tuple[list[Tensor], list[SolverInfo]]:
        """The descent loop on ``B`` problems (``B = 1``: leaves without a batch
        dimension); ``row``: one problem's tree, for the optimizer's parameter names."""
        names = _optimizer_names(row, leaves)
        # Copies, so that an objective or optimizer working in place cannot touch init.
        params = {n: leaf.detach().clone() for n, leaf in zip(names, leaves)}
        opt = self.optimizer
        if hasattr(opt, "validate"):
            opt.validate(params, {})  # device/dtype mismatches fail before the loop
        state = opt.init(params)
        device = leaves[0].device
        live = torch.ones(B, dtype=torch.bool, device=device)
        status = torch.zeros(B, dtype=torch.long, device=device)
        stopped_at = torch.zeros(B, dtype=torch.long, device=device)
        gnorm = f = torch.zeros(0)  # set at k = 0, a check
        for k in range(self.maxiter + 1):
            f_k, grads_list = oracle(list(params.values()))
            if k % self.check_every == 0 or k == self.maxiter:
                gn = _row_norms(grads_list, B)
                if k == 0:
                    gnorm, f = gn, f_k
                why = torch.where(gn <= self.tol, _CONVERGED, _MAXITER if k == self.maxiter else 0)
                why = torch.where(torch.isfinite(gn), why, _DIVERGED)
                stop = live & (why > 0)
                status = torch.where(stop, why, status)
                stopped_at = torch.where(stop, k, stopped_at)
                gnorm = torch.where(live, gn, gnorm)
                f = torch.where(live, f_k, f)
                live = live & ~stop
                running = live.tolist()  # the loop's only host read
                if not any(running):
                    break
                oracle.narrow(running)
            grads = dict(zip(names, grads_list))
            new, state = opt.step(params, grads, state, {})
            # a stopped problem keeps its point (its optimizer state runs on, unused); a
            # stack of one stops as a whole, so it needs no mask
            params = new if B == 1 else {n: _keep(live, new[n], params[n]) for n in names}
        out = [p.detach().clone() for p in params.values()]
        infos = []
        counts = torch.stack([status, stopped_at]).tolist()
        floats = torch.stack([gnorm, f.to(gnorm.dtype)]).tolist()
        for why, k, norm, value in zip(*counts, *floats):
            infos.append(
                SolverInfo(
                    self.method,
                    k,
                    why == _CONVERGED,
                    norm,
                    value,
                    self._message(why, k),
                    tol=self.tol,
                    evaluations=k + 1,
                )
            )
        return out, infos

    def _message(self, why: int, k: int) -> str:
        if why == _CONVERGED:
            return "gradient norm <= tol"
        if why == _DIVERGED:
            return f"diverged: non-finite gradient at step {k}; lower the learning rate"
        return f"maxiter={self.maxiter} reached (raise maxiter or the learning rate)"


_CONVERGED, _MAXITER, _DIVERGED = 1, 2, 3


def _same_for_every_element(value: Any) -> bool:
    """A setting that broadcasts unchanged over a stack of problems."""
    from bilevel.optim.hparams import PerElement, Schedule

    if isinstance(value, Mapping):
        return all(_same_for_every_element(v) for v in value.values())
    if isinstance(value, PerElement):
        return False
    if isinstance(value, Schedule):
        return value.values.ndim <= 1  # one value per step (not per step and element)
    if isinstance(value, Tensor):
        return value.ndim == 0
    return True


def gradient_descent(
    optimizer: Any = None, tol: float = 1e-6, maxiter: int = 1000, check_every: int = 10
) -> GradientDescent:
    """A solver running any :mod:`bilevel.optim` optimizer to a gradient-norm tolerance.

    The optimizer's hyperparameters come from its constructor settings (``hparams``
    is empty). The gradient norm is read (one host sync) every ``check_every`` steps
    and at ``maxiter``, so the result can be up to ``check_every - 1`` steps past the
    first point below ``tol``. A tensor ``init`` is named ``"params"`` for the
    optimizer; a flat dict keeps its keys (for per-parameter settings). Under
    ``torch.func.vmap`` the layers minimise the stack at once with
    :meth:`GradientDescent.solve_batch` (one call shares its code), except with the
    hypergradient-descent optimizers or per-element settings, which then run once per
    problem.

    Example:
        >>> import torch, bilevel
        >>> solver = gradient_descent(bilevel.optim.sgd(lr=0.5), tol=1e-8)
        >>> w, info = solver(lambda w: ((w - 3.0) ** 2).sum(), torch.zeros(2, dtype=torch.float64))
        >>> w, info.converged
        (tensor([3., 3.], dtype=torch.float64), True)
    """
    return GradientDescent(optimizer, tol, maxiter, check_every)

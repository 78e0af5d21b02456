"""Argument checks shared by the public functions, and the assembly of one implicit layer."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import tree_flatten, tree_unflatten
from bilevel.implicit._leaves import LEAF_SPEC, _check_like, _Packer
from bilevel.implicit.function import _Implicit
from bilevel.implicit.problem import _Problem
from bilevel.implicit.user_problem import LayerSpec, _UserProblem


def _check_solution(value: Any, name: str) -> tuple[list[Tensor], Any]:
    if isinstance(value, Tensor) and value.is_floating_point():
        return [value], LEAF_SPEC  # the common case, without a tree walk
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
            return linalg.auto(linalg.gmres()), False
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
        return linalg.auto(linalg.cg() if symmetric else linalg.gmres()), bool(symmetric)
    if solver_sym and not symmetric:
        raise ValueError(
            f"{name}: linear_solver={sname} only handles symmetric operators but symmetric=False; "
            "use bilevel.linalg.gmres() (or dense()) for a non-symmetric dF/dw, or pass "
            "symmetric=True if dF/dw is symmetric"
        )
    return linear_solver, bool(symmetric)


def _call_implicit(problem: _Problem, init_leaves: list[Tensor], packer: _Packer, spec: Any) -> Any:
    tensors, packer.tensors = packer.tensors, []  # the graph keeps what backward needs; no more
    init = [x.detach() if x.requires_grad else x for x in init_leaves]
    out = _Implicit.apply(problem, len(init_leaves), *init, *tensors)
    return out[0] if spec is LEAF_SPEC else tree_unflatten(list(out), spec)


def _with_data(fn: Callable[..., Any], data_given: bool) -> Callable[[Any, Any, Any], Any]:
    if data_given:
        return lambda w, h, d: fn(w, h, d)
    return lambda w, h, d: fn(w, h)


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


def solve_layer(
    layer: LayerSpec, init_leaves: list[Tensor], spec: Any, hparams: Any, data: Any
) -> Any:
    """The solution of ``layer`` from ``init_leaves``, attached to the autograd graph."""
    packer = _Packer((hparams, data))
    problem = _UserProblem(layer, init_leaves, spec, packer)
    if layer.objective is not None:
        problem.check_objective(init_leaves, packer.tensors)
    return _call_implicit(problem, init_leaves, packer, spec)

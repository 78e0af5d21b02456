"""``argmin(..., compiled=True)``: the exact backward of a small problem as one compiled
function of (solution, hyperparameters, outgoing gradient).

Eager autograd pays Python and dispatch overhead per operation on every pass (the loss's
graph, its gradient's graph, a batched backward for the Hessian, the final product): at a
few unknowns that alone is several times autograd through a closed form. Here the
Hessian (``torch.func.jacrev`` of ``torch.func.grad`` of the inner loss), its Cholesky
factorisation (which solves and tests positive definiteness at once) and the hypergradient
(``torch.func.vjp``) are traced once by ``torch.compile`` (inductor) into one kernel call;
the host then reads one summary vector (residual, Cholesky flag, diagonal of the factor)
and builds the info record. A Hessian that is not positive definite, or is singular to
working precision, goes back to the eager path, which warns or raises as it always does.

One compiled function is kept per inner-loss code object and structure (leaf shapes go
to dynamo's guards): a training loop that calls the layer with new tensors of the same
shapes reuses it, also when the loss is a new closure each step. When compiling fails,
or dynamo would recompile past ``_MAX_GRAPHS`` (shapes or Python numbers the loss reads
change between calls), a :class:`CompileFallbackWarning` names why and that loss runs
eagerly from then on.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel._compile_guard import MAX_GRAPHS, check_graph_count, failure_reason
from bilevel._tree import tree_unflatten
from bilevel.linalg.base import _to_host
from bilevel.linalg.info import LinearSolveInfo


class CompileFallbackWarning(RuntimeWarning):
    """``compiled=True`` could not compile the backward; it runs uncompiled (the message
    says why)."""


@dataclasses.dataclass(frozen=True)
class CompiledLoss:
    """The user's inner loss as the compiled backward calls it.

    Attributes:
        inner_loss: ``inner_loss(w, hparams[, data])`` as given to :func:`bilevel.argmin`.
        data_given: whether it takes ``data``.
    """

    inner_loss: Callable[..., Tensor]
    data_given: bool


@dataclasses.dataclass(frozen=True)
class _Structure:
    """What the compiled function closes over (its cache key, with the loss's code)."""

    sol_spec: Any
    sizes: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    packer_spec: Any
    tensor_idx: tuple[int, ...]
    n_constants: int
    data_given: bool
    which: tuple[int, ...]
    rcond: float | None
    damping: float


_CACHE: dict[Any, Any] = {}  # key -> compiled function, or the reason it fell back


def _hypergradient(
    st: _Structure,
    inner_loss: Callable[..., Tensor],
    constants: list[Any],
    sol: list[Tensor],
    theta: list[Tensor],
    g: list[Tensor],
) -> tuple[list[Tensor], Tensor]:
    """The function ``torch.compile`` traces: the gradients of ``theta[which]`` and the
    summary ``[residual norm, Cholesky flag, diag(L)]`` read by the host."""

    x = torch.cat([s.reshape(-1) for s in sol])

    def loss(flat: Tensor, sel: list[Tensor]) -> Tensor:
        leaves = [p.reshape(shape) for p, shape in zip(flat.split(st.sizes), st.shapes)]
        th = list(theta)
        for i, t in zip(st.which, sel):
            th[i] = t
        full = list(constants)
        for i, t in zip(st.tensor_idx, th):
            full[i] = t
        h, d = tree_unflatten(full, st.packer_spec)
        w = tree_unflatten(leaves, st.sol_spec)
        out = inner_loss(w, h, d) if st.data_given else inner_loss(w, h)
        return out.reshape(())

    grad_w = torch.func.grad(loss, argnums=0)
    sel = [theta[i] for i in st.which]
    # the eager path's matrix: column i is (dF/dw)^T e_i, the transpose of the Jacobian
    M = torch.func.jacrev(grad_w, argnums=0)(x, sel).transpose(0, 1)
    if st.damping:
        M = M + st.damping * torch.eye(x.numel(), dtype=M.dtype, device=M.device)
    b = -torch.cat([v.reshape(-1) for v in g])
    # a minimum's Hessian is positive definite: Cholesky both solves and tests it (the
    # eager path's LU and Cholesky in one); anything else goes back to the eager path
    L, flag = torch.linalg.cholesky_ex(M)
    flat_u = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
    rnorm = torch.linalg.vector_norm(torch.addmv(b, M, flat_u, alpha=-1))
    summary = torch.cat([rnorm.reshape(1), flag.to(M.dtype).reshape(1), L.diagonal()])
    _, pullback = torch.func.vjp(lambda s: grad_w(x, s), sel)[:2]
    return list(pullback(flat_u)[0]), summary


@functools.cache
def _dynamo() -> Any:
    import torch._dynamo  # noqa: F401  (imported on first use: it takes seconds)

    return torch._dynamo


_MAX_GRAPHS = MAX_GRAPHS  # graphs per loss and structure before falling back


def _compile(st: _Structure) -> Any:
    """The compiled function of one loss and structure. Each gets its own code object:
    dynamo keeps graphs and counts recompiles per code object, so one layer whose shapes
    keep changing falls back alone (checked after each call against ``_MAX_GRAPHS``, below
    dynamo's own limit, at which it would silently run the traced function eagerly)."""
    _dynamo()

    def run(*args: Any) -> Any:
        return _hypergradient(st, *args)

    own = types.FunctionType(
        run.__code__.replace(), run.__globals__, run.__name__, None, run.__closure__
    )
    fn = torch.compile(own, fullgraph=True, dynamic=False)
    fn._own_code = own.__code__  # type: ignore[attr-defined]
    return fn


def dense_settings(linear_solver: Any, n: int) -> tuple[float | None, float, str] | None:
    """``(rcond, damping, note)`` when ``linear_solver`` solves ``n`` unknowns by a dense
    LU (``dense()``, or ``auto`` at most ``max_dense``) with a number as its damping,
    else None."""
    from bilevel.linalg.auto import Auto, dense_note
    from bilevel.linalg.dense import CHOLESKY, Dense

    damping = getattr(linear_solver, "damping", 0.0)
    if isinstance(damping, Tensor):
        return None
    if isinstance(linear_solver, Auto) and n <= linear_solver.max_dense:
        # the compiled function solves by Cholesky, as the eager path does for a minimum
        return None, float(damping), dense_note(CHOLESKY, n, linear_solver.max_dense)
    if isinstance(linear_solver, Dense) and linear_solver.method == "solve":
        return linear_solver.rcond, float(damping), CHOLESKY
    return None


def compiled_vjp(
    problem: Any,
    sol: Sequence[Tensor],
    theta: Sequence[Tensor],
    g: Sequence[Tensor],
    which: Sequence[int],
) -> list[Tensor] | None:
    """The plain backward of ``problem`` (an argmin) by the compiled exact path, or None
    when the eager path must run: a solver that does not form the matrix (warned), mixed
    dtypes, a warm start, a Hessian that is not positive definite or is singular to working
    precision (the eager path then raises, warns or falls back exactly as without
    compilation), or compiling failed (warned once per loss)."""
    spec: CompiledLoss = problem.compiled
    n = sum(s.numel() for s in sol)
    linear_solver = problem.linear_solver
    settings = dense_settings(linear_solver, n)
    if settings is None:
        warnings.warn(
            f"{problem.name}(compiled=True): only the exact dense backward (LU, a number as "
            f"damping) is compiled, and the linear solver "
            f"{getattr(linear_solver, 'name', linear_solver)!s} does not form the matrix at "
            f"n={n} unknowns: it runs uncompiled. Use the default linear_solver (auto, dense "
            "up to 64 unknowns) or linalg.dense(), or drop compiled=True",
            CompileFallbackWarning,
            stacklevel=5,
        )
        return None
    if len({s.dtype for s in sol}) != 1 or problem.warm_start is not None:
        return None  # the eager path promotes mixed dtypes / keeps the warm start's state
    rcond, damping, note = settings
    packer = problem.packer
    st = _Structure(
        problem.sol_spec,
        tuple(s.numel() for s in sol),
        tuple(tuple(s.shape) for s in sol),
        packer.spec,
        tuple(packer.tensor_idx),
        len(packer.constants),
        spec.data_given,
        tuple(which),
        rcond,
        damping,
    )
    key = (getattr(spec.inner_loss, "__code__", type(spec.inner_loss)), st)
    fn = _CACHE.get(key)
    if isinstance(fn, str):
        return None  # fell back before (warned then)
    try:
        if fn is None:
            fn = _CACHE[key] = _compile(st)
        grads, summary = fn(spec.inner_loss, list(packer.constants), *map(_plain, (sol, theta, g)))
        check_graph_count(fn, _MAX_GRAPHS, "the inner loss")
    except Exception as err:  # compile errors come as many types (dynamo, inductor, gcc)
        reason = failure_reason(err)
        _CACHE[key] = reason
        warnings.warn(
            f"{problem.name}(compiled=True): the backward of this inner loss is not compiled "
            f"from now on ({reason}); it runs uncompiled (same result, eager speed). Pass "
            "numbers that change between calls as tensors in hparams",
            CompileFallbackWarning,
            stacklevel=5,
        )
        return None
    return _finish(problem, grads, summary, (rcond, note))


def _plain(tensors: Sequence[Tensor]) -> list[Tensor]:
    # detached: inputs that require grad make dynamo build a training graph and wrap it in
    # an autograd Function (slower calls); the backward needs no graph of its own
    return [t.detach() for t in tensors]


def _finish(
    problem: Any, grads: list[Tensor], summary: Tensor, settings: tuple[float | None, str]
) -> list[Tensor] | None:
    """The one host read, the info record and its warnings, as the eager dense path; None
    (the eager path decides) when the Hessian is not positive definite or is singular."""
    from bilevel.implicit.linear_problem import _LinearProblem

    rcond, note = settings
    vals = _to_host(summary)
    rn, flag, diag = vals[0], vals[1], vals[2:]
    n = len(diag)
    dtype = summary.dtype
    rc = rcond if rcond is not None else n * torch.finfo(dtype).eps
    if flag != 0 or not all(math.isfinite(v) for v in vals):
        return None  # not positive definite (NotMinimumWarning) or not finite: eager path
    # diag(L)^2 plays the LU pivots' part: at rounding level the matrix is singular
    ratio = (min(diag) / max(max(diag), torch.finfo(dtype).tiny)) ** 2
    if not ratio > rc:
        return None  # singular: dense raises, auto falls back to its iterative solver
    info = LinearSolveInfo(
        "dense",
        n,
        rn,
        True,
        False,
        "; ".join(x for x in (note, "compiled (inductor)") if x),
        threshold=math.nan,
    )
    problem.linear_solver.last_info = info
    _LinearProblem(problem, transpose=True).report("vjp", info)
    return grads

"""``lbfgs(compiled=True)``: the whole L-BFGS loop of one problem as one compiled call.

Eager, every iteration of a small problem costs about fifty small tensor operations
(0.2-0.3 ms of dispatch at a few unknowns), far more than the arithmetic. Here the loop of
:func:`bilevel.solvers._lbfgs_batch._lbfgs` for a stack of one, with its state in
fixed-shape tensors (the ``history_size`` slots of the curvature pairs always all present,
the empty ones masked, as the stack's rows do), is traced once by ``torch.compile`` into a
``torch.while_loop``: one pass per objective evaluation, the value and gradient by
``torch.func.grad_and_value`` of the objective, the line search by the stack's own
:class:`bilevel.solvers.line_search._Search` and its step, pair, retry and stop rules, the
curvature pairs in :class:`bilevel.solvers._inverse_history._Pairs` (``R^-1`` of the
compact form as state: no triangular solves, no gathers), the carried state packed into
two flat buffers (:mod:`bilevel.solvers._packed_state`), a large matrix-vector product in
the objective sent to the BLAS (:func:`_mv`). Inductor runs the loop in its
(C++) wrapper and reads the loop's condition (is the problem still running?) on the host
after every pass: that read is the convergence check, the only one; the results are read
once at the end.

One compiled function is kept per objective code (the code objects of the objective and of
the functions its closure reaches, so that :func:`bilevel.argmin`'s wrapper of different
inner losses gets one each), the unknowns' layout, dtype, device and the settings but
``tol`` and ``maxiter`` (tensor inputs: changing them does not recompile); tensors the
objective reads go to dynamo's guards by shape and dtype, so a training loop whose loss is
a new closure over new tensors of the same shapes reuses it. When compiling fails, or
dynamo would need more than ``_MAX_GRAPHS`` graphs for one entry, a
:class:`bilevel.CompileFallbackWarning` says why and that objective runs eagerly from then
on.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bilevel._compile_guard import MAX_GRAPHS, check_graph_count, failure_reason
from bilevel._tree import tree_unflatten
from bilevel.solvers._flat import _eps
from bilevel.solvers._inverse_history import _Pairs
from bilevel.solvers._lbfgs_batch import _LBFGSSettings, _Result, _status
from bilevel.solvers._packed_state import _Packing
from bilevel.solvers._stack import _NO_STEP, _RUNNING
from bilevel.solvers.line_search import _rows, _Search

_SEARCH_FIELDS = tuple(_Search.__dataclass_fields__)
_MAX_GRAPHS = MAX_GRAPHS  # graphs per cache entry before falling back
_CACHE: dict[Any, Any] = {}  # key -> compiled function, or the reason it fell back
_LIMITS: dict[Any, tuple[Tensor, Tensor]] = {}  # (tol, maxiter, dtype, device) -> inputs
COMPILES = {"count": 0}  # compiled functions built (tests count them)
# inductor's C++ wrapper: the loop runs in C++ (measured 1.7 -> 0.7 ms for 10 passes at 3
# unknowns against its Python wrapper; the first compile takes about twice as long)
_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {"cpp_wrapper": True}
_BLAS_MV_NUMEL = 16384  # matrix entries from which a matrix-vector product calls the BLAS


def _new_search(
    again: Tensor, g: Tensor, gnorm: Tensor, pairs: _Pairs
) -> tuple[Tensor, Tensor, _Pairs]:
    """``_lbfgs_batch._new_search`` over :class:`_Pairs`: the direction, the first trial
    step, and the pairs (forgotten where the direction is not one of descent)."""
    d = pairs.direction(g)
    d0 = (g * d).sum(-1)
    steep = ~(torch.isfinite(d0) & (d0 < 0))
    pairs = pairs.clear(again & steep)
    d = _rows(steep, -g, d)
    tiny = torch.finfo(g.dtype).tiny
    t0 = torch.where(pairs.held_any(), 1.0, torch.clamp(1.0 / gnorm.clamp_min(tiny), max=1.0))
    return d, t0, pairs


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a flat row becomes the objective's argument: one tensor of ``shapes[0]``
    (``spec`` None) or the leaves of a tree (part of the cache key)."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    spec: Any

    def point(self, row: Tensor) -> Any:
        if self.spec is None:
            return row.reshape(self.shapes[0])
        sizes = [math.prod(shape) for shape in self.shapes]
        leaves = [
            part.reshape(shape).to(dtype)
            for part, shape, dtype in zip(row.split(sizes), self.shapes, self.dtypes)
        ]
        return tree_unflatten(leaves, self.spec)


def _loop(
    objective: Callable[[Any], Tensor],
    X: Tensor,
    limits: tuple[Tensor, Tensor],
    layout: _Layout,
    opts: _LBFGSSettings,
) -> tuple[Tensor, ...]:
    """The traced function: ``_lbfgs`` on the ``(1, n)`` stack ``X`` with every pass in
    one ``torch.while_loop``; ``limits`` is ``(tol, maxiter)`` as 0-d tensors (of ``X``'s
    dtype and long: they compare as the numbers do), so that changing them reuses the
    compiled code; returns ``(X, f, gnorm, k, evals, status)``."""
    opts = dataclasses.replace(opts, tol=limits[0], maxiter=limits[1])  # type: ignore[arg-type]
    m, eps = opts.history_size, _eps(X.dtype)
    grad_and_value = torch.func.grad_and_value(lambda row: objective(layout.point(row)))

    def evaluate(Z: Tensor) -> tuple[Tensor, Tensor]:
        g, f = grad_and_value(Z[0])
        return f.reshape(1).to(Z.dtype), g.reshape(1, -1)

    f, g = evaluate(X)
    gnorm = torch.linalg.vector_norm(g, dim=1)
    k = torch.zeros(1, dtype=torch.long, device=X.device)
    status = _status(f, gnorm, k, opts)
    d, t0, pairs = _new_search(status == _RUNNING, g, gnorm, _Pairs.empty(m, X))
    search = _Search.start(t0, f, (g * d).sum(-1), g, 100 * eps * f.abs())
    restarted = torch.zeros(1, dtype=torch.bool, device=X.device)
    state = (X, f, g, gnorm, k, k + 1, restarted, status, d, *pairs)
    fields = tuple(getattr(search, name) for name in _SEARCH_FIELDS)
    packing = _Packing.of(state + fields, X.dtype)
    first = 9 + len(pairs)  # where the search's fields start

    def running(floats: Tensor, ints: Tensor) -> Tensor:
        return (packing.unpack(floats, ints)[7] == _RUNNING).reshape(())

    def one_pass(floats: Tensor, ints: Tensor) -> tuple[Tensor, Tensor]:
        carry = packing.unpack(floats, ints)
        X, f, g, gnorm, k, evals, restarted, status, d = carry[:9]
        pairs = _Pairs(*carry[9:first])
        search = _Search(*carry[first:])
        live = status == _RUNNING
        f_t, g_t = evaluate(X + search.t.unsqueeze(1) * d)
        evals = evals + live.long()
        search, out = search.update(live, f_t, (g_t * d).sum(-1), g_t, opts.wolfe)
        ended = out.ended & live
        # the stack's step, pair, retry and stop rules (``_lbfgs``), at every pass
        step = ended & out.accepted
        s = out.t.unsqueeze(1) * d
        y = out.g - g
        sy, yy = (s * y).sum(-1), (y * y).sum(-1)
        pairs = pairs.push(step & (sy > eps * yy) & (yy > 0), s, y)
        X = _rows(step, X + s, X)
        f = torch.where(step, out.f, f)
        g = _rows(step, out.g, g)
        gnorm = torch.where(step, torch.linalg.vector_norm(g, dim=1), gnorm)
        k = k + step.long()
        restarted = restarted & ~step
        # no step: retry steepest descent once, then stop
        failed = ended & ~out.accepted
        retry = failed & pairs.held_any() & ~restarted
        pairs = pairs.clear(retry)
        restarted = restarted | retry
        status = torch.where(failed & ~retry, _NO_STEP, status)
        status = torch.where(step, _status(f, gnorm, k, opts), status)
        again = ended & (status == _RUNNING)
        d_new, t0, pairs = _new_search(again, g, gnorm, pairs)
        d = _rows(again, d_new, d)
        fresh = _Search.start(t0, f, (g * d).sum(-1), g, 100 * eps * f.abs())
        search = search.where(again, fresh)
        fields = tuple(getattr(search, name) for name in _SEARCH_FIELDS)
        return packing.pack((X, f, g, gnorm, k, evals, restarted, status, d, *pairs, *fields))

    out = packing.unpack(*torch.while_loop(running, one_pass, packing.pack(state + fields)))
    X, f, _, gnorm, k, evals, _, status = (t.clone() for t in out[:8])
    return X, f, gnorm, k, evals, status


def _codes(fn: Any, depth: int = 4) -> tuple[Any, ...]:
    """The code objects of ``fn`` and of the functions its closure reaches (the cache key:
    argmin's one wrapper around many inner losses gets an entry per loss)."""
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        return (type(fn),)
    out: tuple[Any, ...] = (code,)
    if depth > 0:
        for cell in fn.__closure__ or ():
            try:
                inner = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if callable(inner) and not isinstance(inner, (Tensor, type)):
                out += _codes(inner, depth - 1)
    return out


@functools.cache
def _dynamo() -> Any:
    import torch._dynamo  # noqa: F401  (imported on first use: it takes seconds)

    return torch._dynamo


def _mv(matrix: Tensor, vector: Tensor) -> Tensor:
    """``aten.mv`` for inductor: a large matrix goes to the BLAS (as a one-column ``mm``);
    a small one is fused into the pass's kernel, as inductor does by default."""
    if matrix.numel() >= _BLAS_MV_NUMEL and matrix.dtype == vector.dtype:
        return torch.mm(matrix, vector.unsqueeze(1)).squeeze(1)
    return (matrix * vector).sum(dim=1)


def _inductor(gm: Any, example_inputs: Any) -> Any:
    """Inductor with the C++ wrapper and :func:`_mv`: its own reduction loops for a
    matrix-vector product run 3-4x slower than the BLAS at 1000 x 300 (the transposed
    product's accumulator round-trips through memory)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = {**select_decomp_table(), torch.ops.aten.mv.default: _mv}
    return compile_fx(gm, example_inputs, config_patches=_OPTIONS, decompositions=table)


def _compile(layout: _Layout, opts: _LBFGSSettings) -> Any:
    """A compiled ``_loop`` with its own code object: dynamo keeps graphs and counts
    recompiles per code object, so each cache entry is counted on its own."""
    _dynamo()

    def run(objective: Callable[[Any], Tensor], X: Tensor, tol: Tensor, maxiter: Tensor) -> Any:
        return _loop(objective, X, (tol, maxiter), layout, opts)

    own = types.FunctionType(
        run.__code__.replace(), run.__globals__, run.__name__, None, run.__closure__
    )
    fn = torch.compile(own, fullgraph=True, dynamic=False, backend=_inductor)
    fn._own_code = own.__code__  # type: ignore[attr-defined]
    COMPILES["count"] += 1
    return fn


def _limits(opts: _LBFGSSettings, X: Tensor) -> tuple[Tensor, Tensor]:
    """``(tol, maxiter)`` as the loop's 0-d inputs, made once per value (the loop only reads
    them)."""
    # inference tensors carry other dispatch keys: dynamo would guard them apart
    key = (opts.tol, opts.maxiter, X.dtype, X.device, torch.is_inference_mode_enabled())
    limits = _LIMITS.get(key)
    if limits is None:
        if len(_LIMITS) >= 64:  # a caller sweeping tol: keep the table small
            _LIMITS.clear()
        limits = _LIMITS[key] = (
            torch.tensor(opts.tol, dtype=X.dtype, device=X.device),
            torch.tensor(opts.maxiter, device=X.device),
        )
    return limits


def compiled_lbfgs(
    objective: Callable[[Any], Tensor],
    layout: _Layout,
    X: Tensor,
    opts: _LBFGSSettings,
    check: Callable[[], Any],
) -> _Result | None:
    """The compiled run of one problem ``X`` (1, n), or None when it must run eagerly
    (compiling failed now or before: warned once per cache entry). ``check()`` is the
    eager evaluation at ``X``, run before compiling an entry: its errors (no gradient path,
    a non-scalar value) are the eager solver's, raised as they are."""
    # tol and maxiter are inputs, not part of the key
    key = (_codes(objective), layout, X.dtype, X.device, opts.history_size, opts.wolfe)
    fn = _CACHE.get(key)
    if isinstance(fn, str):
        return None
    if fn is None:
        check()
    try:
        if fn is None:
            fn = _CACHE[key] = _compile(layout, opts)
        out = fn(objective, X, *_limits(opts, X))
        check_graph_count(fn, _MAX_GRAPHS, "the objective")
    except Exception as err:  # compile errors come as many types (dynamo, inductor, gcc)
        from bilevel.implicit.compiled import CompileFallbackWarning

        reason = failure_reason(err)
        _CACHE[key] = reason
        warnings.warn(
            f"lbfgs(compiled=True): this objective is not compiled from now on ({reason}); it "
            "runs the eager solver (same answer to the tolerance, eager speed). Pass numbers "
            "that change between calls as tensors",
            CompileFallbackWarning,
            stacklevel=5,
        )
        return None
    X, f, gnorm, k, evals, status = out
    return _Result(X, f, gnorm, k, evals, status)

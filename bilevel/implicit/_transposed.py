"""Hessian-vector products for the plain backward's cg loop by the backward of one recorded
product: the graph of ``v -> H v`` built once per backward, then each product one backward
pass through it.

The plain backward's products are double backward passes through the gradient's graph:
every one re-runs the whole second-order formula of each op, including its parts that
depend only on the solution (a log-softmax's ``exp(output)``, its backward kernel; measured
on multinomial logistic regression, 898 x 64 x 10: 0.47 ms per product, of which the two
matrix products are 0.09 ms). Recording one product with ``create_graph=True`` gives
``u = (dF/dw)^T v`` as a graph in ``v``: linear, so the backward of ``u`` with respect to
``v`` applied to ``v'`` is ``(dF/dw) v'``, which for an argmin (``F`` the gradient, its
Jacobian the symmetric Hessian) is the same product ``H v'``. That backward runs only the
transposed formulas of the ops on the path from ``v``, with the solution-only values saved
once (measured 0.31 ms per product on the same problem; 3-10% less on ridge at 3-300
unknowns). The values equal the double backward's to rounding (the Hessian is symmetric in
exact arithmetic only).

Used only where both hold by construction: an argmin's Hessian (symmetric), the CPU loop of
:mod:`bilevel.implicit._plain_cg` (no functorch transform, no double backward of the
hypergradient), and more than ``MAX_DOUBLE`` unknowns. This route differentiates the loss
one order further than the double backward: an op without that formula fails when the graph
is built or at its first backward, and a custom ``autograd.Function`` whose backward is not
differentiable as written can drop a term silently (measured: a ``once_differentiable``
backward inside another Function's backward gave the regulariser's part alone). So the
first product after the recorded one also runs as a double backward and the two are
compared (to ``sqrt(eps)``); on a failure or a mismatch the solve takes the double backward
products from there on, the old route's values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel.implicit._products import _plain_grad

# Up to this many unknowns the double backward stays: a solve that small runs few products
# (cg ends in about n steps), too few to pay back the recording and the checked product.
MAX_DOUBLE = 64
# The verdicts (route checked, or not) by the structure of F's graph: the node types of its
# backward formulas and the unknowns' shapes and dtypes. One call per loss structure pays the
# check (one product more); later calls take the verdict with no check. Every call computes
# the same values either way (the checked product returns the route's value), so a run
# resumed in a fresh process reproduces the uninterrupted one bitwise.
_VERDICTS: dict[tuple[Any, ...], bool] = {}
_MAX_VERDICTS = 256


def transposed_products(
    F: Sequence[Tensor | None],
    s: Sequence[Tensor],
    b: Sequence[Tensor],
    vjp: Callable[[Sequence[Tensor]], list[Tensor]],
) -> Callable[[Sequence[Tensor]], list[Tensor]]:
    """``v -> H v`` for the symmetric ``H = dF/ds`` (``F`` the gradient of the inner loss at the
    leaves ``s``, with its graph): by the backward of the recorded product ``H b`` where the
    graph's structure says it pays (:func:`_structure`), it can be built and it agrees with
    ``vjp`` (the double backward), else ``vjp``. The first call with ``v`` equal to ``b`` (cg's first direction from zero)
    returns the recorded product."""
    key, pays = _structure(F, s)
    verdict = _VERDICTS.get(key)
    if verdict is False or not pays:
        return vjp
    try:
        with torch.enable_grad():
            # leaves of their own (sharing b's memory, never written: cg copies b first)
            vl = [x.detach().requires_grad_() for x in b]
            U = _plain_grad(F, s, vl, retain_graph=True, create_graph=True)
    except RuntimeError:
        _remember(key, False)
        return vjp  # an op without a differentiable second-order formula: same products
    if any(u is None or u.grad_fn is None for u in U):
        _remember(key, False)
        return vjp  # a leaf the product does not depend on (allow_unused): keep the old route
    return _Transposed(tuple(u for u in U if u is not None), vl, b, vjp, key, verdict is True)


def _structure(F: Sequence[Tensor | None], s: Sequence[Tensor]) -> tuple[tuple[Any, ...], bool]:
    """The node types of F's graph (depth first) with the unknowns' shapes and dtypes, and
    whether the route pays: the graph holds a backward kernel's node (``*BackwardBackward*``:
    log-softmax, nll, softplus, sigmoid, tanh...) or a custom Function's, whose double
    backward re-runs solution-only work. A graph of products, sums and powers (a quadratic:
    ridge) has a double backward as lean as the route (measured 1000 x 300: the route a few
    per cent slower), so it keeps the double backward. A rule on the structure, not a timing:
    the same loss takes the same route in every process."""
    types: list[type] = []
    seen: set[int] = set()
    pays = False
    stack = [None if f is None else f.grad_fn for f in F]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))  # (every node stays alive during the walk: ids are not reused)
        types.append(type(fn))
        pays = pays or "BackwardBackward" in type(fn).__name__ or isinstance(fn, _CUSTOM)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return (tuple(types), tuple((tuple(x.shape), x.dtype) for x in s)), pays


_CUSTOM = torch.autograd.function.BackwardCFunction


def _remember(key: tuple[Any, ...], verdict: bool) -> None:
    if len(_VERDICTS) >= _MAX_VERDICTS:
        _VERDICTS.clear()
    _VERDICTS[key] = verdict


class _Transposed:
    """The products by the recorded product's backward (see :func:`transposed_products`)."""

    def __init__(
        self,
        U: tuple[Tensor, ...],
        vl: list[Tensor],
        b: Sequence[Tensor],
        vjp: Callable[[Sequence[Tensor]], list[Tensor]],
        key: tuple[Any, ...],
        checked: bool,
    ) -> None:
        self.U, self.vl, self.b, self.vjp, self.key = U, vl, list(b), vjp, key
        self.first: list[Tensor] | None = [u.detach() for u in U]
        self.tried = checked  # whether the route has been checked (here or in a past call)
        self.ok = True  # whether it agreed with the double backward

    def _backward(self, v: Sequence[Tensor]) -> list[Tensor]:
        with torch.enable_grad():
            got = _plain_grad(self.U, self.vl, v, retain_graph=True)
        return [torch.zeros_like(x) if o is None else o for x, o in zip(v, got)]

    def __call__(self, v: Sequence[Tensor]) -> list[Tensor]:
        first, self.first = self.first, None
        if first is not None and all(
            vi.shape == bi.shape and torch.equal(vi, bi) for vi, bi in zip(v, self.b)
        ):
            return first
        if not self.ok:
            return self.vjp(v)
        if self.tried:
            return self._backward(v)
        self.tried = True
        # the first product of a direction other than b runs both ways: a loss whose
        # third-order formula is missing, or silently drops a term (a custom Function whose
        # backward is not differentiable as written), takes the double backward from here on
        ref = self.vjp(v)
        got: list[Tensor] | None = None
        try:
            got = self._backward(v)
            self.ok = _close(got, ref)
        except RuntimeError:
            self.ok = False  # a genuine error would raise again in the double backward
        _remember(self.key, self.ok)
        # the route's value when it passed: what a later call, with no check, computes
        return got if self.ok and got is not None else ref


def _close(got: Sequence[Tensor], ref: Sequence[Tensor]) -> bool:
    """Whether two products agree to rounding (sqrt(eps) of the norm: a dropped term of the
    Hessian is far larger). CPU tensors: the reads synchronise with nothing."""
    for a, b in zip(got, ref):
        tol = torch.finfo(b.dtype).eps ** 0.5 * float(torch.linalg.vector_norm(b))
        if not float(torch.linalg.vector_norm(a - b)) <= tol:
            return False
    return True

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
* :func:`root` -- any ``F``; :func:`fixed_point` -- ``F(w) = w - map_fn(w)``
  (GMRES by default);
* :func:`custom_root` -- a decorator making any solver function differentiable;
  :func:`custom_fixed_point` -- the same for a solver of ``w = map_fn(w)``;
* :func:`proximal_argmin` -- ``argmin f + g`` through the proximal fixed point, with the
  support-restricted backward of Bertrand et al. (2020);
* :class:`ImplicitDiagnostics`, :func:`last_backward_info` -- what the linear solves did;
* :func:`hypergrad` -- gradients of an outer value w.r.t. a tree of hyperparameters.

How it composes with autograd and ``torch.func``: every solution is the output of one
``torch.autograd.Function`` (``setup_context`` style) whose forward runs the solver,
whose ``backward`` and ``jvp`` apply the theorem, and whose ``vmap`` rule solves each
problem of a batch on its own (linear solves vectorised with per-problem scalars and
stopping, inner solvers once per problem), so ``vmap(f)`` equals a loop of ``f``. The linear solve
of a backward or jvp is itself an instance of the same Function (the root of a linear
system), so hypergradients are differentiable again (double backward, ``jacfwd`` of
``jacrev``) and batch under ``vmap`` (``jacrev``, ``jacfwd``, batched tasks).
"""

from bilevel.implicit.argmin import argmin
from bilevel.implicit.compiled import CompileFallbackWarning
from bilevel.implicit.custom_fixed_point import custom_fixed_point
from bilevel.implicit.custom_root import custom_root
from bilevel.implicit.diagnostics import ImplicitDiagnostics, last_backward_info, last_forward_info
from bilevel.implicit.fixed_point import fixed_point
from bilevel.implicit.hypergrad import hypergrad
from bilevel.implicit.proximal import proximal_argmin
from bilevel.implicit.root import root
from bilevel.implicit.warm_start import WarmStart

__all__ = [
    "CompileFallbackWarning",
    "ImplicitDiagnostics",
    "WarmStart",
    "argmin",
    "custom_fixed_point",
    "custom_root",
    "fixed_point",
    "hypergrad",
    "last_backward_info",
    "last_forward_info",
    "proximal_argmin",
    "root",
]

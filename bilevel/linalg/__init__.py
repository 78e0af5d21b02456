"""Matrix-free linear solvers over pytrees of tensors.

The implicit engine needs one linear solve per backward pass, ``A x = b`` where
``A`` is only available as a function ``matvec(v) -> A v`` (a Hessian-vector
product or the Jacobian of a fixed-point map) and ``b`` is a tensor or a
dict/tuple of tensors of any shapes. Every solver here is an object built by a
factory and called as::

    x, info = solver(matvec, b, x0=None)

Solvers:

* :func:`cg` -- conjugate gradients, symmetric positive definite ``A``; detects
  negative curvature.
* :func:`minres` -- MINRES (Paige & Saunders 1975), symmetric indefinite ``A``
  (the Hessian of a neural-network inner problem away from a strict minimum).
* :func:`gmres` -- restarted GMRES, any non-singular ``A`` (fixed points).
* :func:`neumann` -- truncated Neumann series (Lorraine et al. 2020), converges
  when ``||I - alpha A|| < 1``.
* :func:`auto` -- :func:`dense` for few unknowns, an iterative solver otherwise (the
  implicit layers' default).
* :func:`dense` -- forms the matrix (small problems only): LU solve, or least
  squares with a singular-value cutoff.

All iterative loops run on the device: the only host synchronisations are one
convergence check every ``check_every`` iterations (by default every iteration on CPU,
where reading a flag costs no synchronisation, every 10 on GPU) and one at the end that
fills the :class:`LinearSolveInfo` record. Between checks, iterations after convergence
are masked with ``torch.where`` on a device boolean, so they neither change nor
break the solution; results do not depend on ``check_every``.
Under ``torch.func.vmap`` (where reading a value on the host is impossible) the
solvers run ``maxiter`` masked iterations and report ``info.checked = False``.

Every solver accepts ``damping``: it then solves ``(A + damping I) x = b``.
:func:`cg` and :func:`minres` accept ``preconditioner=``: :func:`jacobi` (a Hutchinson
estimate of the diagonal, :func:`hutchinson_diagonal`, kept across solves in a
:class:`PreconditionerMemory` or a :class:`bilevel.WarmStart`), a diagonal, or ``M^-1``.
Iterative solvers stop when ``||b - A x|| <= max(tol * ||b||, atol)``.
"""

from bilevel.linalg.auto import Auto as Auto
from bilevel.linalg.auto import auto
from bilevel.linalg.base import LinearSolver, MatVec
from bilevel.linalg.cg import CG as CG
from bilevel.linalg.cg import cg
from bilevel.linalg.dense import Dense as Dense
from bilevel.linalg.dense import dense
from bilevel.linalg.gmres import GMRES as GMRES
from bilevel.linalg.gmres import gmres
from bilevel.linalg.info import LinearSolveInfo
from bilevel.linalg.minres import MINRES as MINRES
from bilevel.linalg.minres import minres
from bilevel.linalg.neumann import Neumann as Neumann
from bilevel.linalg.neumann import neumann
from bilevel.linalg.preconditioner import Jacobi as Jacobi
from bilevel.linalg.preconditioner import PreconditionerMemory, hutchinson_diagonal, jacobi

__all__ = [
    "LinearSolveInfo",
    "LinearSolver",
    "MatVec",
    "PreconditionerMemory",
    "auto",
    "cg",
    "dense",
    "gmres",
    "hutchinson_diagonal",
    "jacobi",
    "minres",
    "neumann",
]

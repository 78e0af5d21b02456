"""Inner solvers for the forward pass of implicit differentiation.

The implicit engine differentiates the optimality condition at the solution, not
the solver, so these solvers run under :func:`torch.no_grad` and return detached
tensors: no autograd graph is kept across iterations, whatever their number.

Two families share one calling convention and one report, :class:`SolverInfo`:

* minimisation solvers, ``solution, info = solver(objective, init)`` where
  ``objective(params)`` returns a 0-d tensor: :func:`gradient_descent` (any
  :mod:`bilevel.optim` optimizer), :func:`lbfgs` (strong Wolfe line search),
  :func:`newton_cg` (Hessian-vector products and conjugate gradients) and
  :func:`scipy_minimize` (a bridge to :func:`scipy.optimize.minimize`, bounds
  included);
* :func:`proximal_gradient` -- FISTA for ``f + g`` given ``g``'s prox (a
  :class:`Composite` target; used by :func:`bilevel.proximal_argmin`), per-problem
  steps and stopping under ``vmap``;
* fixed-point solvers, ``solution, info = solver(map_fn, init)`` iterating
  ``w <- map_fn(w)``: :func:`fixed_point_iteration` and :func:`anderson`.

``params``/``init`` is a tensor or a pytree (e.g. a dict) of floating tensors; the
solution has the same structure, devices and dtypes, and never aliases ``init``.
:func:`stationarity` and :func:`check_stationarity` measure (and warn about) the
gradient norm at a solution, since the implicit hypergradient assumes an exact
optimum.

Host synchronisation: gradient descent and the fixed-point solvers synchronise
only at their convergence checks (every ``check_every`` iterations; the fixed-point
solvers once more at the end, for the info record). Newton-CG reads one
flag per CG iteration, per line-search trial step and per Newton step; L-BFGS, whose line
search decides with device-side masks, reads one flag per evaluation (did a search end?)
and one more when a search ended (is any problem live?). ``solve_batch`` of
:class:`LBFGS`, :class:`GradientDescent`, :class:`NewtonCG` and
:class:`ProximalGradient` (and :class:`bilevel.constraints.ProjectedGradient`) minimises
a stack of problems at once, each with its own step sizes, line search and stopping, and
row ``i`` is what a single call on problem ``i`` gives: the ``vmap`` rule of the implicit
layers; :meth:`FixedPointIteration.solve_batch` and :meth:`Anderson.solve_batch` iterate a
stack of maps the same way (each problem its own iterate, Anderson history, least-squares
weights and stopping; the ``vmap`` rule of :func:`bilevel.fixed_point`), reading one number
per check for the whole stack. The scipy bridge runs on the host, once per problem, by
design.
"""

from bilevel.solvers.anderson import Anderson, anderson
from bilevel.solvers.base import MapFn as MapFn
from bilevel.solvers.base import (
    NotMinimumError,
    NotMinimumWarning,
    NotStationaryError,
    NotStationaryWarning,
    Solver,
    SolverInfo,
)
from bilevel.solvers.base import Objective as Objective
from bilevel.solvers.fixed_point_iteration import FixedPointIteration, fixed_point_iteration
from bilevel.solvers.gradient_descent import GradientDescent, gradient_descent
from bilevel.solvers.lbfgs import LBFGS, lbfgs
from bilevel.solvers.newton_cg import NewtonCG, newton_cg
from bilevel.solvers.proximal_gradient import Composite, ProximalGradient, proximal_gradient
from bilevel.solvers.scipy_minimize import ScipyMinimize, scipy_minimize
from bilevel.solvers.stationarity import check_stationarity, fixed_point_residual, stationarity

__all__ = [
    "SolverInfo",
    "NotMinimumError",
    "NotMinimumWarning",
    "NotStationaryError",
    "NotStationaryWarning",
    "Solver",
    "GradientDescent",
    "LBFGS",
    "NewtonCG",
    "Composite",
    "ProximalGradient",
    "ScipyMinimize",
    "FixedPointIteration",
    "Anderson",
    "gradient_descent",
    "lbfgs",
    "newton_cg",
    "proximal_gradient",
    "scipy_minimize",
    "fixed_point_iteration",
    "anderson",
    "stationarity",
    "check_stationarity",
    "fixed_point_residual",
]

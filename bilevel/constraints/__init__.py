"""Constrained inner problems: projections and the projected-gradient fixed point.

* projections -- ``{w >= 0}``, box, simplex, l1/l2/linf balls,
  hyperplane, halfspace, affine set, box section;
* :func:`project_birkhoff` (doubly stochastic matrices) and :func:`project_polyhedron`
  (through :func:`bilevel.qp`);
* :func:`projected_gradient` -- an inner solver, ``solver(objective, init)``;
* :func:`projected_argmin` -- the differentiable constrained argmin (the fixed point of
  one projected-gradient step, differentiated by the implicit function theorem).
"""

from bilevel.constraints.birkhoff import project_birkhoff
from bilevel.constraints.polyhedron import project_polyhedron
from bilevel.constraints.projected import (
    ProjectedGradient,
    _projection_caller,  # noqa: F401 (used by bilevel.implicit callers)
    projected_argmin,
    projected_gradient,
)
from bilevel.constraints.projections import (
    project_affine_set,
    project_box,
    project_box_section,
    project_halfspace,
    project_hyperplane,
    project_l1_ball,
    project_l2_ball,
    project_linf_ball,
    project_nonnegative,
    project_simplex,
    simplex_threshold,
)

__all__ = [
    "ProjectedGradient",
    "project_affine_set",
    "project_birkhoff",
    "project_box",
    "project_box_section",
    "project_halfspace",
    "project_hyperplane",
    "project_l1_ball",
    "project_l2_ball",
    "project_linf_ball",
    "project_nonnegative",
    "project_polyhedron",
    "project_simplex",
    "projected_argmin",
    "projected_gradient",
    "simplex_threshold",
]

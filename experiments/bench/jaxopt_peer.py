"""JAXopt as a peer of ``bench implicit``: the same hypergradients in JAX (jitted, float64).

Each problem is written once more in ``jax.numpy`` and differentiated with JAXopt's implicit
differentiation, the way a JAXopt user would:

* ``w*`` given (as bilevel's ``argmin(..., solver=None)``): ``jaxopt.implicit_diff.custom_root``
  on the inner gradient around a "solver" that returns the precomputed solution, backward
  by ``jaxopt.linear_solve.solve_cg`` at the same relative tolerance and iteration cap as
  bilevel's ``linalg.cg`` (``||r|| <= tol ||b||``, at most ``min(10 n, 1000)`` iterations);
  its operator is the Hessian by reverse-over-reverse products, as bilevel's default.
* solve and backward (as ``argmin(..., solver=solvers.lbfgs(...))``): ``jaxopt.LBFGS`` with
  ``implicit_diff=True`` from the same start, to the same gradient-norm tolerance.

The whole hypergradient (forward of the outer loss, the custom VJP, the linear solve) is one
``jax.jit`` function of the hyperparameter and the data (passed as arguments, not baked in as
constants). It is traced and compiled by a first call outside the timed region; that call's
time (trace, compile and one run) is reported as ``compile ... (untimed)``. A timed call runs the compiled function, waits for it
(``block_until_ready``) and hands the result to torch (a copy of ``p`` numbers).

Threads: with ``--threads 1`` XLA's Eigen kernels are made single-threaded
(``--xla_cpu_multi_thread_eigen=false`` in ``XLA_FLAGS``, read when JAX starts its CPU
backend), so both libraries use one core.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import core

NAME = "jaxopt"
SINGLE_THREAD_FLAG = "--xla_cpu_multi_thread_eigen=false"


def peer() -> core.Peer:
    """JAXopt as detected by :func:`core.peer` (``missing`` when jax or jaxopt fails to import)."""
    return core.peer(NAME)


def configure(threads: int) -> None:
    """Single-threaded XLA for ``threads == 1`` (effective if JAX's backend has not started)."""
    if threads == 1 and SINGLE_THREAD_FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " " + SINGLE_THREAD_FLAG
        ).strip()


def _jax() -> Any:
    import jax

    jax.config.update("jax_enable_x64", True)
    return jax


def device_mismatch(device: torch.device) -> str | None:
    """Why JAXopt cannot run where torch runs (JAX sees no such device), or None."""
    jax = _jax()
    platform = jax.devices()[0].platform  # "cpu", "gpu" (CUDA) or "tpu"
    wanted = "gpu" if device.type == "cuda" else device.type
    if platform != wanted:
        return f"JAX's default device is {platform}, the bench runs on {device.type}"
    return None


def to_jax(t: Tensor) -> Any:
    """A torch tensor as a float64 (or integer) JAX array on JAX's default device."""
    _jax()  # float64 arrays need x64 on before the first conversion
    import jax.numpy as jnp

    x = t.detach().cpu()
    return jnp.asarray(x.double().numpy() if x.is_floating_point() else x.numpy())


class Jitted:
    """A jitted JAX function of fixed arguments, compiled by a first (untimed) call.

    Calling it runs the compiled function and returns its result as a float64 torch tensor.
    """

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        jax = _jax()
        self.fn = jax.jit(fn)
        self.args = args
        t0 = time.perf_counter()
        jax.block_until_ready(self.fn(*args))  # trace + compile + one run
        self.compile_s = time.perf_counter() - t0

    def __call__(self) -> Tensor:
        out = self.fn(*self.args).block_until_ready()
        return torch.from_numpy(np.array(out))

    @property
    def note(self) -> str:
        return f"compile {core.fmt_time(self.compile_s)} (untimed)"


def cg_solve(tol: float, n: int) -> Callable[..., Any]:
    """``solve_cg`` at relative tolerance ``tol`` with bilevel cg's cap ``min(10 n, 1000)``."""
    from jaxopt import linear_solve

    maxiter = min(10 * n, 1000)

    def solve(matvec: Callable[[Any], Any], b: Any, **_: Any) -> Any:
        return linear_solve.solve_cg(matvec, b, tol=tol, maxiter=maxiter)

    return solve


def given_solution(
    inner: Callable[..., Any], outer: Callable[[Any, Any], Any], tol: float, n: int
) -> Callable[..., Any]:
    """``h, w_star, train, val -> d outer(w*(h), val) / dh`` with ``w*`` given.

    ``inner(w, h, train)`` is the inner objective; the solution's derivative comes from
    ``custom_root`` on ``grad_w inner`` with ``solve_cg(tol)``.
    """
    jax = _jax()
    from jaxopt import implicit_diff

    @implicit_diff.custom_root(jax.grad(inner), solve=cg_solve(tol, n))
    def solution(w_star: Any, h: Any, train: Any) -> Any:
        return w_star  # the precomputed minimiser, as given to every implementation

    def outer_of_h(h: Any, w_star: Any, train: Any, val: Any) -> Any:
        return outer(solution(w_star, h, train), val)

    return jax.grad(outer_of_h)


def lbfgs_solution(
    inner: Callable[..., Any],
    outer: Callable[[Any, Any], Any],
    tol: float,
    n: int,
    *,
    solve_tol: float,
    maxiter: int,
    history_size: int,
) -> Callable[..., Any]:
    """``h, w0, train, val -> d outer(w*(h), val) / dh`` with ``w*`` found by ``jaxopt.LBFGS``
    from ``w0`` to gradient norm ``solve_tol``, differentiated implicitly (``solve_cg(tol)``)."""
    jax = _jax()
    import jaxopt

    solver = jaxopt.LBFGS(
        fun=inner,
        tol=solve_tol,
        maxiter=maxiter,
        history_size=history_size,
        implicit_diff=True,
        implicit_diff_solve=cg_solve(tol, n),
    )

    def outer_of_h(h: Any, w0: Any, train: Any, val: Any) -> Any:
        return outer(solver.run(w0, h, train).params, val)

    return jax.grad(outer_of_h)


def lbfgs_iterations(
    inner: Callable[..., Any], *args: Any, solve_tol: float, maxiter: int, history_size: int
) -> tuple[int, float]:
    """The iterations and final gradient norm of ``jaxopt.LBFGS`` on ``inner`` (for a note)."""
    import jaxopt

    state = (
        jaxopt.LBFGS(fun=inner, tol=solve_tol, maxiter=maxiter, history_size=history_size)
        .run(*args)
        .state
    )
    return int(state.iter_num), float(state.error)


# --------------------------------------------------------------------------- logistic regression


def _design(design: Any) -> dict[str, Any]:
    """A dense (``X``) or row-sparse (``cols``, ``vals``) design as a dict of JAX arrays."""
    if design.X is not None:
        return {"X": to_jax(design.X)}
    return {"cols": to_jax(design.cols), "vals": to_jax(design.vals)}


def _mv(design: dict[str, Any], w: Any) -> Any:
    if "X" in design:
        return design["X"] @ w
    return (design["vals"] * w[design["cols"]]).sum(-1)  # gather; its transpose a scatter-add


def _logistic_inner(w: Any, h: Any, train: Any) -> Any:
    jax = _jax()
    import jax.numpy as jnp

    design, s = train
    return jax.nn.softplus(-s * _mv(design, w)).mean() + 0.5 * (jnp.exp(h) * w * w).sum()


def _logistic_outer(w: Any, val: Any) -> Any:
    jax = _jax()

    design, s = val
    return jax.nn.softplus(-s * _mv(design, w)).mean()


def logistic_given_solution(problem: Any, tol: float) -> Jitted:
    """``bench implicit``'s L2 logistic regression (``problem``: an ``implicit.Problem``):
    the hypergradient with respect to the log L2 weight(s) at the precomputed ``w*``."""
    train = (_design(problem.train[0]), to_jax(problem.train[1]))
    val = (_design(problem.val[0]), to_jax(problem.val[1]))
    fn = given_solution(_logistic_inner, _logistic_outer, tol, problem.p)
    return Jitted(fn, to_jax(problem.h), to_jax(problem.w_star), train, val)


def missing_cells(implementation: str) -> dict[str, str]:
    """A table row saying that JAXopt is missing (no time, nothing checked)."""
    return {
        "implementation": implementation,
        "median": "-",
        "agree": "missing",
        "note": peer().describe()[:90],
    }

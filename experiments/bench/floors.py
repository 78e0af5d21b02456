"""The eager floors under the targets that ``bench implicit`` and ``bench maml`` miss.

``python -m experiments.bench.floors [--repeats 9] [--quick]``

Each floor is work a bilevel row cannot skip, timed as ``bench implicit`` times its rows
(:func:`experiments.bench.core.measure`: one call after ``gc.collect()``, the rows
interleaved, medians), float64 (iMAML float32), one thread, and printed next to the row
and its reference:

* ridge 10x3 and 100x30 with ``solvers.lbfgs`` (target <= 3x the closed form): the inner
  loss and its gradient evaluated as many times as that L-BFGS evaluates them (no
  directions, line search or backward), and the hypergradient at the given solution
  (``solver=None``, the backward such a row also runs);
* ridge 10x3 and 100x30 with ``cg`` (target <= 2x): ``cg``'s own loop alone on the formed
  matrix for the iterations the row's ``cg`` takes (what the loop costs; not a floor with
  the rest of the row added: timed apart, each part pays its own cold start);
* digits with ``cg`` (target <= 1x JAXopt): the two matrix products of one Hessian-vector
  product of the cross-entropy (``X V`` and ``X^T Z``, 898 x 64 x 10), as many times as
  ``cg`` iterates, in PyTorch, in JAX (jitted, one ``fori_loop``) and in NumPy: the part
  of every product that no fusion of the element-wise work removes;
* iMAML as ``bench maml`` times it (float32, the ``maml`` experiment's defaults, meta-batch
  25; target: the vmapped meta-gradient >= 5x the loop of separate calls): the vmapped
  proximal loss's value and gradient as many times as the slowest task's L-BFGS evaluates
  it, then its stacked first-order graph and as many Hessian-vector products through it as
  the slowest task's backward ``cg`` makes (each task alone: the stack runs until its
  slowest is done), written with torch alone.

The ratios are to the problem's reference (the closed form, JAXopt's whole solve, or
the iMAML loop). A
floor above its target says the target cannot be met by this route on this machine.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import core, implicit_small, jaxopt_peer

TOL = implicit_small.TOL


def _evaluations(problem: implicit_small.Small, k: int) -> core.Impl:
    """The inner loss and its gradient, ``k`` times from zero (L-BFGS's evaluations alone)."""
    h = problem.h.detach()
    w0 = torch.zeros_like(problem.w_star)

    def run() -> Tensor:
        g = w0
        for _ in range(k):
            w = w0.clone().requires_grad_()
            (g,) = torch.autograd.grad(problem.inner(w, h), w)
        return g

    return core.Impl(f"floor: {k} evaluations", run, check=False, note="loss + gradient")


def _cg_loop(problem: implicit_small.Small) -> tuple[core.Impl, int]:
    """``cg``'s loop on the ridge matrix, formed once outside the timing, and its iterations."""
    from bilevel import linalg

    X = problem.train[0]
    n, p = X.shape
    A = X.T @ X / n + problem.h.detach().exp() * torch.eye(p, dtype=X.dtype)
    w = problem.w_star.detach().clone().requires_grad_()
    b = -torch.autograd.grad(problem.outer(w), w)[0]  # the backward's right-hand side
    solver = linalg.cg(tol=TOL)

    def product(v: list[Tensor]) -> list[Tensor]:
        return [A @ v[0]]

    def run() -> Tensor:
        return solver._solve(product, [b], None)[0][0]

    iterations = int(solver._solve(product, [b], None)[1].iterations)
    name = f"floor: cg loop, {iterations} it."
    return core.Impl(name, run, check=False, note="on the formed matrix"), iterations


def _products(k: int) -> list[core.Impl]:
    """``k`` times ``X^T (X V)`` at the digits' shapes, in PyTorch, NumPy and JAX."""
    X_np = implicit_small.digits_data(0)[0]
    X = torch.as_tensor(X_np)
    V0 = torch.randn(
        X.shape[1], 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )

    # each product depends on the last; scaled by 1 / ||X||_2^2 (inside the BLAS call) so
    # that V stays bounded without an extra pass
    scale = 1.0 / float(torch.linalg.matrix_norm(X, 2)) ** 2

    def torch_run() -> Tensor:
        V = V0
        for _ in range(k):
            V = torch.addmm(V, X.t(), X @ V, beta=0, alpha=scale)
        return V

    Xn, V0n = np.ascontiguousarray(X_np), V0.numpy()

    def numpy_run() -> Tensor:
        V = V0n
        for _ in range(k):
            V = Xn.T @ (Xn @ V)
            V *= scale
        return torch.from_numpy(V)

    note = "898x64 @ 64x10, then its transpose"
    impls = [
        core.Impl(f"floor: {k} HVP matmul pairs, torch", torch_run, check=False, note=note),
        core.Impl(f"floor: {k} HVP matmul pairs, numpy", numpy_run, check=False, note=note),
    ]
    if jaxopt_peer.peer().available:
        jax = jaxopt_peer._jax()

        def pairs(X: Any, V: Any) -> Any:
            def body(_: Any, V: Any) -> Any:
                return scale * (X.T @ (X @ V))  # XLA folds the scale into the product

            return jax.lax.fori_loop(0, k, body, V)

        run = jaxopt_peer.Jitted(pairs, jaxopt_peer.to_jax(X), jaxopt_peer.to_jax(V0))
        impls.append(
            core.Impl(f"floor: {k} HVP matmul pairs, jax", run, check=False, note=run.note)
        )
    return impls


def _table(title: str, results: dict[str, core.Result], reference: str) -> list[str]:
    ref = results[reference].median if reference in results else None
    lines = [title, f"{'row':<38} {'median':>10} {'x ' + reference:>16}  note"]
    lines.append("-" * len(lines[-1]))
    for name, res in results.items():
        if res.failed is not None or res.median is None:
            lines.append(f"{name:<38} {'failed':>10} {'':>16}  {res.failed}")
            continue
        ratio = f"{res.median / ref:.2f}x" if ref else "-"
        lines.append(f"{name:<38} {core.fmt_time(res.median):>10} {ratio:>16}  {res.note}")
    return lines


def _then(name: str, first: core.Impl, second: core.Impl, note: str) -> core.Impl:
    """``first`` then ``second`` in one call (one timing: the cold start paid once, as the
    row pays it)."""

    def run() -> Tensor:
        first.fn()
        return second.fn()

    return core.Impl(name, run, check=False, note=note)


def _ridge(p: int, repeats: int) -> list[str]:
    from bilevel import linalg, solvers

    n = {3: 10, 30: 100}[p]
    problem = implicit_small.ridge(n, p, 0)
    solver = solvers.lbfgs(
        tol=implicit_small.SOLVE_TOL,
        maxiter=implicit_small.LBFGS_MAXITER,
        history_size=implicit_small.LBFGS_HISTORY,
    )
    lbfgs_run = implicit_small.bilevel_impl(problem, None, solver)
    lbfgs_run()
    evaluations = int(solver.last_info.evaluations)  # type: ignore[union-attr]
    cg = linalg.cg(tol=TOL)
    cg_run = implicit_small.bilevel_impl(problem, cg)
    cg_run()
    given = core.Impl("bilevel auto (solution given)", implicit_small.bilevel_impl(problem, None))
    evaluated = _evaluations(problem, evaluations)
    loop, loop_iterations = _cg_loop(problem)
    if loop_iterations != cg.last_info.iterations:  # type: ignore[union-attr]
        raise RuntimeError(f"{loop.name}: not the row's cg ({cg.last_info})")
    lbfgs_floor = _then(
        "floor: lbfgs", evaluated, given, "the evaluations, then the given-solution row"
    )
    impls = [
        core.Impl("closed form", implicit_small.closed_form_impl(problem)),
        given,
        core.Impl("bilevel lbfgs", lbfgs_run, note=f"{evaluations} evaluations"),
        evaluated,
        lbfgs_floor,
        core.Impl("bilevel cg", cg_run, note=f"{cg.last_info.iterations} it."),  # type: ignore[union-attr]
        loop,
    ]
    results = core.measure(
        impls,
        reference=problem.exact,
        rtol=1e-8,
        repeats=repeats,
        warmup=2,
        device=torch.device("cpu"),
    )
    median = {name: res.median or math.nan for name, res in results.items()}
    closed = median["closed form"]
    lines = _table(f"== ridge {n}x{p} ({p} unknowns) ==", results, "closed form")
    lines.append(
        f"lbfgs: floor {median[lbfgs_floor.name] / closed:.2f}x, row "
        f"{median['bilevel lbfgs'] / closed:.2f}x (target <= 3x)"
    )
    return lines


def _digits(repeats: int) -> list[str]:
    from bilevel import linalg

    problem = implicit_small.digits(0)
    cg = linalg.cg(tol=TOL)
    run = implicit_small.bilevel_impl(problem, cg)
    run()
    k = int(cg.last_info.iterations)  # type: ignore[union-attr]
    impls = [core.Impl("bilevel cg", run, note=f"cg(tol={TOL:g}), {k} it.")]
    if jaxopt_peer.peer().available:
        impls.extend(implicit_small.jaxopt_impls(problem, lbfgs=False))
    impls.extend(_products(k))
    results = core.measure(
        impls, reference=None, rtol=1e-8, repeats=repeats, warmup=2, device=torch.device("cpu")
    )
    reference = "jaxopt cg" if "jaxopt cg" in results else "bilevel cg"
    lines = _table("== digits (640 unknowns) ==", results, reference)
    if reference == "bilevel cg":
        lines.append(f'{jaxopt_peer.peer().describe()}: pip install -e ".[bench]"')
    return lines


def _imaml_counts(
    cfg: dict[str, Any], params: dict[str, Tensor], tasks: tuple[Tensor, ...]
) -> tuple[int, int]:
    """The most inner evaluations and backward cg iterations any task takes alone: the
    passes of the vmapped stack (each task keeps its own solves; the stack runs until its
    slowest is done)."""
    import bilevel
    from experiments import maml as experiment

    evaluations, iterations = 0, 0
    for i in range(len(tasks[0])):
        xs, ys, xq, yq = (t[i] for t in tasks)
        meta = {k: v.detach().requires_grad_() for k, v in params.items()}
        diag = bilevel.implicit.ImplicitDiagnostics()
        adapted = experiment.imaml_adapt(meta, xs, ys, cfg, diag)
        experiment.mse(adapted, xq, yq, cfg["activation"]).backward()
        evaluations = max(evaluations, int(diag.forward.evaluations))
        iterations = max(iterations, int(diag.last_backward.iterations))
    return evaluations, iterations


def _imaml_floor(
    cfg: dict[str, Any], params: dict[str, Tensor], tasks: tuple[Tensor, ...], k: int, j: int
) -> core.Impl:
    """``k`` stacked evaluations (value and gradient of the vmapped proximal loss) and a
    stacked first-order graph with ``j`` Hessian-vector products through it: the user's
    function work of the vmapped meta-gradient, written with torch alone."""
    from experiments import maml as experiment

    lam, activation = cfg["imaml_lambda"], cfg["activation"]
    xs, ys = tasks[0], tasks[1]
    B = len(xs)

    def prox(w: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return experiment._prox_loss(lam, activation, w, params, (x, y))

    values = torch.func.vmap(prox)
    # an evaluation costs the same wherever it is made: at the meta-parameters
    stack = {k_: v.detach().expand(B, *v.shape).contiguous() for k_, v in params.items()}

    def run() -> Tensor:
        for _ in range(k):
            w = {k_: v.clone().requires_grad_() for k_, v in stack.items()}
            torch.autograd.grad(values(w, xs, ys).sum(), list(w.values()))
        w = {k_: v.clone().requires_grad_() for k_, v in stack.items()}
        leaves = list(w.values())
        grads = torch.autograd.grad(values(w, xs, ys).sum(), leaves, create_graph=True)
        v = [torch.ones_like(x) for x in leaves]
        for _ in range(j):
            out = torch.autograd.grad(grads, leaves, v, retain_graph=True)
        return torch.cat([o.reshape(-1) for o in out])

    note = f"{k} stacked evaluations, the graph, {j} stacked HVPs"
    return core.Impl("floor: evaluations + HVPs", run, check=False, note=note)


def _imaml(repeats: int) -> list[str]:
    from . import maml as bench_maml

    dtype, device = torch.float32, torch.device("cpu")
    batch = bench_maml.IMAML_BATCH
    cfg, params, tasks = bench_maml.imaml_setup(batch, dtype, device, 0)
    k, j = _imaml_counts(cfg, params, tasks)
    vmapped, loop = bench_maml.imaml_impls(batch, dtype, device, 0)
    impls = [loop, vmapped, _imaml_floor(cfg, params, tasks, k, j)]
    results = core.measure(
        impls, reference=loop.name, rtol=1e-4, repeats=repeats, warmup=1, device=device
    )
    lines = _table(f"== iMAML meta-gradient, meta-batch {batch}, float32 ==", results, loop.name)
    median = {name: res.median or math.nan for name, res in results.items()}
    budget = median[loop.name] / 5
    lines.append(
        f"iMAML: the 5x target needs the vmap row <= {core.fmt_time(budget)}; the floor is "
        f"{median[impls[2].name] / budget:.0%} of that, the row {median[vmapped.name] / budget:.0%}"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bench.floors", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--quick", action="store_true", help="ridge 3 only, 3 rounds")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be a positive whole number, got {args.repeats}")
    jaxopt_peer.configure(1)
    torch.set_num_threads(1)
    repeats = 3 if args.quick else args.repeats
    print(
        "eager floors of the missed targets: 1 thread, float64 (iMAML: float32), medians "
        f"of {repeats} rounds of one call after gc.collect()"
    )
    print("\n".join(_ridge(3, repeats)))
    if not args.quick:
        for part in (_ridge(30, repeats), _digits(repeats), _imaml(repeats)):
            print()
            print("\n".join(part))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""maml: few-shot sinusoid regression with MAML, first-order MAML and iMAML.

Tasks (Finn et al. 2017): ``y = A sin(x - phi)``, amplitude ``A ~ U[0.1, 5]``, phase
``phi ~ U[0, pi]``, inputs ``x ~ U[-5, 5]``; K = 10 support points to adapt on and query
points to score. The model is an MLP 1-40-40-1 (GELU by default: iMAML's implicit gradient
needs a twice-differentiable inner loss; ``--activation relu`` is Finn et al.'s network, and
``--preset paper`` uses it); adaptation is plain SGD with step
``--inner-lr``. Meta-training (Adam on the initialization; the tasks of a meta-batch run
together: MAML's as one network with per-task weights stacked on a leading axis, iMAML's
under ``torch.func.vmap``) compares

* ``maml-1``, ``maml-5``  MAML, back-propagating through 1 or 5 adaptation steps,
* ``fomaml-5``            first-order MAML (the adaptation's gradients are constants),
* ``imaml``               iMAML (Rajeswaran et al. 2019): the adapted weights are the argmin of
                          support loss + lam/2 ||w - w0||^2 (L-BFGS to gradient norm
                          ``imaml_tol``), differentiated implicitly with conjugate gradients
                          on the positive definite H + lam I (``bilevel.argmin``),

against a model pretrained on all tasks jointly (plain regression on pooled tasks). Meta-test:
MSE on 500 held-out tasks after 0, 1, 5 and 10 SGD adaptation steps, mean and 95% interval,
and after each method's own adaptation (``mse@own``: k SGD steps for MAML-k, the argmin for
iMAML). An evaluation in which some task's adaptation diverges is reported as null with a
note (``diverged``), not averaged over the tasks that survived.
The final meta-parameters of every method are saved in ``meta_params.pt``.

Under ``torchrun --nproc_per_node=N -m experiments maml ...`` every meta-batch (and the
validation and test tasks) is split across the N processes (:mod:`bilevel.distributed`):
each computes the meta-gradient of its block of tasks and one all-reduce combines them,
weighted by task counts, so MAML, first-order MAML and the pretrained baseline follow the
single-process run (to rounding). iMAML solves each task on its own under ``vmap`` (its own
L-BFGS run and CG solve, each with its own stopping decision), so its result does not
depend on how tasks are grouped, and with N processes it matches the single-process run to
rounding too.

:func:`task_loss` (one task, a function of (params, task)) and :func:`meta_gradient`
(the mean over a batch of tasks) are pure functions, so the meta-batch can be split across
processes and the gradients averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import bilevel
import bilevel.linalg
import bilevel.optim
import bilevel.solvers
from bilevel import distributed
from bilevel._memory import available_bytes, format_bytes

from . import plot
from .io import save_checkpoint
from .options import Option, choice, choice_list, int_list, positive_float, positive_int
from .run import Diverged, Run, UsageError

DESCRIPTION = (
    "few-shot sinusoid regression: MAML (1 and 5 steps), first-order MAML and iMAML, tasks "
    "batched, vs a jointly pretrained model"
)
DTYPE = "float32"
METHODS = ("maml-1", "maml-5", "fomaml-5", "imaml")
# the MLP's hidden activation: the module (for functional_call) and the function of the
# stacked-weights path
ACTIVATIONS = {"gelu": (nn.GELU, F.gelu), "relu": (nn.ReLU, F.relu)}
Task = tuple[Tensor, Tensor, Tensor, Tensor]  # x_support, y_support, x_query, y_query

OPTIONS = [
    Option("methods", list(METHODS), type=choice_list(METHODS), help="meta-learning methods"),
    Option("outer_steps", 2000, quick=12, type=positive_int, help="meta-training steps per method"),
    Option("meta_batch", 25, quick=4, type=positive_int, help="tasks per meta-step"),
    Option("shots", 10, type=positive_int, help="support points K per task"),
    Option("queries", 10, type=positive_int, help="query points per training task"),
    Option("inner_lr", 0.01, type=positive_float, help="SGD step of adaptation"),
    Option("outer_lr", 1e-3, quick=3e-3, type=positive_float, help="Adam step of meta-training"),
    Option(
        "activation",
        "gelu",
        type=choice(list(ACTIVATIONS)),
        help="hidden activation of the MLP (gelu: twice differentiable, as iMAML's implicit "
        "gradient needs; relu: Finn et al.'s, non-smooth, iMAML's inner solves cannot converge)",
    ),
    Option("imaml_lambda", 10.0, type=positive_float, help="iMAML proximal weight lam"),
    Option(
        "imaml_tol",
        1e-4,
        type=positive_float,
        help="gradient-norm tolerance of iMAML's inner solve",
    ),
    Option(
        "imaml_steps",
        200,
        type=positive_int,
        help="L-BFGS iteration cap of iMAML's inner solve (it stops at imaml_tol)",
    ),
    Option(
        "cg_steps",
        200,
        type=positive_int,
        help="conjugate-gradient iteration cap of iMAML's backward (it stops at relative "
        "residual 1e-5)",
    ),
    Option("test_tasks", 500, quick=100, type=positive_int, help="held-out meta-test tasks"),
    Option("test_points", 100, quick=50, type=positive_int, help="query points per test task"),
    Option("eval_steps", [0, 1, 5, 10], type=int_list, help="adaptation steps at meta-test"),
    Option(
        "monitor_every",
        50,
        quick=3,
        type=positive_int,
        help="estimate the outer loss on fixed validation tasks every N steps",
    ),
    Option(
        "monitor_tasks", 100, quick=50, type=positive_int, help="validation tasks of the estimate"
    ),
]
# iMAML's memory per task, in units of one MAML adaptation step (3 weight copies): the
# L-BFGS ring of 20 (s, y) pairs and a few vectors of the line search
IMAML_STEPS = 15
# what fraction of the available memory a run may plan to use
MEMORY_FRACTION = 0.8


def add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="skip (and count) a meta-step whose meta-gradient is not finite instead of "
        "stopping; a method whose steps were all skipped still fails",
    )


def memory_estimate(cfg: dict[str, Any], dtype_bytes: int) -> int:
    """Bytes a meta-step needs at its peak, whole batch in one process (an upper estimate).

    Per task and adaptation step, the vmapped inner loop keeps the adapted weights, their
    gradient and the step's update (3 copies of the 1761 weights) and, per support or query
    point, the two hidden layers' activations and their ReLU masks and gradients (4 x 81
    values); the held-out evaluation keeps one step's worth per test task. iMAML keeps no
    graph across its solver's iterations: L-BFGS holds 20 curvature pairs and a few line-search
    vectors per task (counted as ``IMAML_STEPS`` steps, 45 weight copies).
    """
    weights = sum(p.numel() for p in MODELS["gelu"].parameters())
    steps = max(
        [IMAML_STEPS if m == "imaml" else int(m.split("-")[1]) for m in cfg["methods"]] + [1]
    )
    per_point = 4 * 81
    train = cfg["meta_batch"] * steps * (3 * weights + per_point * (cfg["shots"] + cfg["queries"]))
    test = cfg["test_tasks"] * (3 * weights + per_point * (cfg["shots"] + cfg["test_points"]))
    monitor = (
        cfg["monitor_tasks"] * steps * (3 * weights + per_point * (cfg["shots"] + cfg["queries"]))
    )
    return int(max(train, test, monitor) * dtype_bytes)


def validate(cfg: dict[str, Any]) -> None:
    """Refuse a configuration whose meta-step cannot fit in memory, before allocating it."""
    need = memory_estimate(cfg, torch.finfo(getattr(torch, cfg["dtype"])).bits // 8)
    device = torch.device(cfg["device"])
    have = available_bytes(device)
    if have is not None and need > MEMORY_FRACTION * have:
        raise UsageError(
            f"--meta-batch {cfg['meta_batch']} / --test-tasks {cfg['test_tasks']}: a meta-step "
            f"needs about {format_bytes(need)}, more than the {format_bytes(have)} available on "
            f"{device.type}; lower --meta-batch (or the task counts)"
        )


# Finn et al. 2017 (sinusoid regression, section 5.1): 70,000 meta-steps of Adam (lr 1e-3) on
# meta-batches of 25 tasks, K = 10 shots, one adaptation step of SGD with lr 0.01 during
# meta-training, a 1-40-40-1 ReLU MLP; evaluated after 1 and 10 steps, against pretraining
PRESETS = {
    "paper": {
        "methods": ["maml-1"],
        "outer_steps": 70000,
        "meta_batch": 25,
        "shots": 10,
        "queries": 10,
        "inner_lr": 0.01,
        "outer_lr": 1e-3,
        "monitor_every": 1000,
        # a checkpoint (with fsync) every 10 steps cost ~25% of a meta-step; 500 loses at
        # most a few seconds of work on Ctrl-C or a crash
        "checkpoint_every": 500,
        "activation": "relu",  # Finn et al.'s network
    }
}

# -- tasks and model ------------------------------------------------------------------------


def sample_tasks(gen: torch.Generator, n: int, shots: int, queries: int) -> Task:
    """``n`` sinusoid tasks (float64, CPU), each with ``shots`` support and ``queries`` query points."""
    amp = 0.1 + 4.9 * torch.rand(n, 1, 1, generator=gen, dtype=torch.float64)
    phase = math.pi * torch.rand(n, 1, 1, generator=gen, dtype=torch.float64)
    xs = -5 + 10 * torch.rand(n, shots, 1, generator=gen, dtype=torch.float64)
    xq = -5 + 10 * torch.rand(n, queries, 1, generator=gen, dtype=torch.float64)
    return xs, amp * torch.sin(xs - phase), xq, amp * torch.sin(xq - phase)


def _mlp(activation: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(1, 40), activation(), nn.Linear(40, 40), activation(), nn.Linear(40, 1)
    )


MODELS = {name: _mlp(module) for name, (module, _) in ACTIVATIONS.items()}


def init_params(
    gen: torch.Generator, device: torch.device, dtype: torch.dtype
) -> dict[str, Tensor]:
    """PyTorch's default Linear initialization of the 1-40-40-1 MLP, drawn from ``gen``."""
    params = {}
    model = MODELS["gelu"]  # the parameters do not depend on the activation
    for name, p in model.named_parameters():
        layer = model.get_submodule(name.split(".")[0])
        assert isinstance(layer, nn.Linear)
        bound = 1.0 / math.sqrt(layer.in_features)
        u = torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1
        params[name] = (u * bound).to(device=device, dtype=dtype)
    return params


def predict(params: dict[str, Tensor], x: Tensor, activation: str) -> Tensor:
    return functional_call(MODELS[activation], params, (x,))


def mse(params: dict[str, Tensor], x: Tensor, y: Tensor, activation: str) -> Tensor:
    return ((predict(params, x, activation) - y) ** 2).mean()


# -- the per-task inner loop and the meta-gradient ------------------------------------------


def adapt(
    params: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    steps: int,
    lr: float,
    activation: str,
    first_order: bool = False,
) -> dict[str, Tensor]:
    """``steps`` SGD steps on one task's support set; differentiable w.r.t. ``params``.

    Written with ``torch.func.grad``, so it runs under ``vmap`` (one task per batch entry).
    ``first_order`` treats the adaptation gradients as constants (first-order MAML).
    """
    opt = bilevel.optim.sgd(lr=lr)
    state = opt.init(params)
    for _ in range(steps):
        grads = torch.func.grad(mse)(params, x, y, activation)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        params, state = opt.step(params, grads, state)
    return params


def _prox_loss(
    lam: float,
    activation: str,
    w: dict[str, Tensor],
    w0: dict[str, Tensor],
    batch: tuple[Tensor, Tensor],
) -> Tensor:
    reg = sum(((w[k] - w0[k]) ** 2).sum() for k in w)
    return mse(w, *batch, activation) + 0.5 * lam * reg


def imaml_adapt(
    meta_params: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    cfg: dict[str, Any],
    diagnostics: bilevel.implicit.ImplicitDiagnostics | None = None,
) -> dict[str, Tensor]:
    """argmin_w support loss + lam/2 ||w - w0||^2 by L-BFGS from w0; implicit gradient.

    Both solves run to a tolerance, so the implicit gradient is that of the minimiser (the
    engine warns when one does not converge; nothing here silences it). The inner solve is
    L-BFGS to gradient norm ``imaml_tol``; its line search keeps it stable whatever the
    curvature. The backward solves ``(H + lam I) u = g`` with CG to relative residual
    1e-5: with ``lam = 10`` the proximal term outweighs the support loss's negative
    curvature (its Hessian's smallest eigenvalue was measured near -4 at the
    initialization), so the system is positive definite and well conditioned (condition
    numbers 2-30; a few dozen CG steps). This needs a twice-differentiable network
    (``activation="gelu"``): with ReLU the support loss is piecewise smooth, its
    minimisers sit on kinks where the gradient jumps, and no tolerance is reached.
    Under ``vmap`` the tasks' L-BFGS runs are solved as one stack, each task with its own
    iterate, line search and stopping (as in a loop). ``diagnostics`` collects one task's
    solves (outside ``vmap``).
    """
    solver = bilevel.solvers.lbfgs(tol=cfg["imaml_tol"], maxiter=cfg["imaml_steps"])
    linear_solver = bilevel.linalg.cg(tol=1e-5, maxiter=cfg["cg_steps"])
    return bilevel.argmin(
        partial(_prox_loss, cfg["imaml_lambda"], cfg["activation"]),
        meta_params,
        meta_params,
        data=(x, y),
        solver=solver,
        linear_solver=linear_solver,
        diagnostics=diagnostics,
    )


def task_loss(meta_params: dict[str, Tensor], task: Task, cfg: dict[str, Any]) -> Tensor:
    """Query MSE of one task after adapting ``meta_params`` on its support set (``cfg["method"]``)."""
    xs, ys, xq, yq = task
    method = cfg["method"]
    if method == "imaml":
        adapted = imaml_adapt(meta_params, xs, ys, cfg)
    else:
        steps = int(method.split("-")[1])
        adapted = adapt(
            meta_params,
            xs,
            ys,
            steps,
            cfg["inner_lr"],
            cfg["activation"],
            first_order=method.startswith("fo"),
        )
    return mse(adapted, xq, yq, cfg["activation"])


def batched_predict(params: dict[str, Tensor], x: Tensor, activation: str) -> Tensor:
    """The MLP on a batch of tasks at once: every parameter has a leading task axis B (each
    task its own weights), ``x`` is (B, N, 1); three ``baddbmm`` calls."""
    act = ACTIVATIONS[activation][1]
    h = act(torch.baddbmm(params["0.bias"].unsqueeze(1), x, params["0.weight"].mT))
    h = act(torch.baddbmm(params["2.bias"].unsqueeze(1), h, params["2.weight"].mT))
    return torch.baddbmm(params["4.bias"].unsqueeze(1), h, params["4.weight"].mT)


@dataclass(frozen=True)
class MamlSteps:
    """MAML's adaptation: ``steps`` SGD steps of size ``lr`` through the MLP with
    ``activation``, the gradients constants when ``first_order``."""

    steps: int
    lr: float
    activation: str
    first_order: bool


def batched_maml_value_and_grad(
    meta_params: dict[str, Tensor], tasks: Task, how: MamlSteps
) -> tuple[Tensor, dict[str, Tensor]]:
    """MAML's mean query loss and meta-gradient with the tasks' fast weights stacked on a
    leading axis: the same numbers as ``vmap`` of :func:`task_loss`, several times faster.

    The summed support loss is a sum of per-task terms, each depending only on its own slice
    of the stacked weights, so one ``autograd.grad`` of the sum gives every task its own
    gradient; :func:`bilevel.optim.sgd` then steps all tasks at once. With ``first_order``
    the adaptation gradients are constants (no graph through them).
    """
    xs, ys, xq, yq = tasks
    n_tasks = xs.shape[0]
    opt = bilevel.optim.sgd(lr=how.lr)
    act = how.activation
    with torch.enable_grad():
        meta = {k: v.detach().requires_grad_() for k, v in meta_params.items()}
        fast = {k: v.expand(n_tasks, *v.shape) for k, v in meta.items()}
        state = opt.init(fast)
        for _ in range(how.steps):
            support = ((batched_predict(fast, xs, act) - ys) ** 2).mean(dim=(1, 2)).sum()
            grads = torch.autograd.grad(
                support, list(fast.values()), create_graph=not how.first_order
            )
            fast, state = opt.step(fast, dict(zip(fast, grads)), state)
        loss = ((batched_predict(fast, xq, act) - yq) ** 2).mean(dim=(1, 2)).mean()
        meta_grads = torch.autograd.grad(loss, list(meta.values()))
    return loss.detach(), dict(zip(meta, meta_grads))


def meta_value_and_grad(
    meta_params: dict[str, Tensor], tasks: Task, cfg: dict[str, Any]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean query loss over the batch of tasks and its gradient w.r.t. ``meta_params``.

    MAML and first-order MAML use :func:`batched_maml_value_and_grad` (measured 2-17x faster
    per meta-step than ``vmap`` of :func:`task_loss`, which is dominated by per-op dispatch
    at these sizes); iMAML maps :func:`task_loss` over the tasks with ``torch.func.vmap``.
    """
    method = cfg["method"]
    if method != "imaml":
        steps = int(method.split("-")[1])
        how = MamlSteps(steps, cfg["inner_lr"], cfg["activation"], method.startswith("fo"))
        return batched_maml_value_and_grad(meta_params, tasks, how)

    def outer(mp: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        losses = torch.func.vmap(partial(task_loss, cfg=cfg), in_dims=(None, 0))(mp, tasks)
        loss = losses.mean()
        return loss, loss.detach()

    grads, loss = torch.func.grad(outer, has_aux=True)(meta_params)
    return loss, grads


def meta_gradient(
    meta_params: dict[str, Tensor], tasks: Task, cfg: dict[str, Any]
) -> dict[str, Tensor]:
    """The meta-gradient: gradient of the mean query loss over ``tasks`` (leading dim = task).

    ``cfg`` holds ``method`` (one of ``METHODS``), ``inner_lr`` and, for iMAML,
    ``imaml_lambda``, ``imaml_steps`` and ``cg_steps``. The mean is linear in
    the tasks, so shards of equal size can be averaged across processes.
    """
    return meta_value_and_grad(meta_params, tasks, cfg)[1]


def _local(tasks: Task) -> Task:
    """This process's contiguous block of a batch of tasks (all of them in one process)."""
    if not distributed.is_distributed():
        return tasks
    start, stop = distributed.shard_bounds(tasks[0].shape[0])
    return tuple(t[start:stop] for t in tasks)  # type: ignore[return-value]


def per_task_values(fn: Any, params: dict[str, Tensor], tasks: Task) -> Tensor:
    """``vmap(fn)(params, tasks)`` over a batch of tasks split across processes, gathered
    back in task order on every process."""
    local = _local(tasks)
    if local[0].shape[0] == 0:
        values = torch.zeros(0, dtype=tasks[0].dtype, device=tasks[0].device)
    else:
        values = torch.func.vmap(fn, in_dims=(None, 0))(params, local)
    return distributed.all_gather_cat(values.detach())


def mean_value_and_grad(
    value_and_grad: Any, tasks: Task, like: dict[str, Tensor]
) -> tuple[Tensor, dict[str, Tensor], list[int]]:
    """``value_and_grad(tasks)`` of a mean over tasks, for a batch split across processes.

    Each process evaluates its block; one all-reduce sums the blocks weighted by their
    task counts, which gives the mean over the whole batch on every process. In one
    process: ``value_and_grad(tasks)`` itself. Also returns the ranks whose own block gave
    a non-finite loss or gradient (``[0]`` or ``[]`` in one process), found in the same
    all-reduce: after it, one rank's NaN is everybody's and could not be traced back.
    """
    if not distributed.is_distributed():
        loss, grads = value_and_grad(tasks)
        return loss, grads, [] if _finite(loss, grads) else [0]
    n = tasks[0].shape[0]
    local = _local(tasks)
    m = local[0].shape[0]
    if m:
        loss, grads = value_and_grad(local)
    else:  # fewer tasks than processes: this one contributes nothing
        loss = torch.zeros((), dtype=tasks[0].dtype, device=tasks[0].device)
        grads = {k: torch.zeros_like(v) for k, v in like.items()}
    w = m / n
    bad = torch.zeros(distributed.world_size(), dtype=loss.dtype, device=loss.device)
    bad[distributed.rank()] = float(not _finite(loss, grads))
    loss, grads, bad = distributed.all_reduce_sum(
        (loss.detach() * w, {k: g.detach() * w for k, g in grads.items()}, bad)
    )
    return loss, grads, [r for r, b in enumerate(bad.tolist()) if b > 0]


def _finite(loss: Tensor, grads: dict[str, Tensor]) -> bool:
    return bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads.values())


def _nonfinite_step(cfg: dict[str, Any], method: str, k: int, ranks: list[int]) -> str:
    where = f" on rank {', '.join(map(str, ranks))}" if distributed.is_distributed() else ""
    return (
        f"{method}: the meta-gradient of outer step {k + 1} is not finite{where} (the "
        f"adaptation diverged: lower --inner-lr {cfg['inner_lr']:g}); pass --skip-nonfinite to "
        "skip such steps and count them"
    )


def _interval(per_task: Tensor) -> dict[str, Any]:
    """Mean and 95% half-width over tasks; ``None`` and a count when some task diverged (a
    mean over the finite tasks only would flatter the method)."""
    bad = int((~torch.isfinite(per_task)).sum())
    if bad:
        return {"mse": None, "ci95": None, "diverged_tasks": bad}
    mean = float(per_task.mean())
    return {"mse": mean, "ci95": float(1.96 * per_task.std() / math.sqrt(per_task.numel()))}


def evaluate(
    params: dict[str, Tensor], tasks: Task, steps_list: list[int], lr: float, activation: str
) -> dict[str, Any]:
    """Meta-test MSE after each number of SGD adaptation steps: mean and 95% half-width."""
    out = {}
    for steps in steps_list:

        def one(p: dict[str, Tensor], task: Task, steps: int = steps) -> Tensor:
            xs, ys, xq, yq = task
            return mse(adapt(p, xs, ys, steps, lr, activation), xq, yq, activation).detach()

        out[str(steps)] = _interval(per_task_values(one, params, tasks).double())
    return out


def evaluate_own(params: dict[str, Tensor], tasks: Task, cfg: dict[str, Any]) -> dict[str, Any]:
    """Meta-test MSE after the adaptation the method meta-trained for (``cfg["method"]``):
    k SGD steps for MAML-k, the proximal argmin for iMAML.

    The SGD columns score every method with one rule; this one scores each with its own.
    They differ most for iMAML, whose initialization is trained for the argmin and may sit
    where the support loss is too curved for SGD at ``--inner-lr`` (curvature above 2/lr).
    """

    def one(p: dict[str, Tensor], task: Task) -> Tensor:
        return task_loss(p, task, cfg).detach()

    return _interval(per_task_values(one, params, tasks).double())


def diverged_notes(results: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """One line per meta-test evaluation in which some task's adaptation diverged."""
    notes = []
    for method, res in results.items():
        for steps, e in res["eval"].items():
            if e.get("diverged_tasks"):
                notes.append(
                    f"{method}: {steps} SGD steps at --inner-lr {cfg['inner_lr']:g} diverged on "
                    f"{e['diverged_tasks']} of {cfg['test_tasks']} test tasks (the support loss "
                    f"is curved beyond 2/lr at its initialization); mse@{steps} is null"
                    + ("; its own adaptation is in mse@own" if method != "pretrained" else "")
                )
        own = res.get("own") or {}
        if own.get("diverged_tasks"):
            notes.append(
                f"{method}: its own adaptation diverged on {own['diverged_tasks']} test tasks"
            )
    return notes


# -- the experiment -------------------------------------------------------------------------


def run(run: Run, cfg: dict[str, Any]) -> dict[str, Any]:
    dev, dt = run.device, run.dtype
    to = lambda t: tuple(x.to(device=dev, dtype=dt) for x in t)  # noqa: E731
    test = to(
        sample_tasks(run.rng("test-tasks"), cfg["test_tasks"], cfg["shots"], cfg["test_points"])
    )
    monitor = to(
        sample_tasks(run.rng("monitor-tasks"), cfg["monitor_tasks"], cfg["shots"], cfg["queries"])
    )

    def outer_estimate(state: dict[str, Any], k: int, mcfg: dict[str, Any]) -> dict[str, Any]:
        """The outer objective on fixed validation tasks (a noise-free learning curve)."""
        if k % cfg["monitor_every"] and k != cfg["outer_steps"] - 1:
            return {}
        params = {k_: v.detach() for k_, v in state["params"].items()}
        losses = per_task_values(partial(task_loss, cfg=mcfg), params, monitor)
        return {"outer_loss": float(losses.mean())}

    run.plan(cfg["outer_steps"] * (len(cfg["methods"]) + 1))

    def init() -> dict[str, Any]:
        params = {k: v.requires_grad_() for k, v in init_params(run.rng("init"), dev, dt).items()}
        return {"params": params, "outer": torch.optim.Adam(params.values(), lr=cfg["outer_lr"])}

    def finish(state: dict[str, Any], method: str | None = None) -> dict[str, Any]:
        params = {k: v.detach() for k, v in state["params"].items()}
        out = {
            "eval": evaluate(params, test, cfg["eval_steps"], cfg["inner_lr"], cfg["activation"]),
            "params": {k: v.clone() for k, v in params.items()},  # saved apart, not in the summary
        }
        if method is not None:
            out["own"] = evaluate_own(params, test, {**cfg, "method": method})
        return out

    # baseline: one model regressed on all tasks pooled, same number of (task-batch) steps
    def pretrain_step(state: dict[str, Any], k: int) -> dict[str, Any]:
        tasks = to(
            sample_tasks(run.rng("pretrain", k), cfg["meta_batch"], cfg["shots"], cfg["queries"])
        )
        params = state["params"]

        def value_and_grad(block: Task) -> tuple[Tensor, dict[str, Tensor]]:
            xs, ys, xq, yq = block
            x, y = torch.cat([xs, xq], 1).reshape(-1, 1), torch.cat([ys, yq], 1).reshape(-1, 1)
            loss = mse(params, x, y, cfg["activation"])
            grads = torch.autograd.grad(loss, list(params.values()))
            return loss.detach(), dict(zip(params, grads))

        state["outer"].zero_grad()
        loss, grads, bad = mean_value_and_grad(value_and_grad, tasks, params)
        if bad:
            raise Diverged(_nonfinite_step(cfg, "pretrained", k, bad))
        for name, p in params.items():
            p.grad = grads[name]
        state["outer"].step()
        return {
            "train_loss": float(loss.detach()),
            **outer_estimate(state, k, {**cfg, "method": "maml-0"}),
        }

    results = {
        "pretrained": run.phase("pretrained", cfg["outer_steps"], init, pretrain_step, finish)
    }

    for method in cfg["methods"]:
        mcfg = {**cfg, "method": method}

        def step(
            state: dict[str, Any], k: int, method: str = method, mcfg: dict = mcfg
        ) -> dict[str, Any]:
            # the same task draws for every method (common random numbers)
            tasks = to(
                sample_tasks(run.rng("tasks", k), cfg["meta_batch"], cfg["shots"], cfg["queries"])
            )
            params = state["params"]
            detached = {k_: v.detach() for k_, v in params.items()}
            loss, grads, bad = mean_value_and_grad(
                lambda block: meta_value_and_grad(detached, block, mcfg), tasks, detached
            )
            state["outer"].zero_grad()
            finite = not bad
            if not finite and not cfg.get("skip_nonfinite"):
                raise Diverged(_nonfinite_step(cfg, method, k, bad))
            if finite:
                for name, p in params.items():
                    p.grad = grads[name].detach()
                state["outer"].step()
            else:  # --skip-nonfinite: not applied, counted
                state["skipped"] += 1
            return {
                "train_loss": float(loss) if finite else None,
                "skipped": int(not finite),
                **outer_estimate(state, k, mcfg),
            }

        def finish_method(state: dict[str, Any], method: str = method) -> dict[str, Any]:
            if state["skipped"] == cfg["outer_steps"]:
                raise Diverged(
                    f"{method}: all {cfg['outer_steps']} meta-steps were skipped (non-finite "
                    "meta-gradients): the method never left its initialisation; lower "
                    f"--inner-lr {cfg['inner_lr']:g}"
                )
            return {**finish(state, method), "skipped_steps": state["skipped"]}

        def init_method() -> dict[str, Any]:
            return {**init(), "skipped": 0}

        results[method] = run.phase(method, cfg["outer_steps"], init_method, step, finish_method)

    if run.writer:
        final = {m: {k: v.cpu() for k, v in res["params"].items()} for m, res in results.items()}
        save_checkpoint(run.path("meta_params.pt"), final)
    results = {m: {k: v for k, v in res.items() if k != "params"} for m, res in results.items()}
    rows = []
    for name, res in results.items():
        row: dict[str, Any] = {"method": name}
        for s in cfg["eval_steps"]:
            e = res["eval"][str(s)]
            row[f"mse@{s}"] = e["mse"]
            row[f"ci95@{s}"] = e["ci95"]
        own = res.get("own", {})
        row["mse@own"], row["ci95@own"] = own.get("mse"), own.get("ci95")
        rows.append(row)
    _plot(run, cfg, results)
    notes = diverged_notes(results, cfg)
    for note in notes:
        run.echo(f"maml: {note}")
    last = str(max(cfg["eval_steps"]))
    # methods compared by their own adaptation (what each meta-trained for) against the
    # pretrained model after the most SGD steps; a diverged evaluation never wins
    inf = float("inf")
    score = {m: (r.get("own") or {}).get("mse") for m, r in results.items() if m != "pretrained"}
    baseline = results["pretrained"]["eval"][last]["mse"]
    best = min(score, key=lambda m: inf if score[m] is None else score[m], default=None)
    return {
        "table": rows,
        "results": results,
        "best_method": best,
        "beats_pretrained": {
            m: v is not None and baseline is not None and v < baseline for m, v in score.items()
        },
        "diverged": notes,
        "plots": ["maml.png"],
    }


def _plot(run: Run, cfg: dict[str, Any], results: dict[str, Any]) -> None:
    fig, ax = plot.figure(2, 1, size=(4.6, 3.4))
    steps = cfg["eval_steps"]
    # each method's points shifted sideways so the intervals at one x do not hide each other
    spread = 0.12 * min((b - a for a, b in zip(steps, steps[1:])), default=1)
    for i, (name, res) in enumerate(results.items()):
        # a diverged evaluation (null) is left out of its curve
        nan = float("nan")
        mean = [nan if (v := res["eval"][str(s)]["mse"]) is None else v for s in steps]
        half = [nan if (v := res["eval"][str(s)]["ci95"]) is None else v for s in steps]
        shift = (i - (len(results) - 1) / 2) * spread
        xs = [s + shift for s in steps]
        ax[0].errorbar(xs, mean, yerr=half, label=name, marker="o", ms=3, capsize=2, lw=1.2)
    ax[0].set_xticks(steps)
    ax[0].set_xlabel("SGD adaptation steps on K support points")
    ax[0].set_ylabel("meta-test MSE (95% interval)")
    plot.log_axis(ax[0], "y")
    ax[0].set_title(f"{cfg['test_tasks']} held-out tasks", fontsize=10)
    ax[0].grid(alpha=0.3)
    plot.legend(ax[0])
    series = {}
    for name in results:
        rows = [r for r in run.read_metrics(name) if "outer_loss" in r]
        series[name] = ([r["step"] for r in rows], [r["outer_loss"] for r in rows])
    plot.curves(
        ax[1],
        series,
        xlabel="outer step",
        ylabel="query MSE after adaptation",
        title=f"meta-training ({cfg['monitor_tasks']} validation tasks)",
        logy=True,
    )
    plot.save(fig, run.path("maml.png"))

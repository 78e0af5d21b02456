"""Every area of the library on the device under test (``BILEVEL_TEST_DEVICE``, default CPU).

``BILEVEL_TEST_DEVICE=cuda python -m pytest -m device`` runs these (and the other
``device``-marked tests) on a GPU. Each test uses the public API only, builds its inputs on the
device, checks that results stay there, and compares them with an oracle that is independent of
the device path: torch.optim step for step, closed forms, central finite differences, higher,
per-element loops for vmap. Small sizes: the whole set is meant to take seconds on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import bilevel
from bilevel import linalg, solvers

pytestmark = pytest.mark.device
D = torch.float64


def _randn(*shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D).to(device)


def _assert_on(device, *tensors):
    for t in tensors:
        assert t.device == device, f"expected a tensor on {device}, got one on {t.device}"


# --------------------------------------------------------------------------- optimizers


OPTIMIZERS = [
    ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.5, dampening=0.1)),
    ("adam", torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)),
    ("adam", torch.optim.Adam, dict(lr=0.01, amsgrad=True)),
    ("adamw", torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    ("rmsprop", torch.optim.RMSprop, dict(lr=0.01, momentum=0.9, centered=True)),
    ("adagrad", torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.1)),
]


@pytest.mark.parametrize(("name", "torch_cls", "settings"), OPTIMIZERS)
def test_optimizer_steps_equal_torch_optim(device, name, torch_cls, settings):
    params = {"w": _randn(4, 3, device=device), "b": _randn(3, device=device, seed=1)}
    reference = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    torch_opt = torch_cls(list(reference.values()), **settings)
    opt = getattr(bilevel.optim, name)(**settings)
    state = opt.init(params)
    for step in range(6):
        grads = {k: _randn(*v.shape, device=device, seed=10 + step) for k, v in params.items()}
        for k, p in reference.items():
            p.grad = grads[k].clone()
        torch_opt.step()
        params, state = opt.step(params, grads, state, {})
    for k in params:
        _assert_on(device, params[k])
        torch.testing.assert_close(params[k], reference[k].detach(), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- unroll


def _regression(device, n=24, p=5, seed=0):
    X, X_val = _randn(n, p, device=device, seed=seed), _randn(n, p, device=device, seed=seed + 1)
    w_true = _randn(p, device=device, seed=seed + 2)
    y = X @ w_true + 0.1 * _randn(n, device=device, seed=seed + 3)
    y_val = X_val @ w_true + 0.1 * _randn(n, device=device, seed=seed + 4)
    return X, y, X_val, y_val


def _unroll_outer(device, mode, steps=12, **kwargs):
    X, y, X_val, y_val = _regression(device)

    def inner(params, hparams, batch):
        x, t = batch
        return ((x @ params["w"] - t) ** 2).mean() + hparams["l2"] * (params["w"] ** 2).sum()

    def outer(h):
        # The finite differences of hypergradcheck evaluate at hyperparameters that do not
        # require grad, where mode="forward" refuses to run (it has no tangent to carry); the
        # value of the inner loop is the same in every mode, so those evaluations use reverse.
        needs_grad = any(torch.is_tensor(v) and v.requires_grad for v in h.values())
        result = bilevel.unroll(
            inner,
            {"w": torch.zeros(X.shape[1], dtype=D, device=device)},
            h,
            bilevel.optim.sgd(momentum=0.9),
            steps,
            (X, y),
            mode if needs_grad else "reverse",
            **(kwargs if needs_grad else {}),
        )
        _assert_on(device, result.params["w"], result.losses)
        return ((X_val @ result.params["w"] - y_val) ** 2).mean()

    hparams = {
        "lr": torch.tensor(0.05, dtype=D, device=device),
        "l2": torch.tensor(0.01, dtype=D, device=device),
    }
    return outer, hparams


def _hypergrad(outer, hparams):
    leaves = {k: v.clone().requires_grad_(True) for k, v in hparams.items()}
    grads = torch.autograd.grad(outer(leaves), list(leaves.values()))
    return dict(zip(leaves, grads))


@pytest.mark.parametrize("mode", ["reverse", "checkpoint", "forward"])
def test_exact_unroll_modes_match_finite_differences(device, mode):
    outer, hparams = _unroll_outer(device, mode)
    report = bilevel.hypergradcheck(outer, hparams)
    assert report.passed, str(report)


def test_unroll_modes_agree(device):
    grads = {}
    for mode, kwargs in [
        ("reverse", {}),
        ("checkpoint", {"segments": 3}),
        ("forward", {"vectorize": True}),
        ("forward", {"vectorize": False}),
        ("truncated", {"truncate": 12}),  # K = T: the full hypergradient
    ]:
        outer, hparams = _unroll_outer(device, mode, **kwargs)
        grads[(mode, tuple(kwargs.items()))] = _hypergrad(outer, hparams)
    reference = grads[("reverse", ())]
    for key, g in grads.items():
        for name in reference:
            _assert_on(device, g[name])
            torch.testing.assert_close(
                g[name], reference[name], rtol=1e-9, atol=1e-13, msg=str(key)
            )


def test_truncated_and_first_order_modes(device):
    outer, hparams = _unroll_outer(device, "reverse")
    full = _hypergrad(outer, hparams)["lr"]
    outer_k, _ = _unroll_outer(device, "truncated", truncate=3)
    truncated = _hypergrad(outer_k, hparams)["lr"]
    assert torch.isfinite(truncated) and not torch.allclose(truncated, full)

    # first_order: d outer / d params_0 is d outer / d params_T (the FOMAML gradient)
    X, y, X_val, y_val = _regression(device)
    w0 = torch.zeros(X.shape[1], dtype=D, device=device, requires_grad=True)
    result = bilevel.unroll(
        lambda p, h, b: ((b[0] @ p["w"] - b[1]) ** 2).mean(),
        {"w": w0},
        {"lr": 0.05},
        bilevel.optim.sgd(),
        8,
        (X, y),
        "first_order",
    )
    w_T = result.params["w"]
    loss = ((X_val @ w_T - y_val) ** 2).mean()
    (g0,) = torch.autograd.grad(loss, w0)
    expected = 2 * X_val.T @ (X_val @ w_T.detach() - y_val) / X_val.shape[0]
    _assert_on(device, g0)
    torch.testing.assert_close(g0, expected, rtol=1e-10, atol=1e-12)


def test_unroll_under_vmap_over_tasks_equals_a_loop(device):
    tasks = 4
    xs, ys = _randn(tasks, 10, 3, device=device), _randn(tasks, 10, device=device, seed=1)
    w_meta = _randn(3, device=device, seed=2).requires_grad_(True)

    def task_loss(w, x, y):
        def inner(p, h, batch):
            return ((batch[0] @ p["w"] - batch[1]) ** 2).mean()

        result = bilevel.unroll(inner, {"w": w}, {"lr": 0.1}, bilevel.optim.sgd(), 4, (x, y))
        return ((x @ result.params["w"] - y) ** 2).mean()

    batched = torch.func.vmap(task_loss, in_dims=(None, 0, 0))(w_meta, xs, ys)
    (g_batched,) = torch.autograd.grad(batched.sum(), w_meta)
    looped = torch.stack([task_loss(w_meta, xs[i], ys[i]) for i in range(tasks)])
    (g_looped,) = torch.autograd.grad(looped.sum(), w_meta)
    _assert_on(device, batched, g_batched)
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_batched, g_looped, rtol=1e-10, atol=1e-12)


def test_batchnorm_buffers_follow_torch_training(device):
    """unroll with buffers = the same SGD steps on a real module in train mode: parameters and
    running statistics alike."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 2)
    ).to(device=device, dtype=D)
    x, y = _randn(16, 4, device=device), _randn(16, 2, device=device, seed=1)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def inner(p, h, batch, buffers):
        return F.mse_loss(functional_call(model, {**p, **buffers}, (batch[0],)), batch[1])

    result = bilevel.unroll(
        inner, params, {"lr": 0.1}, bilevel.optim.sgd(), 5, (x, y), buffers=buffers
    )
    torch_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(5):
        torch_opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        torch_opt.step()
    for k, v in model.named_parameters():
        torch.testing.assert_close(result.params[k], v.detach(), rtol=1e-10, atol=1e-12)
    for k, v in model.named_buffers():
        _assert_on(device, result.buffers[k])
        torch.testing.assert_close(result.buffers[k], v, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- implicit


def _ridge(device, p=5, n=30):
    X, y, X_val, y_val = _regression(device, n=n, p=p, seed=5)
    l2 = torch.linspace(0.5, 2.0, p, dtype=D, device=device)

    def loss(w, h, batch):
        x, t = batch
        return 0.5 * ((x @ w - t) ** 2).sum() + 0.5 * (h["l2"] * w**2).sum()

    def closed_form(l2_leaf):
        return torch.linalg.solve(X.T @ X + torch.diag(l2_leaf), X.T @ y)

    l2_leaf = l2.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(((X_val @ closed_form(l2_leaf) - y_val) ** 2).sum(), l2_leaf)
    lam_max = float(torch.linalg.eigvalsh(X.T @ X + torch.diag(l2)).max())
    return loss, closed_form, (X, y), (X_val, y_val), l2, expected, lam_max


LINEAR_SOLVERS = {
    "cg": lambda lam: linalg.cg(tol=1e-12),
    "minres": lambda lam: linalg.minres(tol=1e-12),
    "gmres": lambda lam: linalg.gmres(tol=1e-12),
    "neumann": lambda lam: linalg.neumann(alpha=1.0 / lam, maxiter=2000, tol=1e-12),
    "dense": lambda lam: linalg.dense(),
}


# fixed_point's backward operator is J - I = -step * Hessian, negative definite: CG does not
# apply, nor does the Neumann series (it needs alpha > 0 and I - alpha A contracting).
ENGINE_SOLVERS = [("argmin", name) for name in LINEAR_SOLVERS] + [
    ("root", name) for name in LINEAR_SOLVERS
]
ENGINE_SOLVERS += [("fixed_point", name) for name in ("minres", "gmres", "dense")]


@pytest.mark.parametrize(("engine", "solver_name"), ENGINE_SOLVERS)
def test_implicit_hypergradient_with_each_linear_solver(device, engine, solver_name):
    loss, closed_form, data, (X_val, y_val), l2, expected, lam_max = _ridge(device)
    l2_leaf = l2.clone().requires_grad_(True)
    w_star = closed_form(l2).detach()
    step = 1.0 / lam_max
    if engine == "argmin":
        linear_solver = LINEAR_SOLVERS[solver_name](lam_max)
        w = bilevel.argmin(
            loss,
            torch.zeros_like(w_star),
            {"l2": l2_leaf},
            data,
            solver=solvers.lbfgs(tol=1e-11),
            linear_solver=linear_solver,
        )
    elif engine == "root":
        linear_solver = LINEAR_SOLVERS[solver_name](lam_max)

        def gradient(w, h, batch):
            x, t = batch
            return x.T @ (x @ w - t) + h["l2"] * w

        w = bilevel.root(
            gradient, w_star, {"l2": l2_leaf}, data, linear_solver=linear_solver, symmetric=True
        )
    else:
        linear_solver = LINEAR_SOLVERS[solver_name](lam_max)

        def gd_map(w, h, batch):
            x, t = batch
            return w - step * (x.T @ (x @ w - t) + h["l2"] * w)

        w = bilevel.fixed_point(
            gd_map,
            torch.zeros_like(w_star),
            {"l2": l2_leaf},
            data,
            solver=solvers.fixed_point_iteration(tol=1e-12, maxiter=20000),
            linear_solver=linear_solver,
            symmetric=True,
        )
    (g,) = torch.autograd.grad(((X_val @ w - y_val) ** 2).sum(), l2_leaf)
    _assert_on(device, w, g)
    torch.testing.assert_close(w.detach(), w_star, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(g, expected, rtol=1e-7, atol=1e-10)


def test_argmin_under_vmap_over_problems_equals_a_loop(device):
    problems = 3
    Xs, ys = _randn(problems, 20, 4, device=device), _randn(problems, 20, device=device, seed=1)
    l2 = torch.tensor(0.7, dtype=D, device=device, requires_grad=True)

    def solve(x, t, l2):
        def loss(w, h, batch):
            return 0.5 * ((batch[0] @ w - batch[1]) ** 2).sum() + 0.5 * h * (w**2).sum()

        w = bilevel.argmin(
            loss,
            torch.zeros(x.shape[1], dtype=D, device=device),
            l2,
            (x, t),
            solver=solvers.lbfgs(tol=1e-11),
            linear_solver=linalg.cg(tol=1e-12),
        )
        return (w**2).sum()

    batched = torch.func.vmap(solve, in_dims=(0, 0, None))(Xs, ys, l2)
    (g_batched,) = torch.autograd.grad(batched.sum(), l2)
    looped = torch.stack([solve(Xs[i], ys[i], l2) for i in range(problems)])
    (g_looped,) = torch.autograd.grad(looped.sum(), l2)
    _assert_on(device, batched, g_batched)
    torch.testing.assert_close(batched, looped, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(g_batched, g_looped, rtol=1e-7, atol=1e-10)


def test_hypergradcheck_passes_and_catches_a_wrong_gradient(device):
    loss, closed_form, data, (X_val, y_val), l2, _, _ = _ridge(device, p=3)

    def outer(h):
        w = bilevel.argmin(
            loss, closed_form(h["l2"]).detach(), h, data, linear_solver=linalg.cg(tol=1e-12)
        )
        return ((X_val @ w - y_val) ** 2).sum()

    good = bilevel.hypergradcheck(outer, {"l2": l2})
    assert good.passed, str(good)

    def wrong(h):  # the mixed derivative halved: a wrong hypergradient
        w = bilevel.argmin(
            loss,
            closed_form(h["l2"]).detach(),
            {"l2": 0.5 * h["l2"] + 0.5 * h["l2"].detach()},
            data,
            linear_solver=linalg.cg(tol=1e-12),
        )
        return ((X_val @ w - y_val) ** 2).sum()

    assert not bilevel.hypergradcheck(wrong, {"l2": l2}).passed


# --------------------------------------------------------------------------- stateful (higher's API)


def test_stateful_maml_meta_gradient_equals_higher(device):
    import higher  # in the test extra: the oracle

    meta_grads = []
    for library in (bilevel.stateful, higher):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        ).to(device=device, dtype=D)
        inner_opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
        x, y = _randn(8, 1, device=device), _randn(8, 1, device=device, seed=1)
        xq, yq = _randn(8, 1, device=device, seed=2), _randn(8, 1, device=device, seed=3)
        with library.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fm, diffopt):
            for _ in range(3):
                diffopt.step(F.mse_loss(fm(x), y))
            F.mse_loss(fm(xq), yq).backward()
        meta_grads.append([p.grad for p in model.parameters()])
    for ours, theirs in zip(*meta_grads):
        _assert_on(device, ours)
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- distributed


@pytest.fixture
def one_process_group(device, tmp_path, monkeypatch):
    """A real process group of one process (NCCL on CUDA, gloo on the CPU), with bilevel's
    collectives switched on: they skip communication when the world has one process, so
    ``is_distributed`` is made to answer True and every collective runs for real."""
    import datetime
    import sys

    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"file://{tmp_path / 'store'}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=120),
    )
    for name, module in list(sys.modules.items()):
        if name.startswith("bilevel.distributed") and hasattr(module, "is_distributed"):
            monkeypatch.setattr(module, "is_distributed", lambda: True)
    try:
        yield backend
    finally:
        dist.destroy_process_group()


def test_collectives_in_a_one_process_group(device, one_process_group):
    dist = bilevel.distributed
    tree = {
        "a": _randn(3, device=device),
        "b": _randn(2, 2, device=device, seed=1).float(),
        "n": torch.arange(4, device=device),
    }
    summed = dist.all_reduce_sum(tree)
    mean = dist.all_reduce_mean({k: v for k, v in tree.items() if k != "n"})
    sent = dist.broadcast(tree)
    gathered = dist.all_gather_cat(tree["a"])
    for k in tree:
        assert summed[k] is not tree[k], "a real collective returns new tensors"
        _assert_on(device, summed[k], sent[k])
        assert summed[k].dtype == tree[k].dtype
        torch.testing.assert_close(summed[k], tree[k], rtol=0, atol=0)
        torch.testing.assert_close(sent[k], tree[k], rtol=0, atol=0)
    torch.testing.assert_close(mean["b"], tree["b"], rtol=0, atol=0)
    torch.testing.assert_close(gathered, tree["a"], rtol=0, atol=0)
    assert dist.broadcast_object({"seed": 3}) == {"seed": 3}
    dist.barrier()


def test_differentiable_collectives_in_a_one_process_group(device, one_process_group):
    dist = bilevel.distributed
    w = _randn(3, device=device).requires_grad_(True)
    loss = dist.global_sum((dist.replicated(w) ** 2).sum())
    (g,) = torch.autograd.grad(loss, w, create_graph=True)
    torch.testing.assert_close(g, 2 * w, rtol=1e-12, atol=0)
    (gg,) = torch.autograd.grad(g.sum(), w)  # double backward through the collectives
    torch.testing.assert_close(gg, torch.full_like(w, 2.0), rtol=1e-12, atol=0)
    tangent = _randn(3, device=device, seed=1)
    _, jvp_out = torch.func.jvp(lambda x: dist.global_sum(dist.replicated(x) * 3), (w,), (tangent,))
    torch.testing.assert_close(jvp_out, 3 * tangent, rtol=1e-12, atol=0)
    batched = torch.func.vmap(lambda x: dist.global_sum(x.sin()))(_randn(4, 3, device=device))
    assert batched.shape == (4, 3)
    _assert_on(device, g, jvp_out, batched)


def test_distributed_hypergradients_in_a_one_process_group_equal_single_process(
    device, one_process_group
):
    dist = bilevel.distributed
    loss, closed_form, data, (X_val, y_val), l2, expected, _ = _ridge(device)
    l2_leaf = l2.clone().requires_grad_(True)
    w = dist.data_parallel_argmin(
        loss,
        closed_form(l2).detach(),
        {"l2": l2_leaf},
        data,
        linear_solver=linalg.cg(tol=1e-12),
    )
    (g,) = torch.autograd.grad(((X_val @ w - y_val) ** 2).sum(), l2_leaf)
    _assert_on(device, g)
    torch.testing.assert_close(g, expected, rtol=1e-8, atol=1e-10)

    w0 = _randn(3, device=device, seed=7).requires_grad_(True)
    tasks = [_randn(3, device=device, seed=20 + i) for i in range(3)]

    def task_loss(p, t):
        result = bilevel.unroll(
            lambda q, h: ((q["w"] - t) ** 2).sum(), {"w": p}, {"lr": 0.1}, bilevel.optim.sgd(), 3
        )
        return (result.params["w"] ** 2).sum()

    mg = dist.meta_gradient(task_loss, tasks, w0)
    (reference,) = torch.autograd.grad(torch.stack([task_loss(w0, t) for t in tasks]).mean(), w0)
    _assert_on(device, mg.grads)
    torch.testing.assert_close(mg.grads, reference, rtol=1e-12, atol=1e-14)

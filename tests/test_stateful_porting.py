"""A body of higher-style code, each snippet run as written with ``higher`` and with
``from bilevel import stateful as higher`` (the snippet's only name for the library is its
``higher`` argument: changing that is changing the import). Same numbers (< 1e-10, float64
as the default dtype) where both libraries run; the two documented differences, and what
only bilevel runs, are marked.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bilevel import stateful

higher_lib = pytest.importorskip("higher")


@pytest.fixture(autouse=True)
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    warnings.simplefilter("ignore")
    yield
    torch.set_default_dtype(old)


def sinusoid_tasks(n_tasks=3, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n_tasks):
        amp, phase = 0.1 + 4.9 * torch.rand(1, generator=g), 3.1 * torch.rand(1, generator=g)
        x = 10 * torch.rand(2 * k, 1, generator=g) - 5
        y = amp * torch.sin(x + phase)
        tasks.append((x[:k], y[:k], x[k:], y[k:]))
    return tasks


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )


# -- the snippets ------------------------------------------------------------------------
def maml_sinusoid(higher):
    """higher's README pattern: MAML with a meta-optimizer over tasks."""
    model = mlp()
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    inner_opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(2):
        meta_opt.zero_grad()
        for x_spt, y_spt, x_qry, y_qry in sinusoid_tasks():
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (
                fnet,
                diffopt,
            ):
                for _ in range(5):
                    diffopt.step(F.mse_loss(fnet(x_spt), y_spt))
                F.mse_loss(fnet(x_qry), y_qry).backward()
        meta_opt.step()
    return list(model.parameters())


def maml_omniglot_style(higher):
    """The shape of higher's maml-omniglot example: conv net with BatchNorm in train mode."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.BatchNorm2d(8, momentum=1.0, affine=True),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 5),
    )
    meta_opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x_spt, x_qry = torch.randn(2, 5, 1, 8, 8, generator=g), torch.randn(2, 10, 1, 8, 8, generator=g)
    y_spt, y_qry = (
        torch.randint(0, 5, (2, 5), generator=g),
        torch.randint(0, 5, (2, 10), generator=g),
    )
    inner_opt = torch.optim.SGD(net.parameters(), lr=1e-1)
    net.train()
    meta_opt.zero_grad()
    accs = []
    for i in range(2):
        with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(3):
                diffopt.step(F.cross_entropy(fnet(x_spt[i]), y_spt[i]))
            qry_logits = fnet(x_qry[i])
            F.cross_entropy(qry_logits, y_qry[i]).backward()
            accs.append((qry_logits.argmax(dim=1) == y_qry[i]).sum() / 10.0)
    grads = [p.grad.clone() for p in net.parameters()]
    meta_opt.step()
    return grads + accs


def learned_inner_lr(higher):
    """Meta-learning the inner learning rate through override."""
    model = mlp()
    log_lr = torch.tensor(-3.0, requires_grad=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x_spt, y_spt, x_qry, y_qry = sinusoid_tasks(1)[0]
    with higher.innerloop_ctx(model, opt, override={"lr": [log_lr.exp()]}) as (fmodel, diffopt):
        for _ in range(5):
            diffopt.step(F.mse_loss(fmodel(x_spt), y_spt))
        F.mse_loss(fmodel(x_qry), y_qry).backward()
    return [log_lr.grad]


def trainable_opt_params(higher):
    """get_trainable_opt_params / apply_trainable_opt_params (hyperparameter learning)."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5, weight_decay=1e-3)
    override = higher.optim.get_trainable_opt_params(opt)
    hyper = [override["lr"][0], override["weight_decay"][0], override["momentum"][0]]
    hyper_opt = torch.optim.SGD(hyper, lr=1e-3)
    x_spt, y_spt, x_qry, y_qry = sinusoid_tasks(1)[0]
    for _ in range(2):
        hyper_opt.zero_grad()
        with higher.innerloop_ctx(model, opt, override=override) as (fmodel, diffopt):
            for _ in range(3):
                diffopt.step(F.mse_loss(fmodel(x_spt), y_spt))
            F.mse_loss(fmodel(x_qry), y_qry).backward()
        hyper_opt.step()
    higher.optim.apply_trainable_opt_params(opt, override)
    return [h.detach().clone() for h in hyper] + [torch.tensor(opt.param_groups[0]["lr"])]


def functional_params_loop(higher):
    """monkeypatch and a hand-written SGD over explicit params (fmodel(x, params=...))."""
    model = mlp()
    fmodel = higher.monkeypatch(model, copy_initial_weights=False)
    params = list(fmodel.parameters())
    x_spt, y_spt, x_qry, y_qry = sinusoid_tasks(1)[0]
    for _ in range(3):
        loss = F.mse_loss(fmodel(x_spt, params=params), y_spt)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        params = [p - 0.01 * g for p, g in zip(params, grads)]
    F.mse_loss(fmodel(x_qry, params=params), y_qry).backward()
    return [p.grad for p in model.parameters()]


def get_diff_optim_explicit(higher):
    """monkeypatch + get_diff_optim, Adagrad, grad clipping in a grad_callback."""
    model = mlp()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.05)
    fmodel = higher.patch.monkeypatch(model, copy_initial_weights=False)
    diffopt = higher.get_diff_optim(opt, model.parameters(), fmodel=fmodel)
    x_spt, y_spt, x_qry, y_qry = sinusoid_tasks(1)[0]

    def clip(grads):
        return [g.clamp(-1.0, 1.0) for g in grads]

    for _ in range(4):
        diffopt.step(F.mse_loss(fmodel(x_spt), y_spt), grad_callback=clip)
    F.mse_loss(fmodel(x_qry), y_qry).backward()
    return [p.grad for p in model.parameters()]


def example_reweighting(higher):
    """Learning to reweight examples (Ren et al. 2018): gradients w.r.t. example weights."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y, x_val, y_val = sinusoid_tasks(1, k=16)[0]
    eps = torch.zeros(16, requires_grad=True)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        per_example = F.mse_loss(fmodel(x), y, reduction="none").squeeze(1)
        diffopt.step((eps * per_example).sum())
        meta_loss = F.mse_loss(fmodel(x_val), y_val)
        (grad_eps,) = torch.autograd.grad(meta_loss, eps)
    return [grad_eps]


def proximal_regulariser(higher):
    """iMAML-style proximal term against the initial fast weights (parameters(time=0))."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    x_spt, y_spt, x_qry, y_qry = sinusoid_tasks(1)[0]
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(4):
            prox = sum(
                ((p - p0) ** 2).sum()
                for p, p0 in zip(fmodel.parameters(), fmodel.parameters(time=0))
            )
            diffopt.step(F.mse_loss(fmodel(x_spt), y_spt) + 0.5 * prox)
        F.mse_loss(fmodel(x_qry), y_qry).backward()
    return [p.grad for p in model.parameters()]


def k_shot_finetune(higher):
    """k-shot evaluation: fine-tune without tracking higher gradients."""
    model = mlp()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, momentum=0.5)
    out = []
    for x_spt, y_spt, x_qry, y_qry in sinusoid_tasks(2):
        with higher.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
            for _ in range(5):
                diffopt.step(F.mse_loss(fmodel(x_spt), y_spt))
            with torch.no_grad():
                out.append(F.mse_loss(fmodel(x_qry), y_qry))
    return out


def direct_diff_optim_class(higher):
    """A DifferentiableSGD built directly, with nesterov, on a partly trained optimizer."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x_spt, y_spt, x_qry, y_qry = sinusoid_tasks(1)[0]
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(model(x_spt), y_spt).backward()
        opt.step()
    fmodel = higher.monkeypatch(model, copy_initial_weights=True)
    diffopt = higher.optim.DifferentiableSGD(opt, model.parameters(), fmodel=fmodel)
    for _ in range(3):
        diffopt.step(F.mse_loss(fmodel(x_spt), y_spt))
    return list(fmodel.parameters())


def head_only_adaptation(higher):
    """ANIL: adapt only the head (the optimizer holds a subset), frozen body features."""
    model = mlp()
    head_opt = torch.optim.SGD(model[4].parameters(), lr=0.1)
    x_spt, y_spt, x_qry, y_qry = sinusoid_tasks(1)[0]
    with higher.innerloop_ctx(model, head_opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(5):
            diffopt.step(F.mse_loss(fmodel(x_spt), y_spt))
        F.mse_loss(fmodel(x_qry), y_qry).backward()
    return [p.grad for p in model.parameters()]


def adam_default_eps(higher):
    """Adam with its default eps=1e-8: higher adds eps before the bias correction."""
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_spt, y_spt, x_qry, y_qry = sinusoid_tasks(1)[0]
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(F.mse_loss(fmodel(x_spt), y_spt))
        F.mse_loss(fmodel(x_qry), y_qry).backward()
    return [p.grad for p in model.parameters()]


def tied_weights_autoencoder(higher):
    """A tied autoencoder: decoder weight = encoder weight (one Parameter, two modules)."""
    torch.manual_seed(0)
    enc, dec = nn.Linear(6, 6, bias=False), nn.Linear(6, 6)
    dec.weight = enc.weight
    model = nn.Sequential(enc, nn.Tanh(), dec)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(3))
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(F.mse_loss(fmodel(x), x))
        F.mse_loss(fmodel(x), x).backward()
    return [p.grad for p in model.parameters()]


def weight_norm_model(higher, old_style=False):
    """weight norm: torch.nn.utils.parametrizations.weight_norm, or the old hook-based
    torch.nn.utils.weight_norm (higher#14: higher silently ignores the fast weight_v)."""
    torch.manual_seed(0)
    wn = nn.utils.weight_norm if old_style else nn.utils.parametrizations.weight_norm
    model = nn.Sequential(wn(nn.Linear(1, 16)), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x_spt, y_spt, x_qry, y_qry = sinusoid_tasks(1)[0]
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(F.mse_loss(fmodel(x_spt), y_spt))
        F.mse_loss(fmodel(x_qry), y_qry).backward()
    return [p.grad for p in model.parameters()]


SAME = [
    maml_sinusoid,
    maml_omniglot_style,
    learned_inner_lr,
    trainable_opt_params,
    functional_params_loop,
    get_diff_optim_explicit,
    example_reweighting,
    proximal_regulariser,
    k_shot_finetune,
    direct_diff_optim_class,
    head_only_adaptation,
    tied_weights_autoencoder,
    weight_norm_model,
]


def close(a, b, rtol=1e-10, atol=1e-12):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("snippet", SAME, ids=lambda f: f.__name__)
def test_snippet_runs_unchanged_with_the_same_numbers(snippet):
    ours = snippet(stateful)
    theirs = snippet(higher_lib)
    assert any(t is not None and t.abs().max() > 0 for t in ours)
    close(ours, theirs)


def test_adam_default_eps_is_torch_optims():
    # documented difference: torch.optim's eps placement changes the meta-gradient slightly
    ours, theirs = adam_default_eps(stateful), adam_default_eps(higher_lib)
    a, b = torch.cat([g.flatten() for g in ours]), torch.cat([g.flatten() for g in theirs])
    gap = (a - b).norm() / b.norm()
    assert 1e-12 < gap < 1e-2


def test_old_style_weight_norm_is_right_with_bilevel_and_wrong_with_higher():
    # the same function as the parametrization (weight = g * v / |v|, same initial values):
    # bilevel gives the parametrized model's meta-gradients; higher drops weight_v's
    new = weight_norm_model(stateful)  # [bias, g, v, head.weight, head.bias]
    old = weight_norm_model(stateful, old_style=True)  # [bias, weight_g, weight_v, ...]
    close(old, new)
    wrong = weight_norm_model(higher_lib, old_style=True)
    assert wrong[2].abs().max() < 1e-12 < new[2].abs().max()  # no gradient for weight_v

"""The functional model: an nn.Module that never modifies the user's module, and the rest of
higher's API surface (submodules, methods, buffers, fast weights, history, constructors)."""

import copy
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from bilevel import stateful

DT = torch.float64


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(3, 3)
        self.block = nn.Sequential(self.encoder, nn.Tanh(), self.encoder)  # shared submodule
        self.out = nn.Linear(3, 3)
        self.out.weight = self.encoder.weight  # one Parameter in two places

    def forward(self, x):
        return self.out(self.block(x))

    def embed(self, x):
        return self.encoder(x)


def test_user_module_never_modified_with_shared_and_tied_weights():
    torch.manual_seed(0)
    model = Tied().to(DT)
    params = list(model.parameters())
    values = [p.detach().clone() for p in params]
    meta_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(5, 3, dtype=DT)
    with stateful.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(fmodel(x).pow(2).mean())
        fmodel(x).pow(2).mean().backward()
    assert list(model.parameters()) == params  # same objects, same order
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert model.out.weight is model.encoder.weight and model.block[0] is model.block[2]
    assert all(torch.equal(p.detach(), v) for p, v in zip(params, values))
    assert all(p.grad is not None for p in params)  # meta-gradients reach the real Parameters
    meta_opt.step()
    assert not torch.equal(params[0].detach(), values[0])
    copy.deepcopy(model)


def test_submodules_methods_and_attributes_see_fast_weights():
    torch.manual_seed(0)
    model = Tied().to(DT)
    fmodel = stateful.monkeypatch(model)
    zeros = [torch.zeros_like(p) for p in model.parameters()]
    fmodel.update_params(zeros)
    x = torch.randn(2, 3, dtype=DT)
    assert isinstance(fmodel.encoder, nn.Module)
    assert torch.equal(fmodel.encoder(x), torch.zeros(2, 3, dtype=DT))
    assert torch.equal(fmodel.block[2](x), torch.zeros(2, 3, dtype=DT))
    assert torch.equal(fmodel.embed(x), torch.zeros(2, 3, dtype=DT))  # a custom method
    assert fmodel.out.weight is zeros[0]  # tied: the same fast tensor in both places
    assert (
        len(fmodel.block) == 3
        and [type(m).__name__ for m in fmodel.block] == ["FunctionalModule"] * 3
    )
    assert [n for n, _ in fmodel.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert list(fmodel.encoder.parameters()) == zeros[:2]
    # assigning a fast weight on a submodule replaces it in the model's fast weights
    ones = torch.ones(3, 3, dtype=DT)
    fmodel.encoder.weight = ones
    assert fmodel.fast_params[0] is ones and fmodel.out.weight is ones
    assert type(model.encoder.weight) is nn.Parameter


def test_forward_params_replace_the_fast_weights_as_in_higher():
    model = nn.Linear(2, 1).to(DT)
    fmodel = stateful.monkeypatch(model)
    new = [torch.ones(1, 2, dtype=DT), torch.zeros(1, dtype=DT)]
    out = fmodel(torch.ones(1, 2, dtype=DT), params=new)
    assert out.item() == 2.0 and fmodel.fast_params[0] is new[0]
    as_dict = {"weight": 2 * new[0], "bias": new[1]}
    assert fmodel(torch.ones(1, 2, dtype=DT), params=as_dict).item() == 4.0
    with pytest.raises(ValueError, match="parameters"):
        fmodel(torch.ones(1, 2, dtype=DT), params=new[:1])


def test_train_eval_and_buffers_are_the_functional_models_own():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(DT)
    model.eval()
    fmodel = stateful.monkeypatch(model)
    assert not fmodel.training
    fmodel.train()
    assert fmodel.training and fmodel[1].training and not model.training and not model[1].training
    fmodel(torch.randn(8, 3, dtype=DT))
    assert int(fmodel[1].num_batches_tracked) == 1 and int(model[1].num_batches_tracked) == 0
    assert not torch.equal(fmodel[1].running_mean, model[1].running_mean)
    names = [n for n, _ in fmodel.named_buffers()]
    assert names == [n for n, _ in model.named_buffers()]


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
def test_parametrizations_and_weight_norm_work():
    torch.manual_seed(0)
    model = nn.Sequential(
        parametrizations.weight_norm(nn.Linear(3, 4)),
        nn.Tanh(),
        parametrizations.orthogonal(nn.Linear(4, 4)),
        nn.Linear(4, 1),
    ).to(DT)
    old_style = torch.nn.utils.weight_norm(nn.Linear(3, 1).to(DT))
    x, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 1, dtype=DT)
    for net in (model, old_style):
        before = [p.detach().clone() for p in net.parameters()]
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        with stateful.innerloop_ctx(net, opt, copy_initial_weights=False) as (fmodel, diffopt):
            first = F.mse_loss(fmodel(x), y)
            assert torch.allclose(first, F.mse_loss(net(x), y))
            for _ in range(3):
                diffopt.step(F.mse_loss(fmodel(x), y))
            last = F.mse_loss(fmodel(x), y)
            last.backward()
        assert last < first
        assert all(torch.equal(p.detach(), b) for p, b in zip(net.parameters(), before))
        assert all(p.grad is not None for p in net.parameters())
    # a parametrized weight read from the functional model is computed from the fast weights
    fmodel = stateful.monkeypatch(model)
    fmodel.update_params([torch.zeros_like(p) + 0.5 for p in model.parameters()])
    assert not torch.allclose(fmodel[0].weight, model[0].weight)


def test_history_keeps_only_what_something_else_holds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 1, dtype=DT)
    with stateful.innerloop_ctx(model, opt) as (fmodel, diffopt):
        kept = []
        for _ in range(4):
            kept.append(diffopt.step(F.mse_loss(fmodel(x), y)))
        assert len(list(fmodel.parameters(time=2))) == 4  # the user holds them
        assert fmodel.init_fast_params[0] is list(fmodel.parameters(time=0))[0]
        del kept
        gc.collect()
        for _ in range(2):
            diffopt.step(F.mse_loss(fmodel(x), y))
        # the biases of step 2 are saved by no graph node: they were let go
        with pytest.raises(RuntimeError, match="let go"):
            fmodel.parameters(time=2)
        assert len(list(fmodel.parameters(time=-1))) == 4
    with stateful.innerloop_ctx(model, opt, track_higher_grads=False) as (fmodel, diffopt):
        diffopt.step(F.mse_loss(fmodel(x), y))
        with pytest.raises(ValueError, match="not tracking"):
            fmodel.parameters(time=1)
        with pytest.raises(ValueError, match="not tracking"):
            _ = fmodel.init_fast_params


def test_make_functional_and_create_diff_optim_with_explicit_params():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(DT)
    fmodel = stateful.patch.make_functional(model)
    assert fmodel.fast_params is None
    with pytest.raises(ValueError, match="no fast weights"):
        fmodel(torch.ones(1, 3, dtype=DT))
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    diffopt = stateful.create_diff_optim(
        torch.optim.SGD, {"lr": 0.1, "momentum": 0.5}, params=params
    )
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.5)
    x, y = torch.randn(4, 3, dtype=DT), torch.randn(4, 1, dtype=DT)
    for _ in range(3):
        params = diffopt.step(F.mse_loss(fmodel(x, params=params), y), params=params)
        ref_opt.zero_grad()
        F.mse_loss(ref(x), y).backward()
        ref_opt.step()
    for a, b in zip(params, ref.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)
    groups = stateful.create_diff_optim(
        torch.optim.Adam,
        {"lr": 0.1},
        params=[{"params": [params[0]], "lr": 0.2}, {"params": [params[1]]}],
    )
    assert [g["lr"] for g in groups.param_groups] == [0.2, 0.1]


def test_register_optim_with_a_higher_style_update():
    class HalfSGD(torch.optim.SGD):
        pass

    class DifferentiableHalfSGD(stateful.optim.DifferentiableOptimizer):
        """Written against higher's contract: update group["params"] in place."""

        def _update(self, grouped_grads, **kwargs):
            for group, grads in zip(self.param_groups, grouped_grads):
                for i, (p, g) in enumerate(zip(group["params"], grads)):
                    if g is not None:
                        group["params"][i] = p - 0.5 * group["lr"] * g

    stateful.register_optim(HalfSGD, DifferentiableHalfSGD)
    model = nn.Linear(2, 1).to(DT)
    with stateful.innerloop_ctx(model, HalfSGD(model.parameters(), lr=0.2)) as (fm, diffopt):
        assert type(diffopt) is DifferentiableHalfSGD
        before = [p.detach().clone() for p in fm.parameters()]
        loss = fm(torch.ones(1, 2, dtype=DT)).sum()
        diffopt.step(loss)
        torch.testing.assert_close(fm.fast_params[1], before[1] - 0.1)
    with pytest.raises(TypeError, match="DifferentiableOptimizer"):
        stateful.register_optim(HalfSGD, object)


def test_bad_arguments_are_named():
    model = nn.Linear(2, 1)
    with pytest.raises(TypeError, match="nn.Module"):
        stateful.monkeypatch("not a module")
    with pytest.raises(ValueError, match="reference_params"):
        stateful.get_diff_optim(torch.optim.SGD(model.parameters(), lr=0.1), [torch.ones(1)])
    opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.1)
    with pytest.raises(ValueError, match="parameter groups"):
        stateful.innerloop_ctx(model, opt, override={"lr": [0.1, 0.2, 0.3]}).__enter__()
    with pytest.raises(ValueError, match="track_higher_grads"):
        stateful.monkeypatch(model).track_higher_grads = 1


def test_history_lets_go_of_saved_weights_once_backward_has_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8, bias=False), nn.Tanh(), nn.Linear(8, 1, bias=False))
    model = model.to(DT)
    x = torch.randn(5, 3, dtype=DT, requires_grad=True)  # so mm saves every weight
    y = torch.randn(5, 1, dtype=DT)
    with stateful.innerloop_ctx(model, torch.optim.SGD(model.parameters(), lr=0.1)) as (fm, do):
        for _ in range(4):
            do.step(F.mse_loss(fm(x), y))
        outer = F.mse_loss(fm(x), y)
        assert all(len(list(fm.parameters(time=t))) == 2 for t in range(5))  # the graph holds them
        outer.backward()
        del outer
        gc.collect()
        with pytest.raises(RuntimeError, match="let go"):
            fm.parameters(time=2)
        assert len(list(fm.parameters(time=0))) == len(list(fm.parameters(time=-1))) == 2


def test_module_traversal_and_state_dict_give_fast_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(6, 3, dtype=DT)
    with stateful.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(fmodel(x).pow(2).mean())
        assert [n for n, _ in fmodel.named_modules()] == [n for n, _ in model.named_modules()]
        assert len(list(fmodel.children())) == 3
        sd = fmodel.state_dict()
        assert list(sd) == list(model.state_dict())
        assert torch.equal(sd["0.weight"], fmodel[0].weight.detach())
        assert (
            sd["0.weight"].grad_fn is None and fmodel.state_dict(keep_vars=True)["0.weight"].grad_fn
        )
        adapted = copy.deepcopy(model)
        adapted.load_state_dict(sd)
        adapted.train()
        torch.testing.assert_close(adapted(x), fmodel(x), rtol=1e-12, atol=1e-14)

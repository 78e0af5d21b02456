"""Mixed precision: bfloat16 autocast inside the inner loss, in the reverse, checkpoint and
forward modes, on the device under test (CPU autocast has bfloat16 too).

What stays float32 (README "Running on a GPU"): the parameters and their updates, the
optimizer state (momentum buffers, Adam moments), forward mode's tangents (a tangent has its
primal's dtype) and the hypergradients; only the ops autocast lowers run in bfloat16. The
hypergradient then agrees with the float32 one to ``RTOL``: bfloat16 keeps 8 significant
bits (relative rounding 2^-9 ~ 2e-3); measured on the CPU: at most 6e-3 relative, for SGD
with momentum and for Adam, T = 20, in every mode.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import bilevel

pytestmark = pytest.mark.device
RTOL = 2e-2
STEPS = 20


def _problem(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)
    ).to(device)
    g = torch.Generator().manual_seed(1)
    x, x_val = torch.randn(64, 10, generator=g).to(device), torch.randn(64, 10, generator=g)
    y, y_val = torch.randint(0, 3, (64,), generator=g), torch.randint(0, 3, (64,), generator=g)
    return model, (x, y.to(device)), (x_val.to(device), y_val.to(device))


def _hypergradient(device, mode, optimizer, bf16):
    model, train, val = _problem(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    lowered = []

    def inner(p, h, batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = functional_call(model, p, (batch[0],))
        lowered.append(logits.dtype)
        return F.cross_entropy(logits.float(), batch[1])

    lr = torch.tensor(0.3 if optimizer == "sgd" else 0.01, device=device, requires_grad=True)
    wd = torch.tensor(1e-3, device=device, requires_grad=True)
    opt = bilevel.optim.sgd(momentum=0.9) if optimizer == "sgd" else bilevel.optim.adam()
    result = bilevel.unroll(inner, params, {"lr": lr, "weight_decay": wd}, opt, STEPS, train, mode)
    val_loss = F.cross_entropy(functional_call(model, result.params, (val[0],)), val[1])
    grads = torch.stack(torch.autograd.grad(val_loss, [lr, wd]))
    state_tensors = [t for t in _tensors(result.state) if t.is_floating_point()]
    return grads, result.params, state_tensors, lowered


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("mode", ["reverse", "checkpoint", "forward"])
def test_bf16_autocast_inner_loss_gives_the_float32_hypergradient(device, mode, optimizer):
    g32, _, _, lowered32 = _hypergradient(device, mode, optimizer, bf16=False)
    g16, params, state, lowered16 = _hypergradient(device, mode, optimizer, bf16=True)
    assert set(lowered32) == {torch.float32}
    assert set(lowered16) == {torch.bfloat16}, "autocast ran the model in bfloat16"
    assert g16.dtype == torch.float32 and g16.device == device
    assert all(p.dtype == torch.float32 for p in params.values())
    assert state and all(t.dtype == torch.float32 for t in state), "optimizer state is float32"
    assert not torch.equal(g16, g32), "bfloat16 changed nothing: autocast did not apply"
    torch.testing.assert_close(g16, g32, rtol=RTOL, atol=0.0)

"""``lean_grad``: torch.autograd.grad's gradient bits without its Python layer, and the
layer itself wherever it would do more (overrides, modes, transforms)."""

import torch
from torch.overrides import TorchFunctionMode

from bilevel.solvers import _lean_grad


def _loss(w):
    X = torch.linspace(-1, 2, 3 * w.numel(), dtype=w.dtype).reshape(3, -1)
    return 0.5 * (X @ w - 1).pow(2).mean() + 0.05 * (w * w).sum() + w.sin().sum()


def test_lean_grad_is_autograd_grad_bit_for_bit(monkeypatch):
    calls = []
    real = _lean_grad.engine_run_backward
    monkeypatch.setattr(
        _lean_grad, "engine_run_backward", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    for dtype in (torch.float64, torch.float32):
        w = torch.linspace(-2, 3, 7, dtype=dtype).requires_grad_(True)
        (expected,) = torch.autograd.grad(_loss(w), w)
        assert torch.equal(_lean_grad.lean_grad(_loss(w), w), expected)
    assert len(calls) == 2
    unused = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    assert _lean_grad.lean_grad(_loss(w), unused) is None


def test_lean_grad_leaves_modes_and_subclasses_to_autograd_grad(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the lean path ran")

    monkeypatch.setattr(_lean_grad, "engine_run_backward", refuse)
    seen = []

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    w = torch.linspace(-2, 3, 7, dtype=torch.float64).requires_grad_(True)
    (expected,) = torch.autograd.grad(_loss(w), w)
    f = _loss(w)
    with Mode():
        assert torch.equal(_lean_grad.lean_grad(f, w), expected)
    assert torch.autograd.grad in seen  # the mode saw the call: autograd.grad ran

    class Sub(torch.Tensor):
        pass

    ws = w.detach().as_subclass(Sub).requires_grad_(True)
    assert torch.equal(_lean_grad.lean_grad(_loss(ws), ws).as_subclass(torch.Tensor), expected)

"""unroll on user mistakes: each gives one clear error (or warning), the same in every mode,
instead of a silent wrong hypergradient or a raw torch error from deep inside."""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel
from bilevel.unroll import NonFiniteLossError
from bilevel.unroll.preflight import MemoryWarning

DT = torch.float64
MODES = ["reverse", "truncated", "checkpoint", "forward", "first_order"]
G = torch.Generator().manual_seed(0)
X = torch.randn(12, 3, generator=G, dtype=DT)
Y = torch.randn(12, generator=G, dtype=DT)


def kw(mode):
    return {"truncate": 2} if mode == "truncated" else {}


def mse(params, hparams, batch):
    x, y = batch
    return ((x @ params["w"] - y) ** 2).mean() + hparams["l2"] * (params["w"] ** 2).sum()


def w0():
    return {"w": torch.zeros(3, dtype=DT)}


def lr_leaf(value=0.1):
    return torch.tensor(value, dtype=DT, requires_grad=True)


def run(mode, hparams, inner=mse, optimizer=None, data=(X, Y), steps=4, **extra):
    return bilevel.unroll(
        inner,
        w0(),
        hparams,
        optimizer or bilevel.optim.sgd(),
        steps,
        data,
        mode,
        **kw(mode),
        **extra,
    )


# -- a misspelled hyperparameter --------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_misspelled_hyperparameter_names_the_closest_known_name(mode):
    h = {"lerning_rate": lr_leaf(), "l2": torch.tensor(0.1, dtype=DT)}
    with pytest.raises(ValueError, match="'lerning_rate'.*did you mean 'lr'"):
        run(mode, h)
    h = {"lr": lr_leaf(), "l_2": torch.tensor(0.1, dtype=DT)}

    def inner(p, h, b):
        return mse(p, {"l2": h.get("l2", 0.0)}, b)

    with pytest.raises(ValueError, match="'l_2'.*did you mean 'l2'"):
        run(mode, h, inner=inner)


def test_a_key_read_by_the_inner_loss_only_is_fine_and_the_check_can_be_turned_off():
    h = {"lr": lr_leaf(), "l2": torch.tensor(0.1, dtype=DT), "extra": 1.0}
    with pytest.raises(ValueError, match="'extra'"):
        run("reverse", h)
    run("reverse", h, check_hparams=False)


# -- complex loss, loss not depending on params, nothing requiring grad ------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_complex_inner_loss_is_one_clear_error(mode):
    def inner(p, h, b):
        return (p["w"].to(torch.complex128) * 1j).sum() + h["l2"]

    with pytest.raises(TypeError, match="complex"):
        run(mode, {"lr": lr_leaf(), "l2": torch.tensor(0.1, dtype=DT)}, inner=inner)


@pytest.mark.parametrize("mode", MODES)
def test_an_inner_loss_that_ignores_params_is_one_clear_error(mode):
    other = torch.zeros(3, dtype=DT, requires_grad=True)

    def inner(p, h, b):
        return ((X @ other - Y) ** 2).mean() + h["l2"]

    with pytest.raises(ValueError, match="does not depend on params"):
        run(mode, {"lr": lr_leaf(), "l2": torch.tensor(0.1, dtype=DT)}, inner=inner)


@pytest.mark.parametrize("mode", MODES)
def test_no_hyperparameter_requiring_grad_warns_the_same_in_every_mode(mode):
    h = {"lr": torch.tensor(0.1, dtype=DT), "l2": torch.tensor(0.1, dtype=DT)}
    with pytest.warns(UserWarning, match="nothing in this unroll requires grad"):
        result = run(mode, h)
    assert not result.params["w"].requires_grad
    # the same values as a run that differentiates
    ref = run("reverse", {"lr": lr_leaf(), "l2": torch.tensor(0.1, dtype=DT)})
    torch.testing.assert_close(result.params["w"], ref.params["w"].detach())


# -- a captured tensor requiring grad ---------------------------------------------------


@pytest.mark.parametrize("mode", ["forward", "checkpoint"])
def test_a_captured_tensor_requiring_grad_is_refused_where_the_mode_cannot_see_it(mode):
    l2 = torch.tensor(0.1, dtype=DT, requires_grad=True)

    def inner(p, h, b):
        return mse(p, {"l2": l2}, b)

    with pytest.raises(ValueError, match="not in hparams.*pass it in hparams"):
        run(mode, {"lr": lr_leaf()}, inner=inner)
    # in a schedule function of the optimizer too
    opt = bilevel.optim.sgd(lr=lambda t: l2 * 0.5)
    with pytest.raises(ValueError, match="schedule function"):
        run(mode, {"l2": torch.tensor(0.1, dtype=DT)}, optimizer=opt)


def test_reverse_mode_sees_captured_tensors_and_stays_silent():
    l2 = torch.tensor(0.1, dtype=DT, requires_grad=True)

    def inner(p, h, b):
        return mse(p, {"l2": l2}, b)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = run("reverse", {"lr": torch.tensor(0.1, dtype=DT)}, inner=inner)
    (result.params["w"] ** 2).sum().backward()
    assert l2.grad is not None and l2.grad != 0


# -- in-place changes before backward in checkpoint mode --------------------------------


@pytest.mark.parametrize("what", ["data", "captured"])
def test_checkpoint_mode_detects_an_in_place_change_before_backward(what):
    x, y = X.clone(), Y.clone()
    scale = torch.ones(3, dtype=DT)

    def inner(p, h, b):
        xb, yb = b
        return mse(p, h, (xb * scale, yb))

    lr = lr_leaf()
    h = {"lr": lr, "l2": torch.tensor(0.1, dtype=DT)}
    result = bilevel.unroll(inner, w0(), h, bilevel.optim.sgd(), 6, (x, y), "checkpoint")
    loss = (result.params["w"] ** 2).sum()
    with torch.no_grad():
        (x if what == "data" else scale).mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# -- non-finite results and out-of-range tensors ----------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_nan_gradient_at_the_last_step_is_caught_through_the_final_params(mode):
    def inner(p, h, b):
        # finite value, NaN gradient at w = 0 (sqrt's derivative), reached at the last step
        return mse(p, h, b) + 0.0 * (p["w"] ** 2).sum().sqrt()

    with pytest.raises(NonFiniteLossError, match="params"):
        bilevel.unroll(
            inner,
            {"w": torch.zeros(3, dtype=DT)},
            {"lr": lr_leaf(), "l2": torch.tensor(0.1, dtype=DT)},
            bilevel.optim.sgd(),
            1,
            (X, Y),
            mode,
            **({"truncate": 1} if mode == "truncated" else {}),
        )


@pytest.mark.parametrize(
    "optimizer, hparams, needle",
    [
        (bilevel.optim.sgd(), {"lr": torch.tensor(-0.1, dtype=DT)}, "'lr'.*down to -0.1"),
        (
            bilevel.optim.sgd(),
            {"lr": torch.tensor(0.1, dtype=DT), "momentum": torch.tensor(1.5, dtype=DT)},
            "'momentum'.*up to 1.5",
        ),
        (
            bilevel.optim.adam(),
            {"betas": (torch.tensor(0.9, dtype=DT), torch.tensor(1.5, dtype=DT))},
            r"'betas\[1\]'.*up to 1.5.*\[0.0, 1.0\)",
        ),
        (bilevel.optim.adam(), {"eps": torch.tensor(-1e-8, dtype=DT)}, "'eps'"),
        (bilevel.optim.sgd(), {"lr": torch.tensor([0.1, -0.1, 0.1, 0.1], dtype=DT)}, "'lr'"),
    ],
)
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_out_of_range_tensor_hyperparameters_are_refused_at_the_start(
    optimizer, hparams, needle, mode
):
    h = {**hparams, "l2": torch.tensor(0.1, dtype=DT, requires_grad=True)}
    with pytest.raises(ValueError, match=needle):
        run(mode, h, optimizer=optimizer)
    # check_finite=False: no synchronisation, no check
    run(mode, h, optimizer=optimizer, check_finite=False)


# -- a reverse unroll that will not fit --------------------------------------------------


def test_a_reverse_unroll_that_will_not_fit_warns_and_suggests_checkpoint(monkeypatch):
    import importlib

    pre = importlib.import_module("bilevel.unroll.preflight")  # bilevel.unroll is the function

    monkeypatch.setattr(pre, "available_bytes", lambda device: 10_000)  # a tiny machine
    h = {"lr": lr_leaf(), "l2": torch.tensor(0.1, dtype=DT)}
    with pytest.warns(MemoryWarning, match="mode='checkpoint'"):
        run("reverse", h, steps=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run("checkpoint", h, steps=50)  # no estimate for the modes that keep little
    monkeypatch.setattr(pre, "available_bytes", lambda device: 10**12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run("reverse", h, steps=50)

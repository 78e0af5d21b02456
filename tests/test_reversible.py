"""mode="reversible": exact reversal, hypergradients, the bit buffer's size, errors."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits

import bilevel
from bilevel._sync import count_syncs
from bilevel.unroll import reversal
from bilevel.unroll.bitbuffer import BitBuffer, lower_bound
from bilevel.unroll.fixed_point_arithmetic import FixedPoint, out_of_range

DT = torch.float64


def digits(dtype: torch.dtype = DT, device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=dtype, device=device), torch.tensor(y, device=device)


def mlp_params(hidden: int = 50, dtype: torch.dtype = DT, device: Any = "cpu") -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "w1": (torch.randn(64, hidden, generator=g, dtype=dtype) * 0.1).to(device),
        "b1": torch.zeros(hidden, dtype=dtype, device=device),
        "w2": (torch.randn(hidden, 10, generator=g, dtype=dtype) * 0.1).to(device),
        "b2": torch.zeros(10, dtype=dtype, device=device),
    }


def mlp(p: dict, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def batches(steps: int, size: int, x: torch.Tensor, y: torch.Tensor) -> list:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        i = torch.randint(0, 1400, (size,), generator=g).to(x.device)
        out.append((x[i], y[i]))
    return out


def inner(p: dict, h: dict, b: tuple) -> torch.Tensor:
    return F.cross_entropy(mlp(p, b[0]), b[1])


def outer(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(mlp(p, x[1400:]), y[1400:])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- the bit buffer ---------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    moduli=st.one_of(
        st.lists(st.integers(1, 2**10), min_size=1, max_size=3),
        st.lists(st.integers(1, 2**15), min_size=1, max_size=2),
    ),
    ops=st.lists(st.tuples(st.integers(0, 2), st.booleans()), min_size=1, max_size=60),
    seed=st.integers(0, 2**16),
)
def test_bitbuffer_pops_what_was_pushed_in_reverse_order(moduli, ops, seed):
    g = torch.Generator().manual_seed(seed)
    moduli = tuple(moduli)
    buf = BitBuffer(7, moduli, max_bits=16 * len(ops) + 1, device="cpu")
    log = []
    held = 0.0  # bits stored: a pop of values never pushed ("bits back") draws on them
    for which, bits_back in ops:
        m = moduli[which % len(moduli)]
        if bits_back and held >= math.log2(m) + 1:
            log.append(("popped", m, buf.pop(m)))
            held -= math.log2(m)
        else:
            held += math.log2(m)
            values = torch.randint(0, m, (7,), generator=g)
            buf.push(values, m)
            log.append(("pushed", m, values))
    for kind, m, values in reversed(log):  # the mirror image undoes everything
        if kind == "pushed":
            assert torch.equal(buf.pop(m), values)
        else:
            buf.push(values, m)
    assert bool(buf.is_empty())
    assert not bool(buf.overflowed)


@pytest.mark.parametrize(("n", "d"), [(9, 10), (49, 50), (1, 2), (999, 1000)])
def test_bits_back_costs_log2_of_one_over_the_ratio(n, d):
    steps = 400
    expected = steps * math.log2(d / n)
    buf = BitBuffer(1000, (n, d), max_bits=expected + math.log2(d) + 1, device="cpu")
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        buf.push(torch.randint(0, d, (1000,), generator=g), d)
        buf.pop(n)
    per_element = float(buf.payload_bits()) / 1000
    assert abs(per_element - expected) <= 1e-3 * expected + 1e-6
    assert not bool(buf.overflowed)
    # the table holds the payload in whole words, the state the rest
    assert buf.stack.shape[0] == max(1, math.floor((expected + math.log2(d) + 1) / 32))


def test_bitbuffer_flags_a_table_too_small_and_a_pop_of_more_than_it_holds():
    buf = BitBuffer(4, (1000,), max_bits=40, device="cpu")  # one word
    for _ in range(12):  # 120 bits
        buf.push(torch.full((4,), 7), 1000)
    assert bool(buf.overflowed)
    empty = BitBuffer(4, (1000,), max_bits=40, device="cpu")
    for _ in range(4):
        empty.pop(1000)
    assert bool(empty.overflowed)


def test_bitbuffer_lower_bound_is_a_multiple_of_every_modulus():
    low = lower_bound((9, 10, 7))
    assert low % 630 == 0 and 2**30 < low < 2**31
    with pytest.raises(ValueError, match="smaller denominator"):
        lower_bound((2**16 + 1, 2**16))


def test_fixed_point_grid():
    grid = FixedPoint(10)
    x = torch.tensor([0.5, -3.25, 1e-4, 7.0])
    k = grid.to_int(x)
    assert k.dtype == torch.int64
    assert torch.equal(grid.to_int(grid.to_float(k, DT)), k)
    assert float((grid.to_float(k, DT) - x).abs().max()) <= 2**-11
    assert not bool(out_of_range(k))
    assert bool(out_of_range(k, grid.to_int(torch.tensor([2.0**52]))))
    assert bool(out_of_range(grid.to_int(torch.tensor([1.0, float("nan")]))))
    assert bool(out_of_range(grid.to_int(torch.tensor([-float("inf")]))))


# -- exact reversal -----------------------------------------------------------------------


def record_steps(monkeypatch) -> list:
    """The fixed-point weights and velocities (flat) before the first forward step and
    after every step, with the step's settings: the quantised trajectory, stored in full
    by the test."""
    seen: list = []
    original = reversal.forward_step

    def recording(sgd, traj, batch, index, step):
        if not seen:
            seen.append((traj.w.clone(), traj.v.clone(), sgd))
        out = original(sgd, traj, batch, index, step)
        seen.append((traj.w.clone(), traj.v.clone(), sgd))
        return out

    monkeypatch.setattr(reversal, "forward_step", recording)
    return seen


@pytest.mark.device
@pytest.mark.parametrize("momentum", [0.9, Fraction(1, 7)])  # 1/7: 2.8 bits a step, spills
def test_weights_and_velocities_recovered_bitwise(monkeypatch, device, momentum):
    x, y = digits(device=device)
    params = mlp_params(device=device)
    steps = 100
    data = batches(steps, 200, x, y)
    opt = bilevel.optim.sgd(momentum=momentum, weight_decay=1e-3, dampening=0.1)
    # a state carried over: non-zero velocities that the first step multiplies
    state = opt.init(params)
    state = {
        "step": 5,
        "param_steps": dict.fromkeys(params, 5),
        "momentum_buffer": {k: 0.01 * torch.ones_like(p) for k, p in params.items()},
    }
    lr = torch.full((110,), 0.2, dtype=DT, device=device, requires_grad=True)
    seen = record_steps(monkeypatch)
    undone: dict = {}
    original = reversal._check_recovered

    def keep(plan, traj, params0):
        undone.update(w=traj.w.clone(), v=traj.v.clone(), empty=bool(traj.buffer.is_empty()))
        original(plan, traj, params0)

    monkeypatch.setattr(reversal, "_check_recovered", keep)
    r = bilevel.unroll(inner, params, {"lr": lr}, opt, steps, data, mode="reversible", state=state)
    outer(r.params, x, y).backward()
    w0, v0, _ = seen[0]
    assert torch.equal(undone["w"], w0) and torch.equal(undone["v"], v0)
    assert bool(v0.ne(0).any()) and not torch.equal(seen[-1][0], w0)
    assert undone["empty"]
    if momentum == Fraction(1, 7):  # the buffer spilled words to its table
        assert r.reversible.bits_per_weight_step * steps > 64
    assert lr.grad is not None and bool(lr.grad[5 : 5 + steps].ne(0).all())
    assert bool(lr.grad[:5].eq(0).all()) and bool(lr.grad[5 + steps :].eq(0).all())


def test_a_changed_gradient_is_caught_at_the_end_of_backward():
    x, y = digits()
    lr = torch.tensor(0.2, dtype=DT, requires_grad=True)
    torch.manual_seed(0)

    def noisy(p, h, b):  # dropout: the recomputed gradient differs
        return F.cross_entropy(F.dropout(torch.tanh(b[0] @ p["w1"]), 0.3) @ p["w2"], b[1])

    r = bilevel.unroll(
        noisy,
        mlp_params(),
        {"lr": lr},
        bilevel.optim.sgd(momentum=0.9),
        10,
        batches(10, 50, x, y),
        mode="reversible",
    )
    with pytest.raises(RuntimeError, match="did not retrace"):
        outer(r.params, x, y).backward()


# -- hypergradients -----------------------------------------------------------------------


def straight_through_reference(seen, params, lr, momentum, wd, data):
    """Back-propagation through the stored quantised trajectory: each step's float update
    (torch's SGD, written out here) at the stored points, the values replaced by the
    stored next point (straight-through), so autograd differentiates the same steps."""
    names = list(params)
    w = {k: params[k] for k in names}
    v = None
    for t, batch in enumerate(data):
        loss = inner(w, {}, batch)
        grads = torch.autograd.grad(loss, [w[k] for k in names], create_graph=True)
        new_v, new_w = {}, {}
        for k, g in zip(names, grads):
            g = g + wd * w[k]
            new_v[k] = g if v is None else momentum * v[k] + g
            new_w[k] = w[k] - lr[t] * new_v[k]
        nxt_w, nxt_v, sgd = seen[t + 1]
        at_w, at_v = sgd.floats(nxt_w), sgd.floats(nxt_v)
        w = {k: at_w[k] + (new_w[k] - new_w[k].detach()) for k in names}
        v = {k: at_v[k] + (new_v[k] - new_v[k].detach()) for k in names}
    return w


@pytest.mark.parametrize("gamma", [0.9, 0.98, 1 / 7])
def test_hypergradient_equals_backprop_through_the_stored_quantised_trajectory(monkeypatch, gamma):
    x, y = digits()
    steps = 100
    data = batches(steps, 200, x, y)
    params = {k: v.requires_grad_() for k, v in mlp_params().items()}
    lr = torch.linspace(0.1, 0.4, steps, dtype=DT).requires_grad_()
    mu = torch.tensor(gamma, dtype=DT, requires_grad=True)
    wd = torch.tensor(1e-3, dtype=DT, requires_grad=True)
    seen = record_steps(monkeypatch)
    opt = bilevel.optim.sgd(momentum=mu)
    hp = {"lr": lr, "weight_decay": wd}
    r = bilevel.unroll(inner, params, hp, opt, steps, data, mode="reversible")
    got = torch.autograd.grad(outer(r.params, x, y), [lr, mu, wd, *params.values()])
    ref_w = straight_through_reference(seen, params, lr, mu, wd, data)
    # the recorded trajectory ends where the result does
    assert all(torch.equal(ref_w[k].detach(), r.params[k].detach()) for k in params)
    want = torch.autograd.grad(outer(ref_w, x, y), [lr, mu, wd, *params.values()])
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-6
    # and close to the float unroll's (the quantisation is 2**-44)
    float_r = bilevel.unroll(inner, params, hp, opt, steps, data, mode="reverse")
    want_float = torch.autograd.grad(outer(float_r.params, x, y), [lr, mu, wd, *params.values()])
    for a, b in zip(got, want_float):
        assert rel(a, b) < 1e-6


def test_float32_params_and_a_momentum_fraction_against_checkpoint():
    x, y = digits(torch.float32)
    steps = 15
    data = batches(steps, 100, x, y)
    lr = torch.full((steps,), 0.3, requires_grad=True)
    opt = bilevel.optim.sgd(momentum=Fraction(19, 20))
    r = bilevel.unroll(
        inner, mlp_params(dtype=torch.float32), {"lr": lr}, opt, steps, data, mode="reversible"
    )
    assert r.params["w1"].dtype == torch.float32
    (got,) = torch.autograd.grad(outer(r.params, x, y), [lr])
    opt_f = bilevel.optim.sgd(momentum=0.95)
    c = bilevel.unroll(
        inner, mlp_params(dtype=torch.float32), {"lr": lr}, opt_f, steps, data, mode="checkpoint"
    )
    (want,) = torch.autograd.grad(outer(c.params, x, y), [lr])
    assert rel(got, want) < 1e-4


def test_unused_parameter_iterator_data_second_backward_and_no_grad():
    x, y = digits()
    steps = 12
    data = batches(steps, 60, x, y)
    params = {**mlp_params(), "unused": torch.ones(3, dtype=DT)}

    def loss_at(p, h, b):
        return inner(p, h, b)

    lr = torch.tensor(0.25, dtype=DT, requires_grad=True)
    opt = bilevel.optim.sgd(momentum=0.9)
    r_list = bilevel.unroll(loss_at, params, {"lr": lr}, opt, steps, data, mode="reversible")
    r_iter = bilevel.unroll(loss_at, params, {"lr": lr}, opt, steps, iter(data), mode="reversible")
    assert torch.equal(r_list.params["unused"], params["unused"])
    assert all(torch.equal(r_list.params[k], r_iter.params[k]) for k in params)
    assert r_iter.reversible.saved_bytes > r_list.reversible.saved_bytes  # stored batches
    out = outer(r_list.params, x, y)
    (g1,) = torch.autograd.grad(out, [lr], retain_graph=True)
    (g2,) = torch.autograd.grad(out, [lr])
    (g3,) = torch.autograd.grad(outer(r_iter.params, x, y), [lr])
    assert torch.equal(g1, g2) and torch.equal(g1, g3)
    with torch.no_grad():
        r_ng = bilevel.unroll(loss_at, params, {"lr": 0.25}, opt, steps, data, mode="reversible")
    assert all(torch.equal(r_ng.params[k], r_list.params[k].detach()) for k in params)
    assert r_list.state["step"] == steps and r_list.state["param_steps"]["unused"] == 0


# -- the buffer's size on the digits MLP 64-50-10, T = 100, batch 200 -----------------------


@pytest.mark.parametrize(("gamma", "bits"), [(0.9, 0.152), (0.98, 0.029)])
def test_bits_per_weight_step_near_log2_one_over_momentum(gamma, bits):
    x, y = digits()
    steps = 100
    lr = torch.full((steps,), 0.2, dtype=DT, requires_grad=True)
    r = bilevel.unroll(
        inner,
        mlp_params(),
        {"lr": lr},
        bilevel.optim.sgd(momentum=gamma),
        steps,
        batches(steps, 200, x, y),
        mode="reversible",
    )
    report = r.reversible
    assert report.weights == 64 * 50 + 50 + 50 * 10 + 10
    assert report.expected_bits_per_weight_step == pytest.approx(bits, abs=5e-4)
    assert abs(report.bits_per_weight_step - bits) <= 0.15 * bits
    # storage: the documented fixed 96 bits per weight, plus the payload of T steps and
    # one push in whole 32-bit words (for T = 100: none, the states hold it; one allocated)
    d = report.momentum.denominator
    words = max(1, math.floor((steps * (bits + 2e-4) + math.log2(d) + 1) / 32))
    assert report.buffer_bytes == report.weights * (12 + 4 * words)
    assert report.storage_bits_per_weight_step <= (96 + 32 * words) / steps + 1e-9
    outer(r.params, x, y).backward()
    assert lr.grad is not None and bool(torch.isfinite(lr.grad).all())


# -- errors ---------------------------------------------------------------------------------


def _call(opt=None, mode="reversible", hp=None, **kw):
    x, y = digits()
    hp = {"lr": torch.tensor(0.1, dtype=DT, requires_grad=True)} if hp is None else hp
    opt = bilevel.optim.sgd(momentum=0.9) if opt is None else opt
    return bilevel.unroll(inner, mlp_params(), hp, opt, 3, batches(3, 20, x, y), mode=mode, **kw)


@pytest.mark.parametrize(
    ("opt", "kw", "match"),
    [
        (bilevel.optim.adam(), {}, "SGD with momentum only"),
        (bilevel.optim.sgd(momentum=0.9, nesterov=True), {}, "nesterov"),
        (bilevel.optim.sgd(), {}, "cannot be reversed"),
        (bilevel.optim.sgd(momentum=0.912345678), {}, "momentum_denominator"),
        (bilevel.optim.sgd(momentum=torch.full((3,), 0.9, dtype=DT)), {}, "one momentum"),
        (
            bilevel.optim.sgd(momentum=dict.fromkeys(["w1", "b1", "w2", "b2"], 0.9)),
            {},
            "one momentum",
        ),
        (bilevel.optim.sgd(momentum=1.5), {}, r"in \(0, 1\]"),
        (None, {"radix_bits": 70}, "radix_bits must be"),
        (None, {"momentum_denominator": 0}, "momentum_denominator must be"),
    ],
)
def test_unsupported_settings_raise_early(opt, kw, match):
    with pytest.raises(ValueError, match=match):
        _call(opt, **kw)


def test_options_of_another_mode_and_buffers_raise():
    with pytest.raises(ValueError, match="only used with mode='reversible'"):
        _call(mode="reverse", radix_bits=40)
    with pytest.raises(ValueError, match="only used with mode='reversible'"):
        _call(mode="checkpoint", momentum_denominator=10)
    with pytest.raises(ValueError, match="buffers"):
        _call(buffers={"n": torch.zeros(1)})


def test_momentum_denominator_rounds_and_out_of_range_values_raise():
    r = _call(bilevel.optim.sgd(momentum=0.912345678), momentum_denominator=1000)
    assert r.reversible.momentum == Fraction(912, 1000)
    with pytest.raises(OverflowError, match="radix_bits"):
        _call(radix_bits=56, hp={"lr": torch.tensor(100.0, dtype=DT, requires_grad=True)})


def test_settings_in_every_form_match_reverse_mode():
    """momentum in hparams (a tensor), a penalty the inner loss reads, a per-element lr
    for one parameter, maximize, dampening: the same hypergradients as reverse mode."""
    x, y = digits()
    steps = 10
    data = batches(steps, 80, x, y)
    mu = torch.tensor(0.95, dtype=DT, requires_grad=True)
    l2 = torch.tensor(1e-2, dtype=DT, requires_grad=True)
    lr_w1 = torch.full((64, 50), 0.2, dtype=DT, requires_grad=True)
    lr = {"w1": bilevel.optim.per_element(lr_w1), "b1": 0.1, "w2": 0.2, "b2": 0.1}
    hp = {"momentum": mu, "l2": l2, "lr": lr, "dampening": 0.25}

    def ascent(p, h, b):  # maximize=True: the negated loss is ascended
        return -(inner(p, h, b) + h["l2"] * (p["w1"] ** 2).sum())

    opt = bilevel.optim.sgd(maximize=True)
    got = {}
    for mode in ("reversible", "reverse"):
        r = bilevel.unroll(ascent, mlp_params(), hp, opt, steps, data, mode=mode)
        got[mode] = torch.autograd.grad(outer(r.params, x, y), [mu, l2, lr_w1])
    for a, b in zip(got["reversible"], got["reverse"]):
        assert rel(a, b) < 1e-6


def test_transforms_and_a_state_requiring_grad_raise():
    params = mlp_params()
    opt = bilevel.optim.sgd(momentum=0.9)
    state = opt.init(params)
    state["momentum_buffer"] = {k: v.requires_grad_() for k, v in state["momentum_buffer"].items()}
    with pytest.raises(ValueError, match="initial state as a constant"):
        _call(state=state)

    def task(w):
        return bilevel.unroll(
            lambda p, h: (p["w"] ** 2).sum(), {"w": w}, {"lr": 0.1}, opt, 2, mode="reversible"
        ).params["w"]

    with pytest.raises(ValueError, match="torch.func transforms"):
        torch.func.vmap(task)(torch.ones(2, 3))


def test_synchronisations_are_the_documented_ones():
    x, y = digits()
    data = batches(20, 50, x, y)
    lr = torch.tensor(0.2, dtype=DT, requires_grad=True)

    def hypergradient():
        r = bilevel.unroll(
            inner,
            mlp_params(),
            {"lr": lr},
            bilevel.optim.sgd(momentum=0.9),
            20,
            data,
            mode="reversible",
        )
        return torch.autograd.grad(outer(r.params, x, y), [lr])

    hypergradient()
    with count_syncs("cpu") as syncs:
        hypergradient()
    # the range check of lr, the end of the forward pass (range flags and buffer size), the
    # end-of-unroll finiteness check, the end-of-backward recovery check
    assert syncs.count == 4, syncs


def test_hypergradient_passes_central_finite_differences():
    """The fixed-point run is re-run at h ± eps (the momentum, a ratio of integers, has no
    finite difference: the schedule and the weight decay are checked)."""
    x, y = digits()
    steps = 20
    data = batches(steps, 100, x, y)

    def outer_loss(h):
        r = bilevel.unroll(
            inner,
            mlp_params(),
            h,
            bilevel.optim.sgd(momentum=0.9),
            steps,
            data,
            mode="reversible",
        )
        return outer(r.params, x, y)

    hp = {
        "lr": torch.linspace(0.3, 0.1, steps, dtype=DT),
        "weight_decay": torch.tensor(1e-3, dtype=DT),
    }
    # the fixed-point loss is a staircase with steps of ~1e-14 (the grid and the buffer's
    # digits): a step of 1e-5 keeps their share of the difference quotient below 1e-8
    report = bilevel.hypergradcheck(outer_loss, hp, eps=1e-5, max_elements=4, n_directions=3)
    assert report.passed, report


def test_the_memory_benchmark_runs_and_agrees():
    from experiments.bench import reversible as bench

    rows = bench.measure(4, DT, repeats=1, rss=False)
    assert [r["mode"] for r in rows] == ["reverse", "checkpoint", "reversible"]
    assert all(r["rel_err"] < 1e-6 for r in rows)
    report = rows[-1]
    assert report["buffer_bytes"] == 3760 * 16 and report["saved_bytes"] > 0

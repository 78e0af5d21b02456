"""The unrolled engine: modes against each other, closed forms and finite differences."""

import pytest
import torch
from torch.func import functional_call

import bilevel
from bilevel.unroll import NonFiniteLossError

DT = torch.float64


def regression_problem(seed=0, n=40, p=5):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=DT)
    y = X @ torch.randn(p, generator=g, dtype=DT) + 0.1 * torch.randn(n, generator=g, dtype=DT)
    Xv = torch.randn(n, p, generator=g, dtype=DT)
    yv = Xv @ torch.randn(p, generator=g, dtype=DT)
    return X, y, Xv, yv


X, Y, XV, YV = regression_problem()


def ridge_inner(params, hparams, batch):
    x, y = batch
    residual = x @ params["w"] + params["b"] - y
    return (residual**2).mean() + hparams["l2"] * (params["w"] ** 2).sum()


def val_loss(params):
    return ((XV @ params["w"] + params["b"] - YV) ** 2).mean()


def zeros_params(p=5):
    return {"w": torch.zeros(p, dtype=DT), "b": torch.zeros((), dtype=DT)}


def hypergrads(mode, optimizer=None, steps=20, **kw):
    lr = torch.tensor(0.05, dtype=DT, requires_grad=True)
    l2 = torch.tensor(0.1, dtype=DT, requires_grad=True)
    mom = torch.tensor(0.5, dtype=DT, requires_grad=True)
    optimizer = optimizer or bilevel.optim.sgd()
    hp = {"lr": lr, "l2": l2, "momentum": mom}
    result = bilevel.unroll(ridge_inner, zeros_params(), hp, optimizer, steps, (X, Y), mode, **kw)
    val_loss(result.params).backward()
    return torch.stack([lr.grad, l2.grad, mom.grad]), result


@pytest.mark.parametrize(
    "mode,kw",
    [
        ("checkpoint", {}),
        ("checkpoint", {"segments": 3}),
        ("checkpoint", {"segments": 20}),
        ("forward", {}),
        ("forward", {"vectorize": False}),
        ("forward", {"vectorize": True}),
        ("truncated", {"truncate": 20}),
    ],
)
def test_modes_agree_with_reverse(mode, kw):
    reference, ref_result = hypergrads("reverse")
    grads, result = hypergrads(mode, **kw)
    torch.testing.assert_close(grads, reference, rtol=1e-10, atol=0)
    torch.testing.assert_close(result.losses, ref_result.losses, rtol=1e-12, atol=0)
    for k in ref_result.params:
        torch.testing.assert_close(result.params[k], ref_result.params[k], rtol=1e-12, atol=0)


def test_reverse_matches_finite_differences():
    def outer(h):
        result = bilevel.unroll(ridge_inner, zeros_params(), h, bilevel.optim.sgd(), 15, (X, Y))
        return val_loss(result.params)

    point = {
        "lr": torch.tensor(0.05, dtype=DT),
        "l2": torch.tensor(0.1, dtype=DT),
        "momentum": torch.tensor(0.5, dtype=DT),
    }
    report = bilevel.hypergradcheck(outer, point, rtol=1e-6)
    assert report.passed, str(report)


def test_truncated_is_biased_and_differs():
    full, _ = hypergrads("reverse")
    short, _ = hypergrads("truncated", truncate=3)
    assert not torch.allclose(full, short, rtol=1e-3)


def quadratic(seed=1, p=4):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(p, p, generator=g, dtype=DT)
    A = M @ M.T / p + torch.eye(p, dtype=DT)
    b = torch.randn(p, generator=g, dtype=DT)
    c = torch.randn(p, generator=g, dtype=DT)
    return A, b, c


@pytest.mark.parametrize("mode", ["reverse", "checkpoint", "forward"])
def test_quadratic_lr_hypergradient_closed_form(mode):
    A, b, c = quadratic()
    T, lr0 = 12, 0.3
    lr = torch.tensor(lr0, dtype=DT, requires_grad=True)

    def inner(params, hparams):
        w = params["w"]
        return 0.5 * w @ A @ w - b @ w

    result = bilevel.unroll(
        inner, {"w": torch.zeros(4, dtype=DT)}, {"lr": lr}, bilevel.optim.sgd(), T, mode=mode
    )
    (0.5 * ((result.params["w"] - c) ** 2).sum()).backward()
    # w_T = (I - (I - lr A)^T) A^-1 b, so d w_T / d lr = T (I - lr A)^(T-1) b
    eye = torch.eye(4, dtype=DT)
    B = eye - lr0 * A
    w_T = (eye - torch.linalg.matrix_power(B, T)) @ torch.linalg.solve(A, b)
    expected = (w_T - c) @ (T * torch.linalg.matrix_power(B, T - 1) @ b)
    torch.testing.assert_close(result.params["w"].detach(), w_T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lr.grad, expected, rtol=1e-10, atol=1e-12)


def test_first_order_closed_form():
    A, b, c = quadratic()
    T = 10
    lr = torch.tensor(0.2, dtype=DT, requires_grad=True)
    w0 = torch.randn(4, dtype=DT, generator=torch.Generator().manual_seed(3)).requires_grad_()

    def inner(params, hparams):
        w = params["w"]
        return 0.5 * w @ A @ w - b @ w

    result = bilevel.unroll(
        inner, {"w": w0}, {"lr": lr}, bilevel.optim.sgd(), T, mode="first_order"
    )
    (0.5 * ((result.params["w"] - c) ** 2).sum()).backward()
    # first order: the gradients g_t are constants, so d w_T/d lr = -sum g_t and d w_T/d w_0 = I
    w, grads = w0.detach().clone(), []
    for _ in range(T):
        g = A @ w - b
        grads.append(g)
        w = w - 0.2 * g
    outer_grad = w - c
    torch.testing.assert_close(
        lr.grad, -(outer_grad @ torch.stack(grads).sum(0)), rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(w0.grad, outer_grad, rtol=1e-12, atol=1e-14)


def mlp_setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = model.to(DT)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (32,), generator=g)
    return model, x, y


def test_maml_initial_params_get_gradients_in_reverse_and_checkpoint():
    model, x, y = mlp_setup()

    def inner(params, hparams, batch):
        return torch.nn.functional.cross_entropy(
            functional_call(model, params, (batch[0],)), batch[1]
        )

    grads = {}
    for mode in ["reverse", "checkpoint"]:
        params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
        lr = torch.tensor(0.3, dtype=DT, requires_grad=True)
        result = bilevel.unroll(inner, params, {"lr": lr}, bilevel.optim.sgd(), 8, (x, y), mode)
        inner(result.params, {}, (x, y)).backward()
        grads[mode] = torch.cat([lr.grad.reshape(1)] + [p.grad.flatten() for p in params.values()])
    torch.testing.assert_close(grads["checkpoint"], grads["reverse"], rtol=1e-10, atol=1e-13)

    def outer(h):
        result = bilevel.unroll(
            inner,
            {
                "0.weight": h["w0"],
                **{k: v.detach() for k, v in model.named_parameters() if k != "0.weight"},
            },
            {"lr": torch.tensor(0.3, dtype=DT)},
            bilevel.optim.sgd(),
            8,
            (x, y),
        )
        return inner(result.params, {}, (x, y))

    report = bilevel.hypergradcheck(outer, {"w0": model[0].weight.detach().clone()}, rtol=1e-5)
    assert report.passed, str(report)


@pytest.mark.parametrize("mode", ["reverse", "checkpoint", "forward"])
def test_per_step_schedule_and_data_forms(mode):
    T = 6
    schedule = torch.full((T,), 0.05, dtype=DT, requires_grad=True)
    batches = [(X[i::2], Y[i::2]) for i in range(2)] * 3
    forms = {
        "list": batches,
        "function": lambda t: batches[t],
        "iterable": (b for b in batches),
    }
    out = {}
    for name, data in forms.items():
        schedule.grad = None
        hp = {"lr": schedule, "l2": torch.tensor(0.1, dtype=DT)}
        result = bilevel.unroll(ridge_inner, zeros_params(), hp, bilevel.optim.sgd(), T, data, mode)
        val_loss(result.params).backward()
        out[name] = schedule.grad.clone()
    torch.testing.assert_close(out["function"], out["list"], rtol=1e-12, atol=0)
    torch.testing.assert_close(out["iterable"], out["list"], rtol=1e-12, atol=0)
    assert (out["list"] != 0).all()


def test_reiterable_data_is_restarted_and_iterator_that_runs_out_raises():
    batches = [(X, Y)] * 2
    result = bilevel.unroll(
        ridge_inner,
        zeros_params(),
        {"lr": 0.05, "l2": 0.1},
        bilevel.optim.sgd(),
        5,
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=20),
    )
    assert result.losses.shape == (5,)
    with pytest.raises(ValueError, match="ran out of batches at step 2"):
        bilevel.unroll(
            ridge_inner,
            zeros_params(),
            {"lr": 0.05, "l2": 0.1},
            bilevel.optim.sgd(),
            5,
            iter(batches),
        )


def test_batchnorm_buffers_update_and_callers_untouched():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 2)
    ).to(DT)
    x = torch.randn(16, 4, dtype=DT)
    y = torch.randn(16, 2, dtype=DT)
    buffers = {k: v for k, v in model.named_buffers()}
    before = {k: v.clone() for k, v in buffers.items()}

    def inner(params, hparams, batch, buffers):
        out = functional_call(model, {**params, **buffers}, (batch[0],))
        return ((out - batch[1]) ** 2).mean()

    grads = {}
    for mode in ["reverse", "checkpoint", "forward"]:
        lr = torch.tensor(0.1, dtype=DT, requires_grad=True)
        params = {k: v.detach() for k, v in model.named_parameters()}
        result = bilevel.unroll(
            inner, params, {"lr": lr}, bilevel.optim.sgd(), 5, (x, y), mode, buffers=buffers
        )
        inner(
            result.params, {}, (x, y), {k: v.clone() for k, v in result.buffers.items()}
        ).backward()
        grads[mode] = lr.grad
        assert int(result.buffers["1.num_batches_tracked"]) == 5
        assert not torch.allclose(result.buffers["1.running_mean"], before["1.running_mean"])
        for k in before:
            assert torch.equal(buffers[k], before[k]), f"caller's buffer {k} was modified"
    torch.testing.assert_close(grads["checkpoint"], grads["reverse"], rtol=1e-10, atol=0)
    torch.testing.assert_close(grads["forward"], grads["reverse"], rtol=1e-10, atol=0)


def test_forward_mode_memory_is_independent_of_steps():
    """Forward mode saves only the final tangents for the backward pass, whatever T."""

    X, Y, XV, YV = regression_problem(n=30, p=400)  # parameters dominate the saved bytes

    def val_loss(params):
        return ((XV @ params["w"] + params["b"] - YV) ** 2).mean()

    def saved_bytes(steps, mode):
        seen, total = set(), [0]

        def pack(t):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total[0] += t.untyped_storage().nbytes()
            return t

        lr = torch.tensor(0.05, dtype=DT, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = bilevel.unroll(
                ridge_inner,
                zeros_params(400),
                {"lr": lr, "l2": 0.1},
                bilevel.optim.sgd(momentum=0.9),
                steps,
                (X, Y),
                mode,
            )
        val_loss(result.params).backward()
        return total[0]

    assert saved_bytes(40, "forward") == saved_bytes(5, "forward")
    assert saved_bytes(40, "reverse") > 2 * saved_bytes(5, "reverse")
    # checkpoint keeps the segment boundaries: ~sqrt(T) of them
    assert saved_bytes(100, "checkpoint") < saved_bytes(100, "reverse") / 4


def test_optimizer_settings_tensors_are_hyperparameters_in_every_mode():
    out = {}
    for mode in ["reverse", "checkpoint", "forward"]:
        mom = torch.tensor(0.5, dtype=DT, requires_grad=True)
        result = bilevel.unroll(
            ridge_inner,
            zeros_params(),
            {"lr": 0.05, "l2": 0.1},
            bilevel.optim.sgd(momentum=mom),
            10,
            (X, Y),
            mode,
        )
        val_loss(result.params).backward()
        out[mode] = mom.grad
    torch.testing.assert_close(out["checkpoint"], out["reverse"], rtol=1e-10, atol=0)
    torch.testing.assert_close(out["forward"], out["reverse"], rtol=1e-10, atol=0)


def test_no_grad_runs_plain_optimization():
    with torch.no_grad():
        result = bilevel.unroll(
            ridge_inner, zeros_params(), {"lr": 0.05, "l2": 0.1}, bilevel.optim.sgd(), 30, (X, Y)
        )
    assert result.params["w"].grad_fn is None
    assert result.losses[-1] < result.losses[0]


# -- bad input -------------------------------------------------------------------------------


def run(**overrides):
    kwargs = dict(
        inner_loss=ridge_inner,
        params=zeros_params(),
        hparams={"lr": 0.1, "l2": 0.1},
        optimizer=bilevel.optim.sgd(),
        steps=3,
        data=(X, Y),
    )
    kwargs.update(overrides)
    return bilevel.unroll(**kwargs)


def test_non_scalar_inner_loss():
    with pytest.raises(ValueError, match=r"0-d tensor.*step 0.*\(40,\)"):
        run(inner_loss=lambda p, h, b: (b[0] @ p["w"] - b[1]) ** 2)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="steps must be a positive int"):
        run(steps=steps)


def test_unknown_mode_and_truncate():
    with pytest.raises(ValueError, match="mode must be one of"):
        run(mode="backward")
    with pytest.raises(ValueError, match="truncate=K"):
        run(mode="truncated")
    with pytest.raises(ValueError, match="truncate is only used"):
        run(truncate=2)
    with pytest.raises(ValueError, match="segments must be an int"):
        run(mode="checkpoint", segments=10)


def test_params_grads_key_mismatch():
    opt = bilevel.optim.sgd(lr=0.1)
    with pytest.raises(ValueError, match="same keys"):
        opt.step({"a": torch.zeros(1)}, {"b": torch.zeros(1)}, opt.init({"a": torch.zeros(1)}))


def test_short_schedule_and_wrong_dtype_and_device():
    with pytest.raises(ValueError, match="schedule of length 2 but 3 steps"):
        run(hparams={"lr": torch.tensor([0.1, 0.1], dtype=DT), "l2": 0.1})
    with pytest.raises(ValueError, match="dtype torch.float32"):
        run(hparams={"lr": torch.tensor(0.1), "l2": 0.1})
    with pytest.raises(ValueError, match="is on meta"):
        run(hparams={"lr": torch.tensor(0.1, dtype=DT, device="meta"), "l2": 0.1})


def test_forward_mode_needs_a_differentiable_hyperparameter():
    # the same warning as every mode (tests/test_unroll_faults.py), and a constant result
    with pytest.warns(UserWarning, match="requires grad"):
        run(mode="forward")


def test_bad_types():
    with pytest.raises(TypeError, match="inner_loss must be callable"):
        run(inner_loss=3)
    with pytest.raises(TypeError, match="params must be a non-empty dict"):
        run(params=[torch.zeros(2)])
    with pytest.raises(TypeError, match="optimizer must be a bilevel.optim"):
        run(optimizer=torch.optim.SGD)
    with pytest.raises(ValueError, match="data is a sequence of 2 batches but steps=3"):
        run(data=[(X, Y)] * 2)


@pytest.mark.parametrize("mode", ["reverse", "checkpoint", "forward"])
def test_non_finite_loss_names_the_step(mode):
    lr = torch.tensor(10.0, dtype=DT, requires_grad=True)  # diverges

    def inner(params, hparams):
        return (params["w"] ** 4).sum()

    kwargs = dict(
        inner_loss=inner,
        params={"w": torch.ones(2, dtype=DT)},
        hparams={"lr": lr},
        optimizer=bilevel.optim.sgd(),
        steps=12,
        mode=mode,
    )
    with pytest.raises(NonFiniteLossError, match=r"at step \d+") as info:
        bilevel.unroll(**kwargs)
    step = int(str(info.value).split("at step ")[1].split(";")[0])
    w = torch.tensor(1.0, dtype=DT)
    first_bad = next(t for t in range(12) if not torch.isfinite(2 * (w := w - 40.0 * w**3) ** 4))
    assert step == first_bad + 1
    result = bilevel.unroll(**kwargs, check_finite=False)
    assert not torch.isfinite(result.losses).all()


@pytest.mark.parametrize("mode", ["reverse", "first_order"])
def test_unroll_under_vmap_over_tasks_equals_a_loop(mode):
    """MAML with tasks batched by torch.func.vmap: the same meta-gradient as one task at a time."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    model = model.to(DT)
    g = torch.Generator().manual_seed(1)
    xs = 10 * torch.rand(6, 20, 1, generator=g, dtype=DT) - 5
    ys = torch.rand(6, 1, 1, generator=g, dtype=DT) * 4 * torch.sin(xs)

    def inner(params, hparams, batch):
        x, y = batch
        return ((functional_call(model, params, (x[:10],)) - y[:10]) ** 2).mean()

    def task_loss(meta, x, y):
        result = bilevel.unroll(inner, meta, {"lr": 0.05}, bilevel.optim.sgd(), 3, (x, y), mode)
        return ((functional_call(model, result.params, (x[10:],)) - y[10:]) ** 2).mean()

    meta = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    torch.func.vmap(task_loss, in_dims=(None, 0, 0))(meta, xs, ys).mean().backward()
    batched = torch.cat([v.grad.flatten() for v in meta.values()])

    meta2 = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    torch.stack([task_loss(meta2, x, y) for x, y in zip(xs, ys)]).mean().backward()
    looped = torch.cat([v.grad.flatten() for v in meta2.values()])
    assert looped.abs().max() > 1e-6
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-13)

    with pytest.raises(ValueError, match="cannot run inside torch.func"):
        torch.func.vmap(
            lambda x: bilevel.unroll(
                inner, meta, {"lr": 0.05}, bilevel.optim.sgd(), 2, (x, x), "checkpoint"
            ).params["0.bias"]
        )(xs)

"""No hidden host synchronisation: the syncs of one hypergradient are the documented ones.

Documented (README "Running on a GPU"): an unroll synchronises once per finiteness check of
its inner losses (``check_finite=True``: once, at the end; none in the backward pass); an
iterative linear solve in an implicit backward once per ``check_every`` iterations (the
convergence read) plus once at the end (the info record). On CUDA the counts come from
``torch.cuda.set_sync_debug_mode("warn")``; on the CPU from the host reads of tensor values,
the syncs they would be on a GPU (:mod:`bilevel._sync`).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel
from bilevel import _sync, linalg
from bilevel._sync import count_syncs

D = torch.float64
T = 100
ITERATIONS = 100
CHECK_EVERY = 10


@pytest.mark.device
@pytest.mark.parametrize(
    ("mode", "settings"),
    [
        ("reverse", {}),
        ("truncated", {"truncate": 10}),
        ("checkpoint", {}),
        ("forward", {}),
        ("first_order", {}),
    ],
)
def test_unroll_hypergradient_syncs_only_for_the_finiteness_check(
    device, mode, settings, record_property
):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 8, generator=g, dtype=D).to(device)
    y = torch.randn(64, generator=g, dtype=D).to(device)
    lr = torch.tensor(0.02, dtype=D, device=device, requires_grad=True)
    l2 = torch.tensor(0.01, dtype=D, device=device, requires_grad=True)
    w0 = torch.zeros(8, dtype=D, device=device, requires_grad=mode == "first_order")

    def inner(params, hparams, batch):
        x, t = batch
        return ((x @ params["w"] - t) ** 2).mean() + hparams["l2"] * (params["w"] ** 2).sum()

    def hypergradient():
        result = bilevel.unroll(
            inner,
            {"w": w0},
            {"lr": lr, "l2": l2},
            bilevel.optim.sgd(momentum=0.9),
            T,
            (X, y),
            mode,
            **settings,
        )
        wrt = [w0] if mode == "first_order" else [lr, l2]
        return torch.autograd.grad((result.params["w"] ** 2).sum(), wrt)

    hypergradient()  # warm-up: first calls may initialise libraries
    with count_syncs(device) as syncs:
        grads = hypergradient()
    record_property("syncs", syncs.count)  # into the junit XML that .ci/gpu keeps
    record_property("sync_sites", dict(syncs.sites))
    assert all(torch.isfinite(g_).all() for g_ in grads)
    # the documented ones: the range check of the tensor hyperparameters before the first
    # step, and the end-of-unroll finiteness check
    assert syncs.count == 2, f"{mode}: expected the range check and the end check, got {syncs}"


@pytest.mark.device
@pytest.mark.parametrize("solver_name", ["cg", "minres", "gmres", "neumann"])
def test_implicit_backward_syncs_once_per_check_plus_the_info_record(
    device, solver_name, record_property
):
    # An ill-conditioned quadratic, so no solver converges in ITERATIONS iterations.
    n = 200
    eigenvalues = torch.logspace(0, 6, n, dtype=D, device=device)
    b = torch.ones(n, dtype=D, device=device)
    shift = torch.zeros(n, dtype=D, device=device, requires_grad=True)
    options = dict(tol=0.0, maxiter=ITERATIONS, check_every=CHECK_EVERY)
    linear_solver = {
        "cg": lambda: linalg.cg(**options),
        "minres": lambda: linalg.minres(**options),
        "gmres": lambda: linalg.gmres(restart=20, **options),
        "neumann": lambda: linalg.neumann(alpha=1.0 / 1e6, **options),
    }[solver_name]()

    def loss(w, h):
        return 0.5 * (eigenvalues * w**2).sum() - ((b + h) * w).sum()

    w = bilevel.argmin(loss, (b / eigenvalues).detach(), shift, linear_solver=linear_solver)
    outer = w.sum()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*did not converge")
        with count_syncs(device) as syncs:
            (grad,) = torch.autograd.grad(outer, shift)
    record_property("syncs", syncs.count)
    record_property("sync_sites", dict(syncs.sites))
    info = linear_solver.last_info
    assert info is not None and info.iterations == ITERATIONS and not info.converged
    assert torch.isfinite(grad).all()
    checks = (ITERATIONS - 1) // CHECK_EVERY  # at 10, 20, ..., 90; the 100th is the end
    assert syncs.count == checks + 1, f"{solver_name}: expected {checks} + 1, got {syncs}"


# --------------------------------------------------------------------------- the counter itself


def test_cpu_counter_sees_host_reads_in_forward_and_backward():
    class ReadsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, grad):
            grad.tolist()  # a host read inside backward (the autograd engine runs it)
            return grad * 2

    x = torch.arange(4.0, requires_grad=True)
    with count_syncs("cpu") as syncs:
        y = ReadsInBackward.apply(x)
        y.sum().item()
        bool(y[0] > 0)
        torch.nonzero(y)
        y.detach().nonzero()
        y.sum().backward()
        _ = y * 3  # device work: not a sync
    assert syncs.kind == "host_reads"
    assert syncs.count == 5
    assert dict(syncs.sites) == {"item": 1, "__bool__": 1, "nonzero": 2, "tolist": 1}
    # the patches are gone afterwards
    with count_syncs("cpu") as after:
        pass
    y.sum().item()
    assert after.count == 0 and torch.Tensor.item.__name__ == "item"


def test_cpu_counter_restores_methods_when_the_block_raises():
    original = torch.Tensor.tolist
    with pytest.raises(RuntimeError, match="boom"), count_syncs("cpu"):
        raise RuntimeError("boom")
    assert torch.Tensor.tolist is original


def test_cuda_counter_counts_sync_warnings_and_passes_others_on(monkeypatch):
    """The CUDA path with torch.cuda's sync debug functions stood in for (no GPU here)."""
    modes = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    with pytest.warns(UserWarning, match="unrelated"):
        with count_syncs("cuda") as syncs:
            for _ in range(3):
                warnings.warn(
                    f"{_sync.CUDA_SYNC_MESSAGE} (Triggered internally)", UserWarning, stacklevel=1
                )
            warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
    assert syncs.kind == "cuda" and syncs.count == 3
    assert modes == ["warn", 0], "sync debug mode is set, then restored"


def test_counter_rejects_other_devices():
    with pytest.raises(ValueError, match="cpu and cuda"), count_syncs("meta"):
        pass

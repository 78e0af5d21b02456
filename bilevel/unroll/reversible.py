"""``mode="reversible"`` (Maclaurin, Duvenaud and Adams 2015): exact hypergradients of SGD
with momentum in memory that does not hold the trajectory.

The forward pass runs SGD with momentum on fixed-point weights and velocities
(``bilevel.unroll.fixed_point_arithmetic``), pushing what each multiplication by the momentum
``n/d`` discards onto a bit buffer (``bilevel.unroll.bitbuffer``): about
``log2(1/momentum)`` bits per weight per step (0.152 at 0.9). The backward pass walks the
trajectory back exactly, and at each step recomputes the inner gradient at the recovered
weights and back-propagates through the step (a vector-Jacobian product of the float
update, whose Hessian-vector product autograd gives), accumulating the gradients of the
hyperparameters, of the initial weights, and of per-step schedules. The result is the
hypergradient of the ideal (float) dynamics along the quantised trajectory: the same
numbers as back-propagation through that trajectory stored in full.

Synchronisations: the momentum when given as a tensor is read once before the loop; the
range check and the buffer's size once at the end of the forward pass; the exactness
check (the recovered initial weights, velocities and buffer) once at the end of backward.

``bilevel.unroll(..., mode="reversible")`` is the way in; what it stored is reported in
``result.reversible``, a :class:`bilevel.ReversibleReport`. The README's "Reversible
learning" section has the design, the options and measurements.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from bilevel.optim.base import HParams, Optimizer, State
from bilevel.optim.sgd import SGD
from bilevel.unroll.explicit import Explicit
from bilevel.unroll.fixed_point_arithmetic import FixedPoint, Layout, QuantisedSGD
from bilevel.unroll.loop import Run
from bilevel.unroll.result import UnrollResult
from bilevel.unroll.reversal import Plan, Record, ReversibleUnroll, outputs, start, trace
from bilevel.unroll.step import Carry, call_loss, check_loss, suspended_saved_tensors_hooks

__all__ = ["DEFAULT_RADIX_BITS", "MAX_DENOMINATOR", "float_momentum", "momentum_ratio"]

DEFAULT_RADIX_BITS = 44  # the fixed-point grid 2**-44; values below 2**18
MAX_DENOMINATOR = 2**15  # the momentum's denominator, at most


def check_options(mode: str, radix_bits: Any, momentum_denominator: Any) -> None:
    """``radix_bits`` and ``momentum_denominator`` belong to ``mode="reversible"``."""
    for name, value in (("radix_bits", radix_bits), ("momentum_denominator", momentum_denominator)):
        if value is not None and mode != "reversible":
            raise ValueError(f"{name} is only used with mode='reversible' (mode={mode!r})")
    if radix_bits is not None and (
        isinstance(radix_bits, bool) or not isinstance(radix_bits, int) or not 8 <= radix_bits <= 56
    ):
        raise ValueError(f"radix_bits must be an int in [8, 56], got {radix_bits!r}")
    if momentum_denominator is not None and (
        isinstance(momentum_denominator, bool)
        or not isinstance(momentum_denominator, int)
        or not 1 <= momentum_denominator <= MAX_DENOMINATOR
    ):
        raise ValueError(
            f"momentum_denominator must be an int in [1, {MAX_DENOMINATOR}], got "
            f"{momentum_denominator!r}"
        )


def momentum_ratio(optimizer: Optimizer, hparams: HParams, denominator: int | None) -> Fraction:
    """The momentum as a ratio of integers, or a named error.

    Example:
        >>> import bilevel
        >>> momentum_ratio(bilevel.optim.sgd(momentum=0.98), {}, None)
        Fraction(49, 50)
        >>> momentum_ratio(bilevel.optim.sgd(momentum=0.9137), {}, 100)
        Fraction(91, 100)
    """
    value = optimizer.raw("momentum", hparams)
    tolerance = 4 * 2.0**-53
    if isinstance(value, Tensor) and value.ndim == 0 and value.is_floating_point():
        tolerance = 4 * torch.finfo(value.dtype).eps
        value = float(value.detach())  # one documented synchronisation, before the loop
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)):
        raise ValueError(
            "mode='reversible' needs one momentum for every step and parameter: a number, a "
            f"fractions.Fraction or a 0-d tensor; got {type(value).__name__}"
        )
    if denominator is not None:
        ratio = Fraction(round(Fraction(value) * denominator), denominator)
    elif isinstance(value, Fraction):
        ratio = value
    else:
        ratio = Fraction(value).limit_denominator(MAX_DENOMINATOR)
        if abs(float(ratio) - value) > tolerance * abs(value):
            raise ValueError(
                f"mode='reversible' multiplies by the momentum as a ratio of integers, and "
                f"momentum={value!r} is none with a denominator <= {MAX_DENOMINATOR}; pass "
                "momentum_denominator=d to use round(momentum·d)/d, or a fractions.Fraction"
            )
    if not 0 < ratio <= 1 or ratio.denominator > MAX_DENOMINATOR:
        raise ValueError(
            f"mode='reversible' needs a momentum in (0, 1] with a denominator <= "
            f"{MAX_DENOMINATOR}, got {ratio} (a momentum of 0 cannot be reversed: plain "
            "SGD forgets the weights it steps from)"
        )
    return ratio


def float_momentum(optimizer: Optimizer, hparams: HParams) -> tuple[Optimizer, HParams]:
    """A ``fractions.Fraction`` momentum as the float nearest to it, for the float paths
    (the first-step checks, the backward pass's float step); :func:`momentum_ratio` gets
    the same ratio back from that float (no other ratio with a denominator up to 2**15
    is as close).

    Example:
        >>> import bilevel
        >>> opt, _ = float_momentum(bilevel.optim.sgd(momentum=Fraction(1, 7)), {})
        >>> opt.settings["momentum"] == 1 / 7, momentum_ratio(opt, {}, None)
        (True, Fraction(1, 7))
    """
    if isinstance(optimizer.settings.get("momentum"), Fraction):
        optimizer = optimizer.replace(momentum=float(optimizer.settings["momentum"]))
    if optimizer.settings.get("momentum") is None and isinstance(hparams.get("momentum"), Fraction):
        hparams = {**hparams, "momentum": float(hparams["momentum"])}
    return optimizer, hparams


def check_supported(optimizer: Any, hparams: HParams, buffers: Any, state: State | None) -> None:
    """SGD with momentum, no nesterov, no buffers, a constant state: or a named error."""
    if type(optimizer) is not SGD:
        raise ValueError(
            "mode='reversible' reverses SGD with momentum only (bilevel.optim.sgd(momentum=...)), "
            f"got {type(optimizer).__name__}; use mode='checkpoint' for other optimizers"
        )
    if optimizer.flag("nesterov", hparams):
        raise ValueError(
            "mode='reversible' cannot reverse nesterov=True (its step reads the gradient at "
            "the weights it replaces); pass nesterov=False or use mode='checkpoint'"
        )
    if buffers is not None:
        raise ValueError(
            "mode='reversible' cannot reverse buffers (BatchNorm statistics are not "
            "invertible); use mode='checkpoint'"
        )
    momentum = (state or {}).get("momentum_buffer") or {}
    if any(isinstance(v, Tensor) and v.requires_grad for v in momentum.values()):
        raise ValueError(
            "mode='reversible' treats the initial state as a constant, but its momentum "
            "buffer requires grad; pass it detached"
        )


def run_reversible(
    run: Run, carry: Carry, momentum: Fraction, radix_bits: int | None, stores_batches: bool
) -> UnrollResult:
    """The reversible unroll (see the module docstring) with the momentum ``momentum``
    (from :func:`momentum_ratio`); without grad mode, or with nothing requiring grad, only
    its forward pass (the same fixed-point trajectory)."""
    optimizer, hparams = run.inner.optimizer, run.inner.hparams
    params = dict(carry.params)

    def gradient(weights: dict[str, Tensor], batch: Any, step: int) -> tuple[Tensor, dict]:
        # the step's graph is freed at once: no memory the caller's saved-tensor hooks see
        with torch.enable_grad(), suspended_saved_tensors_hooks():
            live = {k: w.detach().requires_grad_() for k, w in weights.items()}
            loss = call_loss(run.inner.inner_loss, live, hparams, batch, None)
            check_loss(loss, step)
            grads = torch.autograd.grad(loss, list(live.values()), allow_unused=True)
        return loss.detach(), dict(zip(live, grads))

    sgd = QuantisedSGD(
        optimizer,
        hparams,
        momentum,
        FixedPoint(DEFAULT_RADIX_BITS if radix_bits is None else radix_bits),
        gradient,
        Layout.of(params),
    )
    explicit = Explicit.of(hparams, optimizer)
    plan = Plan(run, sgd, explicit, list(params), carry.state, stores_batches)
    record = Record(start(plan, params))
    inputs = [*params.values(), *explicit.hyper]
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        out = ReversibleUnroll.apply(plan, record, *inputs)
    else:
        with torch.no_grad():
            trace(plan, record)
        out = outputs(plan, record.trajectory)
    n_p = len(plan.names)
    final = dict(zip(plan.names, out[:n_p]))
    state = {
        "step": carry.state["step"] + run.steps,
        "param_steps": dict(record.trajectory.counts),
        "momentum_buffer": dict(zip(plan.names, out[n_p:])),
    }
    run.checker(record.losses, run.steps, final=True, params=final)
    return UnrollResult(final, state, torch.stack(record.losses), reversible=record.report)

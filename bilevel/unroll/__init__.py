"""The unrolled engine: run T differentiable optimizer steps, get hypergradients by autograd.

One function, :func:`unroll`, and five ways to differentiate through it (``mode``):

``"reverse"``      back-propagation through every step; exact; memory O(T·P).
``"truncated"``    only the last ``truncate`` steps are differentiated; biased; memory O(K·P).
``"checkpoint"``   exact; stores ``segments`` boundary states and recomputes each segment
                   in the backward pass; memory O((T/S + S)·P), O(sqrt(T)·P) by default.
``"forward"``      forward-mode (Franceschi et al. 2017): carries d params / d h along the loop
                   with Jacobian-vector products of the inner gradient (forward-over-reverse);
                   exact; memory O(P·H) whatever T; cost grows with the number H of
                   hyperparameter elements. Exposed as an ordinary autograd node. An op
                   without a working forward-mode formula (``huber_loss``, ``mse_loss``)
                   makes it warn once and take the products from reverse mode (double vjp,
                   about 2x the time per step, memory still flat in T).
``"first_order"``  the inner gradients are constants (first-order MAML); cheap and biased.
``"auto"``         with ``memory_budget=`` bytes: the fastest of reverse, checkpoint and
                   forward whose memory, estimated from two measured steps, fits.
``"reversible"``   SGD with momentum only (Maclaurin et al. 2015): weights and velocities
                   in exact fixed-point arithmetic, the bits each multiplication by the
                   momentum discards kept in a compact buffer (about log2(1/momentum) bits
                   per weight per step), the trajectory retraced exactly backwards; exact
                   along the quantised trajectory; memory O(P) plus that buffer.

Whatever the mode, the result's ``params`` are attached to the autograd graph, so
``outer_loss.backward()`` fills ``.grad`` on the hyperparameter leaves.

The package, one module per concept: :mod:`~bilevel.unroll.step` (one inner step and what
it carries), :mod:`~bilevel.unroll.loop` (the reverse-type modes),
:mod:`~bilevel.unroll.checkpoint`, :mod:`~bilevel.unroll.forward`,
:mod:`~bilevel.unroll.explicit` (hyperparameters as explicit inputs, shared by the last two),
:mod:`~bilevel.unroll.data` (batch sources), :mod:`~bilevel.unroll.validation`,
:mod:`~bilevel.unroll.finite` (the NaN/Inf check) and :mod:`~bilevel.unroll.result`.
``bilevel.unroll`` (the attribute) is the function :func:`unroll`, as before the package
existed; import the modules with ``from bilevel.unroll.forward import ...``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bilevel.optim.base import HParams, Optimizer, State
from bilevel.unroll.auto import choose
from bilevel.unroll.checkpoint import run_checkpoint
from bilevel.unroll.data import batch_source
from bilevel.unroll.finite import FiniteChecker
from bilevel.unroll.forward import forward_mode
from bilevel.unroll.loop import Run, run_autograd
from bilevel.unroll.preflight import (
    FirstStep,
    check_first_step,
    first_batch_cached,
    warn_if_graph_will_not_fit,
)
from bilevel.unroll.ranges import tensor_range_check
from bilevel.unroll.result import NonFiniteLossError, ReversibleReport, UnrollResult
from bilevel.unroll.reversible import (
    check_options,
    check_supported,
    float_momentum,
    momentum_ratio,
    run_reversible,
)
from bilevel.unroll.step import Carry, InnerLoss, InnerStep, call_loss, in_functorch_transform
from bilevel.unroll.validation import (
    MODES,
    validate_mode,
    validate_placement,
    validate_problem,
)

__all__ = ["MODES", "NonFiniteLossError", "ReversibleReport", "UnrollResult", "unroll"]


def unroll(
    inner_loss: InnerLoss,
    params: Mapping[str, Tensor],
    hparams: HParams,
    optimizer: Optimizer,
    steps: int,
    data: Any = None,
    mode: str = "reverse",
    *,
    truncate: int | None = None,
    segments: int | None = None,
    buffers: Mapping[str, Tensor] | None = None,
    state: State | None = None,
    check_finite: bool | int = True,
    vectorize: bool | None = None,
    memory_budget: int | None = None,
    compiled: bool = False,
    check_hparams: bool = True,
    radix_bits: int | None = None,
    momentum_denominator: int | None = None,
) -> UnrollResult:
    """Run ``steps`` optimizer steps on ``inner_loss``; the result is differentiable w.r.t.
    the hyperparameters.

    Args:
        inner_loss: ``inner_loss(params, hparams, batch) -> 0-d tensor``, or
            ``inner_loss(params, hparams)`` when ``data`` is None. With ``buffers``, it is also
            given ``buffers=`` (a fresh copy it may update in place, as ``functional_call``
            does for BatchNorm).
        params: the initial parameters, a dict of tensors (``dict(model.named_parameters())``).
            If they require grad, gradients flow to them too (MAML) in the ``"reverse"``,
            ``"checkpoint"`` and ``"first_order"`` modes; ``"truncated"`` and ``"forward"``
            treat them as constants. A parameter the inner loss does not use at a step (no
            gradient) is left as it is and its optimizer state does not advance, as
            ``torch.optim`` does, in every mode and under ``vmap``.
        hparams: a dict of hyperparameters: read by the optimizer by name (settings the
            optimizer was not given) and passed to ``inner_loss``. Any tensor in it that
            requires grad receives a hypergradient.
        optimizer: a :mod:`bilevel.optim` optimizer.
        steps: the number of inner steps T > 0.
        data: None, a fixed batch (tensor, tuple or dict), a sequence of at least T batches,
            an iterable of batches (restarted when exhausted if re-iterable), or a function
            ``step -> batch``.
        mode: ``"reverse"``, ``"truncated"``, ``"checkpoint"``, ``"forward"``,
            ``"first_order"``, ``"auto"`` or ``"reversible"`` (see the module docstring).
        truncate: with ``mode="truncated"``, the number K of last steps differentiated.
        segments: with ``mode="checkpoint"``, the number of segments (default ceil(sqrt(T))).
        buffers: non-differentiable state of the model (BatchNorm statistics), carried across
            steps; the caller's tensors are never modified.
        state: an optimizer state to start from (default ``optimizer.init(params)``).
        check_finite: check that the inner losses are finite (True: once at the end; an int N:
            every N steps; False: never). Each check synchronises with the device; skipped
            under ``torch.func.vmap``, where ``unroll`` (modes reverse, truncated, first_order)
            takes its inner gradients with ``torch.func.grad`` so tasks can be batched.
        memory_budget: with ``mode="auto"``, the bytes autograd may save for the backward
            pass: the fastest of ``"reverse"``, ``"checkpoint"`` (with the segment count that
            fits) and ``"forward"`` whose estimate, from two measured trial steps, fits is
            run; ``result.auto`` reports the choice (see :mod:`bilevel.unroll.auto`).
        compiled: in ``"forward"`` mode, compute each step's inner gradient and its
            tangent (one direction per call) with ``torch.compile`` (inductor), the
            optimizer's update eagerly on dual tensors: the same numbers, faster steps after
            a warm-up of tens of seconds (see the README); models without buffers. The
            parameters the inner loss uses are found at the first step (a loss that
            leaves a parameter out at later steps only must run uncompiled).
        vectorize: in ``"forward"`` mode, batch the H tangent directions with ``vmap`` (True),
            or loop over them with core forward-mode AD (False: also for inner losses that
            ``vmap`` cannot batch). Default: batch when H > 2.
        radix_bits: with ``mode="reversible"``, the fixed-point grid ``2**-radix_bits`` of
            the weights and velocities (default 44: values up to ``2**18``); see
            :mod:`bilevel.unroll.reversible`.
        momentum_denominator: with ``mode="reversible"``, multiply by the momentum rounded
            to ``round(momentum·d)/d``; by default the momentum must be a ratio of integers
            with a denominator up to 2**15 (0.9 is 9/10), or a ``fractions.Fraction``.
        check_hparams: raise when an ``hparams`` key is read by neither the optimizer nor
            ``inner_loss`` during the first step (a misspelling; the error names the closest
            known name). Turn it off for keys that are read only at later steps.

    Before the loop, the first step is run once eagerly (outside ``torch.func`` transforms,
    random state restored) to give the same error in every mode for: an unread ``hparams``
    key, a complex inner loss, an inner loss that does not depend on ``params``, and, in
    ``"forward"`` and ``"checkpoint"`` modes, a tensor requiring grad that ``inner_loss`` or
    a schedule function captures instead of reading it from ``hparams``. When nothing
    requires grad it warns (and runs without a graph). In ``"reverse"`` and ``"truncated"``
    modes it warns when the bytes the first step saved for backward, times the steps kept,
    exceed half of the available memory. With ``check_finite`` on, tensor hyperparameters
    are range-checked (queued at the start and read with the first finiteness check, so no
    synchronisation of its own; the range error comes before the NaN it would cause), the
    final params are checked with the losses, and ``"checkpoint"`` mode raises if data or a captured tensor was
    modified in place between the forward pass and ``backward()``.

    Returns:
        An :class:`UnrollResult` with ``params``, ``state``, ``losses`` and ``buffers``
        (and ``reversible``, what the bit buffer held, in that mode).

    Example:
        >>> import torch, bilevel
        >>> log_lr = torch.tensor(-2.0, requires_grad=True)
        >>> def inner_loss(params, hparams):
        ...     return ((params["w"] - 3.0) ** 2).sum()
        >>> result = bilevel.unroll(inner_loss, {"w": torch.zeros(2)}, {"lr": log_lr.exp()},
        ...                         bilevel.optim.sgd(), steps=10, mode="forward")
        >>> outer_loss = ((result.params["w"] - 3.0) ** 2).sum()
        >>> outer_loss.backward()
        >>> bool(log_lr.grad < 0)  # a larger learning rate gets closer to 3
        True
    """
    validate_problem(inner_loss, params, hparams, optimizer, steps)
    validate_mode(mode, steps, truncate, segments, memory_budget)
    validate_placement(params, hparams, buffers)
    check_options(mode, radix_bits, momentum_denominator)
    ratio = None  # the reversible mode's momentum as a ratio of integers
    if mode == "reversible":
        check_supported(optimizer, hparams, buffers, state)
        ratio = momentum_ratio(optimizer, hparams, momentum_denominator)  # before any step
        optimizer, hparams = float_momentum(optimizer, hparams)
    optimizer.validate(dict(params), hparams, steps)
    if compiled is not False and mode != "forward":
        raise ValueError(f"compiled=True is only used with mode='forward' (mode={mode!r})")
    if mode in ("checkpoint", "forward", "auto", "reversible") and in_functorch_transform():
        raise ValueError(
            f"mode={mode!r} cannot run inside torch.func transforms (vmap, grad); use "
            "mode='reverse', 'truncated' or 'first_order' there"
        )
    params = dict(params)
    checker = FiniteChecker(check_finite, steps)
    batch_at = batch_source(data, steps)
    if state is None:
        state = optimizer.init(params, hparams)
    own_buffers = None if buffers is None else {k: v.detach() for k, v in buffers.items()}
    persistent: tuple[Any, ...] = ()
    no_graph = False
    if not in_functorch_transform():  # under vmap: no graph to walk, no value to branch on
        ranges = tensor_range_check(optimizer, hparams)
        if ranges is not None and check_finite is not False and not bool(ranges.ok):
            # one documented synchronisation before any step: a negative lr or beta2 = 1.5
            # fails here, not as NaNs at the end of a long run
            ranges.raise_error()
        batch_at, first_batch = first_batch_cached(batch_at)
        first = FirstStep(
            inner_loss,
            params,
            hparams,
            optimizer,
            state,
            own_buffers,
            first_batch,
            mode,
            steps,
            truncate,
            call_loss,
            check_hparams,
        )
        report = check_first_step(first)
        if torch.is_grad_enabled() and not report.differentiable:
            warnings.warn(
                f"unroll(mode={mode!r}): nothing in this unroll requires grad (no tensor in "
                "hparams, in the optimizer's settings or in params does): the result is a "
                "constant and backward() through it fails; make a hyperparameter a tensor "
                "with requires_grad=True, or call unroll under torch.no_grad()",
                stacklevel=2,
            )
            no_graph = True
        if torch.is_grad_enabled():
            warn_if_graph_will_not_fit(report, first)
        persistent = tuple(report.persistent)
    run = Run(InnerStep(inner_loss, optimizer, hparams), steps, batch_at, checker, persistent)
    carry = Carry(params, state, own_buffers)
    with torch.no_grad() if no_graph else contextlib.nullcontext():
        if ratio is not None:  # reversible, with or without grad: the same trajectory
            return run_reversible(run, carry, ratio, radix_bits, _iterator_only(data))
        if torch.is_grad_enabled():
            if mode == "auto":
                assert memory_budget is not None
                choice, run = choose(run, carry, memory_budget)
                options = _ModeOptions(None, choice.segments, vectorize)
                result = _run_mode(run, carry, choice.mode, options)
                result.auto = choice
                return result
            options = _ModeOptions(truncate, segments, vectorize, compiled)
            return _run_mode(run, carry, mode, options)
        # without grad mode every mode is the same loop without graphs
        return run_autograd(
            run, carry, mode if mode in ("truncated", "first_order") else "reverse", truncate
        )


def _iterator_only(data: Any) -> bool:
    """Whether ``data`` can only be iterated once in order (its batches cannot be asked
    for again by step): the reversible mode then keeps them for its backward pass."""
    replayable = (Tensor, tuple, Mapping, Sequence)
    return data is not None and not isinstance(data, replayable) and not callable(data)


@dataclass(frozen=True)
class _ModeOptions:
    """The options that belong to one mode each."""

    truncate: int | None
    segments: int | None
    vectorize: bool | None
    compiled: bool = False


def _run_mode(run: Run, carry: Carry, mode: str, options: _ModeOptions) -> UnrollResult:
    if mode == "forward":
        return forward_mode(run, carry, options.vectorize, options.compiled)
    if mode == "checkpoint":
        return run_checkpoint(run, carry, options.segments)
    return run_autograd(run, carry, mode, options.truncate)

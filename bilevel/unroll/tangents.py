"""One inner step carrying tangents (the building block of ``mode="forward"``).

:func:`dual_step` pushes one direction with the core forward-mode AD (dual tensors through
``torch.autograd.grad``); :func:`compiled_tangent_step` pushes one direction with
``torch.func.jvp`` of the step, through ``torch.compile`` (``compiled=True``).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from bilevel.optim.base import Optimizer, Params
from bilevel.unroll.explicit import Explicit, join_state, split_state
from bilevel.unroll.loop import Run
from bilevel.unroll.step import Carry, call_loss, check_loss, used_inputs


@dataclass(frozen=True)
class ForwardInputs:
    """Everything the forward-mode Function needs besides the hyperparameter tensors."""

    run: Run
    start: Carry  # detached: the tangents, not autograd, carry the dependence on h
    explicit: Explicit
    vectorize: bool | None
    compiled: bool = False


@dataclass(frozen=True)
class Primal:
    """The point one dual step starts from."""

    params: Params
    s_tensors: list[Tensor]
    s_meta: tuple[Any, ...]
    hyper: tuple[Tensor, ...]
    buffers: dict[str, Tensor] | None


@dataclass(frozen=True)
class Tangent:
    """One tangent direction at that point: d params, d state tensors, d hyperparameters."""

    params: Params
    state: list[Tensor]
    hyper: list[Tensor]


def dual_step(
    fwd: ForwardInputs, primal: Primal, tangent: Tangent, batch: Any, step: int
) -> tuple[
    tuple[Params, list[Tensor], tuple[Any, ...]],
    tuple[Params, list[Tensor]],
    Tensor,
    dict[str, Tensor] | None,
]:
    """One inner step carrying one tangent direction with ``torch.autograd.forward_ad``:
    the inner gradient is a reverse pass over dual tensors (forward-over-reverse)."""
    # autograd.Function.forward switches forward-mode AD off; this loop needs it on
    with fwAD._set_fwd_grad_enabled(True), fwAD.dual_level():
        live = {
            k: fwAD.make_dual(v, tangent.params[k]).requires_grad_()
            for k, v in primal.params.items()
        }
        state = join_state(
            [fwAD.make_dual(x, t) for x, t in zip(primal.s_tensors, tangent.state)],
            *primal.s_meta,
        )
        hparams, optimizer = fwd.explicit.substitute(
            [fwAD.make_dual(h, t) for h, t in zip(primal.hyper, tangent.hyper)]
        )
        buffers = primal.buffers
        bufs = None if buffers is None else {k: v.clone() for k, v in buffers.items()}
        with torch.enable_grad():
            loss = call_loss(fwd.run.inner.inner_loss, live, hparams, batch, bufs)
            check_loss(loss, step)
            grads = torch.autograd.grad(loss, list(live.values()), allow_unused=True)
        grad_dict = dict(zip(live, grads))  # None: not used, left alone (torch.optim)
        with torch.no_grad():
            new_params, new_state = optimizer.step(live, grad_dict, state, hparams)
        new_s, *skeleton = split_state(new_state)
        p_out, p_out_t, s_out, s_out_t = {}, {}, [], []
        for k, v in new_params.items():
            primal_v, tangent_v = fwAD.unpack_dual(v)
            p_out[k] = primal_v
            p_out_t[k] = torch.zeros_like(primal_v) if tangent_v is None else tangent_v
        for x in new_s:
            primal_x, tangent_x = fwAD.unpack_dual(x)
            s_out.append(primal_x)
            s_out_t.append(torch.zeros_like(primal_x) if tangent_x is None else tangent_x)
        new_buffers = (
            None if bufs is None else {k: fwAD.unpack_dual(v).primal for k, v in bufs.items()}
        )
        primal_loss = fwAD.unpack_dual(loss).primal
    return (p_out, s_out, tuple(skeleton)), (p_out_t, s_out_t), primal_loss, new_buffers


def _per_tensor(optimizer: Optimizer) -> Optimizer:
    """The optimizer with its per-tensor kernels: the foreach kernels' dispatch check reads
    the functorch stack, which torch.compile cannot trace (a graph break per step)."""
    per_tensor = copy.copy(optimizer)
    per_tensor.foreach = False
    return per_tensor


def stripped_skeleton(idx: list[int], spec: Any, leaves: list[Any]) -> tuple[Any, ...]:
    """A state skeleton without its tensors (``join_state`` puts tensors at ``idx``)."""
    kept = set(idx)
    return idx, spec, [None if i in kept else x for i, x in enumerate(leaves)]


def _tangent_step(
    fwd: ForwardInputs,
    primal: Primal,
    tangent: Tangent,
    at: tuple[Any, int, tuple[Any, ...]],
    skeleton_out: list[Any],
) -> Any:
    """One step pushing one tangent direction (``torch.func.jvp`` of the step): the
    function ``compiled=True`` hands to ``torch.compile``. (Under ``vmap`` over directions
    inductor fails on functorch's wrapped tensors, so directions are looped over.)"""
    # the state's skeleton comes as a plain tuple of Python values (its tensors stripped),
    # not inside the frozen ``primal``: dynamo must guard on the step counter in it
    batch, step, s_meta = at

    def step_fn(p: Params, s_t: list[Tensor], h: list[Tensor]) -> Any:
        hp, opt = fwd.explicit.substitute(h)
        st = join_state(s_t, *s_meta)

        def loss_fn(q: Params) -> tuple[Tensor, Tensor]:
            loss = call_loss(fwd.run.inner.inner_loss, q, hp, batch, None)
            check_loss(loss, step)
            used.update(used_inputs(loss, q))
            return loss, loss

        used: set[str] = set()
        grads, loss = torch.func.grad(loss_fn, has_aux=True)(p)
        grads = {k: g if k in used else None for k, g in grads.items()}  # as torch.optim
        new_p, new_s = _per_tensor(opt).step(p, grads, st, hp)
        new_s_t, *skeleton = split_state(new_s)
        # the non-tensor skeleton leaves by a side channel, without the tensors (functorch
        # wrappers must not escape the transform, nor become outputs of a compiled graph)
        skeleton_out[:] = stripped_skeleton(*skeleton)
        return (new_p, new_s_t), loss

    return torch.func.jvp(  # type: ignore[misc]
        step_fn,
        (primal.params, primal.s_tensors, list(primal.hyper)),
        (tangent.params, tangent.state, tangent.hyper),
        has_aux=True,
    )


@functools.cache
def _compiled() -> Any:
    # built on first use (importing dynamo costs seconds), then shared by every call:
    # dynamo caches compiled graphs by code object and guards; see the README for the
    # warm-up cost and when it pays
    # backend "aot_eager": AOTAutograd's traced graph run by eager kernels. Inductor
    # (the default backend) gave wrong tangents from the second step on (torch 2.13, CPU;
    # aot_eager and eager agree with the uncompiled loop to rounding), so it is not used.
    return torch.compile(_tangent_step, backend="aot_eager")


def compiled_tangent_step(
    fwd: ForwardInputs,
    primal: Primal,
    tangent: Tangent,
    at: tuple[Any, int, tuple[Any, ...]],
    skeleton: list,
) -> Any:
    return _compiled()(fwd, primal, tangent, at, skeleton)

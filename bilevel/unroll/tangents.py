"""One inner step carrying tangents (the building block of ``mode="forward"``).

:func:`dual_step` pushes one direction with the core forward-mode AD (dual tensors through
``torch.autograd.grad``); :func:`compiled_tangent_step` pushes one direction with
``torch.func.jvp`` of the inner gradient through ``torch.compile`` (``compiled=True``), then
the optimizer's update on dual tensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from bilevel._tree import tree_unflatten
from bilevel.optim.base import Optimizer, Params
from bilevel.optim.sgd import SGD
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
        ref = next(iter(primal.params.values()))
        optimizer, hparams = _dual_constants(optimizer, hparams, ref)
        buffers = primal.buffers
        bufs = None if buffers is None else {k: v.clone() for k, v in buffers.items()}
        with torch.enable_grad():
            loss = call_loss(fwd.run.inner.inner_loss, live, hparams, batch, bufs)
            check_loss(loss, step)
            # the seed as a dual with a zero tangent: see _dual_constants
            seed = fwAD.make_dual(torch.ones_like(loss), torch.zeros_like(loss))
            grads = torch.autograd.grad(loss, list(live.values()), seed, allow_unused=True)
        grad_dict = dict(zip(live, grads))  # None: not used, left alone (torch.optim)
        with torch.no_grad():
            new_params, new_state = optimizer.step(live, grad_dict, state, hparams)
        new_s, *skeleton = split_state(new_state)
        p_out, p_out_t, s_out, s_out_t = _unpack(new_params, new_s)
        new_buffers = (
            None if bufs is None else {k: fwAD.unpack_dual(v).primal for k, v in bufs.items()}
        )
        primal_loss = fwAD.unpack_dual(loss).primal
    return (p_out, s_out, tuple(skeleton)), (p_out_t, s_out_t), primal_loss, new_buffers


def _unpack(
    params: Params, s_tensors: list[Tensor]
) -> tuple[Params, Params, list[Tensor], list[Tensor]]:
    """Primals and tangents (zeros where there is none) of the new params and state."""
    p_out, p_out_t, s_out, s_out_t = {}, {}, [], []
    for k, v in params.items():
        primal_v, tangent_v = fwAD.unpack_dual(v)
        p_out[k] = primal_v
        p_out_t[k] = torch.zeros_like(primal_v) if tangent_v is None else tangent_v
    for x in s_tensors:
        primal_x, tangent_x = fwAD.unpack_dual(x)
        s_out.append(primal_x)
        s_out_t.append(torch.zeros_like(primal_x) if tangent_x is None else tangent_x)
    return p_out, p_out_t, s_out, s_out_t


def _dual_constants(
    optimizer: Optimizer, hparams: dict[str, Any], like: Tensor
) -> tuple[Optimizer, dict[str, Any]]:
    """SGD's non-zero number settings (given, read from ``hparams`` or defaults) as dual
    0-d tensors with zero tangents.

    Forward-mode AD gives an operand without a tangent a ZeroTensor, and in torch 2.13 an
    elementwise op on a ZeroTensor infers its output's shape with the Python meta kernel
    (``torch._meta_registrations``, registered over the C++ one): about 0.2 ms per op on a
    CPU, against a few microseconds for the op on duals. ``buf * 0.9`` in SGD's momentum
    was such an op per parameter tensor, the seed of the inner gradient's backward pass
    another; with these changes the same step is about 2.4x faster (learn-lr's MLP).
    """
    if not isinstance(optimizer, SGD):
        # other optimizers branch on whether a setting is a tensor (NAdam keeps its
        # momentum products as Python numbers or as tensors): same values, other rounding
        return optimizer, hparams
    flags = set(getattr(optimizer, "flags", ()))
    zero = torch.zeros((), dtype=like.dtype, device=like.device)

    def dual(value: Any) -> Any:
        if type(value) in (float, int) and value != 0:
            return fwAD.make_dual(torch.tensor(value, dtype=like.dtype, device=like.device), zero)
        if type(value) is tuple:
            return tuple(dual(v) for v in value)
        return value

    settings: dict[str, Any] = {}
    hparams = dict(hparams)
    for name in optimizer.defaults:
        if name in flags:
            continue
        given = optimizer.settings.get(name)
        if given is None and hparams.get(name) is not None:
            hparams[name] = dual(hparams[name])
        else:
            value = optimizer.defaults[name] if given is None else given
            new = dual(value)
            if new is not value:
                settings[name] = new
    return (optimizer.replace(**settings) if settings else optimizer), hparams


def _gradient_jvp(
    fwd: ForwardInputs,
    params: Params,
    p_tan: Params,
    hyper: list[Tensor],
    h_tan: list[Tensor],
    at: tuple[Any, int],
) -> Any:
    """The inner gradient, its directional derivative along one tangent direction, and
    the loss (``torch.func.jvp`` of ``torch.func.grad``): the function ``compiled=True``
    hands to ``torch.compile``.

    Only the model's part of the step is compiled: the optimizer's update counts steps in
    Python ints that dynamo guards on (a new graph every step until its recompile limit,
    then eager), and its tangent is a few cheap elementwise ops done eagerly on duals.
    (Under ``vmap`` over directions inductor fails on functorch's wrapped tensors, so
    directions are looped over.)"""
    batch, step = at
    leaves = list(fwd.explicit.leaves)
    for i, h in zip(fwd.explicit.hyper_idx, hyper):
        leaves[i] = h

    def grad_fn(p: Params, h: list[Tensor]) -> Any:
        for i, x in zip(fwd.explicit.hyper_idx, h):
            leaves[i] = x
        hparams = tree_unflatten(leaves, fwd.explicit.spec)[0]

        def loss_fn(q: Params) -> tuple[Tensor, Tensor]:
            loss = call_loss(fwd.run.inner.inner_loss, q, hparams, batch, None)
            check_loss(loss, step)
            return loss, loss

        return torch.func.grad(loss_fn, has_aux=True)(p)

    grads, grads_t, loss = torch.func.jvp(  # type: ignore[misc]
        grad_fn, (params, hyper), (p_tan, h_tan), has_aux=True
    )
    return grads, grads_t, loss


@functools.cache
def _compiled() -> Any:
    # built on first use (importing dynamo costs seconds), then shared by every call:
    # dynamo caches compiled graphs by code object and guards; see the README for the
    # warm-up cost and when it pays
    # inductor (the default backend): it fuses the gradient's and its tangent's kernels.
    # When the whole step was compiled (the optimizer too) it gave wrong tangents from the
    # second step on, and the step counters made a new graph at every step; only the
    # model's part is compiled now, which agrees with the uncompiled loop to 1e-10 (tested)
    return torch.compile(_gradient_jvp)


def used_params(fwd: ForwardInputs, primal: Primal, batch: Any) -> frozenset[str]:
    """The names of the parameters the inner loss uses at ``primal`` (one eager
    evaluation, no derivatives): ``compiled=True`` takes them from the first step."""
    hparams, _ = fwd.explicit.substitute(list(primal.hyper))
    with torch.enable_grad():
        live = {k: v.detach().requires_grad_() for k, v in primal.params.items()}
        loss = call_loss(fwd.run.inner.inner_loss, live, hparams, batch, None)
        return frozenset(used_inputs(loss, live))


def compiled_tangent_step(
    fwd: ForwardInputs,
    primal: Primal,
    tangent: Tangent,
    at: tuple[Any, int, frozenset[str]],
    skeleton: list,
) -> Any:
    """One step pushing one tangent direction: the inner gradient and its tangent from the
    compiled :func:`_gradient_jvp`, then the optimizer's update on dual tensors.

    ``used`` (in ``at``) names the parameters the inner loss uses (:func:`used_params`):
    the walk of the loss's graph that finds them is Python that dynamo cannot trace."""
    batch, step, used = at
    grads, grads_t, loss = _compiled()(
        fwd, primal.params, tangent.params, list(primal.hyper), tangent.hyper, (batch, step)
    )
    with fwAD._set_fwd_grad_enabled(True), fwAD.dual_level():
        live = {k: fwAD.make_dual(v, tangent.params[k]) for k, v in primal.params.items()}
        grad_dict = {
            k: fwAD.make_dual(grads[k], grads_t[k]) if k in used else None for k in live
        }  # None: not used, left alone (torch.optim)
        state = join_state(
            [fwAD.make_dual(x, t) for x, t in zip(primal.s_tensors, tangent.state)],
            *primal.s_meta,
        )
        hparams, optimizer = fwd.explicit.substitute(
            [fwAD.make_dual(h, t) for h, t in zip(primal.hyper, tangent.hyper)]
        )
        optimizer, hparams = _dual_constants(optimizer, hparams, loss)
        with torch.no_grad():
            new_params, new_state = optimizer.step(live, grad_dict, state, hparams)
        new_s, *skel = split_state(new_state)
        skeleton[:] = skel
        p_out, p_out_t, s_out, s_out_t = _unpack(new_params, new_s)
    return (p_out, s_out), (p_out_t, s_out_t), loss

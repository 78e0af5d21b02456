"""One inner step: the loss, its gradient (a graph through it or not) and the optimizer step.

Every mode's loop is made of these steps; :class:`InnerStep` is what a step computes with
and :class:`Carry` what moves from one step to the next.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import tree_detach
from bilevel.optim.base import HParams, Optimizer, Params, State

InnerLoss = Callable[..., Tensor]


@dataclass(frozen=True)
class InnerStep:
    """What every inner step computes with: the loss and the optimizer, and the
    hyperparameters both read."""

    inner_loss: InnerLoss
    optimizer: Optimizer
    hparams: HParams


@dataclass(frozen=True)
class Carry:
    """What one step hands to the next: parameters, optimizer state, buffers."""

    params: Params
    state: State
    buffers: dict[str, Tensor] | None


def call_loss(
    inner_loss: InnerLoss, params: Params, hparams: HParams, batch: Any, buffers: Any
) -> Tensor:
    """``inner_loss(params, hparams[, batch][, buffers=])``: the forms ``unroll`` documents."""
    args: tuple[Any, ...] = (params, hparams) if batch is None else (params, hparams, batch)
    if buffers is None:
        return inner_loss(*args)
    return inner_loss(*args, buffers=buffers)


def check_loss(loss: Any, step: int) -> None:
    """A scalar tensor, or a named error saying how to make it one."""
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"inner_loss must return a 0-d tensor (a scalar loss); at step {step} it returned "
            f"{shape}; reduce it, e.g. with .mean()"
        )
    if loss.is_complex():
        raise TypeError(
            f"inner_loss returned a complex tensor ({loss.dtype}) at step {step}: a loss to "
            "minimise must be real; return e.g. its .abs() ** 2 or its .real"
        )


def in_functorch_transform() -> bool:
    """Inside torch.func.vmap / grad / jvp: torch.autograd.grad cannot see batched tensors."""
    return bool(torch._C._functorch.get_interpreter_stack())


@contextlib.contextmanager
def suspended_saved_tensors_hooks() -> Iterator[None]:
    """Lift the caller's saved-tensor hooks (e.g. ``save_on_cpu`` or a memory counter) for
    a span whose tensors are not saved for the outer backward pass (a step without a graph,
    the forward-mode loop); ``torch.func.grad`` also refuses to run while such hooks are
    installed."""
    stack = []
    while (top := torch._C._autograd._top_saved_tensors_default_hooks(False)) is not None:
        stack.append(top)
        torch._C._autograd._pop_saved_tensors_default_hooks()
    try:
        yield
    finally:
        for pack, unpack in reversed(stack):
            torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)


def used_inputs(loss: Tensor, inputs: Params) -> set[str]:
    """The names of the ``inputs`` that ``loss``'s graph reaches.

    ``torch.func.grad`` returns zeros for an input the loss does not use where
    ``torch.autograd.grad`` says ``None``; this walk of the graph (Python, no device work)
    recovers the difference, so unused parameters are skipped under ``vmap`` too.
    """
    wanted = {id(v): k for k, v in inputs.items()}
    found: set[str] = set()
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack and len(found) < len(wanted):
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # an AccumulateGrad node: a leaf
        if variable is not None and id(variable) in wanted:
            found.add(wanted[id(variable)])
        stack.extend(f for f, _ in fn.next_functions)
    return found


def autograd_step(
    inner: InnerStep, carry: Carry, batch: Any, step: int, create_graph: bool
) -> tuple[Carry, Tensor]:
    """One inner step with reverse-mode autograd; a graph through it iff ``create_graph``.
    Returns the next carry and the detached loss."""
    # Without create_graph the loss's graph is freed right after the gradient: it is no
    # memory the caller's saved-tensor hooks (offloading, counting) should see.
    if in_functorch_transform():
        return functional_step(inner, carry, batch, step, create_graph)
    params, buffers = carry.params, carry.buffers
    hooks = contextlib.nullcontext() if create_graph else suspended_saved_tensors_hooks()
    with torch.enable_grad(), hooks:
        live = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
        # functional_call updates BatchNorm statistics in place: give it fresh copies so the
        # caller's buffers and earlier steps' buffers (needed by recomputation) stay intact.
        new_buffers = None if buffers is None else {k: v.clone() for k, v in buffers.items()}
        loss = call_loss(inner.inner_loss, live, inner.hparams, batch, new_buffers)
        check_loss(loss, step)
        grads = torch.autograd.grad(
            loss, list(live.values()), create_graph=create_graph, allow_unused=True
        )
    # None for a parameter the loss does not use: the optimizer leaves it and its state alone
    # (torch.optim's semantics), where zeros would decay it and give it momentum
    grad_dict = dict(zip(live, grads))
    if not create_graph:
        # first-order: the step still depends on params and hparams, not through the gradient
        live = params
    new_params, new_state = inner.optimizer.step(live, grad_dict, carry.state, inner.hparams)
    return Carry(new_params, new_state, new_buffers), loss.detach()


def functional_step(
    inner: InnerStep, carry: Carry, batch: Any, step: int, create_graph: bool
) -> tuple[Carry, Tensor]:
    """One inner step with ``torch.func.grad``, so that ``unroll`` runs under ``vmap`` (tasks
    batched for MAML); its gradient stays differentiable by the enclosing autograd."""
    buffers = carry.buffers
    new_buffers = None if buffers is None else {k: v.clone() for k, v in buffers.items()}

    used: set[str] = set()

    def loss_fn(p: Params) -> tuple[Tensor, Tensor]:
        loss = call_loss(inner.inner_loss, p, inner.hparams, batch, new_buffers)
        check_loss(loss, step)
        used.update(used_inputs(loss, p))
        return loss, loss

    grads, loss = torch.func.grad(loss_fn, has_aux=True)(carry.params)
    if not create_graph:
        grads = tree_detach(grads)
    grads = {k: g if k in used else None for k, g in grads.items()}
    new_params, new_state = inner.optimizer.step(carry.params, grads, carry.state, inner.hparams)
    return Carry(new_params, new_state, new_buffers), loss.detach()

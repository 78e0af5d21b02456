"""Online hyperparameter learning during one training run (a torch.optim-like object).

:class:`OnlineHyperOptimizer` wraps an ordinary training loop: call :meth:`~OnlineHyperOptimizer.step`
once per inner step with the step's batch; every ``every`` steps it computes a
hypergradient of the outer loss and lets a ``torch.optim`` optimizer update the
hyperparameters, then training continues with the new values. Two ways to get it:

* ``"forward"`` (Franceschi et al. 2017, real-time hyperparameter optimisation): the
  tangent ``Z_t = d params_t / d h`` is pushed forward with every step (Jacobian-vector
  products of the step, the H directions batched by ``torch.func.vmap``), and the
  hypergradient is ``dE/dparams . Z_t + dE/dh``. With ``carry_tangent=True`` the tangent is
  carried across updates (it then mixes the derivatives under successive hyperparameter
  values, as in the paper); with ``False`` it restarts at every update, so each update is
  exactly the forward-mode hypergradient of its window. Memory O(P·H), flat in T.
* ``"truncated"``: reverse mode through the last ``every`` steps (the graph starts at the
  previous update); biased towards short horizons, memory O(K·P).

Example:
    >>> import torch, bilevel
    >>> from bilevel.unroll.online import OnlineHyperOptimizer
    >>> lr = torch.tensor(0.05, requires_grad=True)
    >>> online = OnlineHyperOptimizer(
    ...     lambda p, h, b: ((p["w"] - b) ** 2).sum(), lambda p, h, v: ((p["w"] - v) ** 2).sum(),
    ...     {"w": torch.zeros(2)}, {"lr": lr}, bilevel.optim.sgd(),
    ...     torch.optim.SGD([lr], lr=1e-3), every=5)
    >>> for t in range(20):
    ...     loss = online.step(torch.ones(2), val_batch=torch.ones(2))
    >>> len(online.updates), bool(lr > 0.05)   # four updates; a larger step helped
    (4, True)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import tree_detach
from bilevel.optim.base import Optimizer, Params
from bilevel.unroll.explicit import Explicit, join_state, split_state
from bilevel.unroll.step import Carry, InnerStep, autograd_step, call_loss, used_inputs

ONLINE_MODES = ("forward", "truncated")

__all__ = ["OnlineHyperOptimizer"]


class OnlineHyperOptimizer:
    """Hyperparameter updates every ``every`` inner steps during one training run.

    Args:
        inner_loss: ``inner_loss(params, hparams, batch) -> 0-d tensor``.
        outer_loss: ``outer_loss(params, hparams, val_batch) -> 0-d tensor`` (without
            ``val_batch`` when :meth:`step` gets none).
        params: the initial inner parameters.
        hparams: a dict of hyperparameters, or a function of no argument returning one
            (``lambda: {"lr": log_lr.exp()}``), evaluated at every step so updates of the
            leaves take effect. The tensors in it that require grad are learned.
        optimizer: the inner :mod:`bilevel.optim` optimizer.
        hyper_optimizer: a ``torch.optim`` optimizer over the hyperparameter leaves.
        every: the update period K in inner steps.
        mode: ``"forward"`` or ``"truncated"`` (see the module docstring).
        carry_tangent: forward mode: carry the tangent across updates (real-time HO).

    Attributes:
        params, state: the current inner parameters and optimizer state (detached).
        updates: per update, ``(step, {name: hypergradient})`` w.r.t. the hparams tensors.
    """

    def __init__(
        self,
        inner_loss: Callable[..., Tensor],
        outer_loss: Callable[..., Tensor],
        params: Mapping[str, Tensor],
        hparams: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
        optimizer: Optimizer,
        hyper_optimizer: torch.optim.Optimizer,
        *,
        every: int,
        mode: str = "forward",
        carry_tangent: bool = True,
    ) -> None:
        if mode not in ONLINE_MODES:
            raise ValueError(f"mode must be one of {ONLINE_MODES}, got {mode!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a bilevel.optim optimizer, got {optimizer!r:.60}")
        if not isinstance(hyper_optimizer, torch.optim.Optimizer):
            raise TypeError("hyper_optimizer must be a torch.optim optimizer over the leaves")
        self.inner_loss, self.outer_loss, self.optimizer = inner_loss, outer_loss, optimizer
        self.hyper_optimizer, self.every, self.mode = hyper_optimizer, every, mode
        self.carry_tangent = carry_tangent
        self._hparams = hparams if callable(hparams) else (lambda: hparams)
        self.params: Params = {k: v.detach() for k, v in params.items()}
        self.state = tree_detach(optimizer.init(dict(self.params), dict(self._hparams())))
        self.t = 0
        self.updates: list[tuple[int, dict[str, Tensor]]] = []
        self._tangents: tuple[Params, list[Tensor]] | None = None
        self._graph_params: Params = self.params  # truncated: params with the window's graph
        self._graph_state: Any = self.state
        self._window: dict[str, Any] | None = None

    def _hyper(self) -> tuple[dict[str, Any], list[str]]:
        # evaluated once per window: the values only change at updates, and one set of
        # tensors for the window is what the window's derivatives are taken w.r.t.
        if self._window is None or self.t % self.every == 0:
            self._window = dict(self._hparams())
        hparams = self._window
        names = [k for k, v in hparams.items() if isinstance(v, Tensor) and v.requires_grad]
        if not names:
            raise ValueError("hparams has no tensor that requires grad: nothing to learn")
        return hparams, names

    def step(self, batch: Any, val_batch: Any = None) -> Tensor:
        """One inner step on ``batch``; every ``every`` steps also a hyperparameter update
        (the outer loss on ``val_batch``). Returns the inner loss (detached)."""
        hparams, names = self._hyper()
        if self.mode == "forward":
            loss = self._forward_step(hparams, batch)
        else:
            inner = InnerStep(self.inner_loss, self.optimizer, hparams)
            carry, loss = autograd_step(
                inner, Carry(self._graph_params, self._graph_state, None), batch, self.t, True
            )
            self._graph_params, self._graph_state = carry.params, carry.state
            self.params, self.state = tree_detach(carry.params), tree_detach(carry.state)
        self.t += 1
        if self.t % self.every == 0:
            self._update(hparams, names, val_batch)
        return loss

    def _forward_step(self, hparams: dict[str, Any], batch: Any) -> Tensor:
        explicit = Explicit.of(hparams, self.optimizer)
        hyper = [h.detach() for h in explicit.hyper]
        sizes = [h.numel() for h in hyper]
        n_dirs = sum(sizes)
        s_tensors, *skeleton_in = split_state(self.state)
        if self._tangents is None or len(self._tangents[1]) != len(s_tensors):
            zeros = {k: v.new_zeros((n_dirs, *v.shape)) for k, v in self.params.items()}
            self._tangents = (zeros, [x.new_zeros((n_dirs, *x.shape)) for x in s_tensors])
        p_tan, s_tan = self._tangents
        basis = torch.eye(n_dirs, dtype=hyper[0].dtype, device=hyper[0].device)
        h_tan = [c.reshape(n_dirs, *h.shape) for c, h in zip(basis.split(sizes, dim=1), hyper)]
        skeleton: list[Any] = []

        def one_step(p: Params, s: list[Tensor], h: list[Tensor]) -> Any:
            hp, opt = explicit.substitute(h)
            st = join_state(s, *skeleton_in)

            def loss_fn(q: Params) -> tuple[Tensor, Tensor]:
                value = call_loss(self.inner_loss, q, hp, batch, None)
                used.update(used_inputs(value, q))
                return value, value

            used: set[str] = set()
            grads, value = torch.func.grad(loss_fn, has_aux=True)(p)
            grads = {k: g if k in used else None for k, g in grads.items()}  # as torch.optim
            new_p, new_s = opt.step(p, grads, st, hp)
            new_s_t, *skel = split_state(new_s)
            skeleton[:] = skel  # the state's non-tensor skeleton leaves by a side channel
            return (new_p, new_s_t), value

        def push(pt: Params, st: list[Tensor], ht: list[Tensor]) -> Any:
            return torch.func.jvp(  # type: ignore[misc]
                one_step, (self.params, s_tensors, hyper), (pt, st, ht), has_aux=True
            )

        with torch.no_grad():
            (new_p, new_s), (new_pt, new_st), loss = torch.func.vmap(
                push,
                in_dims=(0, 0, 0),
                out_dims=(None, 0, None),  # type: ignore[arg-type]
                randomness="same",
            )(p_tan, s_tan, h_tan)
        self.params = {k: v.detach() for k, v in new_p.items()}
        self.state = join_state([x.detach() for x in new_s], *skeleton)
        self._tangents = ({k: v.detach() for k, v in new_pt.items()}, list(new_st))
        return loss.detach()

    def _update(self, hparams: dict[str, Any], names: list[str], val_batch: Any) -> None:
        hyper = {k: hparams[k] for k in names}
        if self.mode == "forward":
            assert self._tangents is not None
            explicit = Explicit.of(hparams, self.optimizer)
            positions = {id(x): j for j, x in enumerate(explicit.hyper)}
            sizes = [h.numel() for h in explicit.hyper]
            live_p = {k: v.detach().requires_grad_() for k, v in self.params.items()}
            live_h = [h.detach().requires_grad_() for h in explicit.hyper]
            hp, _ = explicit.substitute(live_h)
            outer = self._outer(live_p, hp, val_batch)
            grads = torch.autograd.grad(outer, [*live_p.values(), *live_h], allow_unused=True)
            g_p, g_h = grads[: len(live_p)], grads[len(live_p) :]
            total = sum(
                tan.reshape(tan.shape[0], -1) @ g.reshape(-1)
                for tan, g in zip(self._tangents[0].values(), g_p)
                if g is not None
            )
            per_hyper = list(torch.as_tensor(total).split(sizes))
            hypergrads = {}
            for k in names:
                j = positions.get(id(hparams[k]))
                if j is None:  # not an explicit input of the step (cannot happen for dict values)
                    raise ValueError(f"hparams[{k!r}] is not seen by the inner step")
                g = per_hyper[j].reshape(hparams[k].shape)
                hypergrads[k] = g if g_h[j] is None else g + g_h[j]
            if not self.carry_tangent:
                self._tangents = None
        else:
            outer = self._outer(self._graph_params, hparams, val_batch)
            values = torch.autograd.grad(outer, list(hyper.values()), allow_unused=True)
            hypergrads = {
                k: torch.zeros_like(h) if g is None else g
                for (k, h), g in zip(hyper.items(), values)
            }
            self._graph_params, self._graph_state = self.params, self.state
        self.updates.append((self.t, {k: g.detach() for k, g in hypergrads.items()}))
        self.hyper_optimizer.zero_grad()
        torch.autograd.backward(list(hyper.values()), [hypergrads[k] for k in names])
        self.hyper_optimizer.step()

    def _outer(self, params: Params, hparams: dict[str, Any], val_batch: Any) -> Tensor:
        if val_batch is None:
            return self.outer_loss(params, hparams)
        return self.outer_loss(params, hparams, val_batch)

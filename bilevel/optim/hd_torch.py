"""Hypergradient descent as :class:`torch.optim.Optimizer` subclasses: :class:`SGDHD`
and :class:`AdamHD`, running the functional :func:`~bilevel.optim.hd.sgd_hd` /
:func:`~bilevel.optim.hd.adam_hd` per param group.

Settings are checked when the optimizer is built, as ``torch.optim`` does (a negative
learning rate, momentum or weight decay, betas outside ``[0, 1)``, Nesterov without
momentum or with dampening all raise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from bilevel.optim.base import Optimizer
from bilevel.optim.hd import adam_hd, sgd_hd

_BUFFERS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "prev_direction")


class _TorchHD(torch.optim.Optimizer):
    """A :class:`torch.optim.Optimizer` running a functional HD optimizer per param group.

    ``group["lr"]`` holds the adapted learning rate as a 0-d tensor (on the params'
    device, so no host synchronisation); per-parameter state holds the buffers and the
    step count.
    """

    # the functional optimizer and the names of its settings, which are also the group keys
    _factory: Callable[..., Optimizer]
    _settings: tuple[str, ...] = ()

    def _functional(self, group: dict[str, Any]) -> Optimizer:
        settings = {k: group[k] for k in self._settings}
        if "betas" in settings:  # a state_dict round trip turns the pair into a list
            settings["betas"] = tuple(settings["betas"])
        return type(self)._factory(**settings)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        lr = group["lr"]
        ref = group["params"][0]
        if not isinstance(lr, Tensor):
            group["lr"] = torch.tensor(float(lr), dtype=ref.dtype, device=ref.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step for every param group (parameters without ``.grad`` are skipped)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            if any(p.grad.is_sparse for p in ps):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            names = [str(i) for i in range(len(ps))]
            params = dict(zip(names, ps))
            grads = {n: p.grad for n, p in zip(names, ps)}
            opt = self._functional(group)
            first = self.state[ps[0]]
            if "step" not in first:
                fstate = opt.init(params)
            else:
                fstate = {"step": first["step"], "lr": group["lr"]}
                for key in _BUFFERS:
                    if key in first:
                        fstate[key] = {
                            n: self.state[p][key] if key in self.state[p] else torch.zeros_like(p)
                            for n, p in params.items()
                        }
                    else:
                        fstate[key] = None
            new_params, new_state = opt.step(params, grads, fstate)
            torch._foreach_copy_(ps, [new_params[n] for n in names])
            # A new tensor, not an in-place update: a state_dict taken earlier (or a
            # scheduler's initial_lr) must not change under it.
            group["lr"] = new_state["lr"]
            for n, p in params.items():
                pstate = self.state[p]
                pstate["step"] = new_state["step"]
                for key in _BUFFERS:
                    if new_state.get(key) is not None:
                        pstate[key] = new_state[key][n]
        return loss


class SGDHD(_TorchHD):
    """SGD with hypergradient descent on the learning rate, as a ``torch.optim`` optimizer.

    Same update as :func:`sgd_hd`; ``param_groups[i]["lr"]`` is the adapted learning rate
    (a 0-d tensor), one per group.

    Example:
        >>> import torch, bilevel
        >>> w = torch.nn.Parameter(torch.tensor([1.0]))
        >>> opt = bilevel.optim.SGDHD([w], lr=0.1, hypergrad_lr=0.01)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     (0.5 * w**2).sum().backward()
        ...     opt.step()
        >>> opt.param_groups[0]["lr"]
        tensor(0.1162)
    """

    _factory = staticmethod(sgd_hd)
    _settings = (
        "lr",
        "hypergrad_lr",
        "momentum",
        "dampening",
        "weight_decay",
        "nesterov",
        "maximize",
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        hypergrad_lr: float = 1e-6,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        defaults: dict[str, Any] = dict(
            lr=lr,
            hypergrad_lr=hypergrad_lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        # built once for its checks: torch.optim rejects these values at construction
        sgd_hd(**defaults)._check_combination({})
        super().__init__(params, defaults)


class AdamHD(_TorchHD):
    """Adam with hypergradient descent on the learning rate, as a ``torch.optim`` optimizer.

    Same update as :func:`adam_hd`; ``param_groups[i]["lr"]`` is the adapted learning rate
    (a 0-d tensor), one per group.

    Example:
        >>> import torch, bilevel
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> opt = bilevel.optim.AdamHD([w], lr=0.1, hypergrad_lr=0.01)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     (0.5 * w**2).sum().backward()
        ...     opt.step()
        >>> opt.param_groups[0]["lr"]
        tensor(0.1534)
    """

    _factory = staticmethod(adam_hd)
    _settings = ("lr", "hypergrad_lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        hypergrad_lr: float = 1e-8,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        defaults: dict[str, Any] = dict(
            lr=lr,
            hypergrad_lr=hypergrad_lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
        )
        adam_hd(**defaults)  # built once for its checks, as torch.optim does
        super().__init__(params, defaults)

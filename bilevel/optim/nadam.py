"""Differentiable NAdam (the semantics of :class:`torch.optim.NAdam`)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from bilevel.optim import _ops
from bilevel.optim.adam import ADAM_RANGES
from bilevel.optim.base import HParams, HyperParameter, Optimizer, Params, State, StepAt
from bilevel.optim.hparams import contains_tensor, pick
from bilevel.optim.validation import NON_NEGATIVE


def nadam(
    lr: HyperParameter = None,
    betas: tuple[HyperParameter, HyperParameter] | None = None,
    eps: HyperParameter = None,
    weight_decay: HyperParameter = None,
    momentum_decay: HyperParameter = None,
    decoupled_weight_decay: bool | None = None,
    maximize: bool | None = None,
    *,
    foreach: bool | None = None,
) -> NAdam:
    """Differentiable NAdam (Nesterov Adam) with the semantics of :class:`torch.optim.NAdam`.

    Each update ``k`` of a parameter (``g`` the gradient, negated when ``maximize``)::

        g = g + weight_decay * p       (or p = p * (1 - lr * weight_decay), decoupled)
        mu_k = beta1 * (1 - 0.5 * 0.96 ** (k * momentum_decay));   P_k = mu_1 ... mu_k
        m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g * g
        d = sqrt(v / (1 - beta2**k)) + eps
        p = p - lr (1 - mu_k) / (1 - P_k) g / d - lr mu_{k+1} / (1 - P_k mu_{k+1}) m / d

    ``state["mu_product"]`` holds ``P_k`` per parameter: a Python number rounded as torch
    stores it (float32 unless the default dtype is float64) while ``beta1`` and
    ``momentum_decay`` are numbers, a 0-d tensor otherwise. Kernels are per tensor
    (``foreach`` is accepted and ignored). Defaults as torch: ``lr=2e-3, betas=(0.9,
    0.999), eps=1e-8, weight_decay=0, momentum_decay=4e-3``.

    Example:
        >>> import torch, bilevel
        >>> md = torch.tensor(4e-3, requires_grad=True)
        >>> opt = bilevel.optim.nadam(lr=0.1, momentum_decay=md)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> state = opt.init(params)
        >>> for _ in range(2):
        ...     params, state = opt.step(params, {"w": params["w"]}, state)
        >>> params["w"].detach()
        tensor([0.8200, 1.8179])
    """
    return NAdam(
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        momentum_decay=momentum_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        maximize=maximize,
        foreach=foreach,
    )


class NAdam(Optimizer):
    """Functional NAdam; build it with :func:`nadam`."""

    name = "nadam"
    defaults: dict[str, Any] = {
        "lr": 2e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "momentum_decay": 4e-3,
        "decoupled_weight_decay": False,
        "maximize": False,
    }
    flags = ("decoupled_weight_decay", "maximize")
    pairs = ("betas",)
    ranges = {**ADAM_RANGES, "momentum_decay": NON_NEGATIVE}

    def _tensor_mu(self, hparams: HParams) -> bool:
        return contains_tensor(self.raw("betas", hparams)[0]) or contains_tensor(
            self.raw("momentum_decay", hparams)
        )

    def _init_buffers(self, params: Params, hparams: HParams) -> State:
        mu_t = self._tensor_mu(hparams)
        return {
            "exp_avg": {n: p.new_zeros(p.shape) for n, p in params.items()},
            "exp_avg_sq": {n: p.new_zeros(p.shape) for n, p in params.items()},
            "mu_product": {n: p.new_ones(()) if mu_t else 1.0 for n, p in params.items()},
        }

    def _update(
        self, params: Params, grads: Params, state: State, hparams: HParams, at: StepAt
    ) -> tuple[Params, State]:
        t, k = at.index, at.count + 1
        names, ps, gs = self._lists(params, grads)
        exact = self.ops(ps) is _ops.EXACT_LOOP
        ms = self._buffers(state, "exp_avg", names)
        vs = self._buffers(state, "exp_avg_sq", names)
        maximize = self.flag("maximize", hparams)
        decay = self.is_active("weight_decay", hparams)
        decoupled = self.flag("decoupled_weight_decay", hparams)
        betas = self.raw("betas", hparams)
        new_p: Params = {}
        buffers: State = {"exp_avg": {}, "exp_avg_sq": {}, "mu_product": {}}
        loop = _ops.LOOP
        for i, (n, p, g) in enumerate(zip(names, ps, gs)):
            lr = self.hparam("lr", hparams, t, n, p)
            eps = self.hparam("eps", hparams, t, n, p)
            md = self.hparam("momentum_decay", hparams, t, n, p)
            b1, b2 = (pick(betas[j], t, n, p, f"betas[{j}]") for j in (0, 1))
            if maximize:
                g = -g
            bc2 = 1 - b2**k
            if decay:
                wd = self.hparam("weight_decay", hparams, t, n, p)
                if decoupled:
                    p = p.mul(1 - lr * wd)
                else:
                    g = loop.axpy([g], [p], wd)[0]
            mu = b1 * (1.0 - 0.5 * (0.96 ** (k * md)))
            mu_next = b1 * (1.0 - 0.5 * (0.96 ** ((k + 1) * md)))
            product = 1.0 if at.count == 0 else state["mu_product"][n]
            if isinstance(mu, Tensor) or isinstance(product, Tensor):
                product = product * mu
            else:
                product = _ops.as_scalar_product(product, mu)
            m = loop.lerp([ms[i]], [g], 1 - b1)[0]
            v = loop.addcmul(loop.mul([vs[i]], b2), [g], [g], 1 - b2)[0]
            denom = _ops.sqrt(v.div(bc2), exact) + eps
            product_next = product * mu_next
            coef_g = -lr * (1.0 - mu) / (1.0 - product)
            coef_m = (-lr * mu_next) / (1.0 - product_next)
            if isinstance(coef_g, Tensor) or isinstance(coef_m, Tensor):
                p = p.addcdiv(g * coef_g, denom).addcdiv(m * coef_m, denom)
            else:
                p = p.addcdiv(g, denom, value=coef_g).addcdiv(m, denom, value=coef_m)
            new_p[n] = p
            buffers["exp_avg"][n], buffers["exp_avg_sq"][n] = m, v
            buffers["mu_product"][n] = product
        return new_p, buffers

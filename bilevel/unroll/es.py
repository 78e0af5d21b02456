"""Evolution-strategies hypergradients over truncated windows: antithetic ES and Persistent ES.

Neither differentiates through the inner loop: each of ``2 * pairs`` particles runs the
inner optimizer for one window of ``window`` steps with perturbed hyperparameters
``theta +- eps`` (``eps ~ N(0, sigma^2 I)``, one antithetic pair per draw), and the window's
outer losses weigh the perturbations. So they work where back-propagation through the
unroll fails: an inner loop that is not differentiable, or chaotic (large learning rates:
reverse-mode hypergradients explode, Metz et al. 2019).

* **Antithetic ES** (``persistent=False``): ``g = mean_p eps_p (L(theta + eps_p) -
  L(theta - eps_p)) / (2 sigma^2)``, an unbiased estimate of the gradient of the smoothed
  window loss ``E[L(theta + eps)]``; like truncated back-propagation it sees one window only,
  so over a long run it has the short-horizon bias.
* **Persistent ES** (Vicol, Metz, Sohl-Dickstein, ICML 2021): every particle keeps its own
  inner state across windows *and* the sum ``xi`` of all perturbations it has received
  since the inner run began; the estimate weighs the window loss by ``xi`` instead of the
  window's ``eps``. Summed over the windows of an inner run, it is an unbiased estimate of
  the gradient of the smoothed *full-horizon* loss, with fixed memory and compute per window.

Particles are batched with ``torch.func.vmap`` (one vectorised inner step for all of them).

Example:
    >>> import torch, bilevel
    >>> from bilevel.unroll.es import PersistentES
    >>> def inner_loss(p, h):
    ...     return 0.5 * (p["w"] ** 2).sum() - (h["theta"] * p["w"]).sum()
    >>> def outer_loss(p, h):
    ...     return 0.5 * ((p["w"] - 1.0) ** 2).sum()
    >>> theta = torch.zeros(2, requires_grad=True)
    >>> pes = PersistentES(inner_loss, outer_loss, {"w": torch.zeros(2)},
    ...                    bilevel.optim.sgd(lr=0.5), window=2, sigma=0.1, pairs=64,
    ...                    generator=torch.Generator().manual_seed(0))
    >>> estimate = pes.step({"theta": theta})
    >>> estimate.backward()           # accumulates into theta.grad, like loss.backward()
    >>> bool((theta.grad < 0).all())  # a larger theta moves w towards 1
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bilevel.optim.base import HParams, Optimizer, Params
from bilevel.unroll.data import batch_source
from bilevel.unroll.explicit import join_state, split_state
from bilevel.unroll.step import Carry, InnerLoss, InnerStep, autograd_step

OuterLoss = Callable[[Params, HParams], Tensor]

__all__ = ["ESEstimate", "PersistentES"]


@dataclass(frozen=True)
class ESEstimate:
    """One window's estimate.

    Attributes:
        grads: the estimated hypergradient, one tensor per perturbed hyperparameter (by name).
        loss: the mean window outer loss over the particles (detached).
        pair_grads: the per-pair estimates, shape ``(pairs, H)`` (flattened hyperparameters):
            their mean is ``grads``; their spread gives its standard error.
        hyper: the perturbed hyperparameter tensors the estimate is w.r.t. (for
            :meth:`backward`).
    """

    grads: dict[str, Tensor]
    loss: Tensor
    pair_grads: Tensor
    hyper: dict[str, Tensor]

    def standard_error(self) -> Tensor:
        """Per-element standard error of the flattened estimate, ``std / sqrt(pairs)``."""
        return self.pair_grads.std(dim=0) / self.pair_grads.shape[0] ** 0.5

    def backward(self) -> None:
        """Accumulate ``grads`` into the autograd leaves the hyperparameters come from
        (through ``log_lr.exp()`` and the like), as ``outer_loss.backward()`` would."""
        pairs = [(h, self.grads[k]) for k, h in self.hyper.items() if h.requires_grad]
        torch.autograd.backward([h for h, _ in pairs], [g for _, g in pairs])


@dataclass(frozen=True)
class _Window:
    """What every particle's window computes with (shared, not batched)."""

    inner_loss: InnerLoss
    outer_loss: OuterLoss
    optimizer: Optimizer
    hparams: dict[str, Any]
    names: list[str]
    shapes: list[torch.Size]
    batches: list[Any]
    start: int


class PersistentES:
    """Persistent (or, with ``persistent=False``, antithetic truncated) ES hypergradients.

    Args:
        inner_loss: ``inner_loss(params, hparams[, batch]) -> 0-d tensor``, as for
            :func:`bilevel.unroll`; it must run under ``torch.func.vmap``.
        outer_loss: ``outer_loss(params, hparams) -> 0-d tensor`` at the end of a window.
        params: the initial inner parameters (every particle starts from them).
        optimizer: a :mod:`bilevel.optim` optimizer.
        window: inner steps per window (the truncation length K).
        sigma: the perturbations' standard deviation.
        pairs: antithetic pairs of particles (``2 * pairs`` particles).
        data: as for :func:`bilevel.unroll`; step ``t`` of the inner run reads batch ``t``
            (the same batch for every particle).
        persistent: carry the accumulated perturbations across windows (PES); ``False``:
            each window's estimate uses its own perturbations only (truncated ES).
        horizon: the inner run's length T; after T steps the particles restart from
            ``params`` (a new inner run). ``None``: only :meth:`reset` restarts them.
        generator: the random generator of the perturbations.
    """

    def __init__(
        self,
        inner_loss: Callable[..., Tensor],
        outer_loss: Callable[..., Tensor],
        params: Mapping[str, Tensor],
        optimizer: Optimizer,
        *,
        window: int,
        sigma: float,
        pairs: int,
        data: Any = None,
        persistent: bool = True,
        horizon: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if not callable(inner_loss) or not callable(outer_loss):
            raise TypeError("inner_loss and outer_loss must be callable")
        if not isinstance(params, Mapping) or not params:
            raise TypeError("params must be a non-empty dict of tensors")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a bilevel.optim optimizer, got {optimizer!r:.60}")
        for name, value in (("window", window), ("pairs", pairs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(sigma, (int, float)) and sigma > 0):
            raise ValueError(f"sigma must be a positive number, got {sigma!r}")
        if horizon is not None and (not isinstance(horizon, int) or horizon < window):
            raise ValueError(f"horizon must be an int >= window={window} or None, got {horizon!r}")
        self.inner_loss, self.outer_loss, self.optimizer = inner_loss, outer_loss, optimizer
        self.window, self.sigma, self.pairs = window, float(sigma), pairs
        self.persistent, self.horizon, self.generator = persistent, horizon, generator
        self.initial = {k: v.detach() for k, v in params.items()}
        self.batch_at = batch_source(data, horizon or 1)
        self.reset()

    def reset(self) -> None:
        """Start a new inner run: every particle back at ``params``, no perturbation yet."""
        self.t = 0
        self.particles: Params | None = None
        self.state_tensors: list[Tensor] = []
        self.skeleton: tuple[Any, ...] = ()
        self.xi: Tensor | None = None

    def _start(self, hparams: dict[str, Any]) -> None:
        n = 2 * self.pairs
        state = self.optimizer.init(dict(self.initial), hparams)
        tensors, *skeleton = split_state(state)
        self.particles = {k: v.expand(n, *v.shape).clone() for k, v in self.initial.items()}
        self.state_tensors = [x.detach().expand(n, *x.shape).clone() for x in tensors]
        self.skeleton = tuple(skeleton)

    def step(self, hparams: HParams) -> ESEstimate:
        """Advance every particle by one window with the current ``hparams``; the estimate
        of the hypergradient w.r.t. the tensors in ``hparams`` that require grad."""
        if not isinstance(hparams, Mapping):
            raise TypeError(f"hparams must be a dict, got {type(hparams).__name__}")
        names = [
            k
            for k, v in hparams.items()
            if isinstance(v, Tensor) and v.is_floating_point() and v.requires_grad
        ]
        if not names:
            raise ValueError(
                "ES needs at least one hyperparameter tensor that requires grad in hparams "
                "(the ones it perturbs); none does"
            )
        hyper = {k: hparams[k] for k in names}
        theta = torch.cat([h.detach().reshape(-1) for h in hyper.values()])
        if self.xi is not None and self.xi.shape[1] != theta.numel():
            raise ValueError(
                f"the perturbed hyperparameters changed size ({self.xi.shape[1]} -> "
                f"{theta.numel()} elements) within an inner run; call reset() first"
            )
        fixed = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in hparams.items()}
        if self.particles is None:
            self._start(fixed)
        assert self.particles is not None
        eps = self.sigma * torch.randn(
            self.pairs,
            theta.numel(),
            generator=self.generator,
            dtype=theta.dtype,
            device=theta.device,
        )
        eps = torch.cat([eps, -eps])  # antithetic: particle p + pairs mirrors particle p
        self.xi = eps if self.xi is None or not self.persistent else self.xi + eps
        win = _Window(
            self.inner_loss,
            self.outer_loss,
            self.optimizer,
            fixed,
            names,
            [h.shape for h in hyper.values()],
            [self.batch_at(self.t + j) for j in range(self.window)],
            self.t,
        )
        skeleton: list[Any] = []

        def particle(p: Params, s: list[Tensor], th: Tensor) -> tuple[Params, list[Tensor], Tensor]:
            return _particle_window(win, self.skeleton, skeleton, (p, s, th))

        with torch.no_grad():
            params, state, losses = torch.func.vmap(particle, randomness="same")(
                self.particles, self.state_tensors, theta + eps
            )
        self.particles, self.state_tensors, self.skeleton = params, list(state), tuple(skeleton)
        self.t += self.window
        half = self.pairs
        pair_grads = (
            self.xi[:half] * ((losses[:half] - losses[half:]) / (2 * self.sigma**2))[:, None]
        )
        flat = pair_grads.mean(dim=0)
        grads = {
            k: g.reshape(shape)
            for k, g, shape in zip(
                names, flat.split([h.numel() for h in hyper.values()]), win.shapes
            )
        }
        if self.horizon is not None and self.t >= self.horizon:
            self.reset()
        return ESEstimate(grads, losses.mean(), pair_grads, hyper)


def _particle_window(
    win: _Window,
    skeleton_in: tuple[Any, ...],
    skeleton_out: list[Any],
    point: tuple[Params, list[Tensor], Tensor],
) -> tuple[Params, list[Tensor], Tensor]:
    """One particle's window (under vmap): ``window`` inner steps without graphs from its
    carried params and state, with its perturbed hyperparameters; then the outer loss."""
    params, s_tensors, theta = point
    hparams = dict(win.hparams)
    sizes = [int(torch.Size(s).numel()) for s in win.shapes]
    for name, chunk, shape in zip(win.names, theta.split(sizes), win.shapes):
        hparams[name] = chunk.reshape(shape)
    inner = InnerStep(win.inner_loss, win.optimizer, hparams)
    carry = Carry(params, join_state(s_tensors, *skeleton_in), None)
    for j, batch in enumerate(win.batches):
        carry, _ = autograd_step(inner, carry, batch, win.start + j, create_graph=False)
    loss = win.outer_loss(carry.params, hparams)
    new_s, *skeleton = split_state(carry.state)
    # the state's non-tensor skeleton (step counter) leaves vmap by a side channel
    skeleton_out[:] = skeleton
    return carry.params, new_s, loss

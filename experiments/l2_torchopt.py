"""``l2 --torchopt on``: the same hypergradients computed by TorchOpt's implicit CG, timed.

At every outer step of a learning phase, at the solution bilevel's step used, TorchOpt's
``custom_root`` (optimality condition: the gradient of the inner loss, by ``torch.func.grad``)
around a solver that returns that solution, with ``solve_cg`` at the experiment's
``--cg-tol`` (TorchOpt's stopping rule ``||r|| <= rtol ||b||`` is bilevel's cg's) and no warm
start, gives the gradient of the validation loss with respect to the log-weights. Its time
(the TorchOpt call, the validation loss and the backward pass) is set against bilevel's
backward time at the same step; the two hypergradients must agree to ``agree_rtol``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

# both solves stop at ||r|| <= cg_tol ||b||: their hypergradients differ by the solves'
# errors, at most about cond(H) * cg_tol relative; this bound is checked at every step
AGREE_FACTOR = 1e3
AGREE_FLOOR = 1e-6


def agree_rtol(cg_tol: float) -> float:
    """The relative difference allowed between the two hypergradients."""
    return max(AGREE_FACTOR * cg_tol, AGREE_FLOOR)


class TorchOptHypergradient:
    """``peer(w_star, log_l2) -> (hypergradient, seconds)`` with TorchOpt's implicit CG.

    Args:
        inner_loss: ``inner_loss(params, hparams, batch)`` of the experiment's problem.
        data_loss: ``data_loss(params, x, y)``, the outer (validation) loss.
        train, val: the training batch and the validation ``(x, y)``.
        cg_tol, maxiter: TorchOpt's ``solve_cg(rtol=cg_tol, maxiter=maxiter)``.
    """

    def __init__(
        self,
        inner_loss: Callable[..., Tensor],
        data_loss: Callable[..., Tensor],
        train: Any,
        val: tuple[Tensor, Tensor],
        cg_tol: float,
        maxiter: int,
    ) -> None:
        try:
            import torchopt
        except ImportError as err:
            raise RuntimeError(
                "l2 --torchopt on needs TorchOpt: pip install 'bilevel[bench]' (or torchopt)"
            ) from err
        self.torchopt = torchopt
        self.inner_loss, self.data_loss = inner_loss, data_loss
        self.train, self.val = train, val
        self.solve = torchopt.linear_solve.solve_cg(rtol=cg_tol, maxiter=maxiter)

    def __call__(self, w_star: dict[str, Tensor], log_l2: Tensor) -> tuple[Tensor, float]:
        inner_loss, train = self.inner_loss, self.train
        names = sorted(w_star)  # TorchOpt's solutions are tuples of tensors

        def loss(params: tuple[Tensor, ...], h: Tensor) -> Tensor:
            return inner_loss(dict(zip(names, params)), {"l2": h.exp()}, train)

        def optimality(params: tuple[Tensor, ...], h: Tensor) -> Any:
            return torch.func.grad(loss)(params, h)

        t0 = time.perf_counter()

        @self.torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=self.solve)
        def solution(params: tuple[Tensor, ...], h: Tensor) -> tuple[Tensor, ...]:
            return tuple(w_star[k] for k in names)

        h = log_l2.detach().requires_grad_()
        params = solution(tuple(w_star[k] for k in names), h)
        (g,) = torch.autograd.grad(self.data_loss(dict(zip(names, params)), *self.val), h)
        return g.detach(), time.perf_counter() - t0

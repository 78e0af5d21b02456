"""The explicit inputs that checkpoint recomputation and forward tangents differentiate.

A mode that re-runs steps outside the caller's graph (checkpoint) or carries tangents
(forward) needs every differentiable hyperparameter as an explicit tensor input: the
tensors requiring grad among ``(hparams, optimizer.settings)`` come out of the tree, and
:meth:`Explicit.substitute` puts replacements back. The optimizer state is split the same
way into its floating-point tensors and the non-tensor skeleton (step counters, ``None``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from bilevel._tree import tree_flatten, tree_unflatten
from bilevel.optim.base import HParams, Optimizer, State


@dataclass(frozen=True)
class Explicit:
    """The leaves of ``(hparams, optimizer.settings)``, their structure, and the positions of
    the tensors requiring grad.

    Example:
        >>> import torch, bilevel
        >>> lr = torch.tensor(0.1, requires_grad=True)
        >>> ex = Explicit.of({"lr": lr, "scale": 2.0}, bilevel.optim.sgd())
        >>> ex.hyper == [lr]
        True
        >>> ex.substitute([torch.tensor(0.5)])[0]["lr"]
        tensor(0.5000)
    """

    leaves: list[Any]
    spec: Any
    hyper_idx: list[int]
    optimizer: Optimizer

    @staticmethod
    def of(hparams: HParams, optimizer: Optimizer) -> Explicit:
        leaves, spec = tree_flatten((dict(hparams), dict(optimizer.settings)))
        idx = [i for i, x in enumerate(leaves) if isinstance(x, Tensor) and x.requires_grad]
        return Explicit(leaves, spec, idx, optimizer)

    @property
    def hyper(self) -> list[Tensor]:
        """The differentiable hyperparameter tensors, in order."""
        return [self.leaves[i] for i in self.hyper_idx]

    def substitute(self, hyper: Sequence[Tensor]) -> tuple[dict, Optimizer]:
        """hparams and optimizer with the differentiable leaves replaced by ``hyper``."""
        leaves = list(self.leaves)
        for i, h in zip(self.hyper_idx, hyper):
            leaves[i] = h
        hparams, settings = tree_unflatten(leaves, self.spec)
        return hparams, self.optimizer.replace(**settings)


def split_state(state: State) -> tuple[list[Tensor], list[int], Any, list[Any]]:
    """The state's floating-point tensors, and the skeleton (their positions, the tree's
    structure, all leaves) that :func:`join_state` needs to rebuild it."""
    leaves, spec = tree_flatten(state)
    idx = [i for i, x in enumerate(leaves) if isinstance(x, Tensor) and x.is_floating_point()]
    return [leaves[i] for i in idx], idx, spec, leaves


def join_state(tensors: Sequence[Tensor], idx: list[int], spec: Any, leaves: list[Any]) -> State:
    """The inverse of :func:`split_state`, with ``tensors`` in the floating-point places."""
    leaves = list(leaves)
    for i, x in zip(idx, tensors):
        leaves[i] = x
    return tree_unflatten(leaves, spec)

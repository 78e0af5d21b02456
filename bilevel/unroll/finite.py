"""The NaN/Inf check on the inner losses: batched, so that it syncs with the device rarely."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from bilevel.unroll.result import NonFiniteLossError
from bilevel.unroll.step import in_functorch_transform


def _raise_non_finite_params(params: Mapping[str, Tensor]) -> None:
    bad = [k for k, p in params.items() if not bool(torch.isfinite(p).all())]
    raise NonFiniteLossError(
        f"the final params {bad} are not finite although every inner loss is: the gradient "
        "of the last step is NaN or infinite (a non-differentiable point, e.g. sqrt or norm "
        "at 0, or an overflow); pass check_finite=False to skip this check"
    )


def _raise_non_finite(losses: Tensor, offset: int = 0) -> None:
    bad = (~torch.isfinite(losses)).nonzero()
    step = offset + int(bad[0, 0]) if len(bad) else offset
    value = float(losses[step - offset])
    raise NonFiniteLossError(
        f"the inner loss is {value} at step {step}; lower the learning rate, or pass "
        "check_finite=False to skip this check (it synchronises with the device)"
    )


class FiniteChecker:
    """Checks collected losses for NaN/Inf every ``every`` steps (one sync per check).

    Example:
        >>> check = FiniteChecker(True, steps=2)
        >>> check([torch.tensor(1.0), torch.tensor(2.0)], done=2, final=True)   # all finite
    """

    def __init__(self, check_finite: bool | int, steps: int) -> None:
        if isinstance(check_finite, bool):
            self.every = steps if check_finite else 0
        elif isinstance(check_finite, int) and check_finite > 0:
            self.every = check_finite
        else:
            raise ValueError(f"check_finite must be a bool or a positive int, got {check_finite!r}")
        self.steps = steps
        self.checked = 0

    def __call__(
        self,
        losses: list[Tensor],
        done: int,
        final: bool = False,
        params: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Check the losses not checked yet (every ``every`` steps, and at the ``final``
        call); at the final call also ``params``, the result, in the same synchronisation:
        a finite last loss can come with a NaN last gradient."""
        if not self.every or in_functorch_transform():
            return  # under vmap a check would branch on batched values: skipped
        if not final and done >= self.steps:
            return  # the final call checks the last losses together with the params
        fresh = self.checked < done and (final or done - self.checked >= self.every)
        with_params = final and params is not None
        if not fresh and not with_params:
            return
        chunk = torch.stack(losses[self.checked : done]) if fresh else None
        flags = [] if chunk is None else [torch.isfinite(chunk).all()]
        if with_params:
            assert params is not None
            flags += [torch.isfinite(p).all() for p in params.values()]
        if not bool(torch.stack(flags).all()):
            if chunk is not None and not bool(torch.isfinite(chunk).all()):
                _raise_non_finite(chunk, self.checked)
            assert params is not None
            _raise_non_finite_params(params)
        if fresh:
            self.checked = done

"""Forward-mode AD gaps, and Jacobian-vector products from reverse mode alone.

Some torch ops have no forward-mode (jvp) formula (``huber_loss_backward``), or a broken
one (``mse_loss_backward``'s raises "ZeroTensors are immutable", pytorch/pytorch#123996).
Forward-over-reverse then fails where reverse-over-reverse works. bilevel's forward-mode
paths catch such errors, warn once per problem with :class:`ForwardModeFallbackWarning`,
and continue with :func:`jvp_by_double_vjp`: the vector-Jacobian product ``u -> u^T J`` is
linear in ``u``, so its own vjp applied to a tangent ``t`` is ``J t``. That costs a forward
pass, a backward pass and a double backward per product (no forward-mode formula used), and
keeps no more memory than one product needs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bilevel._tree import tree_flatten, tree_unflatten

__all__ = [
    "ForwardModeFallbackWarning",
    "is_forward_ad_gap",
    "jvp_by_double_vjp",
    "linearize_by_double_vjp",
    "warn_fallback",
]

_GAP_MESSAGES = (
    "forward ad",
    "forward-mode",
    "forward mode",
    "jvp",
    "fwd_grad",
    "forward grad",
    # mse_loss_backward's forward-mode formula writes into a ZeroTensor tangent
    "zerotensors are immutable",
)


class ForwardModeFallbackWarning(RuntimeWarning):
    """A forward-mode computation fell back to reverse mode (an op lacks a jvp formula)."""


def is_forward_ad_gap(err: BaseException) -> bool:
    """Whether ``err`` says an op has no, or a broken, forward-mode (jvp) formula.

    Example:
        >>> is_forward_ad_gap(NotImplementedError("Trying to use forward AD with huber_loss_backward"))
        True
        >>> is_forward_ad_gap(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
        False
    """
    msg = str(err).lower()
    return isinstance(err, (NotImplementedError, RuntimeError)) and any(
        key in msg for key in _GAP_MESSAGES
    )


def warn_fallback(where: str, err: BaseException, stacklevel: int = 3) -> None:
    """The one-line warning of a switch to reverse-mode Jacobian-vector products."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    warnings.warn(
        f"{where}: forward-mode AD failed ({type(err).__name__}: {first}); computing the "
        "Jacobian-vector products from reverse mode instead (double vjp: same values, "
        "slower; pass mode/hvp='reverse' to choose it directly)",
        ForwardModeFallbackWarning,
        stacklevel=stacklevel,
    )


def linearize_by_double_vjp(
    fn: Callable[..., Any], primals: Sequence[Any], has_aux: bool = False
) -> tuple[Any, Callable[..., Any], Any]:
    """``(fn(*primals), jvp, aux)`` where ``jvp(*tangents)`` is ``J_fn(primals) @ tangents``,
    from reverse mode only: one forward and backward graph, reused by every ``jvp`` call
    (map ``jvp`` with ``torch.func.vmap`` for several tangents). ``aux`` is None without
    ``has_aux``.
    """
    res: Any = torch.func.vjp(fn, *primals, has_aux=has_aux)
    out, vjp_fn = res[0], res[1]
    out_leaves, out_spec = tree_flatten(out)
    zeros = tree_unflatten([torch.zeros_like(x) for x in out_leaves], out_spec)
    # u -> vjp_fn(u) is linear; its vjp at any u (zeros here) applied to t is J t
    vjp2 = torch.func.vjp(vjp_fn, zeros)[1]

    def jvp(*tangents: Any) -> Any:
        return vjp2(tuple(tangents))[0]

    return out, jvp, (res[2] if has_aux else None)


def jvp_by_double_vjp(
    fn: Callable[..., Any], primals: Sequence[Any], tangents: Sequence[Any], has_aux: bool = False
) -> tuple[Any, Any] | tuple[Any, Any, Any]:
    """``(fn(*primals), J_fn(primals) @ tangents)`` from reverse mode only, like
    ``torch.func.jvp(fn, primals, tangents)`` (``(out, out_tangent, aux)`` with ``has_aux``).

    Works under ``torch.func.vmap`` (batched tangents) and on trees of tensors.

    Example:
        >>> import torch
        >>> x, t = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0])
        >>> out, jt = jvp_by_double_vjp(lambda x: torch.nn.functional.huber_loss(x, 3 * x), (x,), (t,))
        >>> jt  # d/dx1 of mean(huber(x - 3x)) at x = (1, 2), the linear branch: 2 / 2
        tensor(1.)
    """
    out, jvp, aux = linearize_by_double_vjp(fn, primals, has_aux)
    if has_aux:
        return out, jvp(*tangents), aux
    return out, jvp(*tangents)

"""Jacobian-vector products by forward mode, with reverse-over-reverse as the fallback
when an op has no forward-mode formula; vector-Jacobian products.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from bilevel._tree import tree_flatten, tree_unflatten


def _is_forward_ad_gap(err: BaseException) -> bool:
    """True for errors that say an op has no forward-mode (jvp) formula."""
    msg = str(err).lower()
    keys = ("forward ad", "forward-mode", "forward mode", "jvp", "fwd_grad", "forward grad")
    return isinstance(err, (NotImplementedError, RuntimeError)) and any(k in msg for k in keys)


class _ForwardModeSwitch:
    """Shared flag: use forward-mode AD for this problem's products (until it fails once)."""

    def __init__(self, forward: bool = True) -> None:
        self.ok = forward


def _jvp(
    fn: Callable[..., Any],
    primals: Sequence[Any],
    tangents: Sequence[Any],
    switch: _ForwardModeSwitch,
) -> Any:
    """``J_fn(primals) @ tangents`` by forward mode, or reverse-over-reverse when an op lacks it."""
    # forward AD refuses tensors whose elements share memory (expanded batch dims)
    primals = [_dense(p) for p in primals]
    tangents = [_dense(t) for t in tangents]
    first_err: BaseException | None = None
    if switch.ok:
        try:
            return torch.func.jvp(fn, tuple(primals), tuple(tangents))[1]
        except (RuntimeError, NotImplementedError) as err:
            if not _is_forward_ad_gap(err):
                raise
            switch.ok = False
            first_err = err
    # J t = d/du <vjp(u), t>: the VJP is linear in u, so its own VJP applied to t is J t.
    try:
        out, vjp_fn = _vjp(fn, *primals)
        out_leaves, out_spec = tree_flatten(out)
        zeros = tree_unflatten([torch.zeros_like(x) for x in out_leaves], out_spec)
        _, vjp2 = _vjp(vjp_fn, zeros)
        return vjp2(tuple(tangents))[0]
    except Exception as err:
        if first_err is not None:
            raise err from first_err
        raise


def _vjp(fn: Callable[..., Any], *primals: Any) -> tuple[Any, Callable[..., Any]]:
    res = torch.func.vjp(fn, *primals)
    return res[0], res[1]


def _dense(tree: Any) -> Any:
    leaves, spec = tree_flatten(tree)
    return tree_unflatten(
        [x if not isinstance(x, Tensor) or x.is_contiguous() else x.contiguous() for x in leaves],
        spec,
    )

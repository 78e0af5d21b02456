"""Box bounds ``(lower, upper)`` matched to a tree of parameters, and the projected
gradient norm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bilevel._tree import Tree, tree_flatten


def _expand_bound(side: Any, like: Any, default: float, where: str) -> list[np.ndarray]:
    """One float64 array per leaf of ``like`` (in flattening order)."""
    if isinstance(like, Tensor):
        shape = tuple(like.shape)
        if side is None:
            return [np.full(shape, default)]
        if isinstance(side, bool):
            raise TypeError(f"bounds {where} must be numbers or tensors, not bool")
        if isinstance(side, (int, float, np.number)):
            return [np.full(shape, float(side))]
        if isinstance(side, Tensor):
            side = side.detach().cpu().double().numpy()
        if isinstance(side, np.ndarray):
            try:
                return [np.broadcast_to(side.astype(np.float64), shape).copy()]
            except ValueError:
                raise ValueError(
                    f"bounds {where} has shape {side.shape}, which does not broadcast to the "
                    f"parameter shape {shape}"
                ) from None
        raise TypeError(
            f"bounds {where} must be None, a number or a tensor for a tensor parameter; got "
            f"{type(side).__name__}"
        )
    if side is None or (isinstance(side, (int, float, np.number)) and not isinstance(side, bool)):
        out: list[np.ndarray] = []
        for leaf in tree_flatten(like)[0]:
            out.extend(_expand_bound(side, leaf, default, where))
        return out
    if isinstance(like, Mapping):
        if not isinstance(side, Mapping):
            raise TypeError(
                f"bounds {where} must be None, a number or a dict with the params' keys "
                f"{sorted(map(str, like))}; got {type(side).__name__}"
            )
        unknown = set(side) - set(like)
        if unknown:
            raise ValueError(
                f"bounds {where} has keys {sorted(map(str, unknown))} that are not in the params "
                f"({sorted(map(str, like))})"
            )
        out = []
        for key, sub in like.items():
            out.extend(_expand_bound(side.get(key), sub, default, f"{where}[{key!r}]"))
        return out
    if isinstance(like, (list, tuple)):
        if not isinstance(side, (list, tuple)) or len(side) != len(like):
            raise TypeError(
                f"bounds {where} must be None, a number or a list/tuple of length {len(like)}"
            )
        out = []
        for i, (s, sub) in enumerate(zip(side, like)):
            out.extend(_expand_bound(s, sub, default, f"{where}[{i}]"))
        return out
    raise TypeError(f"cannot match bounds {where} to a parameter of type {type(like).__name__}")


def _bound_arrays(bounds: Any, init: Tree, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    import scipy.optimize

    if bounds is None:
        return None
    if isinstance(bounds, scipy.optimize.Bounds):
        lb = np.broadcast_to(np.asarray(bounds.lb, dtype=np.float64), (size,)).copy()
        ub = np.broadcast_to(np.asarray(bounds.ub, dtype=np.float64), (size,)).copy()
    else:
        if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2):
            raise TypeError(
                "bounds must be (lower, upper), each None, a number, or a tensor / tree shaped "
                f"like the params; got {type(bounds).__name__}"
            )
        lower, upper = bounds
        lb = np.concatenate([a.reshape(-1) for a in _expand_bound(lower, init, -np.inf, "lower")])
        ub = np.concatenate([a.reshape(-1) for a in _expand_bound(upper, init, np.inf, "upper")])
    if np.isnan(lb).any() or np.isnan(ub).any():
        raise ValueError("bounds contain NaN")
    if (lb > ub).any():
        i = int(np.argmax(lb > ub))
        raise ValueError(f"bounds: lower > upper at flat index {i} ({lb[i]} > {ub[i]})")
    return lb, ub


def _round_to(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """``values`` rounded to the nearest ``dtype`` number (infinities stay), as float64."""
    return torch.as_tensor(values, dtype=torch.float64).to(dtype).double().numpy()


def _projected_norm(
    x: np.ndarray, g: np.ndarray, box: tuple[np.ndarray, np.ndarray] | None
) -> float:
    if box is not None:
        g = x - np.clip(x - g, box[0], box[1])
    return float(np.linalg.norm(g))

"""The autograd engine's entry below ``torch.autograd.grad``'s Python layer, where present.

``torch.autograd.grad`` spends 40-60 µs per call with cold caches in argument handling
(normalising outputs and cotangents, the ``__torch_function__`` test) before it calls this
entry; the plain backward of an argmin and the eager L-BFGS evaluation call it directly
where that layer would do nothing else. It is private: on a torch without it this is
``None`` and the callers take the public function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

engine_run_backward: Callable[..., Any] | None
try:  # private, present in the torch versions tested
    from torch.autograd.graph import _engine_run_backward as engine_run_backward
except ImportError:  # pragma: no cover - another torch
    engine_run_backward = None

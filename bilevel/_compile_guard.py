"""What the two ``torch.compile`` routes (``argmin(compiled=True)``'s backward and
``lbfgs(compiled=True)``'s loop) share: the check that dynamo has not recompiled one cache
entry too often, and the one-line reason a fallback warning gives."""

from __future__ import annotations

from typing import Any

import torch

MAX_GRAPHS = 4  # graphs per cache entry before falling back (dynamo's own limit: 8)


def check_graph_count(fn: Any, limit: int, what: str) -> None:
    """Raise when dynamo holds more than ``limit`` graphs for ``fn`` (its guards keep
    failing: the caller falls back to eager, saying why); ``what`` names the function whose
    inputs changed (``"the objective"``, ``"the inner loss"``)."""
    graphs = len(torch._C._dynamo.eval_frame._debug_get_cache_entry_list(fn._own_code))
    if graphs > limit:
        raise RuntimeError(
            f"recompiled {graphs - 1} times (guards failed: shapes, dtypes or Python "
            f"numbers {what} reads changed between calls)"
        )


def failure_reason(err: BaseException) -> str:
    """The error's type and first line: compile errors come as many types (dynamo,
    inductor, the C++ compiler) with long messages."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"

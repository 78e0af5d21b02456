"""Files are untrusted: every ``torch.load`` in the library and the experiments passes
``weights_only=True`` (no pickle, so a crafted file cannot run code)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _loads_without_weights_only(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
        ):
            safe = any(
                k.arg == "weights_only"
                and isinstance(k.value, ast.Constant)
                and k.value.value is True
                for k in node.keywords
            )
            if not safe:
                lines.append(node.lineno)
    return lines


def test_every_torch_load_passes_weights_only_true():
    files = sorted((REPO / "bilevel").rglob("*.py")) + sorted((REPO / "experiments").rglob("*.py"))
    assert len(files) > 20
    unsafe = {
        str(f.relative_to(REPO)): lines for f in files if (lines := _loads_without_weights_only(f))
    }
    assert unsafe == {}

"""The documentation cannot rot: the tutorial notebook runs, and the API reference lists every
public module and documents every public name.

The reference itself is built by ``.ci/run`` (``python -m sphinx -W``: warnings are errors).
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import bilevel

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _api_modules() -> list[str]:
    """``API_MODULES`` from docs/conf.py, read without running the file (it writes pages)."""
    tree = ast.parse((DOCS / "conf.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "API_MODULES" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise AssertionError("docs/conf.py defines no API_MODULES list")


def test_every_public_module_has_a_reference_page():
    listed = _api_modules()
    assert listed[0] == "bilevel"
    assert len(set(listed)) == len(listed), f"API_MODULES lists a module twice: {listed}"
    exported = [
        f"bilevel.{name}" for name in bilevel.__all__ if inspect.ismodule(getattr(bilevel, name))
    ]
    missing = [name for name in exported if name not in listed]
    assert not missing, f"add {missing} to API_MODULES in docs/conf.py (one line each)"


@pytest.mark.parametrize("module_name", _api_modules())
def test_reference_module_documents_its_public_names(module_name):
    module = importlib.import_module(module_name)
    if hasattr(module, "__path__"):
        # autodoc documents a package's imported names only through __all__
        assert hasattr(module, "__all__"), f"package {module_name} must define __all__"
    assert (module.__doc__ or "").strip(), f"{module_name} has no module docstring"
    names = getattr(module, "__all__", None) or [
        n for n, obj in vars(module).items() if not n.startswith("_") and _defined_in(obj, module)
    ]
    assert names, f"{module_name} exports nothing"
    undocumented = []
    for name in names:
        assert hasattr(module, name), f"{module_name}.__all__ names {name!r}, which is not there"
        obj = getattr(module, name)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and not (obj.__doc__ or "").strip():
            undocumented.append(name)
    assert not undocumented, f"{module_name}: no docstring on {undocumented}"


def _defined_in(obj: object, module: object) -> bool:
    return getattr(obj, "__module__", None) == getattr(module, "__name__", None)


def test_tutorial_notebook_runs():
    """Execute docs/tutorial.ipynb in a fresh kernel; any cell error (a failed assert included)
    fails the test. Outputs are not written back."""
    import nbclient  # the test extra installs nbclient, nbformat and ipykernel
    import nbformat

    notebook = nbformat.read(DOCS / "tutorial.ipynb", as_version=4)
    nbformat.validate(notebook)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        "store docs/tutorial.ipynb without outputs (the test executes it fresh)"
    )
    client = nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}},  # the kernel imports this checkout's bilevel
    )
    client.execute()
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells and all(cell.get("execution_count") for cell in code_cells)
    printed = "".join(
        out.get("text", "")
        for cell in code_cells
        for out in cell.outputs
        if out.get("name") == "stdout"
    )
    assert "bilevel.argmin (CG)" in printed and "learned lr" in printed

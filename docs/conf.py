"""Sphinx configuration: the API reference is generated from bilevel's docstrings.

The reference has one page per public module, generated from ``API_MODULES`` below when the
build starts: documenting a new public module is one line in that list.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # document this checkout's bilevel, installed or not

# Every public module, in reading order. Each gets a page with its docstring and the members
# in its ``__all__`` (which a public package must define: autodoc skips imported names
# otherwise), documented under the import path users type.
API_MODULES = [
    "bilevel",
    "bilevel.optim",
    "bilevel.unroll.auto",
    "bilevel.unroll.es",
    "bilevel.unroll.online",
    "bilevel.unroll.reversible",
    "bilevel.linalg",
    "bilevel.solvers",
    "bilevel.constraints",
    "bilevel.prox",
    "bilevel.nn",
    "bilevel.stateful",
    "bilevel.stateful.optim",
    "bilevel.stateful.patch",
    "bilevel.stateful.utils",
    "bilevel.distributed",
    "bilevel.forward_ad",
]

project = "bilevel"
author = "the bilevel authors"
copyright = "the bilevel authors"  # noqa: A001 (Sphinx's name)
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "*.ipynb"]
html_theme = "alabaster"
html_static_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Every cross-reference must resolve (-n with -W: a broken :func:`...` fails the build),
# except those into other projects' docs (no inventories are fetched: the build needs no
# network), type aliases, and implementation classes that public factories return
# (``bilevel.linalg.cg`` returns a ``CG``) or that public classes derive from.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|collections|scipy|datetime|typing|numpy|abc|fractions)(\..*)?"),
    (r"py:class", r"(Tensor|Tree|nn\.Module)"),
    (r"py:class", r"bilevel\.(linalg|solvers|qp)\.\w+\.[A-Z]\w*"),
    (r"py:class", r"InteriorPoint"),  # bilevel.qp's solver options, in QPLayer's signature
    (r"py:class", r"bilevel(\.\w+)*\._\w+"),
    (r"py:class", r"_[A-Z]\w*"),  # private classes in signatures (bilevel.stateful's _Root)
    (r"py:class", r"bilevel\.check\.HypergradEntry"),  # the rows of a HypergradReport
]
# No network at build time: intersphinx inventories are not fetched, so links into the Python
# and PyTorch docs stay plain text rather than failing the build.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}


def _write_api_pages() -> None:
    """Write ``api/NAME.rst`` for each of ``API_MODULES`` and ``api/index.rst`` listing them."""
    out = HERE / "api"
    out.mkdir(exist_ok=True)
    for stale in out.glob("*.rst"):
        stale.unlink()
    for name in API_MODULES:
        title = f"``{name}``"
        (out / f"{name}.rst").write_text(
            f"{title}\n{'=' * len(title)}\n\n.. automodule:: {name}\n", encoding="utf-8"
        )
    entries = "".join(f"   {name}\n" for name in API_MODULES)
    (out / "index.rst").write_text(
        f"API reference\n=============\n\n.. toctree::\n   :maxdepth: 2\n\n{entries}",
        encoding="utf-8",
    )


_write_api_pages()

"""Sphinx configuration of the diffem documentation.

Build: ``python -m sphinx -b html docs docs/_build/html`` from the repository root.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document the working tree, installed or not

project = "diffem"
author = "The diffem developers"
copyright = "2024-2026, the diffem developers"

try:
    import diffem

    release = diffem.__version__
except Exception:  # the package must not break the build
    release = "unknown"
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
# numpydoc renders the numpy-style docstrings; napoleon (bundled with Sphinx) is the fallback.
if importlib.util.find_spec("numpydoc") is not None:
    extensions.append("numpydoc")
    numpydoc_show_class_members = False
    numpydoc_class_members_toctree = False
    numpydoc_validation_checks: set[str] = set()
    # Extra sections (e.g. "Shapes") are rendered as plain text; no need to warn about them.
    warnings.filterwarnings("ignore", message="Unknown section", category=UserWarning)
else:
    extensions.append("sphinx.ext.napoleon")
    napoleon_numpy_docstring = True
    napoleon_google_docstring = False

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_default_options = {
    "members": True,
    "undoc-members": False,
    "show-inheritance": True,
    "member-order": "bysource",
    # scikit-learn's generated metadata-routing setters are not part of diffem's API.
    "exclude-members": "set_fit_request, set_score_request, set_transform_request, "
    "set_partial_fit_request, set_predict_request, set_output",
}
autodoc_typehints = "none"  # the numpy-style docstrings state the types
autodoc_mock_imports: list[str] = []
autosummary_generate = False
# Modules still being written must not stop the build: autodoc reports them and goes on.
suppress_warnings = ["autodoc.import_object", "myst.header", "myst.xref_missing"]

html_theme = "furo" if importlib.util.find_spec("furo") is not None else "alabaster"
html_title = f"diffem {release}"
html_static_path: list[str] = []


# ------------------------------------------------------------------ benchmark tables
def _include_benchmark_results(app, docname, source):
    """Appends every ``benchmarks/results/*.md`` table to the ``benchmarks`` page."""
    if docname != "benchmarks":
        return
    results = sorted((ROOT / "benchmarks" / "results").glob("*.md"))
    if not results:
        source[0] += "\n\n*No benchmark results have been recorded yet.*\n"
        return
    parts = []
    for path in results:
        title = path.stem.replace("_", " ").replace("-", " ").capitalize()
        relative = Path("..") / path.relative_to(ROOT)
        include = f"```{{include}} {relative.as_posix()}\n:relative-images:\n```"
        parts.append(f"\n\n## {title}\n\n{include}\n")
    source[0] += "".join(parts)


def setup(app):
    app.connect("source-read", _include_benchmark_results)

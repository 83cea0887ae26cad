"""Sphinx configuration for the polystore documentation.

Built with ``make docs`` (``sphinx-build -W``: every warning is an error). The
CLI reference is generated from the click commands by ``_ext/clidoc.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))

import polystore

project = "polystore"
author = "polystore developers"
copyright = "polystore developers"  # noqa: A001 -- Sphinx's name for it
release = polystore.__version__
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc", "clidoc"]

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_theme_options = {
    "description": "numpy arrays and Python objects under paths, with a SQL catalog",
    "fixed_sidebar": True,
}
html_static_path = ["_static"]
# Code blocks wrap rather than being cut off in the narrow column.
html_css_files = ["polystore.css"]

# The docs build offline: no intersphinx. Cross-references inside polystore are
# checked (nitpicky); references to other projects' classes in signatures
# (numpy, SQLAlchemy, the standard library) cannot resolve and are not errors.
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(?!polystore\b).*")]
# What SQLBackend.at returns: a StorageBackend (snapshots.rst), not exported.
nitpick_ignore = [("py:class", "polystore.backends.sql.snapshots.SnapshotView")]

autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True

pygments_style = "sphinx"


def _drop_object_base(
    app: object, name: str, obj: object, options: object, bases: list[type]
) -> None:
    # "Bases: object" on every plain class says nothing, nor does a mixin
    # that is not part of the public API (SQLBackend's, for instance: its
    # methods are documented as the class's own, see api.rst).
    bases[:] = [
        base
        for base in bases
        if base is not object
        and not (
            base.__module__.startswith("polystore.") and base.__name__ not in polystore.__all__
        )
    ]


def setup(app: object) -> None:
    app.connect("autodoc-process-bases", _drop_object_base)  # type: ignore[attr-defined]

"""Sphinx configuration: the guides in docs/*.md (MyST) and the API reference.

Build with ``bash scripts/build_docs.sh`` (warnings are errors). The API page,
``api.md``, is generated from the docstrings by autodoc; numpydoc renders them
and validates the public API's docstrings (``numpydoc_validation_checks``), so a
missing section fails the build.
"""

from __future__ import annotations

import re

import harmonypy

project = "harmonypy"
author = "harmonypy developers"
copyright = "harmonypy developers"
release = harmonypy.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "numpydoc",
]

# .rst only for the pages autosummary (loaded by numpydoc) may generate; the guides are .md.
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
# GitHub's anchors for headings, so that links such as performance.md#threads resolve.
myst_heading_anchors = 4

html_theme = "furo"
html_title = f"harmonypy {release}"

autodoc_member_order = "bysource"
autodoc_typehints = "none"  # numpydoc's Parameters sections carry the types

numpydoc_show_class_members = False  # members are listed explicitly in api.md
numpydoc_xref_param_type = False
numpydoc_attributes_as_param_list = True

# Every check, less two that ask for more than this package's docstrings need:
# SA01 (a "See Also" section: the text links its neighbours where it matters) and
# ES01 (an extended summary: a one-line method such as ``to_frame`` needs none).
numpydoc_validation_checks = {"all", "SA01", "ES01"}
# A class with an "Attributes" section is a result (of run_harmony, evaluate,
# build_reference, map_query, a callback): its constructor is internal, so its
# fields are documented as attributes, not as constructor parameters.
_RESULT_CLASS = r"(?m)^\s*Attributes\n\s*-{10}$"
numpydoc_validation_overrides = {"PR01": [_RESULT_CLASS]}


_OUTSIDE_DOCS = re.compile(r"\[([^\]`]+)\]\((\.\./[^)#\s]+)\)")


def _link_outside_docs(app, docname, source):
    """Links to files outside docs/ (the README, benchmark results) work on GitHub but
    name no page of the site: turn them into download links, which copy the file in."""
    source[0] = _OUTSIDE_DOCS.sub(lambda m: f"{{download}}`{m[1]} <{m[2]}>`", source[0])


def _result_class_signature(app, what, name, obj, options, signature, return_annotation):
    """No constructor signature for result classes (see ``_RESULT_CLASS``): they are
    returned by functions, and their constructors' parameters are internal."""
    if what in ("class", "exception") and re.search(_RESULT_CLASS, obj.__doc__ or ""):
        return "", None
    return None


def setup(app):
    app.connect("source-read", _link_outside_docs)
    app.connect("autodoc-process-signature", _result_class_signature)

"""Sphinx configuration for torch-secorder (``sphinx-build -W -b html docs docs/_build/html``)."""

from __future__ import annotations

import os
import sys

# The package is normally installed (``pip install -e '.[docs]'``); the source tree is a
# fallback so that a plain checkout builds too.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "src")))

import torch_secorder  # noqa: E402

project = "torch-secorder"
author = "torch-secorder developers"
copyright = "torch-secorder developers"
release = torch_secorder.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build"]
root_doc = "index"
nitpicky = False

# Google-style docstrings.  "Attributes:" sections become :ivar: fields, so that a
# NamedTuple's fields, also documented by autodoc, are not described twice.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
# A "Returns:" line "x: text" shows as "x -- text" (not as a separate "Return type").
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

html_theme = "alabaster"
html_static_path: list[str] = []
html_theme_options = {"description": "Second-order quantities of PyTorch models on torch.func"}

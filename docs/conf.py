"""Sphinx configuration of the captum_inn documentation."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

from captum_inn._version import __version__  # noqa: E402

project = "captum_inn"
author = "captum_inn developers"
release = __version__
version = __version__
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # attributes as fields: properties documented twice would clash
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
nitpicky = False
html_theme = "furo"
html_title = f"captum_inn {__version__}"
exclude_patterns = ["_build"]

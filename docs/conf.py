"""Sphinx configuration of the captum_inn documentation."""

import os
import shutil
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
    "myst_nb",
]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # attributes as fields: properties documented twice would clash
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Every cross-reference to captum_inn must resolve (make docs builds with -W). The site builds
# offline, without intersphinx inventories, so references into other packages cannot resolve and
# are let through.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|captum|sklearn|numpy|matplotlib|PIL|pathlib|os|abc|typing|collections)(\..*)?"),
    (r"py:class", r"(Tensor|Module|nn\.Module|Generator|Path)"),
    (r"py:class", r"captum_inn\.training\.loop\._Config"),  # the TypeVar of merged_config
]
html_theme = "furo"
html_title = f"captum_inn {__version__}"
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

# The tutorials live in ../tutorials (where users look for them); the site renders copies of
# them with their committed outputs. They are executed by CI (tutorials/run.py), never here.
nb_execution_mode = "off"
_TUTORIALS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "tutorials"))
_RENDERED = os.path.join(os.path.dirname(__file__), "tutorials")
os.makedirs(_RENDERED, exist_ok=True)
for _name in sorted(os.listdir(_TUTORIALS)):
    if _name.endswith(".ipynb"):
        shutil.copyfile(os.path.join(_TUTORIALS, _name), os.path.join(_RENDERED, _name))

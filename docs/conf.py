"""Sphinx configuration: MyST Markdown pages and autodoc for the API reference."""

project = "jaxcomp"
author = "jaxcomp developers"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["colon_fence", "dollarmath"]
napoleon_google_docstring = True
autodoc_member_order = "bysource"
html_theme = "furo"
exclude_patterns = ["_build"]
napoleon_use_ivar = True  # NamedTuple fields: one description each, not an attribute plus a field

"""Sphinx configuration for the d2r API reference.

Build (warnings are errors)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys

from sphinx.errors import PycodeError
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging

logger = logging.getLogger(__name__)

# d2r is normally pip-installed (as in CI). In a development checkout where the native module was built
# in place (python/d2r/_native*.so) and d2r is not installed, use python/.
try:
    import d2r  # noqa: F401
except ImportError:
    sys.modules.pop("d2r", None)
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "python")))
    import d2r  # noqa: F401

project = "d2r"
author = "d2r authors"
copyright = "d2r authors"
release = d2r.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

# Docstrings are numpy-style (``Parameters`` / ``Returns`` sections) or plain prose; single backticks
# mean an object name (a cross-reference when it resolves, code otherwise).
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_ivar = True  # "Attributes" sections as fields, not duplicates of the dataclass attributes
napoleon_use_rtype = False
default_role = "py:obj"

autodoc_default_options = {
    "members": True,
    "undoc-members": True,
    "show-inheritance": True,
}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "separated"
# The optional deep-learning back ends are imported lazily by d2r; mock them in case a module ever
# needs them at import time (they are not installed by the test or docs extras).
autodoc_mock_imports = ["torch", "tensorflow", "tf_slim", "tf_keras"]

nitpicky = False
exclude_patterns = ["_build"]
templates_path: list[str] = []
html_theme = "alabaster"
html_static_path: list[str] = []
html_title = f"d2r {release}"

# Every name in the ``__all__`` of these modules must appear in the reference (a missing one is a
# warning, so an error under -W): a new public name needs an entry in docs/api/.
_COVERED_MODULES = ["d2r", "d2r.extract", "d2r.regions", "d2r.regions.detect", "d2r.core.verify", "d2r.core.evaluate",
                    "d2r.datasets", "d2r.cuda", "d2r.workflows.build", "d2r.distributed", "d2r.distributed.serve",
                    "d2r.distributed.request_parsing", "d2r.regions.discover", "d2r.regions.attention", "d2r.core.backend", "d2r.cuda.backend"]


def _check_coverage(app, env):
    documented = set(env.get_domain("py").objects)
    for modname in _COVERED_MODULES:
        module = importlib.import_module(modname)
        for name in getattr(module, "__all__", ()):
            if name.startswith("__"):
                continue
            full = f"{modname}.{name}"
            value = getattr(module, name, None)
            if full in documented or (hasattr(value, "__spec__") and value.__name__ in documented):
                continue
            logger.warning("%s is in %s.__all__ but not in the API reference (docs/api/)", full, modname)


def _constant_doc(app, what, name, obj, options, lines):
    """A constant (autodata) gets its ``#:`` comment, also when a package re-exports it from the module
    that defines it, and never the docstring of its type (``dict``, ``tuple``, ...)."""
    if what != "data":
        return
    type_doc = inspect.cleandoc(type(obj).__doc__ or "")
    if lines and "\n".join(lines).strip() != type_doc:
        return  # its own documentation
    lines[:] = []
    modname, attr = name.rsplit(".", 1)
    for module in list(sys.modules.values()):
        mod = getattr(module, "__name__", "")
        if not mod.startswith(modname + ".") or getattr(module, attr, None) is not obj:
            continue
        try:
            comment = ModuleAnalyzer.for_module(mod).find_attr_docs().get(("", attr))
        except PycodeError:
            continue
        if comment:
            lines.extend(comment)
            return


def _public_bases(app, name, obj, options, bases):
    """"Bases:" names public classes only (a private base such as ``_IndexBase`` gives way to its bases)."""
    public = []
    for base in bases:
        while getattr(base, "__name__", "").startswith("_") and getattr(base, "__bases__", ()):
            base = base.__bases__[0]
        public.append(base)
    bases[:] = public


def setup(app):
    app.connect("env-check-consistency", _check_coverage)
    app.connect("autodoc-process-bases", _public_bases)
    app.connect("autodoc-process-docstring", _constant_doc)

"""The package's layers (docs/architecture.md): imports point down, checked on the source.

The import-linter contract in pyproject.toml (run by `lint-imports` in CI) checks the layer order. It
cannot see the compiled extension as a module (``import d2r._native`` reads as an import of ``d2r``), so
it ignores imports of the top-level package; this test checks the rest by reading the source: no layer
imports the facade (``d2r/__init__.py``) or a deprecated old path, and the core imports nothing of d2r
but itself and the native module."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import d2r

PKG = Path(d2r.__file__).resolve().parent
LAYERS = ["cli", "distributed", "workflows", "datasets", "regions", "extract", "cuda", "core"]
OLD_PATHS = {"index", "codebook", "aggregate", "kernels", "index_io", "evaluate", "verify", "features", "convert",
             "detect", "discover", "build", "pipeline", "report", "synthetic", "serve"}


def _imports(path: Path):
    """(line, imported module, names) of every import statement of a file (relative ones resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(PKG.parent).with_suffix("")
    pkg = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg[:len(pkg) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            yield node.lineno, mod, [a.name for a in node.names]


def _layer_files(layer):
    return sorted((PKG / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", LAYERS)
def test_no_layer_imports_the_facade_or_an_old_path(layer):
    bad = []
    for f in _layer_files(layer):
        for line, mod, names in _imports(f):
            if mod == "d2r":
                bad += [f"{f.relative_to(PKG)}:{line} from d2r import {n}" for n in names
                        if n not in ("_native", "_version") and n not in LAYERS]
            parts = mod.split(".")
            if len(parts) == 2 and parts[0] == "d2r" and parts[1] in OLD_PATHS:
                bad.append(f"{f.relative_to(PKG)}:{line} imports the deprecated path {mod}")
    assert not bad, "\n".join(bad)


def test_core_imports_only_itself_the_native_module_and_the_standard_library():
    allowed_d2r = ("d2r.core", "d2r._native", "d2r._version")
    bad = []
    for f in _layer_files("core"):
        for line, mod, names in _imports(f):
            top = mod.split(".")[0]
            if top == "d2r":
                if mod == "d2r":
                    bad += [f"{f.name}:{line} d2r.{n}" for n in names if n not in ("_native", "_version")]
                elif not mod.startswith(allowed_d2r):
                    bad.append(f"{f.name}:{line} {mod}")
            elif top not in sys.stdlib_module_names and top not in ("numpy", "faiss", "tqdm"):
                bad.append(f"{f.name}:{line} {mod} (core takes numpy, the native module, and faiss/tqdm on demand)")
    assert not bad, "\n".join(bad)


def test_import_linter_contract_is_kept():
    pytest.importorskip("importlinter")
    root = PKG.parent.parent
    if not (root / "pyproject.toml").exists():
        pytest.skip("the contract lives in the repository's pyproject.toml (an installed package has none)")
    r = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                        "lint_imports_command()"], cwd=root, capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(PKG.parent)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_old_module_paths_still_work_with_a_deprecation_warning():
    import importlib
    import warnings

    for old, name, new in [("d2r.index", "Index", "d2r.core.index"), ("d2r.pipeline", "run", "d2r.workflows.pipeline"),
                           ("d2r.features", "load_features", "d2r.extract.store"),
                           ("d2r.detect", "region_source", "d2r.regions.detect"),
                           ("d2r.evaluate", "revisited", "d2r.core.evaluate"),
                           ("d2r.build", "build_index", "d2r.workflows.build")]:
        mod = importlib.import_module(old)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            got = getattr(mod, name)
        assert got is getattr(importlib.import_module(new), name)
        assert any(issubclass(x.category, DeprecationWarning) and new in str(x.message) for x in w), old
    with pytest.raises(AttributeError, match="moved to"):
        importlib.import_module("d2r.index").no_such_name

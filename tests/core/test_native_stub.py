"""python/d2r/_native.pyi against the extension it describes.

Three views of d2r._native are compared: the built module (names, and each function's parameters as
pybind11 writes them on its docstring's first line), the stub (parsed with ast), and the binding sources
(d2r_native/*.cpp, parsed for m.def / py::class_ / .def* / py::exception and their py::arg). The module
and the stub must agree on every public name, class member, parameter name, default and (where pybind11
names a plain type) type; the sources must agree with the module (which checks the source reader), and
the CUDA part of the stub, which a build without CUDA lacks, is checked against cuda_bindings.cpp.
mypy.stubtest and mypy --strict run on the stub where mypy is installed.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from d2r import _native

ROOT = Path(__file__).resolve().parents[2]
STUB = Path(_native.__file__).with_name("_native.pyi")
SOURCES = ROOT / "d2r_native"
CUDA = bool(_native.cuda_compiled())

# pybind11's spelling of a parameter or return type -> the stub's.
TYPES = {
    "typing.SupportsInt | typing.SupportsIndex": "_Int",
    "typing.SupportsFloat | typing.SupportsIndex": "_Float",
    "bool": "bool",
    "str": "str",
    "int": "int",
    "float": "float",
    "None": "None",
}


@dataclass
class Param:
    name: str
    has_default: bool
    default: str | None = None  # source text of the default
    type: str | None = None


@dataclass
class Func:
    params: list[Param] | None  # None: unknown (a C++ function pointer without py::arg)
    ret: str | None = None
    doc: str | None = None


@dataclass
class Class:
    members: dict[str, Func | str] = field(default_factory=dict)  # a Func, or "property"
    bases: tuple[str, ...] = ()
    doc: str | None = None


# ---- the built module ----------------------------------------------------------------------------


def _split_top(s: str, sep: str = ",") -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return [p.strip() for p in out]


def _parse_signature(line: str) -> tuple[list[Param], str]:
    """'name(a: T, b: U = 1) -> R' (pybind11's first docstring line) -> params, R."""
    start = line.index("(")
    depth = 0
    for i in range(start, len(line)):
        depth += line[i] in "([{"
        depth -= line[i] in ")]}"
        if depth == 0:
            break
    params = []
    for p in _split_top(line[start + 1 : i]):
        default = None
        if " = " in p:
            p, default = p.split(" = ", 1)
        name, _, typ = p.partition(": ")
        params.append(Param(name, default is not None, default, typ or None))
    return params, line[i + 1 :].strip().removeprefix("-> ")


def _runtime_func(f: object, method: bool) -> Func:
    doc = f.__doc__ or ""
    first, _, rest = doc.partition("\n")
    params, ret = _parse_signature(first)
    if method:
        assert params and params[0].name in ("self", "arg0"), first
        params = params[1:]
    return Func(params, ret, rest.strip() or None)


def runtime_view() -> tuple[dict[str, Func], dict[str, Class]]:
    funcs, classes = {}, {}
    for name, v in vars(_native).items():
        if name.startswith("_"):
            continue
        if isinstance(v, type) and issubclass(v, BaseException):
            classes[name] = Class(bases=tuple(b.__name__ for b in v.__bases__))
        elif isinstance(v, type):
            c = Class(doc=v.__doc__)
            for mname, m in vars(v).items():
                if mname in ("__doc__", "__module__", "__dict__", "__weakref__", "_pybind11_conduit_v1_"):
                    continue
                if isinstance(m, property):
                    c.members[mname] = "property"
                    ret = _parse_signature((m.fget.__doc__ or "").partition("\n")[0])[1]
                    c.members[mname + ".fget"] = Func([], ret)
                elif type(m).__name__ == "instancemethod":
                    c.members[mname] = _runtime_func(m, method=True)
            classes[name] = c
        elif callable(v):
            funcs[name] = _runtime_func(v, method=False)
        else:
            raise AssertionError(f"d2r._native.{name}: unexpected {type(v).__name__}")
    return funcs, classes


# ---- the stub --------------------------------------------------------------------------------------


def _unparse(node: ast.expr | None) -> str | None:
    return None if node is None else ast.unparse(node)


def _stub_func(f: ast.FunctionDef, method: bool) -> Func:
    a = f.args
    pos = a.posonlyargs + a.args
    if method:
        assert pos and pos[0].arg == "self", f.name
        pos = pos[1:]
    defaults = [None] * (len(pos) - len(a.defaults)) + list(a.defaults)
    params = [
        Param(p.arg, d is not None, _unparse(d), _unparse(p.annotation)) for p, d in zip(pos, defaults)
    ]
    params += [
        Param(p.arg, d is not None, _unparse(d), _unparse(p.annotation)) for p, d in zip(a.kwonlyargs, a.kw_defaults)
    ]
    return Func(params, _unparse(f.returns), ast.get_docstring(f))


def stub_view() -> tuple[dict[str, Func], dict[str, Class]]:
    tree = ast.parse(STUB.read_text(), str(STUB))
    funcs, classes = {}, {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            funcs[node.name] = _stub_func(node, method=False)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            c = Class(bases=tuple(ast.unparse(b) for b in node.bases), doc=ast.get_docstring(node))
            for m in node.body:
                if isinstance(m, ast.FunctionDef):
                    if any(ast.unparse(d) == "property" for d in m.decorator_list):
                        c.members[m.name] = "property"
                        c.members[m.name + ".fget"] = Func([], _unparse(m.returns))
                    elif any(ast.unparse(d) == f"{m.name}.setter" for d in m.decorator_list):
                        continue  # a settable property (def_property): its getter above names it
                    else:
                        c.members[m.name] = _stub_func(m, method=True)
            classes[node.name] = c
    return funcs, classes


# ---- the binding sources -------------------------------------------------------------------------


def _code_only(text: str) -> str:
    """text with comments blanked and string literals kept (so that brackets in them are not counted)."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text[i] in "\"'":
            q, j = text[i], i + 1
            while text[j] != q:
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _preprocess(text: str, cuda: bool) -> str:
    """Keeps the branch of each #ifdef D2R_WITH_CUDA that a build with (cuda) / without CUDA compiles."""
    keep, stack = [], []  # stack: for each open #if, None or (whether it is D2R_WITH_CUDA's, branch taken)
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#if"):
            stack.append(["D2R_WITH_CUDA" in s, cuda if "D2R_WITH_CUDA" in s else True])
        elif s.startswith("#else"):
            if stack[-1][0]:
                stack[-1][1] = not stack[-1][1]
        elif s.startswith("#endif"):
            stack.pop()
        elif all(taken for _, taken in stack):
            keep.append(line)
    return "\n".join(keep)


def _matching(s: str, i: int) -> int:
    """Index of the bracket closing the one at s[i] (strings skipped)."""
    depth, j = 0, i
    while True:
        ch = s[j]
        if ch in "\"'":
            j = s.index(ch, j + 1)
            while s[j - 1] == "\\":
                j = s.index(ch, j + 1)
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return j
        j += 1


def _statements(body: str) -> list[str]:
    out, depth, cur, j = [], 0, [], 0
    while j < len(body):
        ch = body[j]
        if ch in "\"'":
            k = j + 1
            while body[k] != ch:
                k += 2 if body[k] == "\\" else 1
            cur.append(body[j : k + 1])
            j = k + 1
            continue
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == ";" and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
        j += 1
    return out


_ARG = re.compile(r'py::arg\("(\w+)"\)(\s*=\s*([^,]+?(?:\([^()]*\))?))?\s*(?=,|$)')


def _source_func(args: str, method: bool) -> Func:
    found = [Param(m.group(1), m.group(2) is not None, m.group(3)) for m in _ARG.finditer(args)]
    if found:
        return Func(found)
    lam = re.search(r"\[[^\]]*\]\s*\(", args)
    if not lam:
        return Func(None)  # a function pointer: the parameters are not read from here
    n = len(_split_top(args[lam.end() : _matching(args, lam.end() - 1)]))
    return Func([Param(f"arg{i}", False) for i in range(n - (1 if method else 0))])


def _first_string(args: str) -> str:
    m = re.match(r'\s*"(\w+)"', args)
    assert m, args
    return m.group(1)


def source_view(cuda: bool) -> tuple[dict[str, Func], dict[str, Class]]:
    funcs, classes = {}, {}
    for path in sorted(SOURCES.glob("*.cpp")):
        text = _code_only(_preprocess(path.read_text(), cuda))
        for head in re.finditer(r"(void init_\w+\(py::module_& m\)|PYBIND11_MODULE\(_native, m\))\s*\{", text):
            body = text[head.end() : _matching(text, head.end() - 1)]
            for st in _statements(body):
                if st.startswith("m.def("):
                    args = st[len("m.def(") : _matching(st, len("m.def"))]
                    funcs[_first_string(args)] = _source_func(args, method=False)
                elif ex := re.match(r'static py::exception<[^>]*>\s*\w+\(m,\s*"(\w+)",\s*PyExc_(\w+)\)', st):
                    classes[ex.group(1)] = Class(bases=(ex.group(2),))
                elif cl := re.match(r"py::class_<.*?>\(m,\s*\"(\w+)\"", st, re.S):
                    c = classes[cl.group(1)] = Class()
                    rest = st[_matching(st, st.index("(", cl.start() + len("py::class_"))) + 1 :]
                    k = 0
                    while mm := re.compile(r"\.(def\w*)\(").search(rest, k):
                        end = _matching(rest, mm.end() - 1)
                        args, kind, k = rest[mm.end() : end], mm.group(1), end + 1
                        if kind == "def_buffer":
                            continue
                        if kind == "def" and args.lstrip().startswith("py::init"):
                            c.members["__init__"] = _source_func(args, method=False)
                            continue
                        name = _first_string(args)
                        if kind in ("def_property_readonly", "def_readonly", "def_property", "def_readwrite"):
                            c.members[name] = "property"
                        else:
                            assert kind == "def", kind
                            c.members[name] = _source_func(args, method=True)
    return funcs, classes


# ---- comparisons -----------------------------------------------------------------------------------


def _names(view: tuple[dict[str, Func], dict[str, Class]]) -> set[str]:
    funcs, classes = view
    out = set(funcs)
    for cname, c in classes.items():
        out.add(cname)
        out |= {f"{cname}.{m}" for m in c.members if not m.endswith(".fget")}
    return out


def _members(view: tuple[dict[str, Func], dict[str, Class]]) -> dict[str, Func | str]:
    funcs, classes = view
    out: dict[str, Func | str] = dict(funcs)
    for cname, c in classes.items():
        out.update({f"{cname}.{m}": v for m, v in c.members.items()})
    return out


def _literal(text: str | None) -> object:
    """A default's value, or ... where it is not a Python literal (e.g. C++ source text)."""
    try:
        return ast.literal_eval(text or "")
    except (ValueError, SyntaxError):
        return ...


def _same_params(a: Func, b: Func, where: str, defaults: bool) -> list[str]:
    if a.params is None or b.params is None:
        return []
    na = [(p.name, p.has_default) for p in a.params]
    nb = [(p.name, p.has_default) for p in b.params]
    if na != nb:
        return [f"{where}: parameters {na} != {nb}"]
    errors = []
    if defaults:
        for p, q in zip(a.params, b.params):
            va, vb = _literal(p.default), _literal(q.default)
            if p.has_default and va is not ... and vb is not ... and va != vb:
                errors.append(f"{where}({p.name}): default {p.default} != {q.default}")
    return errors


def _norm(doc: str | None) -> str:
    return " ".join((doc or "").split())


def test_stub_and_module_have_the_same_names() -> None:
    runtime, stub = _names(runtime_view()), _names(stub_view())
    cuda_only = _names(source_view(cuda=True)) - _names(source_view(cuda=False))
    assert not runtime - stub, f"bound but not in {STUB.name}: {sorted(runtime - stub)}"
    extra = stub - runtime
    if not CUDA:
        extra -= cuda_only  # checked against cuda_bindings.cpp below
    assert not extra, f"in {STUB.name} but not bound: {sorted(extra)}"


def test_stub_and_module_have_the_same_signatures() -> None:
    rt, st = _members(runtime_view()), _members(stub_view())
    errors = []
    for name in sorted(rt.keys() & st.keys()):
        r, s = rt[name], st[name]
        if not isinstance(r, Func) or not isinstance(s, Func):
            if r != s:
                errors.append(f"{name}: {r!r} in the module, {s!r} in the stub")
            continue
        errors += _same_params(r, s, name, defaults=True)
        for p, q in zip(r.params or [], s.params or []):
            if p.type in TYPES and q.type != TYPES[p.type]:
                errors.append(f"{name}({p.name}): {p.type} in the module, {q.type} in the stub")
        if r.ret in TYPES and s.ret != TYPES[r.ret]:
            errors.append(f"{name}: returns {r.ret} in the module, {s.ret} in the stub")
        if r.doc and _norm(r.doc) != _norm(s.doc):
            errors.append(f"{name}: docstring {r.doc!r} in the module, {s.doc!r} in the stub")
    assert not errors, "\n".join(errors)


def test_stub_classes_match_module_classes() -> None:
    (_, rt), (_, st) = runtime_view(), stub_view()
    for name in rt.keys() & st.keys():
        if rt[name].bases and rt[name].bases[0] != "pybind11_object":
            assert st[name].bases == rt[name].bases, name
        if rt[name].doc:
            assert _norm(rt[name].doc) == _norm(st[name].doc), name


def test_source_reader_agrees_with_the_module() -> None:
    """The reader of the binding sources finds what this build bound (so its CUDA view can be trusted)."""
    src, rt = source_view(cuda=CUDA), runtime_view()
    assert _names(src) == _names(rt)
    errors = []
    srcm, rtm = _members(src), _members(rt)
    for name in sorted(srcm.keys() & rtm.keys()):
        a, b = srcm[name], rtm[name]
        if isinstance(a, Func) and isinstance(b, Func):
            errors += _same_params(a, b, name, defaults=False)
    assert not errors, "\n".join(errors)


def test_stub_cuda_part_matches_cuda_bindings() -> None:
    """The CUDA names of the stub against cuda_bindings.cpp (in a build with CUDA, also checked above)."""
    src, st = source_view(cuda=True), stub_view()
    cuda_only = _names(src) - _names(source_view(cuda=False))
    assert cuda_only, "no CUDA-only bindings found in cuda_bindings.cpp"
    assert cuda_only <= _names(st), sorted(cuda_only - _names(st))
    srcm, stm = _members(src), _members(st)
    errors = []
    for name in sorted(cuda_only & srcm.keys()):  # the functions and class members
        a, b = srcm[name], stm[name]
        if isinstance(a, Func) and isinstance(b, Func):
            errors += _same_params(a, b, name, defaults=False)
        elif a != b:
            errors.append(f"{name}: {a!r} in the source, {b!r} in the stub")
    for name, c in src[1].items():
        if c.bases:  # py::exception<...>(m, name, PyExc_<base>)
            assert st[1][name].bases == c.bases, name
    assert not errors, "\n".join(errors)


def test_stub_ships_with_the_package() -> None:
    assert STUB.name == "_native.pyi"
    assert (STUB.parent / "py.typed").exists()
    setup = (ROOT / "setup.py").read_text()
    assert "_native.pyi" in setup and "py.typed" in setup


def _stub_env() -> dict[str, str]:
    """The environment mypy finds the package in: MYPYPATH for a source checkout (python/); an installed
    package (site-packages, which mypy refuses in MYPYPATH) is found by mypy itself."""
    root = str(STUB.parent.parent)
    env = dict(os.environ, PYTHONPATH=root)
    if "site-packages" not in Path(root).parts and "dist-packages" not in Path(root).parts:
        env["MYPYPATH"] = root
    return env


def _mypy(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed")
    env = _stub_env()
    return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_stub_passes_mypy_strict(tmp_path: Path) -> None:
    # --follow-imports=silent: the parent package d2r is analysed too, and its (untyped) errors are not the stub's.
    # -m (not the file's path): an installed stub's folder, site-packages, must not become a source root.
    r = _mypy("--strict", "--follow-imports=silent", "--cache-dir", str(tmp_path / "cache"), "-m", "d2r._native",
              cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


# mypy.stubtest's allowlist: each entry is a difference by design.
STUBTEST_ALLOWLIST = r"""# pybind11 classes have the metaclass pybind11_builtins.pybind11_type, which a stub does not name.
d2r\._native\.(Quantizer|InvertedFile|PostingWriter|MappedFile|DeviceArray|GpuQuantizer|GpuInvertedFile)

# Classes without a constructor (made by InvertedFile.writer, GpuQuantizer.search / gpu_aggregate): at run
# time pybind11's __init__(*args, **kwargs) raises TypeError; the stub declares none.
d2r\._native\.PostingWriter\.__init__
d2r\._native\.DeviceArray\.__init__
"""
# CUDA build only (cuda_bindings.cpp under D2R_WITH_CUDA): absent from a build without CUDA, where
# test_stub_cuda_part_matches_cuda_bindings checks them against cuda_bindings.cpp instead.
STUBTEST_ALLOWLIST_NO_CUDA = r"""
d2r\._native\.(CudaError|CudaMemoryError|DeviceArray|GpuQuantizer|GpuInvertedFile)
d2r\._native\.(cuda_alloc_test|cuda_device_name|cuda_memory_info|cuda_runtime_info|gpu_aggregate|gpu_kmeans)
"""


def test_stubtest(tmp_path: Path) -> None:
    """mypy.stubtest: names, kinds and (where Python can read them) signatures. The allowlist holds what
    pybind11 differs in by design (its metaclass, classes without a constructor) and the CUDA-only names."""
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed")
    env = _stub_env()
    allowlist = tmp_path / "allowlist.txt"
    allowlist.write_text(STUBTEST_ALLOWLIST + ("" if CUDA else STUBTEST_ALLOWLIST_NO_CUDA))
    r = subprocess.run([sys.executable, "-m", "mypy.stubtest", "d2r._native", "--allowlist", str(allowlist),
                        "--ignore-unused-allowlist", "--mypy-config-file", os.devnull], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr

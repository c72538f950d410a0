"""Harness for the README's ```python blocks (used by tests/test_readme.py).

Conventions, read from comment lines inside a block:

- ``# needs: gpu, dataset, tf, torch`` (the block's first line, any combination): the block needs
  something CI lacks. It is compiled and name-checked, not run; ``gpu`` blocks run where
  ``d2r.cuda.is_available()``.
- ``# inputs: name1, name2`` (any comment line): names the block deliberately leaves to the reader
  (their own data). Such a block cannot run, so it is compiled and name-checked only.
- ``# reproduces: <method name>``: the tutorial block's printed table equals that method of
  ``d2r.pipeline.run`` on the demo set (see test_tutorial_matches_demo).

Every other block is run in a fresh namespace. The name check: (a) every ``import d2r...`` / ``from d2r...
import name`` resolves; (b) every attribute chain rooted at ``d2r`` (or at a name a d2r import binds)
resolves by getattr on the real module, a submodule only where the block's own imports load it in a
fresh interpreter; (c) every name the block loads is bound in the block before it is used (or later,
for function bodies), is a builtin, or is declared in ``# inputs:``.
"""
from __future__ import annotations

import ast
import builtins
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import linecache
import os
import re
import subprocess
import sys
import time
import traceback
import types

NEEDS = {
    "gpu": "a CUDA device",
    "dataset": "an external dataset such as Revisited Oxford",
    "tf": "TensorFlow (optional dependency)",
    "torch": "PyTorch (optional dependency)",
}
PYTHON_INFO = {"python", "py", "python3"}
BUILTIN_NAMES = frozenset(dir(builtins))

_DIRECTIVE = re.compile(r"^\s*#\s*(needs|inputs|reproduces)\s*:\s*(.*?)\s*$")
_DIRECTIVE_TYPO = re.compile(r"^\s*#\s*(need|input|reproduce|requires?|skip|marks?)\s*:", re.IGNORECASE)
_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")


# ---- Markdown -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block: ``line`` is the README line of its first code line (1-based)."""
    line: int
    fence_line: int
    info: str
    code: str
    headings: tuple = ()
    needs: tuple = ()
    inputs: tuple = ()
    reproduces: str | None = None
    directive_problems: tuple = ()

    @property
    def id(self) -> str:
        return f"L{self.line}"

    @property
    def first_line(self) -> str:
        for ln in self.code.splitlines():
            if ln.strip():
                return ln.strip()
        return "(empty block)"

    @property
    def where(self) -> str:
        return f"README.md line {self.line} ({self.first_line!r})"

    @property
    def is_python(self) -> bool:
        return self.info.split()[0].lower() in PYTHON_INFO if self.info.split() else False


def _split_names(s: str) -> list[str]:
    return [p for p in re.split(r"[,\s]+", s) if p]


def parse_directives(code: str, line: int = 1):
    """(needs, inputs, reproduces, problems) of a block's comment lines; problems name README lines."""
    needs, inputs, reproduces, problems = [], [], None, []
    lines = code.splitlines()
    first = next((i for i, ln in enumerate(lines) if ln.strip()), None)
    for i, ln in enumerate(lines):
        at = line + i
        m = _DIRECTIVE.match(ln)
        if m is None:
            if _DIRECTIVE_TYPO.match(ln):
                problems.append(f"line {at}: {ln.strip()!r} looks like a directive; the harness reads "
                                f"only '# needs:', '# inputs:' and '# reproduces:'")
            continue
        key, value = m.group(1), m.group(2)
        if key == "needs":
            if i != first:
                problems.append(f"line {at}: '# needs:' must be the block's first line")
            tags = _split_names(value)
            if not tags:
                problems.append(f"line {at}: '# needs:' names nothing")
            for t in tags:
                if t not in NEEDS:
                    problems.append(f"line {at}: unknown need {t!r} (known: {', '.join(NEEDS)})")
                elif t not in needs:
                    needs.append(t)
        elif key == "inputs":
            names = _split_names(value)
            if not names:
                problems.append(f"line {at}: '# inputs:' names nothing")
            for n in names:
                if not n.isidentifier():
                    problems.append(f"line {at}: '# inputs:' {n!r} is not a Python name")
                elif n not in inputs:
                    inputs.append(n)
        else:
            if reproduces is not None:
                problems.append(f"line {at}: a second '# reproduces:'")
            elif not value:
                problems.append(f"line {at}: '# reproduces:' names no method")
            else:
                reproduces = value
    return tuple(needs), tuple(inputs), reproduces, tuple(problems)


def parse_markdown(text: str, python_only: bool = True):
    """The fenced code blocks of a Markdown text, in order, and a list of problems (unclosed fences).

    Fences of backticks or tildes (3 or more, any indentation: content lines lose up to the fence's
    indentation); blocks inside ``<!-- -->`` comments are ignored; ATX and setext headings give each
    block its heading path (``Block.headings``)."""
    lines = text.splitlines()
    blocks, problems = [], []
    stack: list[tuple[int, str]] = []          # (level, heading text)
    i, n = 0, len(lines)
    prev_paragraph = False                     # previous line is paragraph text (for setext headings)
    while i < n:
        ln = lines[i]
        if ln.lstrip().startswith("<!--"):
            while i < n and "-->" not in lines[i]:
                i += 1
            i += 1
            prev_paragraph = False
            continue
        m = _FENCE.match(ln)
        if m and not (m.group(2)[0] == "`" and "`" in m.group(3)):
            indent, fence, info = len(m.group(1)), m.group(2), m.group(3).strip()
            start = i
            body = []
            i += 1
            closed = False
            while i < n:
                c = lines[i]
                cm = re.match(r"^\s*(`{3,}|~{3,})\s*$", c)
                if cm and cm.group(1)[0] == fence[0] and len(cm.group(1)) >= len(fence):
                    closed = True
                    break
                strip = len(c) - len(c.lstrip(" "))
                body.append(c[min(indent, strip):])
                i += 1
            if not closed:
                problems.append(f"README.md line {start + 1}: the {fence} fence opened here is never closed")
            code = "\n".join(body) + ("\n" if body else "")
            needs, inputs, reproduces, dprob = parse_directives(code, start + 2)
            b = Block(line=start + 2, fence_line=start + 1, info=info, code=code,
                      headings=tuple(h for _, h in stack), needs=needs, inputs=inputs,
                      reproduces=reproduces, directive_problems=dprob)
            if b.is_python or not python_only:
                blocks.append(b)
            i += 1
            prev_paragraph = False
            continue
        h = _ATX.match(ln)
        if h:
            level = len(h.group(1))
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, (h.group(2) or "").strip()))
            prev_paragraph = False
        elif prev_paragraph and _SETEXT.match(ln):
            level = 1 if ln.strip()[0] == "=" else 2
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, lines[i - 1].strip()))
            prev_paragraph = False
        else:
            prev_paragraph = bool(ln.strip()) and not ln.startswith("    ")
        i += 1
    return blocks, problems


# ---- static analysis ---------------------------------------------------------------------------------
@dataclasses.dataclass
class ImportRef:
    kind: str            # "import" or "from"
    module: str
    name: str | None     # for "from": the imported name ("*" for a star import)
    lineno: int
    source: str          # the statement, for re-running it in a fresh interpreter


@dataclasses.dataclass
class Analysis:
    undefined: list      # (name, lineno, reason) reason: "undefined", "before", "local-before"
    chains: list         # (root name, attribute tuple, lineno), roots resolved at module level
    imports: list        # ImportRef of d2r modules
    aliases: dict        # name -> dotted path, for names bound only by d2r imports
    unused_inputs: list
    problems: list       # (lineno, message)


def _is_d2r(module: str | None) -> bool:
    return bool(module) and (module == "d2r" or module.startswith("d2r."))


def _bound_names(nodes) -> set:
    """Names a list of statements binds in its own scope (not inside nested functions, classes,
    lambdas or comprehensions, except walrus targets there)."""
    out = set()

    def target(t):
        if isinstance(t, ast.Name):
            out.add(t.id)
        elif isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                target(e)
        elif isinstance(t, ast.Starred):
            target(t.value)

    def visit(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
            return
        if isinstance(node, ast.Lambda):
            return
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.NamedExpr):
                    target(sub.target)
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                if a.name != "*":
                    out.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            out.add(node.name)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            out.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            out.add(node.rest)
        for child in ast.iter_child_nodes(node):
            visit(child)

    for nd in nodes:
        visit(nd)
    return out


def _declared(nodes, kind) -> set:
    out = set()

    def visit(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            return
        if isinstance(node, kind):
            out.update(node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    for nd in nodes:
        visit(nd)
    return out


class _Scope:
    def __init__(self, kind, parent, local_names=(), globals_=(), nonlocals=()):
        self.kind = kind                  # "module", "function", "class", "comprehension"
        self.parent = parent
        self.defined: set = set()
        self.locals = set(local_names)    # function: every name its body binds (Python's local set)
        self.globals = set(globals_)
        self.nonlocals = set(nonlocals)


def _dotted(node):
    """(root name, attrs) for a pure chain ``a.b.c``, else None."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return node.id, tuple(reversed(attrs))
    return None


class _Analyzer:
    def __init__(self, inputs, future_annotations):
        self.module = _Scope("module", None)
        self.scope = self.module
        self.inputs = set(inputs)
        self.used_inputs: set = set()
        self.future_annotations = future_annotations
        self.undefined: list = []
        self.chains: list = []
        self.imports: list = []
        self.import_paths: dict = {}        # module-level name -> set of d2r paths bound by imports
        self.other_bound: set = set()       # module-level names bound otherwise
        self.problems: list = []
        self.pending: list = []             # deferred function / lambda bodies

    # -- names
    def bind(self, name, import_path=None):
        s = self.scope
        if s.kind == "function" and name in s.globals:
            s = self.module
        elif s.kind == "function" and name in s.nonlocals:
            p = s.parent
            while p is not None and not (p.kind == "function" and name in p.locals):
                p = p.parent
            s = p or self.module
        s.defined.add(name)
        if s is self.module:
            if import_path is not None:
                self.import_paths.setdefault(name, set()).add(import_path)
            else:
                self.other_bound.add(name)

    def load(self, name, lineno):
        """Checks a load; returns the scope it resolves to (None: builtin, input or undefined)."""
        s, first = self.scope, True
        while s is not None:
            if s.kind == "class" and not first:
                s = s.parent
                continue
            if s.kind == "function":
                if name in s.globals:
                    s = self.module
                    continue
                if name in s.locals and name not in s.nonlocals:
                    if name not in s.defined:
                        self.undefined.append((name, lineno, "local-before"))
                    return s
            elif name in s.defined:
                return s
            s, first = s.parent, False
        if name in BUILTIN_NAMES:
            return None
        if name in self.inputs:
            self.used_inputs.add(name)
            return None
        self.undefined.append((name, lineno, "undefined"))
        return None

    def bind_target(self, t):
        if isinstance(t, ast.Name):
            self.bind(t.id)
        elif isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                self.bind_target(e)
        elif isinstance(t, ast.Starred):
            self.bind_target(t.value)
        elif isinstance(t, ast.Attribute):
            self.expr(t.value)
        elif isinstance(t, ast.Subscript):
            self.expr(t.value)
            self.expr(t.slice)
        else:
            self.expr(t)

    # -- statements
    def run(self, tree):
        # a function that declares `global x` and assigns x may define it for the module (optimistic)
        for f in ast.walk(tree):
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.module.defined |= _declared(f.body, ast.Global) & _bound_names(f.body)
        self.stmts(tree.body)
        while self.pending:
            self.pending.pop(0)()

    def stmts(self, body):
        for st in body:
            getattr(self, "s_" + type(st).__name__, self.s_generic)(st)

    def s_generic(self, node):
        for child in ast.iter_child_nodes(node):
            self.expr(child)

    def s_Assign(self, node):
        self.expr(node.value)
        for t in node.targets:
            self.bind_target(t)

    def s_AugAssign(self, node):
        if isinstance(node.target, ast.Name):
            self.load(node.target.id, node.lineno)
        self.expr(node.value)
        self.bind_target(node.target)

    def s_AnnAssign(self, node):
        if node.value is not None:
            self.expr(node.value)
        if not self.future_annotations and self.scope.kind != "function":
            self.expr(node.annotation)
        if node.value is not None:
            self.bind_target(node.target)
        elif not isinstance(node.target, ast.Name):
            self.expr(node.target.value)

    def _loop_body(self, body, orelse):
        self.scope.defined |= _bound_names(body)     # a later iteration sees what an earlier one bound
        self.stmts(body)
        self.stmts(orelse)

    def s_For(self, node):
        self.expr(node.iter)
        self.bind_target(node.target)
        self._loop_body(node.body, node.orelse)

    s_AsyncFor = s_For

    def s_While(self, node):
        self.expr(node.test)
        self._loop_body(node.body, node.orelse)

    def _branches(self, branches):
        before = set(self.scope.defined)
        after = set()
        for run in branches:
            self.scope.defined = set(before)
            run()
            after |= self.scope.defined
        self.scope.defined = after

    def s_If(self, node):
        self.expr(node.test)
        self._branches([lambda: self.stmts(node.body), lambda: self.stmts(node.orelse)])

    def s_With(self, node):
        for item in node.items:
            self.expr(item.context_expr)
            if item.optional_vars is not None:
                self.bind_target(item.optional_vars)
        self.stmts(node.body)

    s_AsyncWith = s_With

    def s_Try(self, node):
        self.stmts(node.body)

        def handler(h):
            def run():
                if h.type is not None:
                    self.expr(h.type)
                if h.name:
                    self.bind(h.name)
                self.stmts(h.body)
            return run

        self._branches([lambda: self.stmts(node.orelse)] + [handler(h) for h in node.handlers])
        self.stmts(node.finalbody)

    s_TryStar = s_Try

    def s_Match(self, node):
        self.expr(node.subject)

        def case(c):
            def run():
                self.pattern(c.pattern)
                if c.guard is not None:
                    self.expr(c.guard)
                self.stmts(c.body)
            return run

        self._branches([case(c) for c in node.cases])

    def pattern(self, p):
        if isinstance(p, ast.MatchValue):
            self.expr(p.value)
        elif isinstance(p, ast.MatchSequence):
            for q in p.patterns:
                self.pattern(q)
        elif isinstance(p, ast.MatchMapping):
            self.expr(p.keys)
            for q in p.patterns:
                self.pattern(q)
            if p.rest:
                self.bind(p.rest)
        elif isinstance(p, ast.MatchClass):
            self.expr(p.cls)
            for q in p.patterns + p.kwd_patterns:
                self.pattern(q)
        elif isinstance(p, ast.MatchStar):
            if p.name:
                self.bind(p.name)
        elif isinstance(p, ast.MatchAs):
            if p.pattern is not None:
                self.pattern(p.pattern)
            if p.name:
                self.bind(p.name)
        elif isinstance(p, ast.MatchOr):
            for q in p.patterns:
                self.pattern(q)

    def _params(self, args):
        names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
        names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
        return names

    def _defer(self, params, body, lineno, is_expr=False):
        parent = self.scope
        stmts = [ast.Expr(body)] if is_expr else body
        local_names = set(params) | _bound_names(stmts)
        globals_, nonlocals = _declared(stmts, ast.Global), _declared(stmts, ast.Nonlocal)
        local_names -= globals_ | nonlocals

        def run():
            saved = self.scope
            self.scope = _Scope("function", parent, local_names, globals_, nonlocals)
            self.scope.defined |= set(params)
            self.stmts(stmts)
            self.scope = saved

        self.pending.append(run)

    def s_FunctionDef(self, node):
        self.expr(node.decorator_list)
        self.expr(node.args.defaults)
        self.expr([d for d in node.args.kw_defaults if d is not None])
        if not self.future_annotations:
            for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs + [
                    x for x in (node.args.vararg, node.args.kwarg) if x is not None]:
                self.expr(a.annotation)
            self.expr(node.returns)
        self.bind(node.name)
        self._defer(self._params(node.args), node.body, node.lineno)

    s_AsyncFunctionDef = s_FunctionDef

    def s_ClassDef(self, node):
        self.expr(node.decorator_list)
        self.expr(node.bases)
        self.expr([k.value for k in node.keywords])
        saved = self.scope
        self.scope = _Scope("class", saved)
        self.stmts(node.body)
        self.scope = saved
        self.bind(node.name)

    def s_Import(self, node):
        for a in node.names:
            if _is_d2r(a.name):
                self.imports.append(ImportRef("import", a.name, None, node.lineno, ast.unparse(node)))
            if a.asname:
                self.bind(a.asname, a.name if _is_d2r(a.name) else None)
            else:
                top = a.name.split(".")[0]
                self.bind(top, top if _is_d2r(a.name) else None)

    def s_ImportFrom(self, node):
        if node.level:
            self.problems.append((node.lineno, "a relative import cannot work in a README snippet"))
        mod = node.module or ""
        d2r = _is_d2r(mod) and not node.level
        for a in node.names:
            if d2r:
                self.imports.append(ImportRef("from", mod, a.name, node.lineno, ast.unparse(node)))
            if a.name == "*":
                try:
                    m = importlib.import_module(mod)
                    names = getattr(m, "__all__", None) or [x for x in dir(m) if not x.startswith("_")]
                except Exception:  # noqa: BLE001 - any failure: say the names cannot be checked
                    self.problems.append((node.lineno, f"'from {mod} import *': {mod} does not import here, "
                                                       "so the names it binds cannot be checked"))
                    names = []
                for x in names:
                    self.bind(x, f"{mod}.{x}" if d2r else None)
            else:
                self.bind(a.asname or a.name, f"{mod}.{a.name}" if d2r else None)

    def s_Global(self, node):
        pass

    s_Nonlocal = s_Global

    # -- expressions
    def expr(self, node):
        if node is None:
            return
        if isinstance(node, list):
            for x in node:
                self.expr(x)
            return
        m = getattr(self, "e_" + type(node).__name__, None)
        if m is not None:
            m(node)
            return
        for child in ast.iter_child_nodes(node):
            self.expr(child)

    def e_Name(self, node):
        if isinstance(node.ctx, ast.Store):
            self.bind(node.id)
        else:
            self.load(node.id, node.lineno)

    def e_Attribute(self, node):
        d = _dotted(node)
        if d is None or not isinstance(node.ctx, ast.Load):
            self.expr(node.value)
            return
        where = self.load(d[0], node.lineno)
        if where is self.module or where is None:
            self.chains.append((d[0], d[1], node.lineno))

    def e_NamedExpr(self, node):
        self.expr(node.value)
        saved = self.scope
        while self.scope.kind == "comprehension":
            self.scope = self.scope.parent
        self.bind_target(node.target)
        self.scope = saved

    def e_Lambda(self, node):
        self.expr(node.args.defaults)
        self.expr([d for d in node.args.kw_defaults if d is not None])
        self._defer(self._params(node.args), node.body, node.lineno, is_expr=True)

    def _comprehension(self, generators, elts):
        self.expr(generators[0].iter)
        saved = self.scope
        self.scope = _Scope("comprehension", saved)
        for i, g in enumerate(generators):
            if i:
                self.expr(g.iter)
            self.bind_target(g.target)
            self.expr(g.ifs)
        self.expr(elts)
        self.scope = saved

    def e_ListComp(self, node):
        self._comprehension(node.generators, [node.elt])

    e_SetComp = e_GeneratorExp = e_ListComp

    def e_DictComp(self, node):
        self._comprehension(node.generators, [node.key, node.value])


def analyze(code: str, inputs=()) -> Analysis:
    """Static analysis of a block (raises SyntaxError)."""
    tree = ast.parse(code)
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                 any(a.name == "annotations" for a in n.names) for n in tree.body)
    a = _Analyzer(inputs, future)
    a.run(tree)
    undefined = []
    for name, lineno, reason in a.undefined:
        if reason == "undefined" and name in a.module.defined:
            reason = "before"
        undefined.append((name, lineno, reason))
    aliases = {n: next(iter(p)) for n, p in a.import_paths.items() if len(p) == 1 and n not in a.other_bound}
    return Analysis(undefined, a.chains, a.imports, aliases,
                    sorted(set(inputs) - a.used_inputs), a.problems)


# ---- resolution against the real package ---------------------------------------------------------------
def _find_spec(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _resolve_path(path: str):
    """The object a d2r import binds (imports submodules as a from-import would)."""
    parts = path.split(".")
    obj = importlib.import_module(parts[0])
    for i, p in enumerate(parts[1:], 1):
        try:
            obj = getattr(obj, p)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


_FRESH_SCRIPT = """
import json, sys
for s in json.loads(sys.argv[1]):
    try:
        exec(s, {})
    except BaseException:
        pass
print(json.dumps(sorted(m for m in sys.modules if m == "d2r" or m.startswith("d2r."))))
"""
_fresh_cache: dict = {}


def fresh_modules(import_sources) -> set:
    """The d2r modules a fresh interpreter has loaded after the given import statements."""
    key = tuple(sorted(set(import_sources)))
    if key not in _fresh_cache:
        import d2r
        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(d2r.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([pkg_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        out = subprocess.run([sys.executable, "-c", _FRESH_SCRIPT, json.dumps(list(key))], env=env,
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"listing the modules of {key} failed:\n{out.stderr[-2000:]}")
        _fresh_cache[key] = set(json.loads(out.stdout.strip().splitlines()[-1]))
    return _fresh_cache[key]


def _missing_dependency(e: ModuleNotFoundError, module: str) -> str | None:
    """The third-party module an import of ``module`` lacks, or None if ``module`` itself is missing."""
    name = e.name or ""
    if not name or _is_d2r(name) or module == name or module.startswith(name + "."):
        return None
    return name


def check_block(block: Block) -> tuple[list, list]:
    """(problems, notes) of a block: messages naming README lines. Empty problems: it passes."""
    problems = list(block.directive_problems)
    notes = []
    off = block.line - 1
    try:
        compile(block.code, "README.md", "exec")
        an = analyze(block.code, block.inputs)
    except SyntaxError as e:
        return problems + [f"line {off + (e.lineno or 1)}: does not compile: {e.msg}"], notes

    for lineno, msg in an.problems:
        problems.append(f"line {off + lineno}: {msg}")
    seen = set()
    for name, lineno, reason in an.undefined:
        if (name, reason) in seen:
            continue
        seen.add((name, reason))
        if reason == "undefined" and _find_spec(name):
            problems.append(f"line {off + lineno}: name {name!r} is not defined in the block: "
                            f"a module, so import it ('import {name}')")
        elif reason == "undefined":
            problems.append(f"line {off + lineno}: name {name!r} is not defined in the block (define or "
                            f"import it, or declare it as the reader's input: '# inputs: {name}')")
        elif reason == "before":
            problems.append(f"line {off + lineno}: name {name!r} is used before the block assigns it")
        else:
            problems.append(f"line {off + lineno}: local name {name!r} is used before its function assigns it")
    for name in an.unused_inputs:
        problems.append(f"'# inputs:' declares {name!r}, which the block never reads (or defines itself)")

    optional_marked = bool({"tf", "torch"} & set(block.needs))
    unimportable = set()
    for ref in an.imports:
        at = f"line {off + ref.lineno}"
        try:
            mod = importlib.import_module(ref.module)
        except ModuleNotFoundError as e:
            dep = _missing_dependency(e, ref.module)
            unimportable.add(ref.module)
            if dep is None:
                problems.append(f"{at}: no module {ref.module!r} ({e})")
            elif optional_marked:
                notes.append(f"{at}: {ref.module} not imported here: {dep} is not installed")
            else:
                problems.append(f"{at}: importing {ref.module} needs {dep!r}, which is not installed here; "
                                f"mark the block '# needs: ...' if it needs an optional dependency")
            continue
        except Exception as e:  # noqa: BLE001 - report whatever the import raised
            unimportable.add(ref.module)
            problems.append(f"{at}: importing {ref.module} raises {type(e).__name__}: {e}")
            continue
        if ref.kind == "from" and ref.name != "*":
            if not hasattr(mod, ref.name) and not _find_spec(f"{ref.module}.{ref.name}"):
                problems.append(f"{at}: 'from {ref.module} import {ref.name}': {ref.module} has no {ref.name!r}")

    import_sources = [r.source for r in an.imports]
    d2r_imported = an.aliases.get("d2r") == "d2r"
    for root, attrs, lineno in an.chains:
        at = f"line {off + lineno}"
        if root == "d2r" and an.aliases.get("d2r", "d2r") == "d2r":
            base = "d2r"
        elif root in an.aliases:
            base = an.aliases[root]
        else:
            continue
        if any(base == m or base.startswith(m + ".") for m in unimportable):
            continue
        try:
            obj = _resolve_path(base)
        except Exception:  # noqa: BLE001 - the import check reports it
            continue
        shown = root
        for a in attrs:
            shown += "." + a
            try:
                val = getattr(obj, a)
            except AttributeError:
                if isinstance(obj, types.ModuleType) and _find_spec(f"{obj.__name__}.{a}"):
                    problems.append(f"{at}: {shown}: {obj.__name__}.{a} is a submodule the block never "
                                    f"imports (add 'import {obj.__name__}.{a}')")
                else:
                    what = obj.__name__ if isinstance(obj, types.ModuleType) else \
                        getattr(obj, "__qualname__", type(obj).__name__)
                    problems.append(f"{at}: {shown} does not resolve: {what} has no attribute {a!r}")
                break
            except Exception as e:  # noqa: BLE001 - a property raising on the class, say
                problems.append(f"{at}: {shown}: getattr raises {type(e).__name__}: {e}")
                break
            if (isinstance(val, types.ModuleType) and isinstance(obj, types.ModuleType)
                    and val.__name__ == f"{obj.__name__}.{a}" and (d2r_imported or root != "d2r")):
                if val.__name__ not in fresh_modules(import_sources):
                    problems.append(f"{at}: {shown}: {val.__name__} is a submodule that the block's imports "
                                    f"do not load (add 'import {val.__name__}')")
                    break
            obj = val
    return problems, notes


# ---- running -----------------------------------------------------------------------------------------
def not_run_reason(block: Block, gpu_available: bool) -> str | None:
    """Why a block is only checked, not run (None: it runs)."""
    why = []
    for t in block.needs:
        if t == "gpu":
            if not gpu_available:
                why.append("gpu (no CUDA device here)")
        else:
            why.append(f"{t} ({NEEDS[t]}; such blocks are only checked)")
    if block.inputs:
        why.append(f"the reader's own data ('# inputs: {', '.join(block.inputs)}')")
    if not why:
        return None
    return "compiled and name-checked only; not run: needs " + "; ".join(why)


@dataclasses.dataclass
class RunResult:
    stdout: str
    error: str | None     # the formatted traceback (README frames), None if the block ran
    seconds: float
    namespace: dict = dataclasses.field(default_factory=dict, repr=False)


def execute_block(block: Block, filename: str = "README.md", source_text: str | None = None) -> RunResult:
    """Runs a block in a fresh namespace in the current directory, stdout captured; tracebacks
    name ``filename`` with README line numbers (``source_text``: that file's text, if not on disk).
    Restores d2r's thread count afterwards."""
    if source_text is not None:
        linecache.cache[filename] = (len(source_text), None, source_text.splitlines(True), filename)
    tree = ast.parse(block.code, filename)
    ast.increment_lineno(tree, block.line - 1)
    code = compile(tree, filename, "exec")
    ns = {"__name__": "__main__", "__builtins__": builtins}
    buf = io.StringIO()
    threads = None
    try:
        import d2r
        threads = d2r.get_num_threads()
    except Exception:  # noqa: BLE001 - the block reports its own import failures
        pass
    t = time.perf_counter()
    error = None
    try:
        with contextlib.redirect_stdout(buf):
            exec(code, ns)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a failing block is a test result
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
        error = "".join(traceback.format_exception(type(e), e, tb))
    finally:
        if threads is not None:
            import d2r
            d2r.set_num_threads(threads)
    return RunResult(buf.getvalue(), error, time.perf_counter() - t, ns)


# ---- the tutorial ------------------------------------------------------------------------------------
def find_tutorial(blocks) -> Block:
    """The python block under a heading containing "tutorial" (the one with '# reproduces:' if several)."""
    under = [b for b in blocks if b.is_python and any("tutorial" in h.lower() for h in b.headings)]
    if not under:
        raise LookupError("no ```python block under a heading that contains 'tutorial'")
    if len(under) == 1:
        return under[0]
    marked = [b for b in under if b.reproduces]
    if len(marked) != 1:
        raise LookupError(f"{len(under)} python blocks under the tutorial heading "
                          f"({', '.join(b.id for b in under)}) and {len(marked)} with '# reproduces:'; "
                          "mark exactly one")
    return marked[0]


_SUMMARY = re.compile(r"^\s*mAP\s+([A-Za-z](?:/[A-Za-z])*)\s*:\s*(.+?)\s*$")
_LETTERS = {"E": "easy", "M": "medium", "H": "hard"}


def parse_map_summary(text: str) -> dict:
    """{"easy", "medium", "hard"}: the mAPs (percent) of the one ``mAP E/M/H: a / b / c`` line that
    d2r.evaluate.format_table prints. Raises ValueError if there is not exactly one such line."""
    found = []
    for ln in text.splitlines():
        m = _SUMMARY.match(ln)
        if m is None:
            continue
        letters = m.group(1).upper().split("/")
        values = [v.strip() for v in m.group(2).split("/")]
        if len(letters) != len(values):
            raise ValueError(f"cannot read {ln.strip()!r}")
        found.append({_LETTERS.get(k, k): float(v) for k, v in zip(letters, values)})
    if len(found) != 1:
        raise ValueError(f"expected one 'mAP E/M/H: ...' line (d2r.evaluate.format_table), found {len(found)}")
    res = found[0]
    missing = [p for p in ("easy", "medium", "hard") if p not in res]
    if missing:
        raise ValueError(f"the table has no {', '.join(missing)} protocol")
    return res

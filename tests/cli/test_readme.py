"""The README's ```python blocks run as written, on the built-in demo set.

Each block gets two tests, ids by README line (``L64``: the block's first code line):

- ``test_block_checks``: the block compiles, and its names resolve: (a) every ``import d2r...`` /
  ``from d2r... import name``; (b) every attribute chain rooted at ``d2r`` (or at a name a d2r import
  binds) by getattr on the real package, a submodule only where the block's own imports load it;
  (c) every name it reads is bound in the block, a builtin, or declared with ``# inputs: a, b``.
- ``test_block_runs``: the block is run in a fresh namespace with a temporary folder as the current
  directory, stdout captured, in README order. Not run (skipped, saying why) when its first line is
  ``# needs: gpu`` (run where ``d2r.cuda.is_available()``, marked ``gpu``), ``# needs: dataset``,
  ``# needs: tf`` or ``# needs: torch`` (several may be combined: ``# needs: gpu, dataset``), or when it
  declares ``# inputs:`` (the reader's own data).

``test_tutorial_matches_demo``: the block under the heading containing "tutorial" prints a Revisited
table (``d2r.core.evaluate.format_table``); its mAP Easy / Medium / Hard equal, within 0.1, those of
``d2r.workflows.pipeline.run`` on the demo set, with the demo's region source (its default, as ``d2r demo`` runs
it), for the method the block names with ``# reproduces: <name>`` (a name from
``d2r.workflows.pipeline.default_methods``; not an oracle row, and the block may not use the dataset's boxes). RootSIFT extraction is memoised in this module (the blocks
and the pipeline run extract the same demo images; it is deterministic, so only the time changes).
The harness itself lives in tests/readme_blocks.py and is unit-tested at the end of this file on
synthetic README text.
"""
import copy
import hashlib
import io
import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest

import d2r
import readme_blocks as rb

# $D2R_README: check another Markdown file (a draft) the same way
README = Path(os.environ.get("D2R_README") or Path(__file__).resolve().parents[2] / "README.md").resolve()
TEXT = README.read_text(encoding="utf-8")
BLOCKS, PARSE_PROBLEMS = rb.parse_markdown(TEXT)
GPU = d2r.cuda.is_available()
TOLERANCE = 0.1      # mAP, percent


def _run_params():
    out = []
    for b in BLOCKS:
        marks = [getattr(pytest.mark, t) for t in b.needs if t in ("gpu", "tf", "torch")]
        out.append(pytest.param(b, id=b.id, marks=marks))
    return out


@pytest.fixture(scope="module")
def rootsift_memo():
    """RootSIFT is deterministic, and the README's blocks and the pipeline run extract the same demo
    images (files, and the same crops as arrays) with the same parameters: each (parameters, image) is
    extracted once in this module, later calls get a copy. Everything else runs as written."""
    from d2r.extract import RootSIFT

    real = RootSIFT.__call__
    memo = {}

    def key(self, image):
        if isinstance(image, (str, os.PathLike)):
            st = os.stat(image)
            ident = ("file", os.path.realpath(image), st.st_mtime_ns, st.st_size)
        elif isinstance(image, np.ndarray):
            ident = ("array", image.shape, image.dtype.str,
                     hashlib.sha1(np.ascontiguousarray(image).data).hexdigest())
        else:
            return None
        return type(self), json.dumps(self.describe()["params"], sort_keys=True, default=str), ident

    def call(self, image):
        try:
            k = key(self, image)
        except (OSError, AttributeError, TypeError, ValueError):
            k = None
        if k is None:
            return real(self, image)
        if k not in memo:
            memo[k] = real(self, image)
        return copy.deepcopy(memo[k])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RootSIFT, "__call__", call)
        yield memo


@pytest.fixture(scope="module")
def run_block(tmp_path_factory, rootsift_memo):
    """Runs a README block once per module (the tutorial is slow and two tests read it): a fresh
    namespace, a temporary folder as the current directory, stdout captured; tracebacks show the
    README text that was collected, with its line numbers."""
    done = {}

    def run(block):
        if block.line not in done:
            with pytest.MonkeyPatch.context() as mp:
                mp.chdir(tmp_path_factory.mktemp(block.id))
                done[block.line] = rb.execute_block(block, str(README), source_text=TEXT)
        return done[block.line]

    return run


def _tail(s, n=3000):
    return s if len(s) <= n else "...\n" + s[-n:]


def test_readme_parses():
    assert not PARSE_PROBLEMS, "\n".join(PARSE_PROBLEMS)
    assert BLOCKS, "README.md has no ```python block"
    try:
        tutorial = rb.find_tutorial(BLOCKS)
    except LookupError:
        tutorial = None                     # test_tutorial_matches_demo says so
    stray = [b.where for b in BLOCKS if b.reproduces and b is not tutorial]
    assert not stray, f"'# reproduces:' outside the tutorial is not checked: {stray}"


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in BLOCKS])
def test_block_checks(block):
    problems, notes = rb.check_block(block)
    if problems:
        pytest.fail(f"{block.where}:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.mark.parametrize("block", _run_params())
def test_block_runs(block, run_block):
    reason = rb.not_run_reason(block, GPU)
    if reason is not None:
        pytest.skip(f"{block.where}: {reason}")
    res = run_block(block)
    if res.error is not None:
        pytest.fail(f"{block.where} fails ({res.seconds:.1f} s):\n{_tail(res.error)}"
                    + (f"\n--- its output ---\n{_tail(res.stdout, 1500)}" if res.stdout else ""), pytrace=False)


@pytest.mark.slow
def test_tutorial_matches_demo(run_block, rootsift_memo, monkeypatch):
    from d2r.workflows import pipeline
    from d2r.datasets import make_demo_set

    try:
        block = rb.find_tutorial(BLOCKS)
    except LookupError as e:
        pytest.fail(f"README.md: {e}", pytrace=False)
    names = [m[0] for m in pipeline.default_methods(None)]
    if block.reproduces not in names:
        pytest.fail(f"{block.where}: the tutorial must name the method it reproduces, "
                    f"'# reproduces: <name>', one of {names} (it says {block.reproduces!r})", pytrace=False)
    if block.needs or block.inputs:
        pytest.fail(f"{block.where}: the tutorial must run as written (no '# needs:' / '# inputs:')", pytrace=False)
    res = run_block(block)
    if res.error is not None:
        pytest.fail(f"{block.where} fails:\n{_tail(res.error)}", pytrace=False)
    try:
        tutorial = rb.parse_map_summary(res.stdout)
    except ValueError as e:
        pytest.fail(f"{block.where}: {e}; it printed:\n{_tail(res.stdout, 1500)}", pytrace=False)

    # only the reproduced method: run() builds its methods from the codebook it trains, so filter the list
    all_methods = pipeline.default_methods
    monkeypatch.setattr(pipeline, "default_methods",
                        lambda codebook: [m for m in all_methods(codebook) if m[0] == block.reproduces])
    out = io.StringIO()
    # the demo's row: d2r demo's region source (pipeline.DEFAULT_REGIONS, discovered), not an oracle; the
    # tutorial must not name a row whose numbers come from the dataset's own boxes
    assert not block.reproduces.endswith(pipeline.ORACLE_SUFFIX) and pipeline.DEFAULT_REGIONS == "discovered"
    assert '"dataset"' not in block.code and "'dataset'" not in block.code, \
        f"{block.where}: the tutorial uses the dataset's boxes (an oracle); use the demo's region source"
    result = pipeline.run(make_demo_set(), rerank=False, report_dir=None, progress=False, out=out)
    assert result["regions"] == pipeline.DEFAULT_REGIONS
    (method,) = result["methods"]
    assert method.name == block.reproduces
    demo = {p: 100.0 * float(method.results[p]["map"]) for p in ("easy", "medium", "hard")}
    off = {p: tutorial[p] - demo[p] for p in demo if not abs(tutorial[p] - demo[p]) <= TOLERANCE}
    if off:
        fmt = " / ".join
        pytest.fail(f"{block.where}: the tutorial's mAP E/M/H {fmt(f'{tutorial[p]:.2f}' for p in demo)} "
                    f"differ from d2r.workflows.pipeline.run's {block.reproduces!r} {fmt(f'{demo[p]:.2f}' for p in demo)} "
                    f"by more than {TOLERANCE} ({', '.join(f'{p} {d:+.2f}' for p, d in off.items())})\n"
                    f"--- the tutorial printed ---\n{_tail(res.stdout, 1500)}\n--- the pipeline printed ---\n"
                    f"{_tail(out.getvalue(), 1500)}", pytrace=False)


# ---- the harness itself, on synthetic README text ---------------------------------------------------------
def _block(code):
    blocks, problems = rb.parse_markdown("# t\n\n```python\n" + textwrap.dedent(code).lstrip("\n") + "```\n")
    assert not problems and len(blocks) == 1
    return blocks[0]


def _problems(code):
    return rb.check_block(_block(code))[0]


SYNTHETIC = """\
# Title

Some text.

```bash
echo not python
```

## Five-minute Tutorial

```python
import d2r
# reproduces: ASMK*
print("mAP E/M/H: 10.00 / 20.00 / 30.00")
```

<!--
```python
this is commented out
```
-->

Setext heading
--------------

  ```py
  # needs: gpu, dataset
  import d2r
  print(d2r.cuda.is_available())
  ```

~~~~python
# inputs: x
y = x + 1
~~~~
"""


def test_parse_synthetic():
    blocks, problems = rb.parse_markdown(SYNTHETIC)
    assert not problems
    assert [b.line for b in blocks] == [12, 27, 33]
    assert [b.id for b in blocks] == ["L12", "L27", "L33"]
    tut, gpu, inp = blocks
    assert tut.headings == ("Title", "Five-minute Tutorial") and tut.reproduces == "ASMK*"
    assert rb.find_tutorial(blocks) is tut
    assert gpu.headings == ("Title", "Setext heading") and gpu.needs == ("gpu", "dataset")
    assert gpu.code.startswith("# needs:")                   # the fence's indentation is removed
    assert inp.inputs == ("x",) and inp.where == "README.md line 33 ('# inputs: x')"
    assert rb.not_run_reason(tut, False) is None
    assert "gpu (no CUDA device here)" in rb.not_run_reason(gpu, False)
    assert "dataset" in rb.not_run_reason(gpu, True) and "gpu" not in rb.not_run_reason(gpu, True).split("needs ")[1]
    assert "the reader's own data" in rb.not_run_reason(inp, True)
    assert all(rb.check_block(b)[0] == [] for b in blocks)
    assert rb.parse_markdown(SYNTHETIC, python_only=False)[0][0].info == "bash"


def test_parse_unclosed_fence():
    blocks, problems = rb.parse_markdown("text\n\n```python\nx = 1\n")
    assert problems == ["README.md line 3: the ``` fence opened here is never closed"]


@pytest.mark.parametrize("code, expected", [
    ("print(undefined_thing)\n", ["name 'undefined_thing' is not defined"]),
    ("y = x + 1\n", ["name 'x' is not defined", "'# inputs: x'"]),
    ("print(a)\na = 1\n", ["'a' is used before the block assigns it"]),
    ("import d2r\nd2r.nonexistent()\n", ["d2r.nonexistent does not resolve: d2r has no attribute 'nonexistent'"]),
    ("import d2r\nd2r.Index.no_such_method\n", ["d2r.Index.no_such_method does not resolve"]),
    ("import d2r\nd2r.workflows.pipeline.run\n", ["d2r.workflows.pipeline is a submodule", "import d2r.workflows.pipeline"]),
    ("from d2r.core.evaluate import no_such_name\n", ["d2r.core.evaluate has no 'no_such_name'"]),
    ("import d2r.no_such_module\n", ["no module 'd2r.no_such_module'"]),
    ("from d2r.core import evaluate as ev\nev.no_such_function\n", ["ev.no_such_function does not resolve"]),
    ("d2r.Index\n", ["name 'd2r' is not defined in the block: a module, so import it"]),
    ("# inputs: a, b\nprint(a)\n", ["declares 'b', which the block never reads"]),
    ("x = 1\n# needs: gpu\n", ["'# needs:' must be the block's first line"]),
    ("# needs: gpu, cloud\n", ["unknown need 'cloud'"]),
    ("# need: gpu\n", ["looks like a directive"]),
    ("def f():\n    print(z)\n    z = 1\n", ["local name 'z' is used before its function assigns it"]),
    ("class C:\n    k = 1\n    def m(self):\n        return k\n", ["name 'k' is not defined"]),
    ("x = (\n", ["does not compile"]),
    ("from . import x\n", ["relative import"]),
])
def test_check_reports(code, expected):
    problems = _problems(code)
    text = "\n".join(problems)
    assert all(e in text for e in expected), problems


@pytest.mark.parametrize("code", [
    "# inputs: descriptors, paths\nimport d2r\ncb = d2r.Codebook.train(descriptors, n_words=4)\nprint(len(paths))\n",
    "import d2r\nprint(d2r.cuda.is_available(), d2r.Index.load, d2r.__version__)\n",
    "import d2r.workflows.pipeline\nd2r.workflows.pipeline.run\nd2r.core.evaluate.format_table\n",    # pipeline imports evaluate
    "import numpy as np, d2r\nfrom d2r.core.evaluate import revisited, format_table\nformat_table.__name__\n",
    "from d2r.workflows import pipeline\npipeline.default_methods\n",
    "for i, (a, b) in enumerate([(1, 2)]):\n    c = a + b + i\nprint(c)\n",
    "with open(__import__('os').devnull) as fh:\n    fh.read()\n",
    "try:\n    import cupy as cp\nexcept ImportError as e:\n    cp = None\n    print(e)\nprint(cp)\n",
    "def f(a, *args, k=1, **kw):\n    return g(a) + k + len(args) + len(kw)\ndef g(x):\n    return x\nprint(f(1))\n",
    "sq = [x * x for x in range(3) if x]\nd = {k: v for k, v in zip('ab', sq)}\nprint(sq, d, (y for y in d))\n",
    "if (n := 3) > 2:\n    m = n\nelse:\n    m = 0\nprint(m)\n",
    "total = 0\nfor i in range(3):\n    if i:\n        total += last\n    last = i\n",
    "f = lambda a, b=2: a + b + f.__code__.co_argcount\nprint(f(1))\n",
    "class C:\n    k = 1\n    v = [k]\n    def m(self):\n        return C.k + self.k\nprint(C().m())\n",
    "match {'a': 1}:\n    case {'a': x, **rest}:\n        print(x, rest)\n    case [first, *others]:\n        print(first, others)\n",
    "def outer():\n    x = 1\n    def inner():\n        nonlocal x\n        x += 1\n        return x\n    return inner()\nprint(outer())\n",
    "def setup():\n    global G\n    G = 1\nsetup()\nprint(G)\n",
])
def test_check_passes(code):
    assert _problems(code) == []


def test_optional_dependency_import_is_tolerated_when_marked(monkeypatch):
    import importlib
    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "d2r.fake_heavy":
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    problems, notes = rb.check_block(_block("# needs: torch\nfrom d2r.fake_heavy import Thing\n"))
    assert problems == [] and "torch is not installed" in notes[0]
    problems, _ = rb.check_block(_block("from d2r.fake_heavy import Thing\n"))
    assert "needs 'torch'" in problems[0]


def test_execute_reports_readme_line(tmp_path, monkeypatch):
    text = "# R\n\n## Tutorial\n\n```python\nprint('hello')\nx = 1\nraise ValueError('boom')\n```\n"
    (block,) = rb.parse_markdown(text)[0]
    monkeypatch.chdir(tmp_path)
    res = rb.execute_block(block, str(tmp_path / "SYNTH.md"), source_text=text)
    assert res.stdout == "hello\n"
    assert "ValueError: boom" in res.error and "line 8" in res.error and "raise ValueError('boom')" in res.error
    assert block.where == "README.md line 6 (\"print('hello')\")"
    before = d2r.get_num_threads()
    other = 2 if before == 1 else 1
    ok = rb.execute_block(rb.parse_markdown(f"```python\nimport d2r\nd2r.set_num_threads({other})\n"
                                            "open('f.txt', 'w').write('x')\n```\n")[0][0])
    assert ok.error is None and (tmp_path / "f.txt").exists()
    assert d2r.get_num_threads() == before                  # the harness restores the thread count


def test_parse_map_summary():
    table = "protocol ...\n----\neasy 12 95.26\nmAP E/M/H: 95.26 / 81.46 / 48.35\n"
    assert rb.parse_map_summary(table) == {"easy": 95.26, "medium": 81.46, "hard": 48.35}
    with pytest.raises(ValueError, match="found 0"):
        rb.parse_map_summary("nothing here")
    with pytest.raises(ValueError, match="found 2"):
        rb.parse_map_summary(table + table)
    with pytest.raises(ValueError, match="no hard"):
        rb.parse_map_summary("mAP E/M: 1.00 / 2.00\n")


def test_format_table_summary_is_parsed():
    """The summary line format_table prints is the one parse_map_summary reads."""
    from d2r.core.evaluate import format_table, revisited

    gnd = [{"easy": [0], "hard": [1], "junk": []}, {"easy": [2], "hard": [], "junk": [1]}]
    res = revisited(np.array([[0, 1, 2], [2, 0, 1]]), gnd)
    got = rb.parse_map_summary(format_table(res))
    assert got == {p: pytest.approx(100 * res[p]["map"], abs=0.005) for p in ("easy", "medium", "hard")}


def test_submodule_check_ignores_what_this_process_imported():
    """d2r.workflows.pipeline being loaded here (by another test) must not hide a block that never imports it."""
    import d2r.workflows.pipeline  # noqa: F401

    assert hasattr(d2r.workflows, "pipeline")
    (problem,) = _problems("import d2r\nd2r.workflows.pipeline.run\n")
    assert "d2r.workflows.pipeline is a submodule that the block's imports do not load" in problem
    assert _problems("import d2r\nimport d2r.workflows.pipeline\nd2r.workflows.pipeline.run\n") == []

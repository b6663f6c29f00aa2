"""The product's rooms: imports flow one way, ``cli -> flows -> tasks -> blocks -> core``.

The modules are read with ``ast`` (nothing is imported), so the test needs no extra tool and
sees imports inside functions too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("burrow", "blocks", "tasks", "flows", "cli")
#: Layer rank: a module may import modules of its own rank or below, never above.
RANKS = {"core": 0, "blocks": 1, "tasks": 2, "flows": 3, "cli": 4}
TESTING = "burrow.testing"


def module_files(root: Path = REPO) -> dict[str, Path]:
    """Every module of the shipped packages, by dotted name."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def layer_of(module: str) -> str | None:
    """The layer a product module belongs to; None for burrow.testing (not the product)."""
    if module == TESTING or module.startswith(TESTING + "."):
        return None
    top = module.split(".")[0]
    return "core" if top == "burrow" else top


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``module`` imports anywhere in its body (lazy imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def add(name: str) -> None:
        # the longest known prefix: ``burrow.errors.X`` is the module burrow.errors
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            cand = ".".join(parts[:i])
            if cand in known:
                if cand != module:
                    found.add(cand)
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                add(f"{mod}.{alias.name}")  # ``from burrow import naming`` names a module
            add(mod)
    return found


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    files = module_files(root)
    known = set(files)
    return {m: imported_modules(m, p, known) for m, p in files.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in sorted(graph.items()):
        layer = layer_of(mod)
        if layer is None:
            continue
        for dep in sorted(deps):
            dep_layer = layer_of(dep)
            if dep_layer is None:
                bad.append(f"{mod} ({layer}) imports the test harness {dep}")
            elif RANKS[dep_layer] > RANKS[layer]:
                bad.append(f"{mod} ({layer}) imports {dep} ({dep_layer}), a higher layer")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def defines_task(path: Path) -> bool:
    """True when the module has a function decorated with Prefect's ``@task``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                if (isinstance(target, ast.Name) and target.id == "task") or (
                    isinstance(target, ast.Attribute) and target.attr == "task"
                ):
                    return True
    return False


# ------------------------------------------------------------------------------- the rules


def test_imports_flow_one_way():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_every_tasks_module_defines_a_task():
    files = module_files()
    empty = [m for m, p in files.items() if m.startswith("tasks.") and not defines_task(p)]
    assert empty == []


def test_the_harness_is_not_the_product():
    """Importing the backup flow and the CLI loads neither the test harness nor a test client."""
    code = (
        "import sys, flows.backup, flows.restore, flows.failover, cli;"
        "bad = sorted(m for m in sys.modules if m.startswith('burrow.testing') or m in ('consul', 'moto'));"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


# ------------------------------------------------------------------- the checker can fail


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


@pytest.fixture
def fake_tree(tmp_path: Path) -> Path:
    for pkg in PACKAGES:
        _write(tmp_path, f"{pkg}/__init__.py", "")
    _write(tmp_path, "burrow/errors.py", "class E(Exception): pass\n")
    _write(tmp_path, "blocks/store.py", "from burrow.errors import E\n")
    _write(tmp_path, "tasks/upload.py", "from prefect import task\nfrom blocks import store\n@task\ndef up(): pass\n")
    _write(tmp_path, "flows/backup.py", "from tasks.upload import up\n")
    _write(tmp_path, "cli/main.py", "def main():\n    from flows.backup import up\n")
    return tmp_path


def test_checker_accepts_a_clean_tree(fake_tree):
    graph = import_graph(fake_tree)
    assert graph["flows.backup"] == {"tasks.upload"}
    assert graph["tasks.upload"] == {"blocks.store", "blocks"}
    assert upward_imports(graph) == [] and cycles(graph) == []


def test_checker_catches_an_upward_lazy_import(fake_tree):
    _write(fake_tree, "burrow/errors.py", "def f():\n    from blocks.store import X\n")
    bad = upward_imports(import_graph(fake_tree))
    assert bad == ["burrow.errors (core) imports blocks.store (blocks), a higher layer"]


def test_checker_catches_the_harness_and_a_cycle(fake_tree):
    _write(fake_tree, "burrow/testing/__init__.py", "")
    _write(fake_tree, "blocks/local.py", "from blocks import store\nfrom burrow.testing import servers\n")
    _write(fake_tree, "blocks/store.py", "from blocks.local import Y\n")
    graph = import_graph(fake_tree)
    assert any("test harness" in b for b in upward_imports(graph))
    assert cycles(graph) == [["blocks.local", "blocks.store"]]


def test_checker_catches_a_module_without_a_task(fake_tree):
    _write(fake_tree, "tasks/encrypt.py", "def seal(): pass\n")
    assert not defines_task(fake_tree / "tasks/encrypt.py")
    assert defines_task(fake_tree / "tasks/upload.py")


def test_commands_without_a_flow_never_import_prefect(tmp_path):
    """``list``, ``inspect``, ``status``, ``keygen`` and ``--help`` (issue 11: under a second)
    run without Prefect: neither the commands nor the blocks, stores and catalog they use
    import it. The store is a real local store with a real (unencrypted) archive."""
    code = r"""
import sys, io, contextlib, json
from pathlib import Path
from burrow.archive import ArchiveWriter
from burrow.records import Record
from cli import main
store, out = Path(sys.argv[1]), Path(sys.argv[2])
name = "demo-20261125T000000Z-abcdef.burrow"
(store / "demo").mkdir(parents=True)
with open(store / "demo" / name, "wb") as f:
    w = ArchiveWriter(f, service="zookeeper")
    w.add(Record(key=b"/a", value=b"1"))
    w.finish({"service": "zookeeper", "source": "demo", "source_url": "zk://h:1/x", "root": "/",
              "keys": 1, "raw_bytes": 2, "created": "2026-11-25T00:00:00Z"})
codes = {}
for argv in (["list", str(store)], ["inspect", str(store / "demo" / name)], ["status", str(store)],
             ["keygen", "--out", str(out / "k.key")]):
    with contextlib.redirect_stdout(io.StringIO()):
        codes[argv[0]] = main(argv)
try:
    with contextlib.redirect_stdout(io.StringIO()):
        main(["--help"])
except SystemExit as e:
    codes["--help"] = e.code
print(json.dumps({"codes": codes, "prefect": sorted(m for m in sys.modules if m.split(".")[0] in ("prefect", "prefect_aws"))}))
"""
    store, out = tmp_path / "store", tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", code, str(store), str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["codes"] == {"list": 0, "inspect": 0, "status": 0, "keygen": 0, "--help": 0}
    assert got["prefect"] == []

"""The data package has no import cycle: the graph of its modules' imports of each other (at
module level and inside functions) is acyclic, and each module imports on its own in a fresh
package state."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

DATA = pathlib.Path(__file__).resolve().parents[1] / "regionmed_fast" / "data"
PKG = "regionmed_fast.data"


def _imports(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = node.module.split(".")[0] if node.module else None
                names = [base] if base else [a.name for a in node.names]
            elif (node.module or "").startswith(PKG + "."):
                names = [node.module[len(PKG) + 1:].split(".")[0]]
            else:
                continue
            out.update(n for n in names if (DATA / f"{n}.py").is_file())
        elif isinstance(node, ast.Import):
            out.update(a.name[len(PKG) + 1:].split(".")[0] for a in node.names
                       if a.name.startswith(PKG + "."))
    return out


def test_no_import_cycle_in_data():
    graph = {p.stem: _imports(p) - {p.stem} for p in DATA.glob("*.py") if p.stem != "__init__"}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, "import cycle: " + " -> ".join(path[path.index(m):] + [m])
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
    assert {"loader", "batch", "shards", "dali", "folder"} <= set(graph)
    assert "loader" not in graph["shards"] | graph["dali"] | graph["folder"] | graph["batch"]


def test_each_data_module_imports_alone():
    mods = sorted(p.stem for p in DATA.glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys, torch\n"
        f"for m in {mods!r}:\n"
        "    for k in [k for k in sys.modules if k.startswith('regionmed_fast')]:\n"
        "        del sys.modules[k]\n"
        f"    importlib.import_module('{PKG}.' + m)\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=DATA.parents[1])
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]

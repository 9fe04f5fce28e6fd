"""No import cycle among the project's modules.

Every ``import`` and ``from ... import`` of the packages' source files is read with ``ast`` (function-level imports
included: a lazy import that closes a loop is still a loop, only postponed), resolved to a module of the project,
and the graph's strongly connected components are computed; any component of more than one module, or a module
importing itself, fails the test with the files and the imports that close the loop. A package's
``__init__.py`` counts as the module ``pkg``; importing ``pkg.sub`` is an edge to ``pkg.sub`` only (Python also
runs ``pkg/__init__.py`` first, but that is the package's face, not a dependency of the importer).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# import name -> folder (the distribution maps rotkv_kernels onto kernels/, rotkv_data onto data/)
PACKAGES = {"rotkv_kernels": "kernels", "rotkv_vllm": "rotkv_vllm", "optimum_plugin": "optimum_plugin",
            "rotkv_data": "data"}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file of the project's packages."""
    mods = {}
    for name, folder in PACKAGES.items():
        base = root / folder
        for f in sorted(base.rglob("*.py")):
            rel = f.relative_to(base).with_suffix("")
            parts = [name, *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_edges(mods: dict[str, Path]) -> dict[str, dict[str, int]]:
    """``{module: {imported project module: line}}`` from each file's import statements."""
    edges: dict[str, dict[str, int]] = {m: {} for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node.level, node.module)
                # `from pkg import sub` imports the module pkg.sub when there is one, else a name of pkg
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for n in names:
                while n and n not in mods:  # `import a.b.c` of a non-module attribute path: its module
                    n = n.rpartition(".")[0]
                if n:
                    edges[mod].setdefault(n, node.lineno)
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with a loop (Tarjan), each sorted; sorted by first member."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, {}):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def _describe(comp: list[str], edges, mods) -> str:
    lines = [" <-> ".join(comp)]
    for a in comp:
        for b, line in edges[a].items():
            if b in comp:
                lines.append(f"    {mods[a].relative_to(ROOT)}:{line} imports {b}")
    return "\n".join(lines)


def test_the_finder_sees_a_cycle(tmp_path):
    pkg = tmp_path / "kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from rotkv_kernels.b import g\n")
    (pkg / "b.py").write_text("from . import a\n")
    (pkg / "c.py").write_text("import rotkv_kernels.a\n")
    mods = project_modules(tmp_path)
    found = cycles(import_edges(mods))
    assert found == [["rotkv_kernels.a", "rotkv_kernels.b"]]


def test_no_import_cycle_among_the_project_modules():
    mods = project_modules()
    assert "rotkv_vllm.vllm_backend" in mods and "rotkv_kernels.rotkv_paged" in mods
    edges = import_edges(mods)
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(_describe(c, edges, mods) for c in found)

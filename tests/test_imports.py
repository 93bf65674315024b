"""The house flows one way: no import cycle between monoroute's modules, counting imports inside
functions (a lazy import still ties the two modules' designs together)."""
import ast
from pathlib import Path

import monoroute

ROOT = Path(monoroute.__file__).parent


def module_graph(root: Path, package: str) -> dict[str, set[str]]:
    """{module: modules of the package it imports}, from every `import` / `from … import` anywhere in
    its source. An edge to a module's own parent packages is left out: Python imports those for any
    submodule, which is no design dependency."""
    mods = {}
    for f in root.rglob("*.py"):
        parts = (package,) + f.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    keep = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(keep + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != m and not m.startswith(t + "."):
                    graph[m].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.b import B\n")
    (pkg / "a.py").write_text("import pkg.sub\n")
    (pkg / "sub" / "b.py").write_text("B = 1\n\ndef f():\n    from ..a import x\n")  # relative, in a function
    (pkg / "c.py").write_text("from pkg import a\n")  # imports into the cycle, not part of it
    assert cycles(module_graph(pkg, "pkg")) == [["pkg.a", "pkg.sub", "pkg.sub.b"]]


def test_monoroute_has_no_import_cycle():
    graph = module_graph(ROOT, "monoroute")
    assert len(graph) > 80 and "monoroute.train.trainer" in graph["monoroute.train.upcycle"]
    assert cycles(graph) == []

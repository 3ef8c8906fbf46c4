"""The package's shape: no import cycle among lazysd modules, no private name across modules.

Read from the sources (ast), so function-level imports count too; ``TYPE_CHECKING`` imports
count as well, since a cycle there is still one concept depending on another and back.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lazysd"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    return mods


def _imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """Module -> lazysd modules it imports; and (module, from module, private name) triples."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for mod, f in mods.items():
        package = mod if f.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")
                if node.level:
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if not source.startswith("lazysd"):
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    if sub in mods:
                        graph[mod].add(sub)
                        continue
                    graph[mod].add(source)
                    compiled = (PKG.parent / source.replace(".", "/") / f"{alias.name}.c").exists()  # the C extension
                    dunder = alias.name.startswith("__") and alias.name.endswith("__")  # __version__ is public
                    if alias.name.startswith("_") and not compiled and not dunder:
                        private.append((mod, source, alias.name))
            elif isinstance(node, ast.Import):
                graph[mod].update(a.name for a in node.names if a.name.startswith("lazysd"))
    for mod, deps in graph.items():
        # Importing lazysd.x runs lazysd/__init__ first; that is not a dependency on the facade.
        graph[mod] = {d for d in deps if d in mods and d not in (mod, "lazysd")}
    return graph, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_among_lazysd_modules() -> None:
    graph, _ = _imports(_modules())
    assert graph["lazysd.virtual"] >= {"lazysd.reader", "lazysd.distributed", "lazysd.inspect", "lazysd.dryrun"}  # the scan sees imports
    assert _cycles(graph) == []


def test_no_private_name_crosses_a_module_border() -> None:
    _, private = _imports(_modules())
    assert private == []


def test_core_modules_do_not_reach_up() -> None:
    """The core (geometry, reads, reader, plan, rules) never imports the modules built on it."""
    graph, _ = _imports(_modules())
    upper = {"lazysd.virtual", "lazysd.inspect", "lazysd.dryrun", "lazysd.export", "lazysd.automodel", "lazysd.load"}
    for core in ("lazysd.geometry", "lazysd.reads", "lazysd.reader", "lazysd.plan", "lazysd.rules", "lazysd.distributed"):
        seen, todo = set(), [core]
        while todo:
            for dep in graph[todo.pop()]:
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        assert not seen & upper, (core, sorted(seen & upper))

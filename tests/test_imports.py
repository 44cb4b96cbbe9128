"""The import graph of ``towerrec.*``: layers point one way and no module cycle exists.

Read from the sources (every ``import``, also those inside functions), so a lazy import that
closes a cycle counts as one.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "modules", "trainer", "launch")
# What each layer may import besides itself: launch -> trainer -> modules, data.
ALLOWED = {
    "data": set(),
    "modules": {"data"},
    "trainer": {"modules", "data"},
    "launch": {"trainer", "modules", "data"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["towerrec", *parts])


def _imports(path: Path, name: str) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in found if m.startswith("towerrec.")}


def import_graph() -> dict[str, set[str]]:
    modules = {
        _module_name(path): path for package in PACKAGES for path in (REPO / package).rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path, name) if m in modules and m != name}
    return graph


def _layer(module: str) -> str:
    return module.split(".")[1]


def test_layers_import_only_downwards() -> None:
    wrong = [
        f"{src} imports {dst}"
        for src, targets in import_graph().items()
        for dst in targets
        if _layer(dst) != _layer(src) and _layer(dst) not in ALLOWED[_layer(src)]
    ]
    assert not wrong, "imports against launch -> trainer -> modules, data:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_real_edges() -> None:
    graph = import_graph()
    assert "towerrec.trainer.config" in graph["towerrec.trainer.train"]
    assert "towerrec.trainer.planning.plan_file" in graph["towerrec.trainer.sharding"]

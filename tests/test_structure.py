"""The package's shape: no import circle among its modules (top-level or inside functions), and no
reader of run files that needs the launcher."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PKG = REPO / "peft_lab"


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """{module: peft_lab modules it imports anywhere in its body}, from the source (nothing is imported)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(n: str) -> None:
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                found.append(stack[stack.index(m) :] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def test_no_import_circle():
    graph = import_graph()
    assert "peft_lab.runfiles" in graph and graph["peft_lab.status"]  # the scan sees the package
    # a package importing its own submodules (the method registry) is not a circle
    cycles = [c for c in _cycles(graph) if not any(a == b.rsplit(".", 1)[0] for a, b in zip(c, c[1:]))]
    assert cycles == [], cycles


def test_readers_of_run_files_do_not_need_the_launcher():
    graph = import_graph()
    for reader in ("peft_lab.run", "peft_lab.status", "peft_lab.report", "peft_lab.tracking", "peft_lab.runfiles"):
        assert "peft_lab.sweep" not in graph[reader], reader
    assert graph["peft_lab.runfiles"] == set()  # the owner of the files imports nothing of the package


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]

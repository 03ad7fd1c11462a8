"""The package's shape: no import cycles (function-level imports included: a cycle hidden inside a
function is still two modules that need each other), and the checkpoint room's boundaries."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PKG = "megatron_yuyuan"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in (REPO / PKG).rglob("*.py")}


def is_main_block(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``: runs as a script only, never on import."""
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def walk(tree: ast.AST):
    """Every node of ``tree``, function bodies included, ``__main__`` blocks excluded."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo.extend(c for c in ast.iter_child_nodes(node) if not is_main_block(c))


def imports_of(name: str) -> set[str]:
    """The package modules ``name`` imports anywhere in its code (each with its parent packages,
    whose ``__init__`` runs first)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:  # `from pkg import module` imports the module
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    with_parents = set()
    for target in found:
        parts = target.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    # a module's own parent packages are already importing when it runs
    return {
        m
        for m in with_parents
        if m in MODULES and m != name and not name.startswith(m + ".") and m != PKG
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    graph = {name: imports_of(name) for name in MODULES}
    assert f"{PKG}.model" in graph and f"{PKG}.checkpoint.loader" in graph  # the walk sees them
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_model_does_not_import_lora_and_lora_imports_model():
    assert f"{PKG}.lora" not in imports_of(f"{PKG}.model")
    assert f"{PKG}.model" in imports_of(f"{PKG}.lora")


def test_only_the_checkpoint_format_imports_dist_checkpointing():
    # (cpu_compat patches megatron-core's own writer for CPU runs: it does not read or write)
    users = [
        name
        for name, path in MODULES.items()
        if "megatron.core.dist_checkpointing" in path.read_text()
        and any(
            isinstance(n, ast.ImportFrom)
            and (n.module or "").startswith("megatron.core.dist_checkpointing")
            or isinstance(n, ast.ImportFrom)
            and n.module == "megatron.core"
            and any(a.name == "dist_checkpointing" for a in n.names)
            for n in ast.walk(ast.parse(path.read_text()))
        )
    ]
    assert sorted(users) == [f"{PKG}.checkpoint.storage", f"{PKG}.cpu_compat"]

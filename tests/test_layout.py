"""The package's layout rules, checked on the source: no import cycles, no borrowed private names."""

from __future__ import annotations

import ast
from pathlib import Path

import ftrain

PACKAGE = Path(ftrain.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported ftrain module, names taken from it, line) for every import in the file, nested ones too."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    tree = ast.parse(path.read_text(), str(path))
    # A module-level __getattr__ serves old import paths lazily (ftrain.mesh.ShardedCheckpointManager):
    # it runs only when that name is asked for, after both modules are loaded, so it is not a layer edge.
    aliases = {
        id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__" for n in ast.walk(f)
    }
    for node in ast.walk(tree):
        if id(node) in aliases:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "ftrain"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "ftrain":
                continue
            names = [a.name for a in node.names]
            # `from . import tree` imports the module ftrain.tree, not a name of ftrain
            submodules = [
                n
                for n in names
                if (PACKAGE.parent / module.replace(".", "/") / n).exists()
                or (PACKAGE.parent / module.replace(".", "/") / f"{n}.py").exists()
            ]
            found += [(f"{module}.{n}", [], node.lineno) for n in submodules]
            rest = [n for n in names if n not in submodules]
            if rest:
                found.append((module, rest, node.lineno))
    return found


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _graph() -> dict[str, set[str]]:
    modules = _sources()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, path in modules.items():
        for target, names, _ in _imports(path):
            # Importing a.b.c runs a and a.b first, and m's own parent packages are loaded before m: a
            # parent is not an edge, unless m takes a name from it (`from .. import __version__`): that
            # reaches up into the package's __init__, which imports everything below.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != m and (names or not m.startswith(target + ".")):
                graph[m].add(target)
    return graph


def test_no_import_cycles_inside_the_package():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n) :] + [m, n]) if n in stack else f"{m} -> {n}")
            elif n not in state:
                visit(n, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    # Package __init__ files re-export their children, so `pkg -> pkg._child` is the normal direction;
    # a cycle must involve a real back edge.
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_imports_another_modules_private_name():
    offenders = []
    for path in _sources().values():
        for target, names, line in _imports(path):
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {n} from {target}")
    assert not offenders, "\n".join(offenders)


def test_torchs_pytree_is_imported_in_one_file_only():
    users = [
        str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if "torch.utils._pytree" in p.read_text()
    ]
    assert users == ["ftrain/tree.py"], users

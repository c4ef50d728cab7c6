"""solar_ray's import graph: no circles (imports inside functions count too), training and
data never reach up to the stage registry, the recipe runner or the CLI, and evaluation
imports nothing from training."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "solar_ray"
#: what the layers below may not import: they are imported by it
TOP = {"solar_ray.stages", "solar_ray.pipeline", "solar_ray.cli"}
EVALUATION = (
    "solar_ray.evaluate",
    "solar_ray.compare",
    "solar_ray.seam",
    "solar_ray.contamination",
)


def import_graph(package_dir: Path = PACKAGE) -> dict[str, set[str]]:
    """Every module of the package and the package's modules it imports, anywhere in its code."""
    files = {}
    for path in package_dir.rglob("*.py"):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, level - 1 packages up
                    parents = package.split(".")[: package.count(".") + 2 - node.level]
                    base = ".".join([*parents, *([node.module] if node.module else [])])
                # ``from solar_ray import fs`` imports the module solar_ray.fs
                imported.update([base, *(f"{base}.{alias.name}" for alias in node.names)])
        graph[name] = {m for m in imported if m in files and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports as ``[a, b, ..., a]``, or None (depth-first search)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        path.append(node)
        for nxt in sorted(graph[node]):
            if nxt in path:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        done.add(path.pop())
        return None

    for node in sorted(graph):
        if node not in done and (cycle := visit(node)):
            return cycle
    return None


def _under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _is_evaluation(name: str) -> bool:
    return name in EVALUATION or _under(name, "solar_ray.evalsets")


GRAPH = import_graph()


def test_the_graph_sees_every_kind_of_import(tmp_path):
    files = {
        "__init__.py": "from pkg import a",
        "a.py": "import pkg.sub.b\nfrom pkg.sub import c",
        "sub/__init__.py": "",
        "sub/b.py": "def f():\n    from ..a import x",
        "sub/c.py": "from . import b\nimport os",
    }
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    assert import_graph(tmp_path / "pkg") == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.sub", "pkg.sub.b", "pkg.sub.c"},
        "pkg.sub": set(),
        "pkg.sub.b": {"pkg.a"},
        "pkg.sub.c": {"pkg.sub", "pkg.sub.b"},
    }
    assert find_cycle(import_graph(tmp_path / "pkg")) == ["pkg.a", "pkg.sub.b", "pkg.a"]


def test_no_import_circles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_training_data_and_evaluation_do_not_import_the_layers_above():
    lower = [
        m for m in GRAPH if _under(m, "solar_ray.train", "solar_ray.data") or _is_evaluation(m)
    ]
    upward = sorted((m, t) for m in lower for t in GRAPH[m] & TOP)
    assert not upward, "\n".join(f"{m} imports {t}" for m, t in upward)


def test_evaluation_imports_nothing_from_training():
    found = sorted(
        (m, t) for m in GRAPH if _is_evaluation(m) for t in GRAPH[m] if _under(t, "solar_ray.train")
    )
    assert not found, "\n".join(f"{m} imports {t}" for m, t in found)


def test_every_name_imported_from_the_package_exists():
    """A function-level ``from solar_ray.x import name`` fails only when the function runs:
    a renamed or moved name is caught here instead (every such import, anywhere in the
    package, the tests and the bench scripts)."""
    import importlib

    missing = []
    repo = PACKAGE.parent
    for path in [*PACKAGE.rglob("*.py"), *(repo / "tests").glob("*.py"), *(repo / "bench").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("solar_ray"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name) and not _is_module(f"{node.module}.{alias.name}"):
                        missing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.module}.{alias.name}")
    assert not missing, "imports of names that do not exist:\n" + "\n".join(missing)


def _is_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent is a module, not a package
        return False

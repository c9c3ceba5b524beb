"""The package's layers point one way: configs (package data), version <- runtime <- data <- models <- objectives <-
train <- export <- downstream <- demo / cli. Every import in every module (top level, inside functions, under
TYPE_CHECKING) is read from the source, so an upward import fails here however it is written. Inside a layer the
modules import each other without a circle (an import inside a function counts: it only hides a circle)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medssl"
LAYERS = [
    *("configs", "version", "runtime", "data", "models", "objectives", "train"),
    *("export", "downstream", "demo", "cli", "__main__"),
]
TOP = LAYERS.index("demo")  # demo, cli and __main__ are the entry points: they may import everything
RANK = {name: min(i, TOP) for i, name in enumerate(LAYERS)}


def _room(module: str) -> str | None:
    """``medssl.<room>...`` -> room (a sub-package or a top-level module), else None."""
    parts = module.split(".")
    if parts[0] != "medssl" or len(parts) < 2:
        return None
    return parts[1]


def _imports(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, the text of the module ``module``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            if name == "medssl":  # from medssl import data
                found += [(node.lineno, f"medssl.{alias.name}") for alias in node.names]
    return found


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_room_has_a_layer():
    rooms = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _modules()} - {"__init__"}
    assert rooms <= set(RANK), f"rooms without a layer in this test: {sorted(rooms - set(RANK))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_from_a_layer_above_it(path: Path):
    room = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    if room == "__init__":
        return
    upward = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name} ({_room(name)} is above {room})"
        for line, name in _imports(path.read_text(encoding="utf-8"), _module_name(path))
        if _room(name) in RANK and RANK[_room(name)] > RANK[room]  # type: ignore[index]
    ]
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import():
    """The reader finds imports inside functions, relative ones and ``from medssl import x`` (so the test above can
    fail)."""
    source = (
        "import medssl.models.heads\n"
        "def f():\n"
        "    from medssl.train.trainer import Trainer\n"
        "    from ..objectives import joint\n"
        "    from medssl import export\n"
    )
    names = [name for _, name in _imports(source, "medssl.data.probe")]
    assert names == ["medssl.models.heads", "medssl.train.trainer", "medssl.objectives", "medssl", "medssl.export"]
    assert [_room(n) for n in names] == ["models", "train", "objectives", None, "export"]


def _import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the medssl modules it imports, for ``modules`` (name -> file), wherever the import statement is:
    in a function, or under ``if TYPE_CHECKING:`` (such an import never runs, but a reader of the module must read
    the other one too, and the structure viewer draws it). ``from medssl.a import b`` is ``medssl.a.b`` when that is
    a module, else ``medssl.a``; a package that Python imports on the way to a module (its ``__init__``) is not
    counted."""

    def module_of(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets |= {module_of(alias.name) for alias in node.names if alias.name.startswith("medssl")}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
                source = ".".join(part for part in (base, node.module or "") if part)
                if source.startswith("medssl"):
                    targets |= {
                        f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else module_of(source)
                        for alias in node.names
                    }
        graph[name] = {target for target in targets if target is not None and target != name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for node in sorted(graph):
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_no_import_circles():
    """A circle closed by an import inside a function imports fine and still ties its modules together: none may
    change or be read alone. Each circle is listed with the imports that close it."""
    graph = _import_graph({_module_name(p).removesuffix(".__init__"): p for p in _modules()})
    circles = _circles(graph)
    described = [
        " <-> ".join(circle) + ": " + "; ".join(f"{a} imports {sorted(graph[a] & set(circle))}" for a in circle)
        for circle in circles
    ]
    assert not circles, "\n".join(described)


def test_the_circle_check_finds_circles_closed_inside_a_function_or_for_types_only(tmp_path: Path):
    texts = {
        "medssl.a": "def f():\n    from medssl.b import x\n",  # closes the circle from inside a function
        "medssl.b": "from . import c\n",
        "medssl.c": "import medssl.a\n",
        "medssl.d": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from medssl import e\n",  # for types
        "medssl.e": "from medssl import d\n",
        "medssl.f": "from medssl import e\n",
    }
    modules = {}
    for name, text in texts.items():
        modules[name] = tmp_path / f"{name.split('.')[1]}.py"
        modules[name].write_text(text, encoding="utf-8")
    graph = _import_graph(modules)
    assert graph == {"medssl.a": {"medssl.b"}, "medssl.b": {"medssl.c"}, "medssl.c": {"medssl.a"},
                     "medssl.d": {"medssl.e"}, "medssl.e": {"medssl.d"}, "medssl.f": {"medssl.e"}}  # fmt: skip
    # a circle closed by a type-only import ties its modules as much as one that runs
    assert sorted(sorted(circle) for circle in _circles(graph)) == [
        ["medssl.a", "medssl.b", "medssl.c"],
        ["medssl.d", "medssl.e"],
    ]

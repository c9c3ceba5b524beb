"""The package's layers point one way: configs (package data) <- runtime <- data <- models <- objectives <- train <-
export <- downstream <- demo / cli. Every import in every module (top level, inside functions, under TYPE_CHECKING)
is read from the source, so an upward import fails here however it is written."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medssl"
LAYERS = [
    *("configs", "runtime", "data", "models", "objectives", "train"),
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

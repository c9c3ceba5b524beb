"""Repository contract: CI calls the README's test command, notebooks stay valid Python."""

from __future__ import annotations

import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_notebook_code_cells_parse():
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        for cell in cells:
            if cell["cell_type"] == "code":
                ast.parse("".join(cell["source"]), filename=str(notebook))


def test_benchmark_scripts_compile():
    for script in (ROOT / "benchmarks").glob("*.py"):
        compile(script.read_text(encoding="utf-8"), str(script), "exec")

"""The notebooks: committed without outputs, and run top to bottom on the demo data at smoke size.

Each notebook's first code cell (tagged ``parameters``, papermill-style) reads ``MEDSSL_NB_SMOKE`` (``1``: toy sizes,
seconds) and ``MEDSSL_NB_OUT`` (where everything is written); the tests execute them with nbclient in a fresh
``python3`` kernel of this interpreter, in a temporary folder. Nothing is downloaded: the data is the demo folder
assembled from images shipped by pip packages plus generated phantoms.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from medssl.data.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # per cell; the smoke runs take seconds per cell on a 2-core CPU

needs_kernel = pytest.mark.skipif(
    importlib.util.find_spec("nbclient") is None or importlib.util.find_spec("ipykernel") is None,
    reason="executing the notebooks needs nbclient and ipykernel (pip install nbclient ipykernel)",
)


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _code_cells(notebook: dict[str, Any]) -> list[dict[str, Any]]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_every_notebook_has_a_run_test():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_data_walkthrough.ipynb", "02_pretrain_export_finetune.ipynb"], "add a run test for it"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    notebook = _read(path)
    for cell in _code_cells(notebook):
        where = f"{path.name}, cell {cell.get('id')}"
        assert cell["outputs"] == [], f"{where}: has outputs (clear them before committing)"
        assert cell["execution_count"] is None, f"{where}: has an execution count (clear outputs before committing)"
        assert "execution" not in cell["metadata"], f"{where}: has execution timing metadata"
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    assert "widgets" not in notebook["metadata"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_code_cells_parse_and_the_first_is_the_parameters_cell(path):
    cells = _code_cells(_read(path))
    for cell in cells:
        ast.parse("".join(cell["source"]), filename=f"{path.name}:{cell.get('id')}")
    first = cells[0]
    assert "parameters" in first["metadata"].get("tags", []), "the first code cell must be tagged 'parameters'"
    source = "".join(first["source"])
    assert "MEDSSL_NB_SMOKE" in source and "MEDSSL_NB_OUT" in source


@pytest.mark.skipif(importlib.util.find_spec("nbformat") is None, reason="nbformat is not installed")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_valid_nbformat(path):
    import nbformat

    nbformat.validate(nbformat.read(path, as_version=4))


def _execute(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Path]:
    """Run the notebook in smoke mode with a fresh ``python3`` kernel of this interpreter; cwd ``tmp_path / 'cwd'``.

    Returns the executed notebook and its output folder (``MEDSSL_NB_OUT``)."""
    import nbformat
    from nbclient import NotebookClient

    # A kernelspec of our own, first on JUPYTER_PATH: the kernel is this interpreter whatever else is installed.
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    out = tmp_path / "out"
    monkeypatch.setenv("MEDSSL_NB_SMOKE", "1")
    monkeypatch.setenv("MEDSSL_NB_OUT", str(out))
    monkeypatch.delenv("MEDSSL_NB_DATA", raising=False)  # the demo data, not a user's folder
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()  # a failing cell raises CellExecutionError with its traceback
    return notebook, out


def _text(notebook: Any, cell_id: str) -> str:
    """Everything a cell printed (streams and plain-text results)."""
    (cell,) = [c for c in notebook.cells if c.get("id") == cell_id]
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif "text/plain" in output.get("data", {}):
            parts.append(output.data["text/plain"])
    return "".join(parts)


def _pictures(notebook: Any, cell_id: str) -> int:
    (cell,) = [c for c in notebook.cells if c.get("id") == cell_id]
    return sum("image/png" in output.get("data", {}) for output in cell.outputs)


@needs_kernel
def test_data_walkthrough_runs(tmp_path, monkeypatch):
    notebook, out = _execute(ROOT / "notebooks" / "01_data_walkthrough.ipynb", tmp_path, monkeypatch)
    scan = _text(notebook, "scan")
    assert "manifest.csv: OK (0 errors" in scan
    assert re.search(r"^p[0-9a-f]{20} ", scan, re.MULTILINE) and "lesion" in scan  # rows name files by key
    assert "phantoms/" not in scan  # paths are in the private path map only
    cached = int(re.search(r"items in the cache: (\d+)", _text(notebook, "cache")).group(1))
    assert cached == len(read_manifest(out / "manifest.csv").rows)
    assert "views of sample" in _text(notebook, "views")
    assert "two views: [(8, 1, 64, 64), (8, 1, 64, 64)]" in _text(notebook, "stacks")
    assert [_pictures(notebook, cell) for cell in ("cache", "views", "stacks")] == [1, 1, 1]
    assert list((tmp_path / "cwd").iterdir()) == []  # everything went to MEDSSL_NB_OUT


@needs_kernel
def test_pretrain_export_finetune_runs(tmp_path, monkeypatch):
    notebook, out = _execute(ROOT / "notebooks" / "02_pretrain_export_finetune.ipynb", tmp_path, monkeypatch)
    assert "status: finished | step: 2" in _text(notebook, "pretrain")
    pictures = _text(notebook, "pictures")
    assert "curves.png" in pictures and "embeddings.png" in pictures
    assert _pictures(notebook, "pictures") >= 2
    for name in ("configs/inference.json", "configs/metadata.json", "models/model.pt"):
        assert (out / "bundle" / name).is_file(), name
    assert "monai.networks.nets.resnet.ResNet" in _text(notebook, "monai")
    features = _text(notebook, "features")
    n, d = map(int, re.search(r"features: \((\d+), (\d+)\)", features).groups())
    assert n == 6 and d == 512  # 2 phantoms of each kind (CT, MR, X-ray) at smoke size; ResNet-10 features
    assert "'lesion': 3, 'no_lesion': 3" in features
    probe = _text(notebook, "probe")
    for name in ("pretrained", "random init"):
        assert re.search(rf"{name} +accuracy [0-9.]+ +AUROC [0-9.]+ +\(6 images, \d folds\)", probe), probe
    assert list((tmp_path / "cwd").iterdir()) == []

"""The prepared GPU check (benchmarks/gpu_check.py) runs end to end on the CPU in its dry mode, so that it does not
rot before a GPU runs it: both methods train, the FLOP count and the table reach the Markdown section."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check


def small_archive(folder: Path) -> Path:
    """Six 2D images of two sizes and two small volumes."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        shape = (48, 40) if i % 2 else (40, 56)
        Image.fromarray(rng.integers(0, 255, size=shape, dtype=np.uint8)).save(folder / f"xray{i}.png")
    for i in range(2):
        volume = rng.uniform(0, 100, size=(32, 28, 10)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(folder / f"mr{i}.nii.gz"))
    return folder


def test_the_dry_run_writes_a_row_per_method(tmp_path: Path) -> None:
    report = tmp_path / "BENCH.md"
    report.write_text("# figures\n", encoding="utf-8")
    archive = small_archive(tmp_path / "archive")
    code = gpu_check.main(
        ["--dry", "--data", str(archive), "--workdir", str(tmp_path / "work"), "--update", str(report)]
    )
    assert code == 0
    text = report.read_text(encoding="utf-8")
    assert "<!-- gpu_check:start -->" in text and "## GPU check" in text
    rows = [line for line in text.splitlines() if line.startswith("| joint |") or line.startswith("| simclr |")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1].strip("*")) > 0  # samples/s
        assert float(cells[5]) > 0  # encoder TFLOP per step, counted
        assert cells[7] == "- (peak unknown)"  # a CPU has no bf16 peak in the table: no utilisation invented


@pytest.mark.parametrize(
    ("name", "peak"), [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("Intel Xeon", None)]
)
def test_peaks_come_from_the_device_name(name: str, peak: float | None) -> None:
    assert gpu_check.peak_tflops(name) == peak

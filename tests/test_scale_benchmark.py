"""The manifest scale benchmark (benchmarks/scale_manifest.py) at tiny sizes: every phase runs on a hard-linked
archive, the figures reach the Markdown section, and a phase still runs in a spawned process."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scale_manifest
from _isolated import run_isolated


def test_the_phases_run_and_the_section_is_written(tmp_path: Path) -> None:
    report = tmp_path / "BENCHMARKS.md"
    report.write_text("# Benchmarks\n\nkept\n", encoding="utf-8")
    workdir = tmp_path / "work"
    argv = ["--rows", "20,60", "--samples", "8", "--batch-size", "4", "--workers", "2", "--in-process"]
    assert scale_manifest.main([*argv, "--workdir", str(workdir), "--update", str(report)]) == 0
    text = report.read_text(encoding="utf-8")
    assert "kept" in text and "<!-- scale_manifest:start -->" in text and "<!-- scale_manifest:end -->" in text
    for phase in scale_manifest.PHASES:
        assert f"| 60 | {phase} |" in text and f"| {phase} |" in text.split("Peak RSS growth")[1]
    assert "| 60 | scan |" in text and "60 rows, 0 errors" in text and "5 built, 55 reused" in text
    assert "Python heap per manifest row" in text and "| `MultiCropSliceDataset` |" in text
    assert not list(workdir.glob("archive-*")), "archives are removed after their phases"


def test_a_phase_runs_isolated_on_a_linked_archive(tmp_path: Path) -> None:
    sources = scale_manifest.make_sources(tmp_path / "sources")
    scale_manifest.make_archive(tmp_path / "archive", sources, 12)
    files = sorted(p for p in (tmp_path / "archive").rglob("*") if p.is_file())
    assert len(files) == 12 and all(p.stat().st_nlink > 1 for p in files)  # hard links, no copies
    manifest = tmp_path / "m.csv"
    scan = scale_manifest.phase_scan(str(tmp_path / "archive"), str(manifest), workers=1)
    assert scan["rows"] == 12 and scan["errors"] == 0
    validated = run_isolated(scale_manifest.phase_validate, manifest=str(manifest))
    assert validated["rows"] == 12 and validated["errors"] == 0 and validated["peak_mib"] > 0

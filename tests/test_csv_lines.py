"""CSV lines whose fields may hold a carriage return (a file named ``a\\rb.png``): quoted, so that a reader gets
the record back instead of two halves; every other record written byte for byte as :func:`csv.writer` writes it."""

from __future__ import annotations

import csv
import io

import numpy as np
from factories import write_png
from hypothesis import given
from hypothesis import strategies as st

from medssl.data.manifest import ManifestRow, read_manifest, write_manifest
from medssl.data.pathmap import read_path_map, write_path_map
from medssl.data.scan import ScanOptions, scan_archive
from medssl.runtime.csv_lines import CsvLines

FIELDS = st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8), min_size=1, max_size=4)


def _written(records: list[list[str]], writer_of) -> str:  # type: ignore[no-untyped-def]
    text = io.StringIO(newline="")
    writer_of(text).writerows(records)
    return text.getvalue()


@given(st.lists(FIELDS, max_size=5))
def test_records_read_back_as_written_and_without_a_carriage_return_as_csv_writes_them(records):
    written = _written(records, CsvLines)
    assert list(csv.reader(io.StringIO(written, newline=""))) == records
    if not any("\r" in field for record in records for field in record):
        assert written == _written(records, lambda text: csv.writer(text, lineterminator="\n"))
    assert written.count("\n") >= len(records) and (not records or written.endswith("\n"))


def test_the_csv_module_alone_splits_a_record_at_a_bare_carriage_return():
    """Why :class:`CsvLines` exists: ``csv.writer(lineterminator="\\n")`` leaves the ``"\\r"`` bare."""
    bare = _written([["p1", "a\rb.png"]], lambda text: csv.writer(text, lineterminator="\n"))
    assert list(csv.reader(io.StringIO(bare, newline=""))) == [["p1", "a"], ["b.png"]]
    assert list(csv.reader(io.StringIO(_written([["p1", "a\rb.png"]], CsvLines), newline=""))) == [["p1", "a\rb.png"]]


def test_a_file_named_with_a_carriage_return_scans_and_is_found_again(tmp_path):
    root = tmp_path / "archive"
    write_png(root / "odd\rname.png", np.full((8, 8), 3, np.uint8))
    write_png(root / "plain.png", np.full((8, 8), 5, np.uint8))
    report = scan_archive(root, ScanOptions(salt="cr", progress=False), tmp_path / "out" / "m.csv")
    assert report.rows["rows"] == 2 and not report.errors
    manifest = read_manifest(tmp_path / "out" / "m.csv")
    assert sorted(manifest.resolve(row).name for row in manifest.rows) == ["odd\rname.png", "plain.png"]
    write_path_map(tmp_path / "copy.paths.csv", root, {"p1": "a\rb/c.png", "p2": "d\ne.png"})
    assert dict(read_path_map(tmp_path / "copy.paths.csv").paths.items()) == {"p1": "a\rb/c.png", "p2": "d\ne.png"}
    row = ManifestRow(id="i1", path="p1", format="image", dims=2, label="line one\rline two")
    write_manifest(tmp_path / "labels.csv", [row], tmp_path)
    assert read_manifest(tmp_path / "labels.csv").rows[0].label == "line one\rline two"

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
from medssl.export.metadata import pretraining_modalities
from medssl.runtime.csv_lines import CsvLines, at_record_start

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


# fields that make quoted multi-line records: quotes, separators, line breaks and a "#" after them
QUOTED_FIELDS = st.lists(st.text(alphabet='a,"#\r\n ', max_size=8), min_size=1, max_size=4)


@given(st.lists(QUOTED_FIELDS, max_size=6))
def test_record_starts_are_where_the_csv_reader_starts_each_record(records):
    """Against a plain reference: each record written on its own gives its physical lines, so the file's record starts
    are the running sums of those counts; :func:`at_record_start` must find exactly those in the whole file."""
    lines = list(io.StringIO(_written(records, CsvLines), newline=""))
    starts, line = set(), 0
    for record in records:
        starts.add(line)
        line += len(list(io.StringIO(_written([record], CsvLines), newline="")))
    assert line == len(lines)
    assert [start for start, _ in at_record_start(lines)] == [i in starts for i in range(len(lines))]
    assert [text for _, text in at_record_start(lines)] == lines


def test_a_field_that_continues_with_a_hash_after_a_carriage_return_is_not_a_comment(tmp_path):
    """A label ``"\\r#"`` (found by the scan writer's property test) and a path ``"a\\r# b.png"``: the line after the
    ``"\\r"`` starts with ``#`` and used to be dropped as a comment, losing the record or cutting it short."""
    rows = [
        ManifestRow(id="i1", path="p1", format="image", dims=2, label="\r#"),
        ManifestRow(id="i2", path="p2", format="image", dims=2, label="# root: not a comment\r# nor this"),
    ]
    write_manifest(tmp_path / "labels.csv", rows, tmp_path)
    assert [row.label for row in read_manifest(tmp_path / "labels.csv").rows] == [row.label for row in rows]
    rows.append(ManifestRow(id="i3", path="p3", format="image", dims=2, modality="CT", label="\r# x,CT"))
    write_manifest(tmp_path / "modalities.csv", rows, tmp_path)
    assert pretraining_modalities({"data": {"manifest": str(tmp_path / "modalities.csv")}}) == {"OT": 2, "CT": 1}
    write_path_map(tmp_path / "m.paths.csv", tmp_path, {"p1": "a\r# b.png", "p2": "c.png"})
    assert dict(read_path_map(tmp_path / "m.paths.csv").paths.items()) == {"p1": "a\r# b.png", "p2": "c.png"}

"""The scan's outputs through an external sort (issue 18, memory flat in the row count): whatever the run size, the
manifest, errors CSV and path map are the files a plain in-memory sort writes, no temporary file is left, and the
streamed scan (`medssl manifest scan`) writes what scanning into memory and writing writes."""

from __future__ import annotations

import csv
import gc
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from factories import random_volume, write_dicom_series, write_nifti, write_png
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import medssl.data.scan_writer as scan_writer_module
from medssl.data.manifest import ManifestRow, read_manifest
from medssl.data.pathmap import file_key, read_path_map
from medssl.data.row_transforms import assign_splits, join_labels, pair_masks
from medssl.data.scan import ScanOptions, scan_archive, scan_folder, write_scan
from medssl.data.scan_writer import ScanWriter, SortedRuns

SALT = "writer-test"
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
ERRORS = st.tuples(st.text(alphabet="xyz,é", min_size=1, max_size=5), TEXT)
PATHS = st.text(alphabet="ab,/\"' \n\rç", min_size=1, max_size=6).filter(
    lambda p: not p.startswith("/") and "//" not in p and not p.endswith("/")
)


def _rows(paths: list[str], labels: list[str]) -> list[ManifestRow]:
    return [
        ManifestRow(
            id=f"i{i:04d}",
            path=path,
            format="image",
            dims=2,
            subject=f"s{i % 3}",
            shape=(8, 9),
            spacing=(0.5, 0.25),
            series=f"{i % 2:x}" * (i % 3),  # '', '1', '00': some rows share a key's folder with several series
            label=label,
            mask=f"masks/{path}" if i % 4 == 0 else "",
        )
        for i, (path, label) in enumerate(zip(paths, labels, strict=True))
    ]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    paths=st.lists(PATHS, min_size=0, max_size=30, unique=True),
    labels=st.lists(TEXT, min_size=30, max_size=30),
    errors=st.lists(ERRORS, max_size=8, unique_by=lambda error: error[0]),
    run_lines=st.integers(1, 5),
    max_runs=st.integers(2, 4),
)
def test_any_run_size_writes_the_files_one_sorted_run_writes(tmp_path_factory, paths, labels, errors, run_lines,
                                                             max_runs):  # fmt: skip
    rows = _rows(paths, labels[: len(paths)])
    errors = [(f"bad/{relative}", reason) for relative, reason in errors]  # apart from the rows' paths
    folder = tmp_path_factory.mktemp("w")
    (folder / "archive").mkdir()
    written = {}
    for name, lines in (("one", None), ("many", run_lines)):
        old = scan_writer_module.MAX_RUNS
        scan_writer_module.MAX_RUNS = max_runs  # runs merged into one along the way
        try:
            with ScanWriter(folder / name / "m.csv", folder / "archive", SALT, run_lines=lines) as writer:
                for row in rows:
                    writer.add_row(row)
                for relative, reason in errors:
                    writer.add_error(relative, reason)
                writer.finish()
        finally:
            scan_writer_module.MAX_RUNS = old
        written[name] = _files(folder / name)
    assert written["one"] == written["many"]
    assert set(written["many"]) == {"m.paths.csv", "m.errors.csv"} | ({"m.csv"} if rows else set())

    # against a plain reference: every file named by its key, in (key, series) order
    if rows:
        manifest = read_manifest(folder / "many" / "m.csv")
        keys = [(file_key(r.path, SALT), r.series) for r in rows]
        assert [(r.path, r.series) for r in manifest.rows] == sorted(keys)
        by_key = {file_key(r.path, SALT): r for r in rows}
        for row in manifest.rows:
            original = by_key[row.path]
            assert row.label == original.label and row.id == original.id
            assert row.mask == (file_key(original.mask, SALT) if original.mask else "")
    mapped = read_path_map(folder / "many" / "m.paths.csv").paths
    expected = {file_key(p, SALT): p for p in [*paths, *(r.mask for r in rows if r.mask), *(e[0] for e in errors)]}
    assert dict(mapped.items()) == expected
    with open(folder / "many" / "m.errors.csv", newline="", encoding="utf-8") as handle:
        records = list(csv.reader(handle))[1:]
    assert records == sorted([file_key(relative, SALT), reason] for relative, reason in errors)


def test_sorted_runs_merge_in_order_and_close_their_files(tmp_path):
    runs = SortedRuns(tmp_path, 1, run_lines=3)
    values = [f"{n:03d}" for n in np.random.default_rng(0).permutation(20)]
    for value in values:
        runs.add((value, f"payload,{value}\n"))
    assert [record[0] for record in runs] == sorted(values)
    assert [record[0] for record in runs] == sorted(values), "iterated again: the same records"
    assert all(record[1] == f"payload,{record[0]}\n" for record in runs)
    assert not list(tmp_path.iterdir()), "the runs are unnamed temporary files"
    runs.close()


def _archive(root: Path) -> Path:
    """PNGs in patient folders, NIfTI volumes with masks in labelsTr, a DICOM series, one unreadable file."""
    for patient in range(4):
        for image in range(3):
            write_png(root / f"site/DOE^JANE_{patient}/img{image}.png", np.full((8, 8), 10 * image + patient, np.uint8))
    for case in range(3):
        write_nifti(root / f"imagesTr/case{case}.nii.gz", random_volume((4, 6, 5), seed=case))
        write_nifti(root / f"labelsTr/case{case}.nii.gz", (random_volume((4, 6, 5), seed=case) > 0).astype(np.uint8))
    write_dicom_series(root / "dicom/series1", random_volume((4, 8, 8), seed=9))
    (root / "site/broken.png").write_bytes(b"not a png")
    with open(root / "labels.csv", "w", encoding="utf-8") as handle:
        handle.write("path,label,split,subject\nsite/DOE^JANE_0/img0.png,a,test,P0\nsite/DOE^JANE_1/img1.png,b,,P0\n")
    return root


def test_the_streamed_scan_writes_what_the_in_memory_scan_writes(tmp_path, monkeypatch):
    """`medssl manifest scan` (``scan_archive``: rows streamed through masks, labels, splits and the external
    sort, in runs of 4 here) against ``scan_folder`` + ``pair_masks`` + ``join_labels`` + ``assign_splits`` +
    ``write_scan`` over the held rows: the same bytes in all three files."""
    root = _archive(tmp_path / "archive")
    options = ScanOptions(salt=SALT, progress=False, exclude=["labelsTr/*", "labels.csv"])
    fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
    monkeypatch.setattr(scan_writer_module, "RUN_LINES", 4)
    report = scan_archive(root, options, tmp_path / "streamed" / "m.csv", masks="labelsTr",
                          labels=[root / "labels.csv"], split_fractions=fractions)  # fmt: skip
    result = scan_folder(root, options)
    rows, warnings = pair_masks(result.rows, root, "labelsTr")
    rows, more = join_labels(rows, root / "labels.csv", root, SALT)
    rows = assign_splits(rows, fractions, SALT)
    write_scan(tmp_path / "held" / "m.csv", rows, result.errors, root, SALT)
    assert _files(tmp_path / "streamed") == _files(tmp_path / "held")
    assert report.warnings == [*warnings, *more]
    assert report.rows["rows"] == len(rows) == 12 + 3 + 1 and report.rows["volumes_3d"] == 4
    assert report.walk.files_seen == result.files_seen and dict(report.errors) == dict(result.error_summary())
    manifest = read_manifest(tmp_path / "streamed" / "m.csv")
    assert sum(bool(r.mask) for r in manifest.rows) == 3 and {r.split for r in manifest.rows} <= set(fractions)
    assert b"DOE" not in (tmp_path / "streamed" / "m.csv").read_bytes()


def _peak_per_file(roots: dict[int, Path], out: Path) -> float:
    """The slope of ``scan_archive``'s Python heap peak (``tracemalloc``) between the smallest and the largest of
    ``roots`` (file count -> archive), after a first scan of the smallest (imports and caches out of the figures)."""
    options = ScanOptions(salt=SALT, progress=False, workers=2)
    small, large = min(roots), max(roots)
    scan_archive(roots[small], options, out / "warm" / "m.csv")
    peaks = {}
    for n in (small, large):
        gc.collect()
        tracemalloc.start()
        report = scan_archive(roots[n], options, out / f"out{n}" / "m.csv")
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert report.rows["rows"] == n
    return (peaks[large] - peaks[small]) / (large - small)


def test_a_streamed_scan_holds_a_run_not_the_rows(tmp_path, monkeypatch):
    """The heap a streamed scan holds does not grow with the files (runs of 200 rows, at most 4 open: then merged
    into one): hard links of one PNG in patient folders, 400 against 2000 files."""
    source = write_png(tmp_path / "source.png", np.full((16, 16), 7, np.uint8))
    roots = {}
    for n in (400, 2000):
        roots[n] = tmp_path / f"archive{n}"
        for i in range(n):
            folder = roots[n] / f"patient{i // 20:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            os.link(source, folder / f"image{i:05d}.png")
    monkeypatch.setattr(scan_writer_module, "RUN_LINES", 200)
    monkeypatch.setattr(scan_writer_module, "MAX_RUNS", 4)  # each open run costs its buffers (~30 KB): bounded
    per_file = _peak_per_file(roots, tmp_path)
    # measured ~55 (the top folder's listing, one entry per 20 files; the subjects' hashes): no row is held; the
    # in-memory scan (scan_folder + write_scan: rows as columns, keys, order) peaks ~1150 bytes a file higher here
    assert per_file < 100, per_file
    assert sorted(p.name for p in (tmp_path / "out2000").iterdir()) == ["m.csv", "m.errors.csv", "m.paths.csv"]


@pytest.mark.parametrize("count", [0, 1])
def test_a_scan_with_no_usable_file_writes_the_map_and_errors_only(tmp_path, count):
    root = tmp_path / "archive"
    root.mkdir()
    for i in range(count):
        (root / f"broken{i}.png").write_bytes(b"no")
    report = scan_archive(root, ScanOptions(salt=SALT, progress=False), tmp_path / "out" / "m.csv")
    assert report.outputs.manifest is None and report.rows["rows"] == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.errors.csv", "m.paths.csv"]
    assert sum(report.errors.values()) == count


def test_dicom_headers_are_sorted_by_series_through_runs_with_the_same_rows(tmp_path, monkeypatch):
    """DICOM headers go through the same external sort (by series) and come back one series at a time: with runs of
    2 headers the rows and errors are those of runs that hold every header (two volumes, 2D images, a series whose
    slices sit in two folders, a series with a gap)."""
    from factories import write_dicom_2d

    import medssl.data.scan as scan_module

    root = tmp_path / "archive"
    write_dicom_series(root / "DOE^JANE/ct", random_volume((5, 8, 8), seed=1), modality="CT", series_uid="1.2.3.1")
    write_dicom_series(root / "DOE^JOHN/mr", random_volume((4, 8, 8), seed=2), series_uid="1.2.3.2")
    moved = write_dicom_series(root / "split/a", random_volume((4, 8, 8), seed=3), series_uid="1.2.3.3")
    (root / "split/b").mkdir()
    for path in moved[:2]:
        path.rename(root / "split/b" / path.name)
    write_dicom_series(root / "gap", random_volume((5, 8, 8), seed=4), series_uid="1.2.3.4", skip_slices=[2])
    for i in range(3):
        write_dicom_2d(root / f"cr/image{i}.dcm", np.full((6, 7), 50 + i, np.uint16))
    options = ScanOptions(salt=SALT, progress=False, workers=2)
    whole = scan_folder(root, options)
    seen: list[int] = []
    series_items = scan_module._series_items

    def counted(key, members, *args):  # type: ignore[no-untyped-def]
        seen.append(len(members))
        return series_items(key, members, *args)

    monkeypatch.setattr(scan_module, "_series_items", counted)
    monkeypatch.setattr(scan_writer_module, "RUN_LINES", 2)
    runs = scan_folder(root, options)
    assert list(runs.rows) == list(whole.rows) and runs.errors == whole.errors
    assert sorted(r.format for r in runs.rows) == ["dicom", "dicom", "dicom", "dicom_series", "dicom_series"]
    spread = "one DICOM series is spread over several folders; move it into one"
    assert [reason for _, reason in runs.errors].count(spread) == 2  # the two folders of the split series
    assert len(runs.errors) == 3  # and the series with a gap
    # one call per series with all of its headers: CT 5, MR 4, the split series 4, the gap 4 of 5, CR 1 each
    assert sorted(seen) == [1, 1, 1, 4, 4, 4, 5]


def test_a_streamed_scan_of_dicom_files_holds_a_series_not_the_headers(tmp_path, monkeypatch):
    """DICOM files (one 2D series each, ten to a patient-named folder): the heap does not grow with their number
    (300 against 900 files; runs of 50 lines, at most 2 open). Holding every header until the walk ended cost about
    1170 bytes a file here."""
    from factories import write_dicom_2d

    roots = {}
    for n in (300, 900):
        roots[n] = tmp_path / f"archive{n}"
        for i in range(n):
            write_dicom_2d(roots[n] / f"DOE^JANE_{i // 10}/im{i}.dcm", np.full((6, 7), i % 200, np.uint16))
    monkeypatch.setattr(scan_writer_module, "RUN_LINES", 50)
    monkeypatch.setattr(scan_writer_module, "MAX_RUNS", 2)
    per_file = _peak_per_file(roots, tmp_path)
    assert per_file < 300, per_file  # measured ~90 here, ~20 at 1000 against 3000 files

"""Manifests at scale (issue 18): reading shares repeated values and streams the CSV, validation streams the rows
(duplicates and leakage from hashes, named by a second read), writing never holds the whole text; what they report
is what they reported when every row and record was held."""

from __future__ import annotations

import gc
import os
import tracemalloc
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medssl.data.errors import ManifestError
from medssl.data.manifest import COLUMNS, ManifestRow, RowTable, read_manifest, validate_manifest, write_manifest
from medssl.data.pathmap import PathCursor, write_path_map


def keyed_manifest(folder: Path, rows: list[ManifestRow]) -> Path:
    """``rows`` (``path``: file keys) written with a path map that puts key ``k`` at ``site/k.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "archive").mkdir(exist_ok=True)
    write_path_map(folder / "m.paths.csv", folder / "archive", {r.path: f"site/{r.path}.png" for r in rows})
    write_manifest(folder / "m.csv", rows, None, path_map=folder / "m.paths.csv")
    return folder / "m.csv"


def many_rows(n: int) -> list[ManifestRow]:
    """``n`` distinct files of 20 per subject, half images, half volumes, three shapes."""
    return [
        ManifestRow(
            id=f"i{i:016x}",
            path=f"p{i:020x}",
            format="image" if i % 2 else "nifti",
            dims=2 if i % 2 else 3,
            modality="MR",
            subject=f"s{i // 20:016x}",
            shape=(64, 64) if i % 2 else (32, 32, 12 + (i // 2) % 2),
            spacing=(1.0, 1.0) if i % 2 else (1.0, 1.0, 2.0),
            split="train",
        )
        for i in range(n)
    ]


def test_read_rows_are_columns_that_give_back_the_rows_written(tmp_path):
    written = many_rows(60)
    manifest = read_manifest(keyed_manifest(tmp_path, written))
    rows = manifest.rows
    assert isinstance(rows, RowTable) and len(rows) == 60
    assert list(rows) == written and [rows[i] for i in range(60)] == written and rows[-1] == written[-1]
    assert rows[10:13] == written[10:13] and list(rows.column("id")) == [r.id for r in written]
    with pytest.raises(IndexError):
        rows[60]
    distinct = {"format": 2, "modality": 1, "split": 1, "spacing": 2, "shape": 3, "subject": 3}
    for name, count in distinct.items():
        assert len({id(getattr(r, name)) for r in rows}) == count, f"one object per distinct {name}"
    rows[0].split = "test"
    assert rows[0].split == "train", "a row read from the table is a copy"
    assert manifest.path_map is not None
    assert dict(manifest.path_map.paths) == {r.path: f"site/{r.path}.png" for r in written}


def test_a_shape_and_an_equal_spacing_stay_apart(tmp_path):
    # (2, 2, 2) == (2.0, 2.0, 2.0): shared as one value, the spacing would turn into integers (or the shape into floats)
    rows = [
        ManifestRow(id=f"r{i}", path=f"p{i}", format="nifti", dims=3, shape=(2, 2, 2), spacing=(2.0, 2.0, 2.0))
        for i in range(2)
    ]
    for row in read_manifest(keyed_manifest(tmp_path, rows)).rows:
        assert [type(v) for v in row.shape] == [int] * 3 and [type(v) for v in row.spacing] == [float] * 3


def test_validation_names_duplicates_in_the_order_of_their_first_row(tmp_path):
    ids = ["a", "b", "b", "c", "a", "c", "c", "d"]
    paths = ["p1", "p2", "p3", "p2", "p4", "p1", "p5", "p1"]
    series = ["", "", "", "", "", "", "", "s"]  # p1 of series s is another file than p1
    rows = [
        ManifestRow(id=i, path=p, format="image", dims=2, subject=f"s{n}", series=s)
        for n, (i, p, s) in enumerate(zip(ids, paths, series, strict=True))
    ]
    report = validate_manifest(keyed_manifest(tmp_path, rows), check_files=False)
    assert report.errors == [
        "duplicate id 'a' (2 rows)",
        "duplicate id 'b' (2 rows)",
        "duplicate id 'c' (3 rows)",
        "p1: listed 2 times",
        "p2: listed 2 times",
    ]


def test_validation_finds_leakage_by_subject_whatever_the_split_names(tmp_path):
    splits = {"s1": ["train", "test"], "s2": ["train", "train"], "s3": ["bogus", "train"], "s4": ["bogus", "bogus"]}
    rows = [
        ManifestRow(id=f"{subject}{k}", path=f"p{subject}{k}", format="image", dims=2, subject=subject, split=split)
        for subject, names in splits.items()
        for k, split in enumerate(names)
    ]
    report = validate_manifest(keyed_manifest(tmp_path, rows), check_files=False)
    leaks = [e for e in report.errors if "split leakage" in e]
    assert leaks == [
        "subject s1 appears in several splits (test, train): split leakage",
        "subject s3 appears in several splits (bogus, train): split leakage",
    ]
    assert sum("split 'bogus' is not one of" in e for e in report.errors) == 3


def test_the_summary_counts_as_before(tmp_path):
    rows = many_rows(50)
    rows[3].group, rows[4].split, rows[5].subject = "target", "", ""
    path = keyed_manifest(tmp_path, rows)
    expected = {
        "rows": 50,
        "images_2d": 25,
        "volumes_3d": 25,
        "subjects": len({r.subject for r in rows if r.subject}),
        "formats": dict(Counter(r.format for r in rows)),
        "modalities": {"MR": 50},
        "splits": dict(Counter(r.split or "-" for r in rows)),
        "groups": dict(Counter(r.group or "-" for r in rows)),
    }
    assert read_manifest(path).summary() == expected
    report = validate_manifest(path, check_files=False)
    assert report.summary == expected and report.ok and len(report.warnings) == 1  # the row without a subject


def test_a_manifest_is_written_as_before(tmp_path):
    rows = many_rows(5)
    rows[2].label, rows[3].mask = 'a "quoted", label', "p-mask"
    write_manifest(tmp_path / "m.csv", rows, tmp_path)
    lines = (tmp_path / "m.csv").read_bytes().decode("utf-8").split("\n")
    assert lines[:3] == ["# medssl-manifest v1", "# root: .", ",".join(COLUMNS)]
    row_2 = "i0000000000000002,p00000000000000000002,,nifti,3,MR,s0000000000000000,32x32x13,1x1x2,train,,"
    assert lines[5] == row_2 + '"a ""quoted"", label",'
    assert lines[6].endswith(",train,,,p-mask") and lines[-1] == "" and len(lines) == 3 + 5 + 1


def _per_row(function, small: int, large: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Held and peak Python heap bytes per row of ``function(n)``, as the slope between ``small`` and ``large`` (after
    a first call: imports and caches out of the figures)."""
    function(small)
    figures = []
    for n in (small, large):
        gc.collect()
        tracemalloc.start()
        kept = function(n)
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del kept
        figures.append((held, peak))
    (h0, p0), (h1, p1) = figures
    return (h1 - h0) / (large - small), (p1 - p0) / (large - small)


@pytest.mark.parametrize("step", ["read", "validate"])
def test_reading_and_validating_cost_a_few_hundred_bytes_a_row(tmp_path, step):
    manifests = {n: keyed_manifest(tmp_path / str(n), many_rows(n)) for n in (1000, 5000)}
    if step == "read":
        held, peak = _per_row(lambda n: read_manifest(manifests[n]), 1000, 5000)
        # the rows as columns (RowTable: ~150 bytes, id and file key as UTF-8, 4-byte codes for the repeated
        # values) and the path map (StringMap: ~75 bytes); were 460 held and 560 at peak as row objects sharing
        # their values, 1180 and 1870 with every CSV record held as a dict first and every value its own string
        assert held < 350 and peak < 450, (held, peak)
    else:
        held, peak = _per_row(lambda n: validate_manifest(manifests[n], check_files=False), 1000, 5000)
        # no row is kept (hashes: 8 bytes a row; "held" also counts the interpreter's tuple free lists, bounded);
        # the peak is the path map's reading; was 1630 at peak (every row and CSV record held), 500 with the map a dict
        assert held < 100 and peak < 600, (held, peak)


def test_validation_reads_the_manifest_again_only_for_repeats(tmp_path, monkeypatch):
    import medssl.data.manifest as manifest_module

    reads: defaultdict[str, int] = defaultdict(int)
    real = manifest_module._record_stream

    def counting(path: Path):  # type: ignore[no-untyped-def]
        reads[path.name] += 1
        return real(path)

    monkeypatch.setattr(manifest_module, "_record_stream", counting)
    rows = many_rows(30)
    assert validate_manifest(keyed_manifest(tmp_path / "clean", rows), check_files=False).ok
    assert reads["m.csv"] == 2  # the header (and its comments), then the rows
    rows[7].id = rows[3].id
    assert not validate_manifest(keyed_manifest(tmp_path / "repeats", rows), check_files=False).ok
    assert reads["m.csv"] == 2 + 3


KEYS = st.text("abcdef0123", min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(KEYS, st.text("xyz", min_size=1, max_size=5).map(lambda v: f"{v}/{v}.png"), max_size=30),
    st.lists(KEYS, max_size=20),
    st.booleans(),
    st.booleans(),
)
def test_a_path_cursor_answers_as_the_whole_map(tmp_path_factory, entries, asked, ask_in_order, map_in_order):
    folder = tmp_path_factory.mktemp("cursor")
    path = folder / "m.paths.csv"
    lines = [f"{k},{v}" for k, v in sorted(entries.items(), reverse=not map_in_order)]
    path.write_text("# medssl-paths v1\n# root: .\nkey,path\n" + "".join(f"{line}\n" for line in lines))
    questions = sorted(asked) if ask_in_order else asked
    cursor = PathCursor(path)
    assert [cursor.get(key) for key in questions] == [entries.get(key) for key in questions]
    cursor.finish()
    if ask_in_order and (map_in_order or len(entries) < 2) and all(key in entries for key in asked):
        assert not cursor.whole_map_read, "keys asked in order from a map in order: one entry held at a time"


def test_validation_checks_the_files_of_a_keyed_manifest_without_holding_its_map(tmp_path, monkeypatch):
    import medssl.data.manifest as manifest_module
    import medssl.data.pathmap as pathmap_module

    rows = many_rows(40)
    path = keyed_manifest(tmp_path, rows)
    for row in rows[:-3]:  # three files missing
        target = tmp_path / "archive" / "site" / f"{row.path}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"")

    def whole_map(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("validate read the whole path map")

    monkeypatch.setattr(pathmap_module, "read_path_map", whole_map)
    monkeypatch.setattr(manifest_module, "read_path_map", whole_map)
    report = validate_manifest(path, check_files=True)
    missing = [e for e in report.errors if "file not found" in e]
    assert len(missing) == 3 and all(r.path in e for r, e in zip(rows[-3:], missing, strict=True)), report.errors
    assert all("site" not in e for e in report.errors), "a keyed manifest's messages never quote a mapped path"


def test_validation_finds_a_bad_map_entry_that_no_row_names(tmp_path):
    rows = many_rows(5)
    path = keyed_manifest(tmp_path, rows)
    map_file = tmp_path / "m.paths.csv"
    map_file.write_text(map_file.read_text() + "pzzzz,../outside.png\n")
    with pytest.raises(ManifestError, match=r"without '\.\.'"):
        validate_manifest(path, check_files=True)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(0, 50), max_size=3000))
def test_distinct_hashes_count_as_a_set_does(values):
    from medssl.data.manifest import _DistinctHashes

    distinct = _DistinctHashes()
    for value in values:
        distinct.add(value)
    assert len(distinct) == len(set(values))
    distinct.add(values[0] if values else 7)
    assert len(distinct) == len(set(values)) + (not values)


def test_a_cache_build_over_streamed_rows_holds_nothing_a_row(tmp_path):
    """``medssl manifest preprocess`` reads the manifest with ``hold_rows=False``: the build passes over the rows from
    the file (digest, hashing: the path map in step, each row's index line spooled to a temporary file), so its
    heap does not grow with the rows whose content is cached already (hard links of one image here: one entry)."""
    import numpy as np
    from PIL import Image

    from medssl.data.cache import build_cache
    from medssl.data.preprocess import PreprocessConfig

    source = tmp_path / "source.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64).astype(np.uint8)).save(source)
    manifests = {}
    for n in (1000, 5000):
        rows = [replace(row, format="image", dims=2, shape=(64, 64), spacing=(1.0, 1.0)) for row in many_rows(n)]
        manifests[n] = keyed_manifest(tmp_path / str(n), rows)
        (tmp_path / str(n) / "archive" / "site").mkdir()
        for row in rows:
            os.link(source, tmp_path / str(n) / "archive" / "site" / f"{row.path}.png")

    def build(n: int) -> object:
        report = build_cache(read_manifest(manifests[n], hold_rows=False), tmp_path / "cache", PreprocessConfig(),
                             workers=1, progress=False)  # fmt: skip
        assert not report.errors and report.built + report.reused == n
        return report

    held, peak = _per_row(build, 1000, 5000)
    # ~0 measured; 72 at peak with the rows held (hold_rows=True: the RowTable)
    assert held < 10 and peak < 30, (held, peak)

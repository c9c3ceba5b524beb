"""Preprocessing cache: build, failures, atomicity, incremental rebuild, memory-mapped reads."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import medssl.data.cache as cache_module
from medssl.data.cache import build_cache, open_cache, settings_digest
from medssl.data.errors import DataError
from medssl.data.manifest import read_manifest
from medssl.data.preprocess import PreprocessConfig
from medssl.data.pseudonym import pseudonym
from medssl.data.scan import ScanOptions, scan_folder


def write_volume(path: Path, seed: int, shape=(12, 14, 10), value=None) -> None:
    rng = np.random.default_rng(seed)
    array = rng.uniform(10, 200, size=shape).astype(np.float32) if value is None else value
    nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))


def make_archive(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        write_volume(root / f"vol{i}.nii.gz", seed=i)
    for i in range(2):
        pixels = np.random.default_rng(10 + i).integers(0, 255, size=(40, 30), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i}.png")
    return root


def scan_to_manifest(root: Path, out: Path):
    from medssl.data.manifest import write_manifest

    result = scan_folder(root, ScanOptions(salt="test", progress=False))
    write_manifest(out, result.rows, root)
    return read_manifest(out)


def entries_are_complete(directory: Path) -> None:
    npys = {p.stem for p in directory.glob("*.npy")}
    jsons = {p.stem for p in directory.glob("*.json") if p.name != "settings.json"}
    assert npys == jsons, "every cached array has its metadata and vice versa"
    assert not list(directory.rglob("*.tmp")), "no temporary file is left behind"


def test_build_then_read_memory_mapped(tmp_path):
    manifest = scan_to_manifest(make_archive(tmp_path / "data"), tmp_path / "m.csv")
    config = PreprocessConfig()
    report = build_cache(manifest, tmp_path / "cache", config, workers=1, progress=False)
    assert (report.built, report.reused, report.errors) == (5, 0, [])
    entries = open_cache(manifest, tmp_path / "cache", config)
    assert set(entries) == {row.id for row in manifest.rows}
    for row in manifest.rows:
        entry = entries[row.id]
        array = entry.array()
        assert isinstance(array, np.memmap)
        assert array.dtype == np.float16
        assert array.shape[0] == 1 and list(array.shape[1:]) == list(row.shape)
        assert float(array.min()) >= 0.0 and float(array.max()) <= 1.0
        assert len(entry.meta["foreground"]) == row.dims
    entries_are_complete(report.directory)


def test_second_build_reuses_and_a_grown_manifest_builds_only_the_new_item(tmp_path):
    data = make_archive(tmp_path / "data")
    config = PreprocessConfig()
    manifest = scan_to_manifest(data, tmp_path / "m.csv")
    build_cache(manifest, tmp_path / "cache", config, workers=1, progress=False)
    again = build_cache(manifest, tmp_path / "cache", config, workers=1, progress=False)
    assert (again.built, again.reused) == (0, 5)
    write_volume(data / "vol_new.nii.gz", seed=99)
    grown = scan_to_manifest(data, tmp_path / "m.csv")
    report = build_cache(grown, tmp_path / "cache", config, workers=1, progress=False)
    assert (report.built, report.reused) == (1, 5)
    assert len(open_cache(grown, tmp_path / "cache", config)) == 6


def test_settings_change_the_cache_key(tmp_path):
    manifest = scan_to_manifest(make_archive(tmp_path / "data"), tmp_path / "m.csv")
    a = build_cache(manifest, tmp_path / "cache", PreprocessConfig(), workers=1, progress=False)
    b = build_cache(manifest, tmp_path / "cache", PreprocessConfig(storage_dtype="uint8"), workers=1, progress=False)
    assert a.directory != b.directory
    assert settings_digest(PreprocessConfig()) == a.directory.name
    entry = next(iter(open_cache(manifest, tmp_path / "cache", PreprocessConfig(storage_dtype="uint8")).values()))
    assert entry.array().dtype == np.uint8 and entry.scale == pytest.approx(1 / 255)


def test_bad_items_fail_with_their_path_and_the_rest_is_built(tmp_path):
    data = make_archive(tmp_path / "data")
    nan_volume = np.ones((8, 8, 8), np.float32)
    nan_volume[2, 3, 4] = np.nan
    nan_volume[1, 1, 1] = np.inf
    write_volume(data / "has_nan.nii.gz", seed=0, value=nan_volume)
    write_volume(data / "to_truncate.nii.gz", seed=5, shape=(30, 30, 30))
    write_volume(data / "vanishes.nii.gz", seed=6)
    manifest = scan_to_manifest(data, tmp_path / "m.csv")
    blob = (data / "to_truncate.nii.gz").read_bytes()
    (data / "to_truncate.nii.gz").write_bytes(blob[: len(blob) // 2])  # truncated after the scan
    (data / "vanishes.nii.gz").unlink()  # the file vanished after the scan

    report = build_cache(manifest, tmp_path / "cache", PreprocessConfig(), workers=1, progress=False)
    reasons = {Path(path).name: reason for path, reason in report.errors}
    assert set(reasons) == {"has_nan.nii.gz", "to_truncate.nii.gz", "vanishes.nii.gz"}
    assert "2 voxel(s) are NaN or infinite" in reasons["has_nan.nii.gz"]
    assert "truncated" in reasons["to_truncate.nii.gz"]
    assert "not found" in reasons["vanishes.nii.gz"]
    assert report.built == 5
    entries = open_cache(manifest, tmp_path / "cache", PreprocessConfig())
    assert len(entries) == 5
    entries_are_complete(report.directory)
    errors_csv = report.errors_path.read_text()
    assert "has_nan.nii.gz" in errors_csv and "vanishes.nii.gz" in errors_csv


def test_parallel_build_matches_serial_build(tmp_path):
    manifest = scan_to_manifest(make_archive(tmp_path / "data"), tmp_path / "m.csv")
    serial = build_cache(manifest, tmp_path / "serial", PreprocessConfig(), workers=1, progress=False)
    parallel = build_cache(manifest, tmp_path / "parallel", PreprocessConfig(), workers=2, progress=False)
    assert parallel.built == serial.built == 5
    a = open_cache(manifest, tmp_path / "serial", PreprocessConfig())
    b = open_cache(manifest, tmp_path / "parallel", PreprocessConfig())
    for row_id in a:
        assert a[row_id].key == b[row_id].key
        np.testing.assert_array_equal(a[row_id].array(), b[row_id].array())


def test_interrupted_build_leaves_no_partial_entry_and_resumes(tmp_path, monkeypatch):
    manifest = scan_to_manifest(make_archive(tmp_path / "data"), tmp_path / "m.csv")
    real_save = cache_module._atomic_save_npy
    calls = {"n": 0}

    def save_then_interrupt(path, array):
        calls["n"] += 1
        if calls["n"] == 3:  # killed while writing the third array: a temporary is on disk
            tmp = path.with_name(f".{path.name}.999999999.tmp")
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
        real_save(path, array)

    monkeypatch.setattr(cache_module, "_atomic_save_npy", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_cache(manifest, tmp_path / "cache", PreprocessConfig(), workers=1, progress=False)
    directory = tmp_path / "cache" / settings_digest(PreprocessConfig())
    assert len(list(directory.glob("*.json"))) == 1 + 2  # settings + two finished entries
    assert len(list(directory.glob(".*.tmp"))) == 1
    monkeypatch.setattr(cache_module, "_atomic_save_npy", real_save)
    report = build_cache(manifest, tmp_path / "cache", PreprocessConfig(), workers=1, progress=False)
    assert (report.built, report.reused) == (3, 2)
    entries_are_complete(directory)


def test_missing_cache_is_a_clear_error(tmp_path):
    manifest = scan_to_manifest(make_archive(tmp_path / "data"), tmp_path / "m.csv")
    with pytest.raises(Exception, match="medssl manifest preprocess"):
        open_cache(manifest, tmp_path / "nowhere", PreprocessConfig())


def test_cache_metadata_holds_no_identifiers(tmp_path):
    """The cache stores pixels and geometry only: no path, subject or id of the row."""
    manifest = scan_to_manifest(make_archive(tmp_path / "data"), tmp_path / "m.csv")
    report = build_cache(manifest, tmp_path / "cache", PreprocessConfig(), workers=1, progress=False)
    text = "".join(p.read_text() for p in report.directory.glob("*.json"))
    for row in manifest.rows:
        assert row.path not in text and row.subject not in text and row.id not in text
    assert pseudonym("vol0", "test", prefix="s") not in text


def test_cache_of_identifying_dicoms_holds_no_identifier(tmp_path):
    from factories import IDENTIFIERS, IDENTIFYING_TAGS, random_volume, write_dicom_2d, write_dicom_series

    tags = IDENTIFYING_TAGS
    root = tmp_path / "site"
    write_dicom_series(root / "brain", random_volume((4, 5, 6)), (1.0, 1.0, 3.0), **tags)
    write_dicom_2d(root / "chest" / "cr.dcm", np.arange(48, dtype=np.uint16).reshape(6, 8), **tags)
    manifest = scan_to_manifest(root, tmp_path / "m.csv")
    report = build_cache(manifest, tmp_path / "cache", PreprocessConfig(), workers=1, progress=False)
    assert report.built == 2 and not report.errors
    blobs = b"".join(p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file())
    for identifier in IDENTIFIERS:
        assert identifier.encode() not in blobs, f"{identifier} reached the cache"


@pytest.mark.parametrize(
    "config",
    [PreprocessConfig(), PreprocessConfig(spacing=[0.5, 2.0, 1.0], max_side_2d=16, storage_dtype="uint8")],
    ids=["native", "resampled"],
)
def test_the_entry_size_estimate_is_close_to_what_is_written(tmp_path, config):
    """What the free-space check counts: each entry's array (after resampling) and metadata, within 10%."""
    from medssl.data.cache import estimated_entry_bytes

    manifest = scan_to_manifest(make_archive(tmp_path / "data"), tmp_path / "m.csv")
    build_cache(manifest, tmp_path / "cache", config, workers=1, progress=False)
    entries = open_cache(manifest, tmp_path / "cache", config)
    for row in manifest.rows:
        entry = entries[row.id]
        written = sum(p.stat().st_size for p in entry.directory.glob(f"{entry.key}.*"))
        assert 0.9 * written <= estimated_entry_bytes(row, config) <= 1.1 * written + 1024, row


def test_a_cache_build_without_room_stops_before_writing_any_entry(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from medssl.runtime.preflight import PreflightError

    manifest = scan_to_manifest(make_archive(tmp_path / "data"), tmp_path / "m.csv")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - 4096, 4096))
    with pytest.raises(PreflightError, match=r"data\.cache_dir: .* has 4\.0 KiB free, this run needs at least"):
        build_cache(manifest, tmp_path / "cache", PreprocessConfig(), workers=1, progress=False)
    assert not list((tmp_path / "cache").rglob("*.npy"))


def test_the_index_is_one_line_a_row_and_must_match_the_rows(tmp_path):
    manifest = scan_to_manifest(make_archive(tmp_path / "data"), tmp_path / "m.csv")
    (tmp_path / "data" / "img1.png").write_bytes(b"not a png")  # one row fails: its line has no entry
    report = build_cache(manifest, tmp_path / "cache", PreprocessConfig(), workers=1, progress=False)
    lines = report.index_path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "id,entry" and [line.split(",")[0] for line in lines[1:]] == [r.id for r in manifest.rows]
    failed = {line.split(",")[0] for line in lines[1:] if line.endswith(",")}
    assert len(failed) == 1 == len(report.errors)
    index = open_cache(manifest, tmp_path / "cache", PreprocessConfig())
    assert len(index) == 4 and set(index) == {r.id for r in manifest.rows} - failed
    assert [index.entry_at(i) is None for i in range(5)] == [r.id in failed for r in manifest.rows]
    assert all(index[rid] is index.entry_at(i) for i, rid in enumerate(r.id for r in manifest.rows) if rid in index)
    for damage in (lines[:-1], [lines[0], *lines[1:][::-1]], ["id,key", *lines[1:]], [*lines, "x,y"]):
        report.index_path.write_text("\n".join(damage) + "\n", encoding="utf-8")
        with pytest.raises(DataError, match="does not match the manifest"):
            open_cache(manifest, tmp_path / "cache", PreprocessConfig())


def test_a_build_over_streamed_rows_writes_what_a_build_over_held_rows_writes(tmp_path):
    """``read_manifest(..., hold_rows=False)`` (what ``medssl manifest preprocess`` reads): the rows are passed over
    from the file, never held; the index, the errors and the counts are those of a build over the held rows. Two
    rows of one bad content: the one built has the reader's reason, the other 'same content as a file that
    failed', and neither has an entry."""
    import shutil

    from medssl.data.manifest import StreamedRows

    data = make_archive(tmp_path / "data")
    shutil.copy(data / "img0.png", data / "twin.png")  # same content as img0: one entry for both
    held = scan_to_manifest(data, tmp_path / "m.csv")
    (data / "img1.png").write_bytes(b"not a png")
    shutil.copy(data / "img1.png", data / "twin.png")  # twin now has img1's bad content
    outputs = {}
    for hold in (True, False):
        manifest = read_manifest(tmp_path / "m.csv", hold_rows=hold)
        assert isinstance(manifest.rows, StreamedRows) != hold and len(manifest) == len(held.rows) == 6
        cache = tmp_path / f"cache-{hold}"
        report = build_cache(manifest, cache, PreprocessConfig(), workers=1, progress=False)
        outputs[hold] = (
            report.index_path.read_text(encoding="utf-8"),
            report.errors_path.read_text(encoding="utf-8"),
            report.built,
            report.reused,
        )
        entries_are_complete(report.directory)
        assert not [p for p in (cache / report.directory.name / "index").iterdir() if p.suffix not in (".csv",)]
    assert outputs[True] == outputs[False]
    index, errors, built, reused = outputs[False]
    reasons = sorted(line.rsplit(",", 1)[-1] for line in errors.splitlines()[1:])
    unreadable = "unreadable or truncated image file (UnidentifiedImageError)"
    assert reasons == ["same content as a file that failed", unreadable]
    assert sum(line.endswith(",") for line in index.splitlines()[1:]) == 2 and (built, reused) == (4, 0)
    again = build_cache(read_manifest(tmp_path / "m.csv", hold_rows=False), tmp_path / "cache-False",
                        PreprocessConfig(), workers=1, progress=False)  # fmt: skip
    assert (again.built, again.reused, len(again.errors)) == (0, 4, 2)

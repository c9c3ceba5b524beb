"""``medssl manifest scan`` / ``validate``: rows, errors, privacy, pseudonyms, subjects, splits, labels."""

from __future__ import annotations

import csv
import logging
import os
import stat
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from factories import (
    IDENTIFIERS,
    IDENTIFYING_TAGS,
    SAGITTAL,
    random_volume,
    write_dicom_2d,
    write_dicom_series,
    write_jpeg,
    write_nifti,
    write_png,
)

from medssl.cli import main
from medssl.data.manifest import COLUMNS, MAGIC, ManifestRow, read_manifest, read_manifest_records, write_manifest
from medssl.data.pathmap import default_map_path, read_path_map
from medssl.data.readers import read_row
from medssl.data.scan import ScanOptions, scan_folder

SALT = "unit-test-salt-7f3a"


# --------------------------------------------------------------------------- helpers


def scan(folder: Path, out: Path, *extra: str, salt: str | None = SALT) -> int:
    argv = ["manifest", "scan", str(folder), "--out", str(out), "--no-progress", "--workers", "2", *extra]
    if salt is not None:
        argv += ["--salt", salt]
    return main(argv)


def errors_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".csv") + ".errors.csv")


def path_map(out: Path) -> dict[str, str]:
    """File key -> relative path: what only the scan's path map knows."""
    return dict(read_path_map(default_map_path(out)).paths)


def real_records(out: Path) -> list[dict[str, str]]:
    """The manifest's records with their file keys (``path``, ``mask``) looked up in the path map."""
    records, header, _ = read_manifest_records(out)
    assert tuple(header) == COLUMNS
    paths = path_map(out)
    assert all(r["path"] in paths and r["path"].startswith("p") for r in records), "rows name files by key"
    return [{**r, "path": paths[r["path"]], "mask": paths[r["mask"]] if r["mask"] else ""} for r in records]


def manifest_rows(out: Path) -> dict[str, dict[str, str]]:
    return {r["path"] + (f"#{r['series']}" if r["series"] else ""): r for r in real_records(out)}


def rows_by_path(out: Path) -> dict[str, dict[str, str]]:
    return {r["path"]: r for r in real_records(out)}


def scan_errors(out: Path) -> dict[str, str]:
    paths = path_map(out)
    with open(errors_path(out), newline="") as handle:
        return {paths[r["path"]]: r["reason"] for r in csv.DictReader(handle)}


def write_good_files(folder: Path) -> list[str]:
    """Two files that must survive next to any bad input."""
    write_png(folder / "good.png", np.arange(12 * 16, dtype=np.uint8).reshape(12, 16))
    write_nifti(folder / "good.nii.gz", random_volume((3, 4, 5), seed=11))
    return ["good.nii.gz", "good.png"]


def assert_good_files_kept(out: Path, good: list[str]) -> None:
    rows = rows_by_path(out)
    for rel in good:
        assert rel in rows, f"{rel} missing from the manifest"


# --------------------------------------------------------------------------- a mixed folder


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    # MR series: 4 sagittal slices of 6 rows x 5 columns -> canonical [X, Y, Z] = (4, 5, 6)
    write_dicom_series(root / "mr", random_volume((4, 6, 5), seed=1), (0.8, 1.3, 2.5), (10, -20, 30), SAGITTAL)
    cr_series = "1.2.826.0.1.3680043.8.498.1"
    pixels = (np.arange(8 * 10).reshape(8, 10) * 7).astype(np.uint16)
    write_dicom_2d(root / "cr" / "a.dcm", pixels, pixel_spacing=(0.15, 0.2), series_uid=cr_series)
    write_dicom_2d(root / "cr" / "b.dcm", pixels, pixel_spacing=(0.15, 0.2), series_uid=cr_series)
    # NIfTI with an identity LPS direction: RAS canonical keeps the axis order
    write_nifti(root / "vol.nii.gz", random_volume((3, 4, 5), seed=2), spacing=(1.0, 2.0, 3.0))
    write_png(root / "img.png", np.zeros((12, 16), dtype=np.uint8))
    write_jpeg(root / "photo.jpg", np.zeros((20, 30), dtype=np.uint8), rgb=True)
    (root / "README.txt").write_text("notes about this data\n")
    write_png(root / ".hidden.png", np.zeros((2, 2), dtype=np.uint8))
    return root


def test_scan_mixed_folder(mixed_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "manifests" / "all.csv"
    assert scan(mixed_folder, out) == 0
    captured = capsys.readouterr()

    text = out.read_text()
    assert text.startswith(MAGIC + "\n# paths: all.paths.csv\n")  # no root, no path: the map has them
    assert read_path_map(out.with_name("all.paths.csv")).root.resolve() == mixed_folder.resolve()
    rows = rows_by_path(out)
    assert set(rows) == {"mr", "cr/a.dcm", "cr/b.dcm", "vol.nii.gz", "img.png", "photo.jpg"}

    mr = rows["mr"]
    assert (mr["format"], mr["dims"], mr["modality"]) == ("dicom_series", "3", "MR")
    assert mr["shape"] == "4x5x6"
    assert mr["spacing"] == "2.5x0.8x1.3"
    assert len(mr["series"]) == 16
    for name in ("cr/a.dcm", "cr/b.dcm"):
        cr = rows[name]
        assert (cr["format"], cr["dims"], cr["modality"], cr["shape"]) == ("dicom", "2", "CR", "8x10")
        assert cr["spacing"] == "0.15x0.2"
        assert cr["series"] == ""
    assert rows["cr/a.dcm"]["subject"] == rows["cr/b.dcm"]["subject"]  # same PatientID
    nifti = rows["vol.nii.gz"]
    assert (nifti["format"], nifti["dims"], nifti["modality"]) == ("nifti", "3", "OT")
    assert (nifti["shape"], nifti["spacing"]) == ("5x4x3", "1x2x3")
    assert (rows["img.png"]["format"], rows["img.png"]["dims"], rows["img.png"]["shape"]) == ("image", "2", "12x16")
    assert (rows["photo.jpg"]["shape"], rows["photo.jpg"]["spacing"]) == ("20x30", "1x1")
    assert len({r["id"] for r in rows.values()}) == len(rows)
    assert all(r["subject"].startswith("s") and r["id"].startswith("i") for r in rows.values())

    assert scan_errors(out) == {"README.txt": "unsupported file type (.txt)"}

    assert "scanned 10 files" in captured.out
    assert "found 6 items: 4 2D images, 2 3D volumes (1 DICOM series)" in captured.out
    assert "skipped 1 file(s) or series" in captured.out
    assert "unsupported file type" in captured.out
    assert "ignored 1 hidden file(s)/folder(s)" in captured.out
    assert f"manifest: {out}" in captured.out
    assert f"path map: {out.with_name('all.paths.csv')}" in captured.out
    for name in ("mr", "cr/a.dcm", "vol.nii.gz", "img.png", "photo", "README"):
        assert name not in text and name not in errors_path(out).read_text()

    # every row reads back with the shape and spacing the scan predicted from headers only
    manifest = read_manifest(out)
    assert manifest.root.resolve() == mixed_folder.resolve()
    for row in manifest.rows:
        loaded = read_row(row, manifest.resolve(row))
        assert loaded.array.shape == row.shape, row.path
        assert loaded.spacing == pytest.approx(row.spacing, abs=1e-4), row.path

    assert main(["manifest", "validate", str(out)]) == 0
    assert "OK (0 errors" in capsys.readouterr().out


def test_scan_modality_and_exclude_options(mixed_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.csv"
    assert scan(mixed_folder, out, "--modality", "mr", "--exclude", "cr/*", "--exclude", "*.txt") == 0
    rows = rows_by_path(out)
    assert set(rows) == {"mr", "vol.nii.gz", "img.png", "photo.jpg"}
    assert rows["vol.nii.gz"]["modality"] == "MR"
    assert rows["img.png"]["modality"] == "MR"
    assert scan_errors(out) == {}


def test_scan_folder_library_api(mixed_folder: Path) -> None:
    result = scan_folder(mixed_folder, ScanOptions(salt=SALT, workers=1, progress=False))
    assert result.files_seen == 10
    assert result.hidden_skipped == 1
    assert [r.path for r in result.rows] == sorted(r.path for r in result.rows)
    assert result.error_summary() == {"unsupported file type": 1}


def test_scan_walks_the_tree_once_with_progress_on(
    mixed_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A progress report must not cost a second walk (a counting pass over a network share takes minutes): each
    folder is listed once, and the report counts the files read."""
    listed: list[str] = []
    real_scandir = os.scandir

    def counting_scandir(path: str) -> object:
        listed.append(os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr("medssl.data.scan.os.scandir", counting_scandir)
    result = scan_folder(mixed_folder, ScanOptions(salt=SALT, workers=1, progress=True))
    assert result.files_seen == 10
    assert len(listed) == len(set(listed)), f"a folder listed twice: {sorted(listed)}"
    assert os.fspath(mixed_folder) in listed
    assert "scan: 10 files" in capsys.readouterr().err  # the final line of the (log-file) report


# --------------------------------------------------------------------------- bad inputs, one at a time


def test_corrupt_dicom_after_valid_preamble(tmp_path: Path) -> None:
    good = write_good_files(tmp_path / "d")
    rng = np.random.default_rng(0)
    (tmp_path / "d" / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + rng.bytes(3000))
    out = tmp_path / "m.csv"
    assert scan(tmp_path / "d", out) == 0
    errors = scan_errors(out)
    assert "corrupt DICOM" in errors["garbage.dcm"]
    assert_good_files_kept(out, good)


def test_truncated_dicom(tmp_path: Path) -> None:
    good = write_good_files(tmp_path / "d")
    pixels = (np.arange(64 * 64).reshape(64, 64) % 4000).astype(np.uint16)
    full = write_dicom_2d(tmp_path / "full.dcm", pixels)
    data = full.read_bytes()
    (tmp_path / "d" / "cut.dcm").write_bytes(data[: len(data) // 2])
    out = tmp_path / "m.csv"
    assert scan(tmp_path / "d", out) == 0
    assert "truncated DICOM" in scan_errors(out)["cut.dcm"]
    assert "cut.dcm" not in rows_by_path(out)
    assert_good_files_kept(out, good)


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    good = write_good_files(tmp_path / "d")
    write_dicom_2d(tmp_path / "d" / "report.dcm", None)
    out = tmp_path / "m.csv"
    assert scan(tmp_path / "d", out) == 0
    assert "no pixel data" in scan_errors(out)["report.dcm"]
    assert_good_files_kept(out, good)


def test_truncated_nifti_is_flagged_by_scan_and_reader(tmp_path: Path) -> None:
    from medssl.data.errors import DataError
    from medssl.data.readers import read_nifti

    good = write_good_files(tmp_path / "d")
    path = write_nifti(tmp_path / "d" / "cut.nii.gz", random_volume((16, 16, 16), seed=3))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, data and gzip trailer gone
    out = tmp_path / "m.csv"
    assert scan(tmp_path / "d", out) == 0
    reason = scan_errors(out)["cut.nii.gz"]
    assert "truncated NIfTI" in reason
    assert "cut.nii.gz" not in rows_by_path(out)
    assert_good_files_kept(out, good)
    with pytest.raises(DataError, match="truncated") as info:
        read_nifti(path)
    assert str(path) in str(info.value)


def test_uncompressed_truncated_nifti(tmp_path: Path) -> None:
    good = write_good_files(tmp_path / "d")
    path = write_nifti(tmp_path / "d" / "cut.nii", random_volume((8, 8, 8), seed=3))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    out = tmp_path / "m.csv"
    assert scan(tmp_path / "d", out) == 0
    assert "truncated NIfTI" in scan_errors(out)["cut.nii"]
    assert_good_files_kept(out, good)


def test_4d_nifti(tmp_path: Path) -> None:
    import nibabel as nib

    good = write_good_files(tmp_path / "d")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 3), dtype=np.float32), np.eye(4)), str(tmp_path / "d" / "fmri.nii.gz"))
    out = tmp_path / "m.csv"
    assert scan(tmp_path / "d", out) == 0
    assert "4D NIfTI" in scan_errors(out)["fmri.nii.gz"]
    assert "(4, 5, 6, 3)" in scan_errors(out)["fmri.nii.gz"]
    assert_good_files_kept(out, good)


def test_text_file_named_dcm(tmp_path: Path) -> None:
    good = write_good_files(tmp_path / "d")
    (tmp_path / "d" / "notes.dcm").write_text("this is not a DICOM file\n" * 20)
    out = tmp_path / "m.csv"
    assert scan(tmp_path / "d", out) == 0
    assert "not a DICOM file" in scan_errors(out)["notes.dcm"]
    assert_good_files_kept(out, good)


def test_broken_png(tmp_path: Path) -> None:
    good = write_good_files(tmp_path / "d")
    (tmp_path / "d" / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "m.csv"
    assert scan(tmp_path / "d", out) == 0
    assert "unreadable image file" in scan_errors(out)["broken.png"]
    assert_good_files_kept(out, good)


def test_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "m.csv"
    assert scan(tmp_path / "empty", out) == 2
    captured = capsys.readouterr()
    assert "nothing usable" in captured.err
    assert str(tmp_path / "empty") in captured.err
    assert not out.exists()


def test_folder_with_only_bad_files_writes_no_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("x")
    out = tmp_path / "m.csv"
    assert scan(tmp_path / "d", out) == 2
    assert "nothing usable" in capsys.readouterr().err
    assert not out.exists()
    assert scan_errors(out) == {"a.txt": "unsupported file type (.txt)"}


def test_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert scan(tmp_path / "nope", tmp_path / "m.csv") == 2
    err = capsys.readouterr().err
    assert "folder not found" in err
    assert str(tmp_path / "nope") in err


def test_series_with_missing_slice(tmp_path: Path) -> None:
    good = write_good_files(tmp_path / "d")
    write_dicom_series(tmp_path / "d" / "gap", random_volume((8, 4, 4)), (1.0, 1.0, 2.0), skip_slices=(4,))
    out = tmp_path / "m.csv"
    assert scan(tmp_path / "d", out) == 0
    reason = scan_errors(out)["gap"]
    assert "1 missing slice" in reason
    assert "gap" not in rows_by_path(out)
    assert_good_files_kept(out, good)


def test_series_with_mixed_spacing(tmp_path: Path) -> None:
    good = write_good_files(tmp_path / "d")
    zs = [0.0, 1.0, 2.0, 3.5, 4.5, 5.5]
    write_dicom_series(tmp_path / "d" / "mixed", random_volume((6, 4, 4)), positions_override=[(0, 0, z) for z in zs])
    out = tmp_path / "m.csv"
    assert scan(tmp_path / "d", out) == 0
    assert "mixed slice spacing" in scan_errors(out)["mixed"]
    assert_good_files_kept(out, good)


def test_series_with_duplicate_positions(tmp_path: Path) -> None:
    good = write_good_files(tmp_path / "d")
    zs = [0.0, 1.0, 1.0, 2.0]
    write_dicom_series(tmp_path / "d" / "dup", random_volume((4, 4, 4)), positions_override=[(0, 0, z) for z in zs])
    out = tmp_path / "m.csv"
    assert scan(tmp_path / "d", out) == 0
    assert "share a position" in scan_errors(out)["dup"]
    assert_good_files_kept(out, good)


def test_series_spread_over_two_folders(tmp_path: Path) -> None:
    good = write_good_files(tmp_path / "d")
    volume = random_volume((6, 4, 4))
    uid = "1.2.826.0.1.3680043.8.498.77"
    study = "1.2.826.0.1.3680043.8.498.78"
    write_dicom_series(tmp_path / "d" / "part1", volume[:3], series_uid=uid, study_uid=study)
    write_dicom_series(tmp_path / "d" / "part2", volume[3:], origin=(0, 0, 3), series_uid=uid, study_uid=study)
    out = tmp_path / "m.csv"
    assert scan(tmp_path / "d", out) == 0
    errors = scan_errors(out)
    assert "several folders" in errors["part1"]
    assert "several folders" in errors["part2"]
    assert_good_files_kept(out, good)


def test_two_series_in_one_folder_are_two_rows(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "d" / "both", random_volume((3, 4, 4), seed=1), prefix="A")
    write_dicom_series(tmp_path / "d" / "both", random_volume((5, 4, 4), seed=2), origin=(0, 0, 50), prefix="B")
    out = tmp_path / "m.csv"
    assert scan(tmp_path / "d", out) == 0
    rows = manifest_rows(out)
    assert len(rows) == 2
    assert {r["path"] for r in rows.values()} == {"both"}
    assert {r["shape"] for r in rows.values()} == {"4x4x3", "4x4x5"}
    manifest = read_manifest(out)
    for row in manifest.rows:
        assert read_row(row, manifest.resolve(row)).array.shape == row.shape
    assert main(["manifest", "validate", str(out)]) == 0


def test_validate_reports_vanished_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_good_files(tmp_path / "d")
    out = tmp_path / "m.csv"
    assert scan(tmp_path / "d", out) == 0
    assert main(["manifest", "validate", str(out)]) == 0
    capsys.readouterr()
    (tmp_path / "d" / good[1]).unlink()
    assert main(["manifest", "validate", str(out)]) == 1
    text = capsys.readouterr().out
    assert "file not found" in text
    (key,) = [k for k, rel in path_map(out).items() if rel == good[1]]
    assert key in text and good[1] not in text  # the row's file key, never its path
    assert "INVALID (1 errors" in text
    assert main(["manifest", "validate", str(out), "--no-files"]) == 0


# --------------------------------------------------------------------------- privacy


@pytest.fixture
def identifying_folder(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    tags = IDENTIFYING_TAGS
    write_dicom_series(root / "brain", random_volume((4, 5, 6)), (1.0, 1.0, 3.0), **tags)
    write_dicom_2d(root / "chest" / "cr.dcm", np.ones((6, 8), dtype=np.uint16), **tags)
    write_dicom_2d(root / "PID-778899" / "extra.dcm", np.ones((6, 8), dtype=np.uint16), **tags)
    write_dicom_2d(root / "scans-of-jane" / "more.dcm", np.ones((6, 8), dtype=np.uint16), **tags)
    return root


def test_no_identifier_reaches_any_output(
    identifying_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out" / "manifest.csv"
    argv = ["-v", "manifest", "scan", str(identifying_folder), "--out", str(out), "--salt", SALT, "--no-progress"]
    assert main([*argv, "--split-fractions", "train=1"]) == 0
    assert main(["-v", "manifest", "validate", str(out)]) == 0
    captured = capsys.readouterr()

    # the inputs really carry the identifiers
    for source in (next((identifying_folder / "brain").iterdir()), identifying_folder / "chest" / "cr.dcm"):
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        assert (str(ds.PatientName), ds.PatientID, ds.AccessionNumber, ds.StudyDate) == (
            "Doe^Jane",
            "PID-778899",
            "ACC-5566",
            "20240101",
        )
        assert (ds.PatientBirthDate, ds.InstitutionName) == ("19700101", "St Example Hospital")

    rows = rows_by_path(out)  # paths that hold the patient's own ID or name are scanned like any other
    assert set(rows) == {"brain", "chest/cr.dcm", "PID-778899/extra.dcm", "scans-of-jane/more.dcm"}
    assert scan_errors(out) == {}
    assert "PID-778899/extra.dcm" in default_map_path(out).read_text()  # only the private map names them
    outputs = {
        "manifest": out.read_text(),
        "errors": errors_path(out).read_text(),
        "stdout": captured.out,
        "stderr": captured.err,
        "log": caplog.text,
    }
    for where, text in outputs.items():
        for identifier in IDENTIFIERS:
            assert identifier not in text, f"{identifier!r} leaked into {where}"
        assert "pid-778899" not in text.lower(), where
    # the subject is a keyed pseudonym of the PatientID, shared by the series and the CR
    assert rows["brain"]["subject"] == rows["chest/cr.dcm"]["subject"]


def test_identifying_paths_of_bad_files_stay_in_the_map(identifying_folder: Path, tmp_path: Path) -> None:
    """A file the scan cannot use is named by its key in the errors CSV, whatever its path holds."""
    write_dicom_2d(
        identifying_folder / "pid-778899-copy.dcm", np.ones((4, 4), dtype=np.uint16), patient_id="PID-778899"
    )
    (identifying_folder / "Doe_Jane_notes.dcm").write_text("not a DICOM file\n" * 20)
    out = tmp_path / "m.csv"
    assert scan(identifying_folder, out) == 0
    assert "pid-778899-copy.dcm" in rows_by_path(out)
    assert "not a DICOM file" in scan_errors(out)["Doe_Jane_notes.dcm"]
    for text in (out.read_text(), errors_path(out).read_text()):
        assert "778899" not in text and "jane" not in text.lower() and "doe" not in text.lower()


# --------------------------------------------------------------------------- pseudonyms and salt


def test_ids_and_subjects_are_stable_for_one_salt(mixed_folder: Path, tmp_path: Path, capsys) -> None:
    first, second, other = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    assert scan(mixed_folder, first) == 0
    assert scan(mixed_folder, second) == 0
    assert scan(mixed_folder, other, salt="a-completely-different-salt") == 0
    captured = capsys.readouterr()

    rows_a, rows_b, rows_c = rows_by_path(first), rows_by_path(second), rows_by_path(other)
    assert rows_a == rows_b
    assert set(rows_a) == set(rows_c)
    for path, row in rows_a.items():
        assert rows_c[path]["id"] != row["id"]
        assert rows_c[path]["subject"] != row["subject"]
        assert rows_c[path]["series"] == row["series"]  # unkeyed digest of a UID
        assert next(k for k, v in path_map(other).items() if v == path) != next(
            k for k, v in path_map(first).items() if v == path
        )  # file keys are keyed by the salt too
        assert {k: v for k, v in rows_c[path].items() if k not in ("id", "subject")} == {
            k: v for k, v in row.items() if k not in ("id", "subject")
        }
    for text in (first.read_text(), other.read_text(), errors_path(first).read_text(), captured.out, captured.err):
        assert SALT not in text
        assert "a-completely-different-salt" not in text
    assert "pseudonym salt: command line" in captured.out


def test_salt_file_is_created_private_and_reused(
    mixed_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEDSSL_SALT", raising=False)
    out = tmp_path / "out" / "m.csv"
    assert scan(mixed_folder, out, salt=None) == 0
    salt_file = tmp_path / "out" / ".medssl_salt"
    assert salt_file.is_file()
    if os.name == "posix":
        assert stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    salt = salt_file.read_text().strip()
    first = rows_by_path(out)
    assert scan(mixed_folder, out, salt=None) == 0
    assert rows_by_path(out) == first
    captured = capsys.readouterr()
    assert "(new)" in captured.out
    for text in (out.read_text(), errors_path(out).read_text(), captured.out, captured.err):
        assert salt not in text
    # the environment variable takes precedence over the file
    monkeypatch.setenv("MEDSSL_SALT", "from-the-environment")
    assert scan(mixed_folder, out, salt=None) == 0
    assert rows_by_path(out)["img.png"]["id"] != first["img.png"]["id"]
    assert "pseudonym salt: $MEDSSL_SALT" in capsys.readouterr().out


# --------------------------------------------------------------------------- subjects, splits, labels


def _people(root: Path, persons: int = 12) -> None:
    tiny = np.zeros((4, 4), dtype=np.uint8)
    for n in range(1, persons + 1):
        write_png(root / "NORMAL" / f"person{n}_a.png", tiny)
        write_png(root / "PNEUMONIA" / f"person{n}_virus_b.png", tiny)


def test_subject_pattern_groups_files(tmp_path: Path) -> None:
    _people(tmp_path / "d", persons=3)
    out = tmp_path / "m.csv"
    assert scan(tmp_path / "d", out, "--subject-pattern", r"(person\d+)_") == 0
    rows = rows_by_path(out)
    assert len(rows) == 6
    for n in (1, 2, 3):
        assert rows[f"NORMAL/person{n}_a.png"]["subject"] == rows[f"PNEUMONIA/person{n}_virus_b.png"]["subject"]
    assert len({r["subject"] for r in rows.values()}) == 3
    assert "person" not in "".join(r["subject"] for r in rows.values())
    # without a pattern every file is its own subject
    assert scan(tmp_path / "d", out) == 0
    assert len({r["subject"] for r in rows_by_path(out).values()}) == 6


def test_split_fractions_assign_splits_by_subject(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _people(tmp_path / "d", persons=12)
    out = tmp_path / "m.csv"
    args = ("--subject-pattern", r"(person\d+)_", "--split-fractions", "train=0.5,val=0.25,test=0.25")
    assert scan(tmp_path / "d", out, *args) == 0
    rows = rows_by_path(out)
    splits_of: dict[str, set[str]] = defaultdict(set)
    for row in rows.values():
        splits_of[row["subject"]].add(row["split"])
    assert len(splits_of) == 12
    assert all(len(s) == 1 for s in splits_of.values())
    used = set().union(*splits_of.values())
    assert used <= {"train", "val", "test"}
    assert len(used) >= 2
    # stable: the same salt gives the same assignment
    assert scan(tmp_path / "d", tmp_path / "again.csv", *args) == 0
    assert rows_by_path(tmp_path / "again.csv") == rows
    capsys.readouterr()
    assert main(["manifest", "validate", str(out)]) == 0


def test_split_fractions_keep_a_dicom_patient_together(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for k in range(6):
        patient = f"P{k:03d}"
        write_dicom_series(root / f"{k}" / "t1", random_volume((3, 4, 4), seed=k), patient_id=patient)
        write_dicom_series(root / f"{k}" / "t2", random_volume((3, 4, 4), seed=k + 9), patient_id=patient)
    out = tmp_path / "m.csv"
    assert scan(root, out, "--split-fractions", "train=0.5,test=0.5") == 0
    rows = rows_by_path(out)
    assert len(rows) == 12
    for k in range(6):
        assert rows[f"{k}/t1"]["subject"] == rows[f"{k}/t2"]["subject"]
        assert rows[f"{k}/t1"]["split"] == rows[f"{k}/t2"]["split"]


@pytest.mark.parametrize("fractions", ["train=abc", "train"])
def test_bad_split_fractions_are_rejected(tmp_path: Path, fractions: str, capsys) -> None:
    write_good_files(tmp_path / "d")
    with pytest.raises(SystemExit) as info:
        scan(tmp_path / "d", tmp_path / "m.csv", "--split-fractions", fractions)
    assert info.value.code == 2
    assert "--split-fractions" in capsys.readouterr().err


def test_unknown_split_name_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_good_files(tmp_path / "d")
    assert scan(tmp_path / "d", tmp_path / "m.csv", "--split-fractions", "train=0.8,holdout=0.2") == 2
    assert "split fractions" in capsys.readouterr().err


def test_bad_subject_pattern_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_good_files(tmp_path / "d")
    with pytest.raises(SystemExit):
        scan(tmp_path / "d", tmp_path / "m.csv", "--subject-pattern", "(unclosed")
    assert "invalid regular expression" in capsys.readouterr().err


def test_labels_join_by_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _people(tmp_path / "data", persons=4)
    labels = tmp_path / "meta" / "labels.csv"
    labels.parent.mkdir()
    labels.write_text(
        "path,label,group,split,subject\n"
        "../data/NORMAL/person1_a.png,normal,cohort-a,test,patient-one\n"
        "../data/PNEUMONIA/person1_virus_b.png,virus,cohort-a,,patient-one\n"
        "../data/NORMAL/person2_a.png,normal,cohort-b,holdout,\n"
        "../data/NORMAL/not_there.png,normal,,,\n"
    )
    out = tmp_path / "m.csv"
    args = ("--labels", str(labels), "--subject-pattern", r"(person\d+)_", "--split-fractions", "train=1")
    assert scan(tmp_path / "data", out, *args) == 0
    captured = capsys.readouterr()
    rows = rows_by_path(out)
    one_a, one_b = rows["NORMAL/person1_a.png"], rows["PNEUMONIA/person1_virus_b.png"]
    assert (one_a["label"], one_a["group"], one_a["split"]) == ("normal", "cohort-a", "test")
    assert (one_b["label"], one_b["group"]) == ("virus", "cohort-a")
    assert one_a["subject"] == one_b["subject"]
    assert one_b["split"] == "test"  # the subject's known split wins over the fractions
    two = rows["NORMAL/person2_a.png"]
    assert (two["label"], two["group"], two["split"]) == ("normal", "cohort-b", "train")  # bad split ignored
    assert rows["NORMAL/person3_a.png"]["label"] == ""
    assert rows["NORMAL/person3_a.png"]["split"] == "train"
    assert "patient-one" not in out.read_text()
    assert "split 'holdout' is not train/val/test" in captured.err
    assert "1 of 4 entries match no scanned file" in captured.err


def test_labels_file_without_path_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_good_files(tmp_path / "d")
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\ngood.png,x\n")
    assert scan(tmp_path / "d", tmp_path / "m.csv", "--labels", str(labels)) == 2
    err = capsys.readouterr().err
    assert "'path' column" in err
    assert str(labels) in err


# --------------------------------------------------------------------------- validate


def _touch_rows(root: Path, rows: list[ManifestRow]) -> None:
    for row in rows:
        (root / row.path).parent.mkdir(parents=True, exist_ok=True)
        (root / row.path).touch()


def _row(ident: str, path: str, **kw: object) -> ManifestRow:
    values: dict[str, object] = {"id": ident, "path": path, "format": "image", "dims": 2, "subject": f"s-{ident}"}
    values.update(shape=(4, 4), spacing=(1.0, 1.0))
    values.update(kw)
    return ManifestRow(**values)  # type: ignore[arg-type]


def _validate(tmp_path: Path, rows: list[ManifestRow], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    root = tmp_path / "root"
    _touch_rows(root, rows)
    out = tmp_path / "m.csv"
    write_manifest(out, rows, root)
    code = main(["manifest", "validate", str(out)])
    return code, capsys.readouterr().out


def test_validate_accepts_a_good_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _validate(tmp_path, [_row("a", "a.png", split="train"), _row("b", "b.png", split="test")], capsys)
    assert code == 0
    assert "OK (0 errors, 0 warnings)" in text


def test_validate_duplicate_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _validate(tmp_path, [_row("a", "a.png"), _row("a", "b.png")], capsys)
    assert code == 1
    assert "duplicate id 'a' (2 rows)" in text


def test_validate_duplicate_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _validate(tmp_path, [_row("a", "a.png"), _row("b", "a.png")], capsys)
    assert code == 1
    assert "a.png: listed 2 times" in text


def test_validate_split_leakage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        _row("a", "a.png", subject="s-same", split="train"),
        _row("b", "b.png", subject="s-same", split="test"),
        _row("c", "c.png", subject="s-other", split="test"),
    ]
    code, text = _validate(tmp_path, rows, capsys)
    assert code == 1
    assert "subject s-same appears in several splits (test, train): split leakage" in text
    assert "s-other" not in text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dims": 4, "shape": (4, 4, 4, 4)}, "dims must be 2 or 3, got 4"),
        ({"format": "tiff"}, "format 'tiff' is not one of"),
        ({"dims": 3}, "does not have 3 dimensions"),
        ({"split": "holdout"}, "split 'holdout' is not one of"),
        ({"id": ""}, "empty id"),
    ],
)
def test_validate_bad_values(tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict, message: str) -> None:
    code, text = _validate(tmp_path, [_row("a", "a.png"), _row("b", "bad.png", **change)], capsys)
    assert code == 1
    assert message in text
    assert "bad.png" in text


def test_validate_negative_spacing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    row = ManifestRow(id="a", path="a.png", format="image", dims=2, subject="s", shape=(4, 4), spacing=(1.0, -1.0))
    code, text = _validate(tmp_path, [row], capsys)
    assert code == 1
    assert "spacing must be positive" in text


def test_validate_non_numeric_dims(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.csv"
    (tmp_path / "a.png").touch()
    out.write_text(f"{MAGIC}\n# root: .\n{','.join(COLUMNS)}\na,a.png,,image,two,OT,s,4x4,1x1,,,\n")
    assert main(["manifest", "validate", str(out)]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err
    assert "bad value for dims" in err


def test_validate_missing_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.csv"
    out.write_text("id,path,format\na,a.png,image\n")
    assert main(["manifest", "validate", str(out)]) == 1
    text = capsys.readouterr().out
    assert "missing column(s)" in text
    assert "dims" in text
    assert "subject" in text


def test_validate_missing_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manifest", "validate", str(tmp_path / "none.csv")]) == 2
    assert "manifest not found" in capsys.readouterr().err


def test_validate_empty_manifest_and_root_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.csv"
    write_manifest(out, [], tmp_path)
    assert main(["manifest", "validate", str(out)]) == 1
    assert "manifest has no rows" in capsys.readouterr().out
    # --root overrides the root written in the file
    rows = [_row("a", "a.png")]
    write_manifest(out, rows, tmp_path / "elsewhere")
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.png").touch()
    assert main(["manifest", "validate", str(out)]) == 1
    assert main(["manifest", "validate", str(out), "--root", str(tmp_path / "real")]) == 0


def test_validate_warns_about_rows_without_subject(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _validate(tmp_path, [_row("a", "a.png", subject="", split="train")], capsys)
    assert code == 0
    assert "no subject; splits cannot be checked" in text
    assert "OK (0 errors, 1 warnings)" in text


def test_non_ascii_paths_round_trip(tmp_path: Path) -> None:
    """Hospital folders are often named in the local language: manifests are UTF-8 whatever the locale."""
    folder = tmp_path / "données" / "Åsa_étude"
    folder.mkdir(parents=True)
    write_png(folder / "radiographie_thorax.png", np.arange(64 * 48, dtype=np.uint8).reshape(64, 48))
    out = tmp_path / "m.csv"
    assert scan(tmp_path / "données", out) == 0
    manifest = read_manifest(out)
    assert [manifest.resolve(row) for row in manifest.rows] == [folder / "radiographie_thorax.png"]
    assert list(path_map(out).values()) == ["Åsa_étude/radiographie_thorax.png"]
    assert read_row(manifest.rows[0], manifest.resolve(manifest.rows[0])).array.shape == (64, 48)

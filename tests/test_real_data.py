"""Scan and read the real data in ``../shared/data`` (skipped when the folder is absent)."""

from __future__ import annotations

import contextlib
import csv
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from medssl.cli import main
from medssl.data.manifest import read_manifest_records
from medssl.data.pathmap import default_map_path, read_path_map
from medssl.data.readers import read_dicom_series, read_image_file, read_nifti

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} not found (only on dev/CI machines)"),
]

REAL_IDENTIFIERS = ("Dumbledore", "PGBM-003", "1449c1d", "20090701")
SALT = "real-data-test-salt"


@dataclass
class RealScan:
    rows: list[dict[str, str]]
    errors: list[dict[str, str]]
    texts: dict[str, str]
    code: int


@pytest.fixture(scope="module")
def real_scan(tmp_path_factory: pytest.TempPathFactory) -> RealScan:
    out = tmp_path_factory.mktemp("real") / "all.csv"
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["manifest", "scan", str(DATA), "--out", str(out), "--salt", SALT, "--no-progress", "--workers", "4"]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    errors_csv = out.with_name("all.errors.csv")
    paths = dict(read_path_map(default_map_path(out)).paths)  # rows and errors name files by key: look them up
    with open(errors_csv, newline="") as handle:
        errors = [{**r, "path": paths[r["path"]]} for r in csv.DictReader(handle)]
    rows = [{**r, "path": paths[r["path"]]} for r in read_manifest_records(out)[0]] if out.exists() else []
    texts = {
        "manifest": out.read_text() if out.exists() else "",
        "errors": errors_csv.read_text(),
        "stdout": stdout.getvalue(),
        "stderr": stderr.getvalue(),
    }
    return RealScan(rows=rows, errors=errors, texts=texts, code=code)


def _under(rows: list[dict[str, str]], folder: str) -> list[dict[str, str]]:
    return [r for r in rows if r["path"] == folder or r["path"].startswith(folder + "/")]


def test_scan_succeeds(real_scan: RealScan) -> None:
    assert real_scan.code == 0, real_scan.texts["stderr"]


def test_sagittal_series_is_one_row(real_scan: RealScan) -> None:
    rows = _under(real_scan.rows, "dicom-mr-sag-anon")
    assert len(rows) == 1
    row = rows[0]
    assert (row["format"], row["dims"], row["modality"], row["path"]) == (
        "dicom_series",
        "3",
        "MR",
        "dicom-mr-sag-anon",
    )
    shape = [int(s) for s in row["shape"].split("x")]
    assert 192 in shape
    assert shape == [192, 256, 256]


def test_pgbm003_is_two_series(real_scan: RealScan) -> None:
    rows = _under(real_scan.rows, "dicom-mr-pgbm003")
    assert sorted(r["path"] for r in rows) == ["dicom-mr-pgbm003/11-T1post-18670", "dicom-mr-pgbm003/11_HCropVolume"]
    assert all(r["format"] == "dicom_series" for r in rows)
    by_path = {r["path"]: r for r in rows}
    assert by_path["dicom-mr-pgbm003/11-T1post-18670"]["shape"] == "280x320x22"
    assert by_path["dicom-mr-pgbm003/11_HCropVolume"]["shape"] == "34x50x40"
    assert len({r["subject"] for r in rows}) == 1  # one patient


def test_counts_of_nifti_and_jpeg(real_scan: RealScan) -> None:
    counts = Counter((r["path"].split("/", 1)[0], r["format"], r["dims"]) for r in real_scan.rows)
    assert counts[("msd-hippocampus", "nifti", "3")] == 400
    assert len(_under(real_scan.rows, "msd-hippocampus/images")) == 200
    assert len(_under(real_scan.rows, "msd-hippocampus/labels")) == 200
    assert counts[("kermany-cxr-224", "image", "2")] == 5216
    assert counts[("mednist-subset", "image", "2")] == 6000
    assert len(real_scan.rows) == 400 + 5216 + 6000 + 3
    for folder in ("kermany-cxr-224", "mednist-subset"):
        assert all(r["path"].lower().endswith((".jpeg", ".jpg")) for r in _under(real_scan.rows, folder))
    kermany = _under(real_scan.rows, "kermany-cxr-224")
    assert {r["shape"] for r in kermany} == {"224x224"}
    assert {r["shape"] for r in _under(real_scan.rows, "mednist-subset")} == {"64x64"}


def test_only_errors_are_readmes_and_label_files(real_scan: RealScan) -> None:
    assert real_scan.errors, "expected the README/labels files to be listed"
    for error in real_scan.errors:
        assert Path(error["path"]).name in ("README.md", "labels.csv"), error
        assert error["reason"].startswith("unsupported file type"), error


def test_no_real_identifier_in_outputs(real_scan: RealScan) -> None:
    for name in ("dicom-mr-pgbm003", "msd-hippocampus", "kermany-cxr-224", "PNEUMONIA"):
        assert name not in real_scan.texts["manifest"] and name not in real_scan.texts["errors"]  # keys only
    for where, text in real_scan.texts.items():
        for identifier in (*REAL_IDENTIFIERS, SALT):
            assert identifier not in text, f"{identifier!r} leaked into {where}"


def test_read_sagittal_series() -> None:
    loaded = read_dicom_series(DATA / "dicom-mr-sag-anon", "")
    assert loaded.array.shape == (192, 256, 256)
    assert loaded.array.dtype == np.float32
    assert nib.aff2axcodes(loaded.affine) == ("R", "A", "S")
    assert loaded.spacing == pytest.approx((0.9, 0.859375, 0.859375), abs=1e-3)
    assert 0 <= loaded.array.min() < loaded.array.max() <= 713


def test_crop_series_is_read_in_position_order() -> None:
    folder = DATA / "dicom-mr-pgbm003" / "11_HCropVolume"
    files = sorted(folder.glob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    orientation = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = [float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))) for ds in datasets]
    # name order (1, 10, 11, ...) is not position order
    assert positions != sorted(positions)
    assert [f.name for f in files][:3] == ["1.dcm", "10.dcm", "11.dcm"]

    order = np.argsort(positions, kind="stable")
    stack_zyx = np.stack([datasets[i].pixel_array for i in order]).astype(np.float32)  # [z, rows, columns]
    assert np.allclose(orientation, [1, 0, 0, 0, 1, 0])  # axial, LPS: RAS flips the row and column axes
    expected = stack_zyx.transpose(2, 1, 0)[::-1, ::-1, :]

    loaded = read_dicom_series(folder, "")
    assert loaded.array.shape == (34, 50, 40)
    np.testing.assert_array_equal(loaded.array, expected)
    # and not the name order
    by_name = np.stack([ds.pixel_array for ds in datasets]).astype(np.float32).transpose(2, 1, 0)[::-1, ::-1, :]
    assert not np.array_equal(loaded.array, by_name)


def test_read_kermany_jpeg_as_grey() -> None:
    path = sorted((DATA / "kermany-cxr-224" / "train" / "PNEUMONIA").glob("*.jp*g"))[0]
    with Image.open(path) as image:
        assert image.mode == "RGB"  # grey stored as RGB
    loaded = read_image_file(path)
    assert loaded.array.shape == (224, 224)
    assert loaded.dims == 2
    assert loaded.array.max() > loaded.array.min()


def test_read_hippocampus_nifti() -> None:
    path = sorted((DATA / "msd-hippocampus" / "images").glob("*.nii.gz"))[0]
    loaded = read_nifti(path)
    assert loaded.dims == 3
    assert loaded.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert nib.aff2axcodes(loaded.affine) == ("R", "A", "S")
    assert np.isfinite(loaded.array).all()

"""Readers: every format in one canonical layout ([X, Y, Z] RAS+ volumes, [H, W] images)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from factories import (
    CORONAL,
    SAGITTAL,
    random_volume,
    write_dicom_2d,
    write_dicom_series,
    write_jpeg,
    write_nifti,
    write_png,
)

from medssl.data.dicom import read_header
from medssl.data.errors import DataError
from medssl.data.manifest import ManifestRow
from medssl.data.readers import read_dicom_file, read_dicom_series, read_image_file, read_nifti, read_row

SPACING = (0.8, 1.3, 2.5)  # (sx, sy, sz): columns, rows, slices
ORIGIN = (10.0, -20.0, 30.0)


def _rotation_x(degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


DIRECTIONS = {
    "sagittal": SAGITTAL,  # left-handed: the DICOM slice normal is the opposite of the z axis
    "coronal": CORONAL,
    "axial-flipped": np.diag([-1.0, 1.0, -1.0]),
    "oblique-sagittal": _rotation_x(20.0) @ SAGITTAL,
}


def _lps_to_ras(point: np.ndarray) -> np.ndarray:
    return np.array([-point[0], -point[1], point[2]])


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_dicom_series_and_nifti_of_one_volume_read_the_same(tmp_path: Path, name: str) -> None:
    direction = DIRECTIONS[name]
    volume = random_volume((5, 6, 7), seed=1)  # z, y, x: 5 slices of 6 rows x 7 columns
    write_dicom_series(tmp_path / "series", volume, SPACING, ORIGIN, direction, shuffle_names=True)
    nifti_path = write_nifti(tmp_path / "volume.nii.gz", volume, SPACING, ORIGIN, direction)

    from_dicom = read_dicom_series(tmp_path / "series", series_key="")
    from_nifti = read_nifti(nifti_path)

    assert from_dicom.array.dtype == np.float32
    assert from_dicom.dims == 3
    np.testing.assert_array_equal(from_dicom.array, from_nifti.array)
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-4)
    np.testing.assert_allclose(from_dicom.spacing, from_nifti.spacing, atol=1e-4)
    assert nib.aff2axcodes(from_dicom.affine) == ("R", "A", "S")
    assert nib.aff2axcodes(from_nifti.affine) == ("R", "A", "S")

    # independently: nibabel's own reorientation of the NIfTI
    canonical = nib.as_closest_canonical(nib.load(str(nifti_path)))
    np.testing.assert_array_equal(from_dicom.array, np.asarray(canonical.dataobj, dtype=np.float32))
    np.testing.assert_allclose(from_dicom.affine, canonical.affine, atol=1e-4)
    expected_spacing = sorted(SPACING)
    assert sorted(from_dicom.spacing) == pytest.approx(expected_spacing, abs=1e-4)

    # independently: every source voxel lands where its physical (LPS -> RAS) position says
    inverse = np.linalg.inv(from_dicom.affine)
    rng = np.random.default_rng(0)
    for _ in range(25):
        k, j, i = (int(rng.integers(n)) for n in volume.shape)
        lps = np.asarray(ORIGIN) + direction @ (np.asarray(SPACING) * [i, j, k])
        index = inverse @ np.append(_lps_to_ras(lps), 1.0)
        ijk = np.round(index[:3]).astype(int)
        np.testing.assert_allclose(index[:3], ijk, atol=1e-3)
        assert from_dicom.array[tuple(ijk)] == volume[k, j, i]


def test_sagittal_series_has_the_expected_canonical_layout(tmp_path: Path) -> None:
    # SAGITTAL: x (columns) -> posterior, y (rows) -> inferior, z (slices) -> left, in LPS.
    # In RAS that is x -> -A, y -> -S, z -> -R: canonical [X, Y, Z] = flipped [z, x, y].
    volume = random_volume((4, 6, 5), seed=2)
    write_dicom_series(tmp_path / "sag", volume, SPACING, ORIGIN, SAGITTAL)
    loaded = read_dicom_series(tmp_path / "sag", "")
    expected = volume.transpose(0, 2, 1)[::-1, ::-1, ::-1]  # [z, x, y], each axis reversed
    assert loaded.array.shape == (4, 5, 6)
    np.testing.assert_array_equal(loaded.array, expected.astype(np.float32))
    assert loaded.spacing == pytest.approx((SPACING[2], SPACING[0], SPACING[1]), abs=1e-4)


def test_series_slices_are_ordered_by_position_not_name_or_instance_number(tmp_path: Path) -> None:
    volume = random_volume((9, 4, 5), seed=3)
    paths = write_dicom_series(tmp_path / "axial", volume, (1.0, 1.0, 2.0), (0.0, 0.0, -40.0), np.eye(3))

    # the file names and instance numbers really are scrambled
    by_name = sorted(paths)
    z_by_name = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in by_name]
    assert z_by_name != sorted(z_by_name)
    numbers = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in paths]
    assert numbers != sorted(numbers)

    loaded = read_dicom_series(tmp_path / "axial", "")
    # identity LPS direction: RAS canonical flips X and Y, Z (superior) keeps slice order
    expected = volume.transpose(2, 1, 0)[::-1, ::-1, :]
    np.testing.assert_array_equal(loaded.array, expected.astype(np.float32))
    assert loaded.spacing == pytest.approx((1.0, 1.0, 2.0))
    assert loaded.affine[2, 3] == pytest.approx(-40.0)


def test_factory_series_carries_the_requested_tags(tmp_path: Path) -> None:
    paths = write_dicom_series(
        tmp_path / "s",
        random_volume((4, 3, 3)),
        (0.5, 0.75, 2.0),
        (1.0, 2.0, 3.0),
        CORONAL,
        modality="CT",
        patient_id="PX-1",
        series_uid="1.2.3.4",
        study_uid="1.2.3.5",
    )
    datasets = [pydicom.dcmread(p) for p in paths]  # slice order
    assert len({ds.SOPInstanceUID for ds in datasets}) == 4
    assert {ds.SeriesInstanceUID for ds in datasets} == {"1.2.3.4"}
    assert {ds.StudyInstanceUID for ds in datasets} == {"1.2.3.5"}
    first = datasets[0]
    assert (first.Modality, first.PatientID, first.SOPClassUID) == ("CT", "PX-1", "1.2.840.10008.5.1.4.1.1.2")
    assert [float(v) for v in first.PixelSpacing] == [0.75, 0.5]  # row spacing, column spacing
    assert float(first.SliceThickness) == 2.0
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
    np.testing.assert_allclose([float(v) for v in datasets[2].ImagePositionPatient], [1.0, 2.0 + 2 * 2.0, 3.0])


def test_series_reader_selects_one_series_by_key(tmp_path: Path) -> None:
    from medssl.data.dicom import series_headers_in_folder

    first = random_volume((3, 4, 4), seed=4)
    second = random_volume((3, 4, 4), seed=5)
    write_dicom_series(tmp_path / "two", first, prefix="A")
    write_dicom_series(tmp_path / "two", second, origin=(0.0, 0.0, 100.0), prefix="B")
    keys = {h.series_key for h in series_headers_in_folder(tmp_path / "two", "")}
    assert len(keys) == 2
    arrays = [read_dicom_series(tmp_path / "two", key).array for key in sorted(keys)]
    expected = {volume.transpose(2, 1, 0)[::-1, ::-1, :].astype(np.float32).tobytes() for volume in (first, second)}
    assert {a.tobytes() for a in arrays} == expected


def test_series_with_missing_slice_raises_data_error(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "gap", random_volume((6, 4, 4)), skip_slices=(3,))
    with pytest.raises(DataError, match="missing slice") as info:
        read_dicom_series(tmp_path / "gap", "")
    assert str(tmp_path / "gap") in str(info.value)


# --------------------------------------------------------------------------- single DICOM images


PIXELS = (np.arange(8 * 10).reshape(8, 10) * 12).astype(np.uint16)  # 0 .. 948


def test_dicom_2d_plain(tmp_path: Path) -> None:
    loaded = read_dicom_file(write_dicom_2d(tmp_path / "cr.dcm", PIXELS, pixel_spacing=(0.15, 0.2)))
    assert loaded.dims == 2
    assert loaded.affine is None
    assert loaded.modality == "CR"
    np.testing.assert_array_equal(loaded.array, PIXELS.astype(np.float32))
    assert loaded.spacing == pytest.approx((0.15, 0.2))  # from ImagerPixelSpacing (row, column)


def test_dicom_2d_zero_pixel_spacing_counts_as_absent(tmp_path: Path) -> None:
    """Real CR files carry PixelSpacing 0\\0 (pydicom-data's RG1_UNCR): header and reader both fall back to 1 mm."""
    path = write_dicom_2d(tmp_path / "cr.dcm", PIXELS, pixel_spacing=(0.0, 0.0))
    assert read_dicom_file(path).spacing == (1.0, 1.0)
    assert read_header(path, "salt", "cr.dcm").pixel_spacing == (1.0, 1.0)


def test_dicom_2d_rescale_slope_and_intercept(tmp_path: Path) -> None:
    loaded = read_dicom_file(write_dicom_2d(tmp_path / "ct.dcm", PIXELS, slope=2, intercept=-100))
    np.testing.assert_allclose(loaded.array, PIXELS.astype(np.float32) * 2 - 100)


def test_dicom_2d_monochrome1_is_inverted(tmp_path: Path) -> None:
    stored = PIXELS
    loaded = read_dicom_file(write_dicom_2d(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1"))
    # the brightest stored value becomes the darkest, and the other way round
    assert loaded.array[stored == stored.max()].item() == loaded.array.min()
    assert loaded.array[stored == 0].item() == loaded.array.max()
    np.testing.assert_array_equal(loaded.array, float(stored.max()) - stored.astype(np.float32))


def test_dicom_2d_window_is_applied(tmp_path: Path) -> None:
    center, width = 400.0, 200.0
    stored = PIXELS
    loaded = read_dicom_file(write_dicom_2d(tmp_path / "w.dcm", stored, window=(center, width)))
    low, high = center - width / 2, center + width / 2
    out = loaded.array
    below, above = stored < low - 1, stored > high
    assert below.any() and above.any()
    # values outside the window are clipped to the two ends of the output range
    assert np.all(out[below] == out.min())
    assert np.all(out[above] == out.max())
    assert out.min() < out.max()
    middle = out[(stored > low) & (stored < high - 1)]
    assert middle.size and np.all((middle > out.min()) & (middle < out.max()))
    # monotonic in the stored value
    order = np.argsort(stored, axis=None, kind="stable")
    assert np.all(np.diff(out.ravel()[order]) >= 0)
    # without VOI the stored values come back
    raw = read_dicom_file(tmp_path / "w.dcm", apply_voi=False)
    np.testing.assert_array_equal(raw.array, stored.astype(np.float32))


def test_unreadable_dicom_pixels_raise_data_error(tmp_path: Path) -> None:
    path = write_dicom_2d(tmp_path / "full.dcm", PIXELS)
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - PIXELS.nbytes // 2])
    with pytest.raises(DataError) as info:
        read_dicom_file(cut)
    assert str(cut) in str(info.value)


# --------------------------------------------------------------------------- PNG / JPEG


def _gradient(h: int = 12, w: int = 16) -> np.ndarray:
    return ((np.arange(h)[:, None] * 7 + np.arange(w)[None, :] * 11) % 256).astype(np.uint8)


def test_png_grey(tmp_path: Path) -> None:
    grey = _gradient()
    loaded = read_image_file(write_png(tmp_path / "g.png", grey))
    assert loaded.dims == 2
    assert loaded.array.shape == (12, 16)  # [H, W]
    assert loaded.array.dtype == np.float32
    np.testing.assert_array_equal(loaded.array, grey.astype(np.float32))
    assert loaded.spacing == (1.0, 1.0)


def test_png_stored_as_rgb_with_identical_channels_is_grey(tmp_path: Path) -> None:
    grey = _gradient()
    as_rgb = read_image_file(write_png(tmp_path / "rgb.png", grey, rgb=True))
    as_grey = read_image_file(write_png(tmp_path / "g.png", grey))
    assert as_rgb.array.shape == (12, 16)
    np.testing.assert_array_equal(as_rgb.array, as_grey.array)


def test_colour_png_becomes_luminance(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    rgb = rng.integers(0, 256, size=(10, 9, 3), dtype=np.uint8)
    loaded = read_image_file(write_png(tmp_path / "c.png", rgb))
    assert loaded.array.shape == (10, 9)
    r, g, b = (rgb[..., c].astype(np.float64) for c in range(3))
    luminance = 0.299 * r + 0.587 * g + 0.114 * b  # ITU-R 601-2
    np.testing.assert_allclose(loaded.array, luminance, atol=1.0)
    assert not np.allclose(loaded.array, r, atol=1.0)  # not just one channel


def test_16bit_png_keeps_values(tmp_path: Path) -> None:
    values = (np.arange(6 * 7).reshape(6, 7) * 1500).astype(np.uint16)  # up to 61500
    loaded = read_image_file(write_png(tmp_path / "deep.png", values))
    assert loaded.array.max() > 255
    np.testing.assert_array_equal(loaded.array, values.astype(np.float32))


def test_jpeg_grey_and_rgb_grey(tmp_path: Path) -> None:
    grey = np.full((16, 16), 100, dtype=np.uint8)
    grey[4:12, 4:12] = 200
    for name, rgb in (("g.jpg", False), ("rgb.jpeg", True)):
        loaded = read_image_file(write_jpeg(tmp_path / name, grey, rgb=rgb))
        assert loaded.array.shape == (16, 16)
        np.testing.assert_allclose(loaded.array, grey, atol=12)  # lossy


def test_broken_image_raises_data_error(tmp_path: Path) -> None:
    path = write_png(tmp_path / "cut.png", _gradient(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="unreadable or truncated") as info:
        read_image_file(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- NIfTI failures


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nifti_with_nan_or_inf_raises(tmp_path: Path, bad: float) -> None:
    volume = np.ones((4, 5, 6), dtype=np.float32)
    volume[1, 2, 3] = bad
    volume[2, 2, 2] = bad
    path = write_nifti(tmp_path / "bad.nii.gz", volume)
    with pytest.raises(DataError) as info:
        read_nifti(path)
    message = str(info.value)
    assert str(path) in message
    assert "NaN or infinite" in message
    assert "2 voxel(s)" in message


def test_truncated_nifti_raises_data_error(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "v.nii.gz", random_volume((16, 16, 16), seed=7))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as info:
        read_nifti(path)
    assert str(path) in str(info.value)


def test_4d_nifti_raises_data_error(tmp_path: Path) -> None:
    path = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 3), dtype=np.float32), np.eye(4)), str(path))
    with pytest.raises(DataError, match="4D NIfTI") as info:
        read_nifti(path)
    assert str(path) in str(info.value)


def test_4d_nifti_with_one_volume_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "one.nii.gz"
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6, 1)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 3.0, 4.0, 1.0])), str(path))
    loaded = read_nifti(path)
    assert loaded.array.shape == (4, 5, 6)
    assert loaded.spacing == pytest.approx((2.0, 3.0, 4.0))
    np.testing.assert_array_equal(loaded.array, data[..., 0])


# --------------------------------------------------------------------------- read_row


def test_read_row_of_vanished_file_names_it(tmp_path: Path) -> None:
    path = write_png(tmp_path / "gone.png", _gradient())
    row = ManifestRow(id="i1", path="gone.png", format="image", dims=2, shape=(12, 16))
    assert read_row(row, path).array.shape == (12, 16)
    path.unlink()
    with pytest.raises(DataError, match="file not found") as info:
        read_row(row, path)
    assert str(path) in str(info.value)


def test_read_row_dispatches_and_overrides_modality(tmp_path: Path) -> None:
    volume = random_volume((3, 4, 5), seed=8)
    write_dicom_series(tmp_path / "s", volume, modality="CT")
    nifti = write_nifti(tmp_path / "v.nii.gz", volume)
    cr = write_dicom_2d(tmp_path / "cr.dcm", PIXELS)
    series = read_row(ManifestRow(id="a", path="s", format="dicom_series", dims=3), tmp_path / "s")
    assert series.modality == "CT"
    from_nifti = read_row(ManifestRow(id="b", path="v.nii.gz", format="nifti", dims=3, modality="MR"), nifti)
    assert from_nifti.modality == "MR"
    np.testing.assert_array_equal(series.array, from_nifti.array)
    assert read_row(ManifestRow(id="c", path="cr.dcm", format="dicom", dims=2), cr).array.shape == PIXELS.shape
    with pytest.raises(DataError, match="manifest says 2D"):
        read_row(ManifestRow(id="d", path="v.nii.gz", format="nifti", dims=2), nifti)

"""Helpers (not tests) that write small, real medical image files for the tests.

* ``write_dicom_series``: one DICOM file per slice through SimpleITK/GDCM, with file names and
  InstanceNumbers scrambled so that only ImagePositionPatient gives the right slice order;
* ``write_nifti``: the same volume and geometry as a NIfTI through SimpleITK;
* ``write_dicom_2d``: a single-frame projection image (CR/DX/...) through pydicom;
* ``write_png`` / ``write_jpeg``: plain images through Pillow.

Geometry follows ITK: ``volume_zyx`` is indexed ``[z, y, x]`` (slices, rows, columns),
``spacing`` is ``(sx, sy, sz)``, ``origin`` is the LPS position of voxel (0, 0, 0) and
``direction`` is a 3x3 matrix whose columns are the LPS cosines of the x, y and z axes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"

SAGITTAL = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # x->P, y->I, z->L (left-handed)
CORONAL = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # x->L, y->I, z->P (right-handed)

_counter = itertools.count()


# Identifying DICOM tags for privacy tests (factory keyword -> value) and every string that must never leak.
IDENTIFYING_TAGS = {
    "patient_name": "Doe^Jane",
    "patient_id": "PID-778899",
    "birth_date": "19700101",
    "accession": "ACC-5566",
    "institution": "St Example Hospital",
    "study_date": "20240101",
}
IDENTIFIERS = (*IDENTIFYING_TAGS.values(), "Jane", "Doe")


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _ds_list(values: Iterable[float]) -> str:
    return "\\".join(_ds(v) for v in values)


def slice_positions(
    shape_zyx: Sequence[int], spacing: Sequence[float], origin: Sequence[float], direction: np.ndarray
) -> list[np.ndarray]:
    """LPS ImagePositionPatient of every slice index ``k`` of a volume with this geometry."""
    direction = np.asarray(direction, dtype=float)
    return [np.asarray(origin, dtype=float) + direction[:, 2] * spacing[2] * k for k in range(shape_zyx[0])]


def write_dicom_series(
    folder: str | Path,
    volume_zyx: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: np.ndarray | Sequence[Sequence[float]] = ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
    modality: str = "MR",
    patient_id: str = "P0001",
    patient_name: str = "Anon^Subject",
    birth_date: str = "19000101",
    accession: str = "ACC0000001",
    institution: str = "Nowhere",
    study_date: str = "20000101",
    shuffle_names: bool = True,
    series_uid: str | None = None,
    study_uid: str | None = None,
    skip_slices: Iterable[int] = (),
    positions_override: Sequence[Sequence[float]] | None = None,
    seed: int = 0,
    prefix: str = "IM",
) -> list[Path]:
    """Write ``volume_zyx`` as a single-frame DICOM series, one file per slice, into ``folder``.

    With ``shuffle_names`` the file names and the InstanceNumbers are both permuted (and not
    in the same way), so only the slice positions tell the true order. ``skip_slices`` leaves
    slices out (a gap); ``positions_override`` gives each slice's LPS position explicitly.
    Returns the written paths in slice (position) order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    volume_zyx = np.asarray(volume_zyx)
    if volume_zyx.ndim != 3:
        raise ValueError("volume_zyx must be 3D [z, y, x]")
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    nz = volume_zyx.shape[0]
    positions = (
        [np.asarray(p, dtype=float) for p in positions_override]
        if positions_override is not None
        else slice_positions(volume_zyx.shape, spacing, origin, direction)
    )
    if len(positions) != nz:
        raise ValueError("positions_override needs one position per slice")
    rng = np.random.default_rng(seed)
    name_order = rng.permutation(nz) if shuffle_names else np.arange(nz)
    number_order = rng.permutation(nz) if shuffle_names else np.arange(nz)
    if shuffle_names and nz > 2:
        # make sure neither the names nor the instance numbers follow the positions
        while np.array_equal(name_order, np.arange(nz)) or np.array_equal(name_order, np.arange(nz)[::-1]):
            name_order = rng.permutation(nz)
        while np.array_equal(number_order, np.arange(nz)) or np.array_equal(number_order, np.arange(nz)[::-1]):
            number_order = rng.permutation(nz)

    image = sitk.GetImageFromArray(volume_zyx.astype(np.int16))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection(direction.flatten().tolist())

    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    sop_class = CT_IMAGE_STORAGE if modality.upper() == "CT" else MR_IMAGE_STORAGE
    iop = _ds_list([*direction[:, 0], *direction[:, 1]])
    series_tags = {
        "0008|0060": modality,
        "0020|000e": series_uid,
        "0020|000d": study_uid,
        "0010|0010": patient_name,
        "0010|0020": patient_id,
        "0010|0030": birth_date,
        "0008|0050": accession,
        "0008|0080": institution,
        "0008|0020": study_date,
        "0008|0021": study_date,
        "0008|0030": "120000",
        "0008|0016": sop_class,
        "0020|0037": iop,
        "0028|0030": _ds_list([spacing[1], spacing[0]]),  # row spacing (y), column spacing (x)
        "0018|0050": _ds(spacing[2]),
        "0008|103e": "test series",
        "0020|0011": "1",
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    skipped = set(skip_slices)
    written: list[Path] = []
    for k in range(nz):
        if k in skipped:
            continue
        image_slice = image[:, :, k]
        for tag, value in series_tags.items():
            image_slice.SetMetaData(tag, value)
        image_slice.SetMetaData("0020|0032", _ds_list(positions[k]))
        image_slice.SetMetaData("0020|0013", str(int(number_order[k]) + 1))
        image_slice.SetMetaData("0008|0018", generate_uid())
        path = folder / f"{prefix}{int(name_order[k]):04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(image_slice)
        written.append(path)
    return written


def write_nifti(
    path: str | Path,
    volume_zyx: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: np.ndarray | Sequence[Sequence[float]] = ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
) -> Path:
    """Write ``volume_zyx`` (same conventions as ``write_dicom_series``) as NIfTI (.nii or .nii.gz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.asarray(volume_zyx))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection(np.asarray(direction, dtype=float).reshape(3, 3).flatten().tolist())
    sitk.WriteImage(image, str(path))
    return path


def write_dicom_2d(
    path: str | Path,
    pixels: np.ndarray | None,
    modality: str = "CR",
    photometric: str = "MONOCHROME2",
    slope: float = 1.0,
    intercept: float = 0.0,
    window: tuple[float, float] | None = None,
    pixel_spacing: tuple[float, float] = (0.2, 0.2),
    patient_id: str = "P0001",
    patient_name: str = "Anon^Subject",
    birth_date: str = "19000101",
    accession: str = "ACC0000001",
    institution: str = "Nowhere",
    study_date: str = "20000101",
    series_uid: str | None = None,
    study_uid: str | None = None,
) -> Path:
    """A single-frame uint16 DICOM image through pydicom; ``pixels=None`` writes no pixel data.

    ``window`` is ``(center, width)``; ``pixel_spacing`` goes into ImagerPixelSpacing (row, column).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sop_class = {"CR": CR_IMAGE_STORAGE, "DX": DX_IMAGE_STORAGE}.get(modality.upper(), SECONDARY_CAPTURE_STORAGE)
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid()

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.AccessionNumber = accession
    ds.InstitutionName = institution
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = "120000"
    ds.SeriesNumber = 1
    ds.InstanceNumber = next(_counter) + 1
    if pixels is not None:
        pixels = np.asarray(pixels, dtype=np.uint16)
        ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.ImagerPixelSpacing = [float(s) for s in pixel_spacing]
        if slope != 1 or intercept != 0:
            ds.RescaleSlope = _ds(slope)
            ds.RescaleIntercept = _ds(intercept)
            ds.RescaleType = "US"
        if window is not None:
            ds.WindowCenter = _ds(window[0])
            ds.WindowWidth = _ds(window[1])
        ds.PixelData = pixels.tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def write_png(path: str | Path, array: np.ndarray, rgb: bool = False) -> Path:
    """Grey (uint8 -> L, uint16 -> I;16) or, with ``rgb`` or an [H, W, 3] array, an RGB PNG."""
    return _write_pillow(path, array, rgb, "PNG")


def write_jpeg(path: str | Path, array: np.ndarray, rgb: bool = False) -> Path:
    return _write_pillow(path, array, rgb, "JPEG")


def _write_pillow(path: str | Path, array: np.ndarray, rgb: bool, fmt: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.asarray(array)
    if rgb and array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim == 3:
        image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))  # RGB
    elif array.dtype == np.uint16:
        image = Image.fromarray(np.ascontiguousarray(array))  # I;16
    else:
        image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))  # L
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    image.save(path, format=fmt, **kwargs)
    return path


def random_volume(shape_zyx: Sequence[int], seed: int = 0, low: int = -1000, high: int = 3000) -> np.ndarray:
    """An int16 volume of distinct-enough random values (so that any reordering shows)."""
    return np.random.default_rng(seed).integers(low, high, size=tuple(shape_zyx), dtype=np.int16)


PACS_TAGS = {
    "patient_name": "Zyxwvut^Quorabelle",
    "patient_id": "ZQ-99173-PX",
    "birth_date": "19530612",
    "accession": "ACC-77Q31",
    "institution": "Klinikum Ostwind",
    "study_date": "19890417",
}
"""The identifying DICOM tags the PACS-export privacy tests write (and search every output for)."""

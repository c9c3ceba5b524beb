"""Readers: every format comes out as a float32 array in one canonical layout with its geometry.

* volumes (DICOM series, multi-frame DICOM, NIfTI): ``[X, Y, Z]`` in RAS+ with a RAS affine;
* images (single-frame DICOM, PNG/JPEG/...): ``[H, W]`` as displayed (rows, columns).

DICOM series go through SimpleITK after sorting by position; single DICOM images through
pydicom (modality LUT, VOI LUT/window, MONOCHROME1 inversion); NIfTI through nibabel; image
files through Pillow (RGB that is really grey is taken as grey).
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
from nibabel.orientations import OrientationError
from PIL import Image, UnidentifiedImageError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from medssl.data.dicom import assemble_series, pixel_spacing, series_headers_in_folder
from medssl.data.errors import DataError
from medssl.data.geometry import affine_from_lps, spacing_from_affine, to_canonical
from medssl.data.manifest import ManifestRow

sitk.ProcessObject.SetGlobalWarningDisplay(False)


@dataclass
class LoadedImage:
    """A decoded image or volume.

    ``array``: float32, ``[X, Y, Z]`` (RAS) for ``dims == 3`` or ``[H, W]`` for ``dims == 2``.
    ``spacing``: mm per axis in the same order. ``affine``: 4x4 RAS affine (volumes only).
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray | None
    modality: str

    @property
    def dims(self) -> int:
        return self.array.ndim


def check_finite(array: np.ndarray, path: Path | str) -> None:
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise DataError(path, f"{bad} voxel(s) are NaN or infinite")


def _sitk_to_canonical(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)  # [Z, Y, X] (+ [C] for colour)
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = array[..., :3].mean(axis=-1)
    if array.ndim == 2:
        array = array[None]
    array_xyz = array.transpose(2, 1, 0)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(image.GetDimension(), -1)
    if direction.shape != (3, 3):
        direction = np.eye(3)
    spacing = list(image.GetSpacing()) + [1.0] * (3 - image.GetDimension())
    origin = list(image.GetOrigin()) + [0.0] * (3 - image.GetDimension())
    affine = affine_from_lps(direction, spacing[:3], origin[:3])
    return to_canonical(array_xyz, affine)


def read_dicom_series(folder: Path, series_key: str) -> LoadedImage:
    """A single-frame DICOM series, sorted by ImagePositionPatient (not file name or number)."""
    headers = series_headers_in_folder(folder, series_key)
    try:
        geometry = assemble_series(headers, "series")  # the reason must not quote the folder (it may name a patient)
    except ValueError as exc:
        raise DataError(folder, str(exc).removeprefix("series: ")) from None
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in geometry.files])
    try:
        image = reader.Execute()
    except RuntimeError:
        raise DataError(folder, "SimpleITK could not decode the series' pixel data") from None
    array, affine = _sitk_to_canonical(image)  # Z spacing from positions, checked uniform above
    check_finite(array, folder)
    modality = headers[0].modality
    return LoadedImage(array=array, spacing=spacing_from_affine(affine), affine=affine, modality=modality)


def read_dicom_file(path: Path, apply_voi: bool = True) -> LoadedImage:
    """One DICOM file: a 2D image (pydicom) or a multi-frame volume (SimpleITK)."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise DataError(path, f"unreadable DICOM file ({type(exc).__name__})") from None
    try:
        return _decode_dicom(ds, path, apply_voi)
    except (DataError, MemoryError):
        raise
    except Exception as exc:  # pydicom decodes an element when it is first read: a corrupt one raises here
        raise DataError(path, f"corrupt DICOM file ({type(exc).__name__})") from None


def _decode_dicom(ds: pydicom.Dataset, path: Path, apply_voi: bool) -> LoadedImage:
    """:func:`read_dicom_file` once the file is parsed."""
    modality = str(ds.get("Modality", "OT") or "OT").upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError:
            raise DataError(path, "SimpleITK could not decode this multi-frame DICOM") from None
        array, affine = _sitk_to_canonical(image)
        check_finite(array, path)
        return LoadedImage(array=array, spacing=spacing_from_affine(affine), affine=affine, modality=modality)
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise DataError(path, f"cannot decode pixel data ({type(exc).__name__})") from None
    array = apply_modality_lut(pixels, ds).astype(np.float32)
    if array.ndim == 3:  # colour: RGB, YBR -> luminance
        array = array[..., :3].mean(axis=-1)
    if apply_voi and ("WindowCenter" in ds or "VOILUTSequence" in ds):
        array = np.asarray(apply_voi_lut(array, ds, index=0), dtype=np.float32)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        array = array.max() + array.min() - array
    check_finite(array, path)
    return LoadedImage(
        array=np.ascontiguousarray(array, dtype=np.float32),
        spacing=pixel_spacing(ds),
        affine=None,
        modality=modality,
    )


def read_nifti(path: Path) -> LoadedImage:
    """A 3D NIfTI (a 4D one with a single volume is accepted), reoriented to RAS+."""
    try:
        image = nib.load(str(path))
        shape = image.shape
    except Exception as exc:
        raise DataError(path, f"unreadable NIfTI header ({type(exc).__name__})") from None
    if len(shape) == 4 and shape[3] == 1:
        pass
    elif len(shape) != 3:
        raise DataError(path, f"{len(shape)}D NIfTI (shape {tuple(shape)}) is not supported; split it into 3D volumes")
    if min(shape) < 1:
        raise DataError(path, f"NIfTI header gives shape {tuple(shape)}: every dimension must be positive")
    try:
        data = np.asarray(image.dataobj, dtype=np.float32)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError, OverflowError) as exc:
        raise DataError(path, f"truncated or corrupt NIfTI data ({type(exc).__name__})") from None
    data = data.reshape(shape[:3])
    check_finite(data, path)
    try:
        array, affine = to_canonical(data, image.affine)
    except (ValueError, OrientationError):  # a zero or non-finite axis in the affine (LinAlgError is a ValueError)
        raise DataError(path, "NIfTI affine has a zero or non-finite axis; cannot orient the volume") from None
    return LoadedImage(array=array, spacing=spacing_from_affine(affine), affine=affine, modality="OT")


def read_image_file(path: Path) -> LoadedImage:
    """PNG/JPEG/BMP/TIFF through Pillow; grey stored as RGB becomes one channel."""
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
                rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
                is_grey = np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
                array = rgb[..., 0] if is_grey else np.asarray(image.convert("L"), dtype=np.float32)
            else:  # L, I, I;16, F, 1
                array = np.asarray(image, dtype=np.float32)
    except Image.DecompressionBombError:  # not an OSError: Pillow refuses a header of over 2 x MAX_IMAGE_PIXELS
        raise DataError(path, "image header gives more pixels than Pillow decodes safely (corrupt file?)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(path, f"unreadable or truncated image file ({type(exc).__name__})") from None
    if array.ndim != 2:
        raise DataError(path, f"unexpected image array shape {array.shape}")
    check_finite(array, path)
    return LoadedImage(array=np.ascontiguousarray(array), spacing=(1.0, 1.0), affine=None, modality="OT")


def read_row(row: ManifestRow, path: Path) -> LoadedImage:
    """Read the file(s) of one manifest row; the row's modality wins over the file's."""
    if not path.exists():
        raise DataError(path, "file not found (moved or deleted since the scan?)")
    if row.format == "dicom_series":
        loaded = read_dicom_series(path, row.series)
    elif row.format == "dicom":
        loaded = read_dicom_file(path)
    elif row.format == "nifti":
        loaded = read_nifti(path)
    elif row.format == "image":
        loaded = read_image_file(path)
    else:
        raise DataError(path, f"unknown format {row.format!r}")
    if row.modality and row.modality != "OT":
        loaded.modality = row.modality
    if loaded.dims != row.dims:
        if row.dims == 2 and loaded.dims == 3 and loaded.array.shape[2] == 1:
            loaded.array = loaded.array[:, :, 0]
            loaded.spacing = loaded.spacing[:2]
        else:
            raise DataError(path, f"manifest says {row.dims}D but the file holds a {loaded.dims}D array")
    return loaded

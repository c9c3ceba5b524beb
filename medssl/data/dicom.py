"""DICOM header reading and series assembly, without pixel data.

Raw identifiers (PatientID, PatientName, ...) are read only to derive a keyed pseudonym and to
tell whether a file's path holds one; they are never stored on the returned objects. Paths, which
may name patients whether or not this check sees it, stay out of manifests through the path map
(:mod:`medssl.data.pathmap`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from medssl.data.errors import DataError
from medssl.data.geometry import affine_from_lps, canonical_shape_spacing, check_slice_positions, slice_normal
from medssl.data.pseudonym import digest, pseudonym

# Projection radiography and other inherently 2D modalities: one file is one image.
MODALITIES_2D = frozenset({"CR", "DX", "DR", "MG", "RF", "XA", "IO", "PX", "XC", "SC", "OT", "US", "ES"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".ima"})
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_IDENTIFYING_TAGS = ("PatientID", "PatientName", "OtherPatientIDs", "AccessionNumber")


def looks_like_dicom(path: Path) -> bool:
    """True for files with the DICOM Part 10 preamble ("DICM" at byte 128)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


@dataclass(frozen=True)
class DicomHeader:
    """What the scanner needs from one DICOM file; no identifiers, only pseudonyms and digests."""

    path: Path
    series_key: str  # digest of SeriesInstanceUID
    instance_key: str  # digest of SOPInstanceUID
    subject: str  # keyed pseudonym of PatientID (or of the study when there is none)
    modality: str
    rows: int
    columns: int
    frames: int
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float]
    path_has_identifier: bool
    redacted_path: str  # the relative path with any identifier found in it replaced


def read_header(path: Path, salt: str, relative_path: str) -> DicomHeader:
    """Read one DICOM file's header (pixels skipped) or raise ``DataError`` naming the file."""
    try:
        ds = pydicom.dcmread(path, defer_size=256)
    except InvalidDicomError:
        raise DataError(path, "not a DICOM file (no DICOM preamble or header)") from None
    except Exception as exc:  # pydicom raises many types on corrupt input; their text may hold values
        raise DataError(path, f"corrupt DICOM header ({type(exc).__name__})") from None
    try:
        return _header(ds, path, salt, relative_path)
    except (DataError, OSError):
        raise
    except Exception as exc:  # pydicom decodes an element when it is first read: a corrupt one raises here
        raise DataError(path, f"corrupt DICOM header ({type(exc).__name__})") from None


def _header(ds: Any, path: Path, salt: str, relative_path: str) -> DicomHeader:
    """:func:`read_header` once the file is parsed."""
    pixel_tags = [tag for tag in _PIXEL_TAGS if tag in ds]
    if not pixel_tags:
        if "SOPClassUID" not in ds and "TransferSyntaxUID" not in ds.file_meta:
            raise DataError(path, "corrupt DICOM header (no recognisable DICOM elements)")
        raise DataError(path, "DICOM file has no pixel data (structured report, presentation state, ...)")
    if _truncated(ds.get_item(pixel_tags[0], keep_deferred=True), path):
        raise DataError(path, "truncated DICOM file (pixel data ends past the end of the file)")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise DataError(path, "DICOM file has pixel data but no valid Rows/Columns") from None
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    patient_raw = str(ds.get("PatientID", "") or "") or str(ds.get("StudyInstanceUID", "") or "") or series_uid
    identifiers = [str(ds.get(tag, "") or "") for tag in _IDENTIFYING_TAGS]
    name_parts = [p for p in str(ds.get("PatientName", "") or "").replace("^", " ").split() if len(p) >= 3]
    redacted_path = relative_path
    for value in identifiers + name_parts:
        if len(value) >= 3:
            redacted_path = re.sub(re.escape(value), "[redacted]", redacted_path, flags=re.IGNORECASE)
    position = _floats(ds.get("ImagePositionPatient"), 3)
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    spacing = pixel_spacing(ds)
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    return DicomHeader(
        path=path,
        series_key=digest(series_uid) if series_uid else digest(f"file:{relative_path}"),
        instance_key=digest(sop_uid) if sop_uid else digest(f"file:{relative_path}"),
        subject=pseudonym(patient_raw, salt, prefix="s") if patient_raw else "",
        modality=str(ds.get("Modality", "OT") or "OT").upper(),
        rows=rows,
        columns=columns,
        frames=frames,
        position=position,
        orientation=orientation,
        pixel_spacing=(spacing[0], spacing[1]),
        path_has_identifier=redacted_path != relative_path,
        redacted_path=redacted_path,
    )


def _truncated(element: object, path: Path) -> bool:
    """True when a pixel data element of defined length runs past the end of the file.

    Header reads defer large values (``defer_size``), so pydicom only seeks past them and a
    file cut inside its pixel data would otherwise look complete.
    """
    length = getattr(element, "length", None)
    tell = getattr(element, "value_tell", None)
    if length is None or tell is None or length == 0xFFFFFFFF:
        return False
    value = getattr(element, "value", None)
    if value is not None:
        return len(value) < length
    return tell + length > path.stat().st_size


def pixel_spacing(ds: Any) -> tuple[float, float]:
    """(row, column) spacing in mm from PixelSpacing, else ImagerPixelSpacing; a missing, malformed, zero or
    negative value (``0\\0`` occurs in real CR files) counts as absent, and 1 mm is assumed."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        values = _floats(ds.get(keyword), 2)
        if values is not None and all(v > 0 for v in values):
            return (values[0], values[1])
    return (1.0, 1.0)


def _floats(value: object, count: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return values if len(values) == count and all(np.isfinite(values)) else None


@dataclass(frozen=True)
class SeriesGeometry:
    """A single-frame DICOM series sorted along its slice normal (Z ordered by position)."""

    files: tuple[Path, ...]
    shape: tuple[int, int, int]  # canonical [X, Y, Z]
    spacing: tuple[float, float, float]  # canonical
    slice_spacing: float


def assemble_series(headers: Sequence[DicomHeader], where: str) -> SeriesGeometry:
    """Sort a series' files by ImagePositionPatient projected on the slice normal and check it.

    Instance numbers and file names are not trusted. Raises ``ValueError`` for mixed sizes or
    orientations, missing geometry, duplicate positions, missing slices or mixed spacing.
    """
    first = headers[0]
    if any((h.rows, h.columns) != (first.rows, first.columns) for h in headers):
        raise ValueError(f"{where}: slices of different sizes in one series")
    if any(h.position is None or h.orientation is None for h in headers):
        raise ValueError(f"{where}: slices without ImagePositionPatient/ImageOrientationPatient")
    orientation = np.asarray(first.orientation)
    if any(not np.allclose(h.orientation, orientation, atol=1e-3) for h in headers):  # type: ignore[arg-type]
        raise ValueError(f"{where}: slices with different orientations in one series")
    normal = slice_normal(orientation)
    positions = np.array([float(np.dot(normal, h.position)) for h in headers])  # type: ignore[arg-type]
    order = np.argsort(positions, kind="stable")
    sorted_positions = positions[order]
    slice_spacing = check_slice_positions(sorted_positions, where)
    files = tuple(headers[i].path for i in order)
    direction = np.stack([orientation[:3], orientation[3:6], normal], axis=1)
    voxel_spacing = (first.pixel_spacing[1], first.pixel_spacing[0], slice_spacing)
    origin = headers[int(order[0])].position
    affine = affine_from_lps(direction, voxel_spacing, origin)  # type: ignore[arg-type]
    shape, spacing = canonical_shape_spacing((first.columns, first.rows, len(files)), voxel_spacing, affine)
    return SeriesGeometry(files=files, shape=shape, spacing=spacing, slice_spacing=slice_spacing)  # type: ignore[arg-type]


def series_headers_in_folder(folder: Path, series_key: str, salt: str = "") -> list[DicomHeader]:
    """Headers of the files in ``folder`` (not recursive) that belong to the series ``series_key``."""
    if not folder.is_dir():
        raise DataError(folder, "series folder not found")
    headers = []
    for name in sorted(os.listdir(folder)):
        path = folder / name
        if not path.is_file() or not (path.suffix.lower() in DICOM_SUFFIXES or looks_like_dicom(path)):
            continue
        try:
            header = read_header(path, salt, name)
        except DataError:
            continue
        if not series_key or header.series_key == series_key:
            headers.append(header)
    if not headers:
        raise DataError(folder, "no readable DICOM file of this series in the folder (moved or deleted?)")
    return headers

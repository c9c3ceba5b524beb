"""``medssl manifest scan``: turn a folder tree into manifest rows (headers only, no pixels).

DICOM files are grouped by SeriesInstanceUID. A single-frame file of a projection modality
(CR/DX/DR/MG/...) is a 2D image; a multi-frame file is a volume; a series of single-frame
cross-sectional slices (CT/MR/PT/...) is one volume, sorted by position and checked for
missing slices and mixed spacing. NIfTI and PNG/JPEG files are one row each.

Rows and errors name files by their path relative to the root here; ``medssl manifest scan`` then replaces
those paths by file keys and writes them to the path map (:func:`write_scan`, :mod:`medssl.data.pathmap`), so
folders named after patients (PACS exports) scan like any other and no output but the map names them.
"""

from __future__ import annotations

import fnmatch
import gzip
import itertools
import os
import re
import struct
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from PIL import Image, UnidentifiedImageError

from medssl.data.dicom import (
    DICOM_SUFFIXES,
    MODALITIES_2D,
    DicomHeader,
    assemble_series,
    looks_like_dicom,
    read_header,
)
from medssl.data.errors import DataError
from medssl.data.geometry import affine_from_lps, canonical_shape_spacing
from medssl.data.manifest import ManifestRow, RowTable
from medssl.data.pseudonym import pseudonym
from medssl.data.row_transforms import LabelJoin, MaskPairing, SplitAssignment
from medssl.data.scan_writer import ScanOutputs, ScanWriter, SortedRuns
from medssl.runtime.progress import progress

_T = TypeVar("_T")
_R = TypeVar("_R")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


@dataclass
class ScanOptions:
    salt: str
    subject_pattern: re.Pattern[str] | None = None
    modality: str | None = None  # for files that do not say (NIfTI, PNG/JPEG)
    exclude: Sequence[str] = ()
    workers: int = 8
    progress: bool = True


@dataclass
class ScanResult:
    rows: RowTable
    errors: list[tuple[str, str]]  # (path relative to the root, reason): private until keyed by write_scan
    files_seen: int
    hidden_skipped: int = 0

    def error_summary(self) -> Counter[str]:
        return Counter(_reason_kind(reason) for _, reason in self.errors)


def file_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in DICOM_SUFFIXES or looks_like_dicom(path):
        return "dicom"
    return "unsupported"


@dataclass
class ScanCounts:
    """What a walk counted: the files it gave, and the hidden files and folders it skipped."""

    files_seen: int = 0
    hidden_skipped: int = 0


def iter_files(root: Path, exclude: Sequence[str], counts: ScanCounts | None = None) -> Iterator[str]:
    """The files under ``root`` as paths relative to it (``/``-separated strings), one at a time; hidden files and
    folders are skipped (and counted in ``counts``).

    The paths come in string order (a folder's files and subfolders by name, a subfolder's contents where its name
    plus ``/`` sorts), so rows made in this order need no sorting; what is held is the listing of each folder on the
    way down, not the files. Like :func:`os.walk`: links to folders are not followed and unreadable folders are
    skipped."""
    counts = counts if counts is not None else ScanCounts()

    def visit(prefix: str, folder: str) -> Iterator[str]:
        try:
            with os.scandir(folder) as scan:
                entries = sorted((e.name + "/" if _is_folder(e) else e.name, e) for e in scan)
        except OSError:
            return
        for name, entry in entries:
            if entry.name.startswith("."):
                counts.hidden_skipped += 1
                continue
            rel = prefix + entry.name
            if name.endswith("/"):
                if not entry.is_symlink():
                    yield from visit(rel + "/", entry.path)
            elif not any(fnmatch.fnmatch(rel, pattern) for pattern in exclude):
                counts.files_seen += 1
                yield rel

    return visit("", os.fspath(root))


def _is_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


@dataclass(frozen=True)
class FileInfo:
    shape: tuple[int, ...]
    spacing: tuple[float, ...]


def nifti_info(path: Path) -> FileInfo:
    """Canonical shape/spacing of a NIfTI from its header, plus a cheap truncation check."""
    try:
        image = nib.load(str(path))
        header = image.header
        shape = tuple(int(s) for s in image.shape)
    except Exception as exc:
        raise DataError(path, f"unreadable NIfTI header ({type(exc).__name__})") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DataError(path, f"{len(shape)}D NIfTI (shape {shape}) is not supported; split it into 3D volumes")
    if min(shape) < 1:
        raise DataError(path, f"NIfTI header gives shape {shape}: every dimension must be positive")
    # the loaded header's vox_offset is reset to 0; the array proxy keeps the offset in the file
    offset = int(getattr(image.dataobj, "offset", header.get_data_offset()))
    expected = offset + int(np.prod(shape)) * header.get_data_dtype().itemsize
    actual = _uncompressed_size(path, expected)
    if actual < expected:
        raise DataError(path, f"truncated NIfTI ({actual} of {expected} bytes)")
    zooms = tuple(float(z) for z in header.get_zooms()[:3])
    try:
        shape_c, spacing_c = canonical_shape_spacing(shape, zooms, image.affine)
    except ValueError:  # a zero or non-finite axis in the affine: no orientation (numpy's LinAlgError included)
        raise DataError(path, "NIfTI affine has a zero or non-finite axis; cannot orient the volume") from None
    return FileInfo(shape=shape_c, spacing=spacing_c)


def _uncompressed_size(path: Path, expected: int) -> int:
    """File size, or for .gz the uncompressed size.

    A complete .gz ends with a trailer holding the uncompressed size mod 2**32: when it matches
    ``expected`` that is enough. A truncated .gz ends inside its compressed data, so its last four
    bytes are arbitrary (usually far larger than ``expected``); only then is the stream decompressed
    to count its bytes.
    """
    size = path.stat().st_size
    if not path.name.lower().endswith(".gz"):
        return size
    if size < 18:
        return 0
    with open(path, "rb") as handle:
        handle.seek(-4, os.SEEK_END)
        isize = struct.unpack("<I", handle.read(4))[0]
    if isize == expected % 2**32:
        return expected
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read1(1 << 16):
                total += len(chunk)
    except (EOFError, OSError, zlib.error):
        pass  # truncated or corrupt: count what was decompressed before the end
    return total


def image_info(path: Path) -> FileInfo:
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # ValueError: a header cut short ("Truncated IHDR chunk"); DecompressionBombError: a header giving over
        # 2 x 179 M pixels (a few corrupt bytes read as a TGA header give one), as in readers.read_image_file
        raise DataError(path, f"unreadable image file ({type(exc).__name__})") from None
    return FileInfo(shape=(height, width), spacing=(1.0, 1.0))


def multiframe_info(path: Path) -> FileInfo:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise DataError(path, "multi-frame DICOM that SimpleITK cannot read") from None
    size, spacing = reader.GetSize(), reader.GetSpacing()
    try:
        direction = np.asarray(reader.GetDirection(), dtype=float).reshape(3, 3)
        affine = affine_from_lps(direction, spacing, reader.GetOrigin())
        shape, spacing_c = canonical_shape_spacing(size, spacing, affine)
    except ValueError:  # SimpleITK reads an all-zero direction when the orientation is unusable (numpy's LinAlgError)
        raise DataError(
            path, "multi-frame DICOM without a usable orientation (zero or non-finite axis); cannot orient the volume"
        ) from None
    return FileInfo(shape=shape, spacing=spacing_c)


def _probe(root: Path, rel: str, salt: str) -> tuple[str, str, object]:
    """``(rel, kind, header or file info or DataError)`` of the file ``root / rel``."""
    path = root / rel
    kind = file_kind(path)
    try:
        if kind == "dicom":
            return rel, kind, read_header(path, salt, rel)
        if kind == "nifti":
            return rel, kind, nifti_info(path)
        if kind == "image":
            return rel, kind, image_info(path)
    except DataError as exc:
        return rel, kind, exc
    except OSError as exc:
        return rel, kind, DataError(path, f"cannot read file ({type(exc).__name__})")
    suffix = "".join(path.suffixes[-1:]) or "no extension"
    return rel, kind, DataError(path, f"unsupported file type ({suffix})")


def _in_order(pool: ThreadPoolExecutor, function: Callable[[_T], _R], items: Iterable[_T], ahead: int) -> Iterator[_R]:
    """``pool.map(function, items)`` with at most ``ahead`` items in flight (``map`` submits every item at once: a
    future and its result per file, all held until they are consumed)."""
    pending: deque[Future[_R]] = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


ScanError = tuple[str, str]
"""A file or series the scan cannot use: ``(path relative to the root, reason)``."""


def scan_items(
    root: Path, options: ScanOptions, counts: ScanCounts | None = None, spool: Path | None = None
) -> Iterator[ManifestRow | ScanError]:
    """The rows and errors of the files under ``root``, as they are found (paths relative to ``root``): PNG, JPEG and
    NIfTI files in path order as they are probed (``4 x workers`` at a time), then the DICOM files' rows and errors,
    a series at a time (every header of a series is needed: the headers are sorted by series through unnamed private
    temporary files in ``spool``, the system's temporary folder by default, and read back one series at a time).
    ``counts``: filled as the walk goes. The folder tree is walked once; with ``options.progress`` the report counts
    the files probed so far (no total: that would need a second walk, which on a network share costs minutes).

    Raises:
        DataError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "folder not found")
    counts = counts if counts is not None else ScanCounts()
    # DICOM headers sorted by series through private temporary runs: a series at a time is held, not the headers
    dicom_headers = SortedRuns(spool, 1)
    modality = (options.modality or "OT").upper()
    workers = max(1, options.workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        files = iter_files(root, options.exclude, counts)
        probes = _in_order(pool, lambda rel: _probe(root, rel, options.salt), files, 4 * workers)
        # one walk: the bar counts the files as they come, without a total (counting first would walk the tree twice)
        for rel, kind, result in progress(probes, desc="scan", unit="file", enabled=options.progress):
            if isinstance(result, DataError):
                yield rel, result.reason
            elif kind == "dicom":
                dicom_headers.add(_header_record(rel, result))  # type: ignore[arg-type]
            else:
                info: FileInfo = result  # type: ignore[assignment]
                yield ManifestRow(
                    id=pseudonym(f"file:{rel}", options.salt, prefix="i"),
                    path=rel,
                    format=kind,
                    dims=len(info.shape),
                    modality=modality,
                    subject=_file_subject(rel, options),
                    shape=info.shape,
                    spacing=info.spacing,
                )
    try:
        for series_key, records in itertools.groupby(dicom_headers, key=lambda record: record[0]):
            members = [_header_from_record(record, root) for record in records]
            yield from _series_items(series_key, members, root, options)
    finally:
        dicom_headers.close()


def scan_folder(root: Path, options: ScanOptions) -> ScanResult:
    """Scan ``root`` and return its manifest rows (paths relative to ``root``, in path order, held as columns:
    :class:`RowTable`) and per-file errors (sorted). :func:`scan_archive` writes a scan's outputs without holding
    its rows."""
    counts = ScanCounts()
    rows = RowTable()
    errors: list[ScanError] = []
    for item in scan_items(root, options, counts):
        if isinstance(item, ManifestRow):
            rows.append(item)
        else:
            errors.append(item)
    errors.sort()
    return ScanResult(rows=_by_path(rows), errors=errors, files_seen=counts.files_seen,
                      hidden_skipped=counts.hidden_skipped)  # fmt: skip


def _by_path(rows: RowTable) -> RowTable:
    """``rows`` sorted by path, then series: as they are when they are (the walk's order, no DICOM rows added after
    it), else a sorted copy (two stable sorts of positions: one column's strings held at a time)."""
    paths, series = rows.column("path"), rows.column("series")
    if all((paths[i - 1], series[i - 1]) <= (paths[i], series[i]) for i in range(1, len(rows))):
        return rows
    order = sorted(range(len(rows)), key=series.__getitem__)
    order.sort(key=paths.__getitem__)
    return RowTable(rows[i] for i in order)


def _file_subject(rel: str, options: ScanOptions) -> str:
    raw = None
    if options.subject_pattern is not None:
        match = options.subject_pattern.search(rel)
        if match:
            raw = match.group(1) if match.groups() else match.group(0)
    if raw is None:
        name = rel.rsplit("/", 1)[-1]
        raw = re.sub(r"(\.nii\.gz|\.[^.]+)$", "", name)
    return pseudonym(raw, options.salt, prefix="s")


def _series_items(
    series_key: str, members: Sequence[DicomHeader], root: Path, options: ScanOptions
) -> Iterator[ManifestRow | ScanError]:
    """The rows and errors of one DICOM series (its files' headers, in walk order): a row per multi-frame file, a row
    per file of a projection modality (or a series of one file), else one volume row for the series' folder."""

    def rel(path: Path) -> str:
        return path.relative_to(root).as_posix()

    singles = [h for h in members if h.frames <= 1]
    for header in (h for h in members if h.frames > 1):
        try:
            info = multiframe_info(header.path)
        except DataError as exc:
            yield rel(header.path), exc.reason
            continue
        yield _dicom_row(header, rel(header.path), "dicom", info.shape, info.spacing, options)
    if not singles:
        return
    if singles[0].modality in MODALITIES_2D or len(singles) == 1:
        for header in singles:
            shape = (header.rows, header.columns)
            yield _dicom_row(header, rel(header.path), "dicom", shape, header.pixel_spacing, options)
        return
    folders = {h.path.parent for h in singles}
    if len(folders) > 1:
        for folder in sorted(folders):
            yield rel(folder), "one DICOM series is spread over several folders; move it into one"
        return
    folder = rel(next(iter(folders))) or "."
    try:
        geometry = assemble_series(singles, f"series of {len(singles)} files")
    except ValueError as exc:
        yield folder, str(exc)
        return
    row = _dicom_row(singles[0], folder, "dicom_series", geometry.shape, geometry.spacing, options)
    yield replace(row, id=pseudonym(f"series:{series_key}", options.salt, prefix="i"), series=series_key)


def _floats_text(values: Sequence[float] | None) -> str:
    """Numbers as exact text (``repr``), space-separated; ``-`` for None."""
    return "-" if values is None else " ".join(repr(float(v)) for v in values)


def _floats_from_text(text: str) -> tuple[float, ...] | None:
    return None if text == "-" else tuple(float(v) for v in text.split())


def _header_record(rel: str, header: DicomHeader) -> tuple[str, ...]:
    """A DICOM header as strings (series first, the sort key; the path relative to the root), for the spool."""
    return (
        header.series_key,
        rel,
        header.instance_key,
        header.subject,
        header.modality,
        str(header.rows),
        str(header.columns),
        str(header.frames),
        _floats_text(header.position),
        _floats_text(header.orientation),
        _floats_text(header.pixel_spacing),
        "1" if header.path_has_identifier else "",
        header.redacted_path,
    )


def _header_from_record(record: Sequence[str], root: Path) -> DicomHeader:
    """The header :func:`_header_record` wrote (the same values: numbers round-trip exactly)."""
    series, rel, instance, subject, modality, rows, columns, frames, position, orientation, spacing, flag, redacted = (
        record
    )
    pixel_spacing = _floats_from_text(spacing) or ()
    return DicomHeader(
        path=root / rel,
        series_key=series,
        instance_key=instance,
        subject=subject,
        modality=modality,
        rows=int(rows),
        columns=int(columns),
        frames=int(frames),
        position=_floats_from_text(position),
        orientation=_floats_from_text(orientation),
        pixel_spacing=pixel_spacing,  # type: ignore[arg-type]
        path_has_identifier=flag == "1",
        redacted_path=redacted,
    )


def _dicom_row(
    header: DicomHeader,
    rel: str,
    fmt: str,
    shape: Sequence[int],
    spacing: Sequence[float],
    options: ScanOptions,
) -> ManifestRow:
    return ManifestRow(
        id=pseudonym(f"instance:{header.instance_key}", options.salt, prefix="i"),
        path=rel,
        format=fmt,
        dims=len(shape),
        modality=header.modality,
        subject=header.subject,
        shape=tuple(int(s) for s in shape),
        spacing=tuple(float(s) for s in spacing),
    )


def write_scan(
    out: Path,
    rows: Iterable[ManifestRow],
    errors: Iterable[ScanError],
    root: Path,
    salt: str,
    path_map: Path | None = None,
) -> ScanOutputs:
    """Write a scan's outputs (:class:`medssl.data.scan_writer.ScanWriter`) with every relative path replaced by its
    file key: the path map (default ``<out stem>.paths.csv`` beside ``out``, private), ``<out stem>.errors.csv``
    naming failures by key, and the manifest ``out`` (only when there are rows) naming its files by key."""
    with ScanWriter(out, root, salt, path_map) as writer:
        for row in rows:
            writer.add_row(row)
        for relative, reason in errors:
            writer.add_error(relative, reason)
        return writer.finish()


@dataclass
class ScanReport:
    """What :func:`scan_archive` did: the files written, the walk's counts, the counts of the rows written
    (:meth:`medssl.data.manifest.Manifest.summary`'s), the errors by reason (``reason (detail)`` counted as
    ``reason``) and the warnings of the masks, labels and splits."""

    outputs: ScanOutputs
    walk: ScanCounts
    rows: dict[str, object]
    errors: Counter[str]
    warnings: list[str]


def scan_archive(
    root: Path,
    options: ScanOptions,
    out: Path,
    *,
    masks: str | None = None,
    labels: Sequence[Path] = (),
    split_fractions: dict[str, float] | None = None,
    path_map: Path | None = None,
) -> ScanReport:
    """``medssl manifest scan``: scan ``root`` and write the keyed manifest, its errors CSV and its path map, without
    holding the rows (they stream from the walk through the masks (``masks``: a folder of label maps under ``root``),
    the ``labels`` CSVs (in order) and the split assignment into :class:`medssl.data.scan_writer.ScanWriter`, whose
    external sort puts them in key order).

    Raises:
        DataError: ``root`` is not a folder; a labels file or the masks folder is missing or unreadable.
        ValueError: bad ``split_fractions``.
        ManifestError: two paths share one file key (nothing is written).
    """
    pairing = MaskPairing(root, masks) if masks else None
    joins = [LabelJoin(Path(labels_csv), root, options.salt) for labels_csv in labels]
    splits = SplitAssignment(split_fractions, options.salt) if split_fractions else None
    walk = ScanCounts()
    errors: Counter[str] = Counter()
    with ScanWriter(out, root, options.salt, path_map) as writer:
        for item in scan_items(root, options, walk, spool=Path(out).parent):
            if not isinstance(item, ManifestRow):
                writer.add_error(*item)
                errors[_reason_kind(item[1])] += 1
                continue
            row: ManifestRow | None = item if pairing is None else pairing(item)
            if row is None:
                continue
            for join in joins:
                row = join(row)
            if splits is not None:
                splits.observe(row)
            writer.add_row(row)
        outputs = writer.finish(splits)
        rows = writer.counts.result()
    warnings = [*(pairing.warnings() if pairing else []), *(w for join in joins for w in join.warnings())]
    return ScanReport(outputs=outputs, walk=walk, rows=rows, errors=errors, warnings=warnings)


def _reason_kind(reason: str) -> str:
    """A reason without its detail in parentheses (``unreadable image file (OSError)`` -> ``unreadable image file``)."""
    return re.sub(r"\s*\(.*", "", reason)

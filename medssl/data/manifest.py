"""The manifest: one CSV row per image or volume, no protected health information.

File layout::

    # medssl-manifest v1
    # root: ../shared/data
    id,path,series,format,dims,modality,subject,shape,spacing,split,group,label,mask
    ...

``root`` is relative to the manifest's own folder (or absolute); ``path`` is relative to the
root. A root given on the command line overrides the one in the file. ``mask`` (optional) is the
path, relative to the root, of a label map for segmentation/detection fine-tuning: same grid as the
image, integer class values (0 background).
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from medssl.data.errors import ManifestError
from medssl.runtime.files import atomic_write_text

MAGIC = "# medssl-manifest v1"
COLUMNS: tuple[str, ...] = (
    "id",
    "path",
    "series",
    "format",
    "dims",
    "modality",
    "subject",
    "shape",
    "spacing",
    "split",
    "group",
    "label",
    "mask",
)
OPTIONAL_COLUMNS: tuple[str, ...] = ("mask",)
"""Columns a manifest may lack (written by newer versions; read as empty)."""
FORMATS = ("dicom_series", "dicom", "nifti", "image")
SPLITS = ("", "train", "val", "test")


@dataclass
class ManifestRow:
    """One image (``dims`` 2) or volume (``dims`` 3).

    ``shape`` and ``spacing`` are in the canonical array order the readers return:
    ``[X, Y, Z]`` (RAS) for volumes, ``[H, W]`` (rows, columns) for images.
    ``series`` is a digest of the DICOM SeriesInstanceUID (for ``dicom_series`` rows whose
    folder holds several series), else empty.
    """

    id: str
    path: str
    format: str
    dims: int
    modality: str = "OT"
    subject: str = ""
    shape: tuple[int, ...] = ()
    spacing: tuple[float, ...] = ()
    series: str = ""
    split: str = ""
    group: str = ""
    label: str = ""
    mask: str = ""  # label map (segmentation/detection), relative to the root like ``path``

    def to_record(self) -> dict[str, str]:
        record = {k: ("" if v is None else v) for k, v in asdict(self).items()}
        record["shape"] = "x".join(str(int(s)) for s in self.shape)
        record["spacing"] = "x".join(f"{float(s):.6g}" for s in self.spacing)
        record["dims"] = str(self.dims)
        return {c: str(record[c]) for c in COLUMNS}

    @classmethod
    def from_record(cls, record: dict[str, str], line: int) -> ManifestRow:
        try:
            shape = tuple(int(s) for s in record["shape"].split("x")) if record.get("shape") else ()
            spacing = tuple(float(s) for s in record["spacing"].split("x")) if record.get("spacing") else ()
            dims = int(record["dims"])
        except (KeyError, ValueError) as exc:
            raise ManifestError(f"line {line}: bad value for dims/shape/spacing ({exc})") from exc
        known = {f.name for f in fields(cls)}
        values = {k: (v or "") for k, v in record.items() if k in known}
        values.update(shape=shape, spacing=spacing, dims=dims)
        return cls(**values)


@dataclass
class Manifest:
    rows: list[ManifestRow]
    root: Path

    def resolve(self, row: ManifestRow) -> Path:
        return self.root / row.path

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self) -> dict[str, object]:
        """Counts only (no identifiers): safe to print and to log to an experiment tracker."""
        return {
            "rows": len(self.rows),
            "images_2d": sum(r.dims == 2 for r in self.rows),
            "volumes_3d": sum(r.dims == 3 for r in self.rows),
            "subjects": len({r.subject for r in self.rows if r.subject}),
            "formats": dict(Counter(r.format for r in self.rows)),
            "modalities": dict(Counter(r.modality for r in self.rows)),
            "splits": dict(Counter(r.split or "-" for r in self.rows)),
            "groups": dict(Counter(r.group or "-" for r in self.rows)),
        }


def _relative_root(root: Path, manifest_path: Path) -> str:
    try:
        return os.path.relpath(root.resolve(), manifest_path.resolve().parent)
    except ValueError:  # another drive on Windows
        return str(root.resolve())


def write_manifest(path: Path, rows: Sequence[ManifestRow], root: Path) -> None:
    buffer = io.StringIO()
    buffer.write(f"{MAGIC}\n# root: {_relative_root(root, path)}\n")
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row.to_record())
    atomic_write_text(path, buffer.getvalue())


def write_csv(path: Path, header: Sequence[str], records: Iterable[Sequence[object]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(records)
    atomic_write_text(path, buffer.getvalue())


def read_manifest_records(path: Path) -> tuple[list[dict[str, str]], list[str], str | None]:
    """Raw records, the header columns and the ``root`` comment, without interpreting values."""
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    root: str | None = None
    data_lines: list[str] = []
    with open(path, newline="", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("#"):
                if line.startswith("# root:"):
                    root = line.split(":", 1)[1].strip()
                continue
            data_lines.append(line)
    reader = csv.DictReader(data_lines)
    header = list(reader.fieldnames or [])
    return list(reader), header, root


def read_manifest(path: str | Path, root: str | Path | None = None) -> Manifest:
    """Read a manifest; ``root`` overrides the root written in the file."""
    path = Path(path)
    records, header, file_root = read_manifest_records(path)
    missing = [c for c in ("id", "path", "format", "dims") if c not in header]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}")
    rows = [ManifestRow.from_record(rec, line=i + 2) for i, rec in enumerate(records)]
    if root is not None:
        resolved_root = Path(root)
    elif file_root is not None:
        resolved_root = (path.parent / file_root) if not os.path.isabs(file_root) else Path(file_root)
    else:
        resolved_root = path.parent
    return Manifest(rows=rows, root=resolved_root)


@dataclass
class ValidationReport:
    errors: list[str]
    warnings: list[str]
    summary: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


def validate_manifest(path: str | Path, root: str | Path | None = None, check_files: bool = True) -> ValidationReport:
    """Check columns, values, paths, duplicates and split leakage across subjects."""
    path = Path(path)
    errors: list[str] = []
    warnings: list[str] = []
    _, header, _ = read_manifest_records(path)
    missing = [c for c in COLUMNS if c not in header and c not in OPTIONAL_COLUMNS]
    if missing:
        errors.append(f"{path}: missing column(s): {', '.join(missing)}")
        return ValidationReport(errors, warnings)
    unknown = [c for c in header if c not in COLUMNS]
    if unknown:
        warnings.append(f"{path}: extra column(s) ignored: {', '.join(unknown)}")
    manifest = read_manifest(path, root)
    if not manifest.rows:
        errors.append(f"{path}: manifest has no rows")
    ids = Counter(r.id for r in manifest.rows)
    keys = Counter((r.path, r.series) for r in manifest.rows)
    for ident, count in ids.items():
        if count > 1:
            errors.append(f"duplicate id {ident!r} ({count} rows)")
    for (rel, series), count in keys.items():
        if count > 1:
            errors.append(f"{rel}: listed {count} times" + (f" (series {series})" if series else ""))
    splits_of_subject: dict[str, set[str]] = defaultdict(set)
    for line, row in enumerate(manifest.rows, start=2):
        where = f"line {line} ({row.path})"
        if not row.id:
            errors.append(f"{where}: empty id")
        if row.format not in FORMATS:
            errors.append(f"{where}: format {row.format!r} is not one of {', '.join(FORMATS)}")
        if row.dims not in (2, 3):
            errors.append(f"{where}: dims must be 2 or 3, got {row.dims}")
        elif row.shape and len(row.shape) != row.dims:
            errors.append(f"{where}: shape {row.shape} does not have {row.dims} dimensions")
        if row.spacing and any(s <= 0 for s in row.spacing):
            errors.append(f"{where}: spacing must be positive, got {row.spacing}")
        if row.split not in SPLITS:
            errors.append(f"{where}: split {row.split!r} is not one of train, val, test or empty")
        if not row.subject:
            warnings.append(f"{where}: no subject; splits cannot be checked for leakage")
        elif row.split:
            splits_of_subject[row.subject].add(row.split)
        if check_files and not manifest.resolve(row).exists():
            errors.append(f"{where}: file not found: {manifest.resolve(row)}")
        if check_files and row.mask and not (manifest.root / row.mask).is_file():
            errors.append(f"{where}: mask file not found: {manifest.root / row.mask}")
    for subject, splits in sorted(splits_of_subject.items()):
        if len(splits) > 1:
            errors.append(f"subject {subject} appears in several splits ({', '.join(sorted(splits))}): split leakage")
    return ValidationReport(errors, warnings, manifest.summary())

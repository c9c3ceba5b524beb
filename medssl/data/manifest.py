"""The manifest: one CSV row per image or volume, no protected health information.

File layout of a scanned manifest::

    # medssl-manifest v1
    # paths: archive.paths.csv
    id,path,series,format,dims,modality,subject,shape,spacing,split,group,label,mask
    ...

``path`` (and ``mask``) hold opaque file keys; the path map named by ``paths`` (relative to the manifest's folder,
or given with ``--paths`` / ``data.path_map``) gives the archive root and each key's path under it
(:mod:`medssl.data.pathmap`), so the manifest itself holds no file or folder name. Manifests written without a map
(older ones, :func:`write_manifest` without ``path_map``) have a ``# root:`` line instead, relative to the
manifest's own folder (or absolute), and ``path`` relative to that root. A root given on the command line overrides
the one in the file (or in the map). ``mask`` (optional) names a label map for segmentation/detection fine-tuning:
same grid as the image, integer class values (0 background).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from medssl.data.errors import DataError, ManifestError
from medssl.data.pathmap import PathMap, map_wider_than_root, read_path_map, root_escape
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


class RootEscapeError(DataError):
    """A manifest row names a file by a path that could leave the manifest's root (absolute, or with ``..``)."""


def resolve_under_root(root: Path, relative: str, manifest: Path | None = None) -> Path:
    """``root / relative`` for a file that a manifest row names by its path, refusing a path that could leave the root.

    The check is on the text (symbolic links inside the root are followed as the file system does): an absolute path
    (``/x``, ``C:\\x``, ``\\\\server\\x``) or a ``..`` component (with either separator) is refused.

    Args:
        manifest: the manifest file, named in the message.
    Raises:
        RootEscapeError: the message names the path and the manifest.
    """
    reason = root_escape(relative)
    if reason is None:
        return Path(root) / relative
    raise RootEscapeError(
        relative,
        f"refused: {reason} may leave the root {root} of {manifest or 'the manifest'} (rows name files relative to "
        "the root, without '..')",
    )


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
    mask: str = ""  # label map (segmentation/detection): a file key or a relative path, like ``path``

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
        except TypeError:  # csv leaves the columns past the end of a short row as None
            raise ManifestError(f"line {line}: the row has fewer fields than the header") from None
        known = {f.name for f in fields(cls)}
        values = {k: (v or "") for k, v in record.items() if k in known}
        values.update(shape=shape, spacing=spacing, dims=dims)
        return cls(**values)


@dataclass
class Manifest:
    """Rows and where their files are.

    ``root``: the archive root (the command line's, else the path map's or the ``# root:`` line's).
    ``path_map_file``: the path map a keyed manifest names its files through (``None``: ``path`` values are paths
    relative to ``root``); ``path_map``: that map once read (``None`` while the file is missing: resolving a row then
    raises a :class:`ManifestError` saying where the map was expected and how to point at it).
    """

    rows: list[ManifestRow]
    root: Path
    path_map: PathMap | None = None
    path_map_file: Path | None = None
    source: Path | None = None  # the manifest file, for messages

    def resolve(self, row: ManifestRow) -> Path:
        """The file (or series folder) of ``row``."""
        return self.locate(row.path)

    def resolve_mask(self, row: ManifestRow) -> Path:
        """The label map of ``row`` (its ``mask`` column)."""
        return self.locate(row.mask)

    def locate(self, name: str) -> Path:
        """The file a manifest names by ``name`` (a file key through the path map, else a path under the root).

        Raises:
            ManifestError: the manifest names files through a path map that is missing.
            DataError: ``name`` is not in the path map (the message names the key, never a path).
        """
        if self.path_map_file is None:
            return resolve_under_root(self.root, name, self.source)
        if self.path_map is None:
            raise ManifestError(missing_map_message(self.source, self.path_map_file))
        relative = self.path_map.paths.get(name)
        if relative is None:
            raise DataError(name, f"file key not in the path map {self.path_map_file.name}")
        return self.root / relative

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


def missing_map_message(manifest: Path | None, expected: Path) -> str:
    """What to do when a keyed manifest's path map is not where it is expected."""
    return (
        f"{manifest or 'manifest'}: its path map {expected} is missing (the manifest names files by key only). "
        "Point at the map with --paths FILE (medssl manifest validate/preprocess) or data.path_map=FILE "
        "(pretrain, finetune), or scan the archive again"
    )


def write_manifest(path: Path, rows: Sequence[ManifestRow], root: Path | None, path_map: Path | None = None) -> None:
    """Write ``rows`` as given; ``path_map``: they name files by key through that map (written separately, see
    :func:`medssl.data.pathmap.write_path_map`), and the manifest records only where the map is, not ``root``."""
    buffer = io.StringIO()
    if path_map is not None:
        buffer.write(f"{MAGIC}\n# paths: {_relative_root(Path(path_map), path)}\n")
    elif root is not None:
        buffer.write(f"{MAGIC}\n# root: {_relative_root(root, path)}\n")
    else:
        raise ValueError("write_manifest: give the archive root or the path map")
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


def _read_records(path: Path) -> tuple[list[dict[str, str]], list[str], dict[str, str]]:
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    comments: dict[str, str] = {}
    data_lines: list[str] = []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("#"):
                    name, colon, value = line[1:].partition(":")
                    if colon and name.strip() in ("root", "paths"):
                        comments[name.strip()] = value.strip()
                    continue
                data_lines.append(line)
        reader = csv.DictReader(data_lines)
        header = list(reader.fieldnames or [])
        records = list(reader)
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
    except csv.Error as exc:
        raise ManifestError(f"{path}: unreadable CSV ({exc})") from None
    return records, header, comments


def read_manifest_records(path: Path) -> tuple[list[dict[str, str]], list[str], str | None]:
    """Raw records, the header columns and the ``root`` comment, without interpreting values."""
    records, header, comments = _read_records(path)
    return records, header, comments.get("root")


def _beside(manifest: Path, written: str) -> Path:
    return Path(written) if os.path.isabs(written) else manifest.parent / written


def read_manifest(path: str | Path, root: str | Path | None = None, paths: str | Path | None = None) -> Manifest:
    """Read a manifest; ``root`` overrides the root written in the file (or in its path map), ``paths`` the path
    map's location (a manifest given a map names its files by key through it). A missing map is an error only when
    a file is resolved (:meth:`Manifest.locate`): rows and cache lookups work without the archive."""
    path = Path(path)
    records, header, comments = _read_records(path)
    missing = [c for c in ("id", "path", "format", "dims") if c not in header]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}")
    rows = [ManifestRow.from_record(rec, line=i + 2) for i, rec in enumerate(records)]
    if paths is not None or "paths" in comments:
        map_file = Path(paths) if paths is not None else _beside(path, comments["paths"])
        path_map = read_path_map(map_file) if map_file.is_file() else None
        map_root = path_map.root if path_map is not None else path.parent  # unused while the map is missing
        resolved_root = Path(root) if root is not None else map_root
        return Manifest(rows=rows, root=resolved_root, path_map=path_map, path_map_file=map_file, source=path)
    file_root = comments.get("root")
    if root is not None:
        resolved_root = Path(root)
    elif file_root is not None:
        resolved_root = _beside(path, file_root)
    else:
        resolved_root = path.parent
    return Manifest(rows=rows, root=resolved_root, source=path)


@dataclass
class ValidationReport:
    errors: list[str]
    warnings: list[str]
    summary: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


def validate_manifest(
    path: str | Path, root: str | Path | None = None, check_files: bool = True, paths: str | Path | None = None
) -> ValidationReport:
    """Check columns, values, files (through the path map of a keyed manifest), duplicates and split leakage across
    subjects. Messages name rows by line and file key, never by a path that a map keeps private."""
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
    manifest = read_manifest(path, root, paths)
    if check_files and manifest.path_map_file is not None:
        if manifest.path_map is None:
            errors.append(missing_map_message(path, manifest.path_map_file))
            check_files = False
        elif map_wider_than_root(manifest.path_map):
            warnings.append(
                f"{manifest.path_map_file}: the path map is readable by users the archive root does not let in "
                "(chmod go-r it)"
            )
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
        if row.spacing and not all(math.isfinite(s) and s > 0 for s in row.spacing):
            errors.append(f"{where}: spacing must be positive and finite, got {row.spacing}")
        if row.split not in SPLITS:
            errors.append(f"{where}: split {row.split!r} is not one of train, val, test or empty")
        if not row.subject:
            warnings.append(f"{where}: no subject; splits cannot be checked for leakage")
        elif row.split:
            splits_of_subject[row.subject].add(row.split)
        if check_files:
            errors.extend(f"{where}: {problem}" for problem in _file_problems(manifest, row))
    for subject, splits in sorted(splits_of_subject.items()):
        if len(splits) > 1:
            errors.append(f"subject {subject} appears in several splits ({', '.join(sorted(splits))}): split leakage")
    return ValidationReport(errors, warnings, manifest.summary())


def _file_problems(manifest: Manifest, row: ManifestRow) -> list[str]:
    """Missing files of ``row``; the path is shown only for manifests that hold paths themselves."""
    problems = []
    for name, what in ((row.path, "file"), (row.mask, "mask file")):
        if not name:
            continue
        try:
            target = manifest.locate(name)
        except DataError as exc:
            problems.append(f"{what} {name}: {exc.reason}")
            continue
        exists = target.exists() if what == "file" else target.is_file()
        if exists:
            continue
        if manifest.path_map_file is None:
            problems.append(f"{what} not found: {target}")
        else:
            problems.append(
                f"{what} not found: key {name} under the root {manifest.root} (moved? rewrite the root of "
                f"{manifest.path_map_file.name} or pass --root)"
            )
    return problems

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

import contextlib
import csv
import io
import math
import os
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, overload

from medssl.data.compact import StringColumn, ValueColumn
from medssl.data.errors import DataError, ManifestError
from medssl.data.pathmap import PathCursor, PathMap, map_wider_than_root, read_map_root, read_path_map, root_escape
from medssl.runtime.csv_lines import CsvLines, at_record_start
from medssl.runtime.files import atomic_binary

if TYPE_CHECKING:
    import numpy as np

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
    or a ``..`` component is refused, by this machine's rules (:func:`medssl.data.pathmap.root_escape`: on Windows
    also ``C:\\x``, ``\\\\server\\x`` and ``..`` between backslashes; on POSIX a backslash is part of a name).

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
        record = {c: getattr(self, c) for c in COLUMNS}
        record["shape"] = "x".join(str(int(s)) for s in self.shape)
        record["spacing"] = "x".join(f"{float(s):.6g}" for s in self.spacing)
        return {c: "" if v is None else str(v) for c, v in record.items()}

    @classmethod
    def from_record(cls, record: dict[str, str], line: int) -> ManifestRow:
        """The row of a CSV record (``line``: its line, for messages)."""
        try:
            shape = tuple(int(s) for s in record["shape"].split("x")) if record.get("shape") else ()
            spacing = tuple(float(s) for s in record["spacing"].split("x")) if record.get("spacing") else ()
            dims = int(record["dims"])
        except (KeyError, ValueError) as exc:
            raise ManifestError(f"line {line}: bad value for dims/shape/spacing ({exc})") from exc
        except TypeError:  # csv leaves the columns past the end of a short row as None
            raise ManifestError(f"line {line}: the row has fewer fields than the header") from None
        known = _field_names(cls)
        values: dict[str, Any] = {k: v or "" for k, v in record.items() if k in known}
        values.update(shape=shape, spacing=spacing, dims=dims)
        return cls(**values)


class RowTable(Sequence[ManifestRow]):
    """Manifest rows held as columns (:mod:`medssl.data.compact`): about 70 bytes a row (its id and file key, a byte
    or two of code for each value rows repeat) instead of the 700 of a :class:`ManifestRow` and its strings. Indexing
    and iteration give a new :class:`ManifestRow` each time: changing it does not change the table.
    """

    _STRINGS = ("id", "path", "series", "mask")
    _VALUES = ("format", "dims", "modality", "subject", "split", "group", "label", "shape", "spacing")

    __slots__ = ("_strings", "_values")

    def __init__(self, rows: Iterable[ManifestRow] = ()) -> None:
        self._strings = {name: StringColumn() for name in self._STRINGS}
        self._values: dict[str, ValueColumn[Any]] = {name: ValueColumn() for name in self._VALUES}
        for row in rows:
            self.append(row)

    def append(self, row: ManifestRow) -> None:
        for name, strings in self._strings.items():
            strings.append(getattr(row, name))
        for name, values in self._values.items():
            values.append(getattr(row, name))

    def __len__(self) -> int:
        return len(self._strings["id"])

    @overload
    def __getitem__(self, index: int) -> ManifestRow: ...

    @overload
    def __getitem__(self, index: slice) -> list[ManifestRow]: ...

    def __getitem__(self, index: int | slice) -> ManifestRow | list[ManifestRow]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("RowTable index out of range")
        values = {name: column[index] for name, column in self._strings.items()}
        values.update((name, column[index]) for name, column in self._values.items())
        return ManifestRow(**values)

    def __iter__(self) -> Iterator[ManifestRow]:
        names = (*self._strings, *self._values)
        columns = (*self._strings.values(), *self._values.values())
        for values in zip(*columns, strict=True):
            yield ManifestRow(**dict(zip(names, values, strict=True)))

    def column(self, name: str) -> Sequence[Any]:
        """One column (``id``, ``path``, ``dims``, ``split``, ...) as a sequence, without making rows."""
        if name in self._strings:
            return self._strings[name]
        return self._values[name]


@cache
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))


class _DistinctHashes:
    """Distinct 64-bit hashes, added one at a time: kept sorted and unique, with the new ones appended until they are
    as many as the kept ones and then merged in (8 bytes a distinct value, at most twice that while adding): a
    subject's hash a row costs nothing more than its first."""

    __slots__ = ("kept", "new")

    def __init__(self) -> None:
        self.kept: np.ndarray | None = None
        self.new = array("q")

    def add(self, value: int) -> None:
        self.new.append(value)
        if len(self.new) >= max(1024, 0 if self.kept is None else len(self.kept)):
            self._merge()

    def _merge(self) -> None:
        import numpy as np  # here: reading a manifest (the command line) need not load numpy

        fresh = np.frombuffer(self.new, dtype=np.int64) if self.new else np.zeros(0, np.int64)
        merged = fresh if self.kept is None else np.concatenate([self.kept, fresh])
        self.kept = np.unique(merged)
        self.new = array("q")

    def __len__(self) -> int:
        self._merge()
        assert self.kept is not None
        return len(self.kept)


class ManifestCounts:
    """The counts of :meth:`Manifest.summary` (and of a scan's rows as written), added up row by row (rows need not
    be held: subjects are counted by distinct 64-bit hash, 8 bytes a subject)."""

    def __init__(self) -> None:
        self.rows = self.images_2d = self.volumes_3d = 0
        self.subject_hashes = _DistinctHashes()
        self.formats: Counter[str] = Counter()
        self.modalities: Counter[str] = Counter()
        self.splits: Counter[str] = Counter()
        self.groups: Counter[str] = Counter()

    def add(self, row: ManifestRow) -> None:
        self.rows += 1
        self.images_2d += row.dims == 2
        self.volumes_3d += row.dims == 3
        if row.subject:
            self.subject_hashes.add(hash(row.subject))
        self.formats[row.format] += 1
        self.modalities[row.modality] += 1
        self.splits[row.split or "-"] += 1
        self.groups[row.group or "-"] += 1

    def result(self) -> dict[str, object]:
        return {
            "rows": self.rows,
            "images_2d": self.images_2d,
            "volumes_3d": self.volumes_3d,
            "subjects": len(self.subject_hashes),
            "formats": dict(self.formats),
            "modalities": dict(self.modalities),
            "splits": dict(self.splits),
            "groups": dict(self.groups),
        }


def _hash32(value: object) -> int:
    """A 32-bit hash of ``value`` (for :func:`_repeated`: 4 bytes a row)."""
    return hash(value) & 0xFFFFFFFF


def _repeated(hashes: array) -> set[int]:
    """The values that occur more than once in ``hashes`` (``array("I")`` or ``array("q")``), found by sorting
    ``hashes`` in place (its order is lost): a bit a value beside it, not the copies, indices and counts of
    ``np.unique``."""
    import numpy as np  # here: reading a manifest (the command line) need not load numpy

    if len(hashes) < 2:
        return set()
    values = np.frombuffer(hashes, dtype=np.uint32 if hashes.typecode == "I" else np.int64)  # a view, sorted in place
    try:
        values.sort()
        return set(np.unique(values[1:][values[1:] == values[:-1]]).tolist())
    finally:
        del values  # no view of the array is left


@dataclass
class Manifest:
    """Rows and where their files are.

    ``root``: the archive root (the command line's, else the path map's or the ``# root:`` line's).
    ``path_map_file``: the path map a keyed manifest names its files through (``None``: ``path`` values are paths
    relative to ``root``); ``path_map``: that map, read on first use (``None`` while the file is missing: resolving a
    row then raises a :class:`ManifestError` saying where the map was expected and how to point at it);
    :meth:`locator` reads it in step with the rows instead. ``map_root``: the root the map's own line names.
    """

    rows: Sequence[ManifestRow] | StreamedRows  # a RowTable when read from a file (StreamedRows: not held)
    root: Path
    path_map_file: Path | None = None
    source: Path | None = None  # the manifest file, for messages
    map_root: Path | None = None  # the root the path map names (``root`` unless --root / data.root overrode it)
    _path_map: PathMap | None = field(default=None, repr=False)

    @property
    def path_map(self) -> PathMap | None:
        """The path map, read on first use (a run that reads only the cache never reads it); ``None`` while its file
        is missing (or for a manifest without one)."""
        if self._path_map is None and self.path_map_file is not None and self.path_map_file.is_file():
            self._path_map = read_path_map(self.path_map_file)
        return self._path_map

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

    def locator(self) -> Callable[[str], Path]:
        """:meth:`locate` for names asked in the order of the rows (a cache build): a keyed manifest reads its path map
        in step with them (:class:`medssl.data.pathmap.PathCursor`) instead of holding it."""
        if self.path_map_file is None or self._path_map is not None or not self.path_map_file.is_file():
            return self.locate
        cursor = PathCursor(self.path_map_file)
        return lambda name: _locate(self, name, cursor)

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self) -> dict[str, object]:
        """Counts only (no identifiers): safe to print and to log to an experiment tracker."""
        counts = ManifestCounts()
        for row in self.rows:
            counts.add(row)
        return counts.result()


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


def write_manifest(path: Path, rows: Iterable[ManifestRow], root: Path | None, path_map: Path | None = None) -> None:
    """Write ``rows`` as given (iterated once, one row at a time); ``path_map``: they name files by key through that
    map (written separately, see :func:`medssl.data.pathmap.write_path_map`), and the manifest records only where
    the map is, not ``root``."""
    if path_map is not None:
        preamble = f"{MAGIC}\n# paths: {_relative_root(Path(path_map), path)}\n"
    elif root is not None:
        preamble = f"{MAGIC}\n# root: {_relative_root(root, path)}\n"
    else:
        raise ValueError("write_manifest: give the archive root or the path map")

    def write(text: TextIO) -> None:
        text.write(preamble)
        writer = CsvLines(text)  # a "\r" in a label is quoted, not read back as a line break
        writer.writerow(COLUMNS)
        for row in rows:
            record = row.to_record()
            writer.writerow([record[column] for column in COLUMNS])

    write_text_atomically(path, write)


def write_csv(path: Path, header: Sequence[str], records: Iterable[Sequence[object]]) -> None:
    def write(text: TextIO) -> None:
        writer = CsvLines(text)
        writer.writerow(header)
        writer.writerows(records)

    write_text_atomically(path, write)


def write_text_atomically(path: Path, write: Callable[[TextIO], None]) -> None:
    """``write(text)`` into ``path`` atomically (:func:`medssl.runtime.files.atomic_binary`), as UTF-8 with newlines
    as written, without holding the whole text (a manifest of 100,000 rows is 15 MB)."""
    with atomic_binary(Path(path)) as handle:
        text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
        try:
            write(text)
        finally:
            text.detach()  # flushes; atomic_binary closes (and renames) the file


@dataclass
class _RecordStream:
    """A manifest's CSV records read one at a time: ``header`` (its columns), ``records`` (dicts, consumed once) and
    ``comments`` (``root``/``paths`` lines, filled as the lines are read: those above the header are there once the
    header is)."""

    header: list[str]
    records: Iterator[dict[str, str]]
    comments: dict[str, str]
    lines: Iterator[str]  # the data lines under ``records``: draining it reads the remaining comments only

    def rows(self) -> Iterator[ManifestRow]:
        """The rows, one at a time."""
        for line, record in enumerate(self.records, start=2):
            yield ManifestRow.from_record(record, line)


@contextlib.contextmanager
def _record_stream(path: Path) -> Iterator[_RecordStream]:
    """Open a manifest for reading record by record.

    Raises:
        ManifestError: no such file, not UTF-8 text, or unreadable CSV (also while the records are being read).
    """
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    comments: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            lines = _data_lines(handle, comments)
            reader = csv.DictReader(lines)
            yield _RecordStream(list(reader.fieldnames or []), reader, comments, lines)
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
    except csv.Error as exc:
        raise ManifestError(f"{path}: unreadable CSV ({exc})") from None


def _data_lines(lines: Iterable[str], comments: dict[str, str]) -> Iterator[str]:
    """The lines that are not comments; ``# root:`` and ``# paths:`` values go to ``comments``. A line that continues
    a quoted field (a label holding ``"\\r#"``) is data, whatever it starts with."""
    for record_start, line in at_record_start(lines):
        if record_start and line.startswith("#"):
            name, colon, value = line[1:].partition(":")
            if colon and name.strip() in ("root", "paths"):
                comments[name.strip()] = value.strip()
            continue
        yield line


def _read_records(path: Path) -> tuple[list[dict[str, str]], list[str], dict[str, str]]:
    with _record_stream(path) as stream:
        records = list(stream.records)
        return records, stream.header, stream.comments


def _header_and_comments(path: Path) -> tuple[list[str], dict[str, str]]:
    """The columns and the ``root``/``paths`` comments of a manifest, without reading its records."""
    with _record_stream(path) as stream:
        for _ in stream.lines:
            pass
        return stream.header, stream.comments


def read_manifest_records(path: Path) -> tuple[list[dict[str, str]], list[str], str | None]:
    """Raw records, the header columns and the ``root`` comment, without interpreting values."""
    records, header, comments = _read_records(path)
    return records, header, comments.get("root")


def _beside(manifest: Path, written: str) -> Path:
    return Path(written) if os.path.isabs(written) else manifest.parent / written


def read_manifest(
    path: str | Path, root: str | Path | None = None, paths: str | Path | None = None, hold_rows: bool = True
) -> Manifest:
    """Read a manifest; ``root`` overrides the root written in the file (or in its path map), ``paths`` the path
    map's location (a manifest given a map names its files by key through it). A missing map is an error only when
    a file is resolved (:meth:`Manifest.locate`): rows and cache lookups work without the archive.

    The file is read a line at a time into a :class:`RowTable` (columns, about 100 bytes a row); the path map is
    read only when a file is located. ``hold_rows=False`` (the cache build, which only passes over the rows) reads
    the header and comments now and the rows each time they are iterated (:class:`StreamedRows`): nothing a row is
    held."""
    path = Path(path)
    if not hold_rows:  # the header and the comments (a ``# paths:`` line may come last) now, the rows when iterated
        header, comments = _header_and_comments(path)
        _check_columns(path, header)
        return _located(path, StreamedRows(path), comments, root, paths)
    with _record_stream(path) as stream:
        _check_columns(path, stream.header)
        rows = RowTable(stream.rows())
        comments = stream.comments
    return _located(path, rows, comments, root, paths)


def _check_columns(path: Path, header: Sequence[str]) -> None:
    """Raises :class:`ManifestError` when ``header`` lacks a column every manifest has."""
    missing = [c for c in ("id", "path", "format", "dims") if c not in header]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}")


class StreamedRows(Collection[ManifestRow]):
    """A manifest file's rows, read from the file each time they are iterated (one :class:`ManifestRow` at a time,
    none held): for the passes of a cache build over a manifest of any size. ``len`` reads the file once.

    Raises (while iterated):
        ManifestError: the file changed into something unreadable since it was opened (see :func:`read_manifest`).
    """

    __slots__ = ("_length", "path")

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._length: int | None = None

    def __iter__(self) -> Iterator[ManifestRow]:
        count = 0
        with _record_stream(self.path) as stream:
            for row in stream.rows():
                count += 1
                yield row
        self._length = count

    def __len__(self) -> int:
        if self._length is None:
            self._length = sum(1 for _ in self)
        return self._length

    def __contains__(self, row: object) -> bool:
        return any(row == mine for mine in self)


def _located(
    path: Path,
    rows: RowTable | StreamedRows,
    comments: dict[str, str],
    root: str | Path | None,
    paths: str | Path | None,
) -> Manifest:
    """The :class:`Manifest` of ``rows`` read from ``path``: its root and path map from ``comments``, or from the
    ``root`` and ``paths`` given (which win)."""
    if paths is not None or "paths" in comments:
        map_file = Path(paths) if paths is not None else _beside(path, comments["paths"])
        # the map's root line only: its entries are read when a file is first located
        map_root = read_map_root(map_file) if map_file.is_file() else None
        resolved_root = Path(root) if root is not None else map_root or path.parent  # unused while the map is missing
        return Manifest(rows=rows, root=resolved_root, path_map_file=map_file, source=path, map_root=map_root)
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
    subjects. Messages name rows by line and file key, never by a path that a map keeps private.

    The rows are checked as they are read, never all held: duplicates are found from 32-bit hashes (4 bytes a row
    each for ids and files) and leakage from a hash a subject, and confirmed, with their values, by a second read
    when some hash repeats (a hash collision is a suspect that the second read clears)."""
    path = Path(path)
    errors: list[str] = []
    warnings: list[str] = []
    header, comments = _header_and_comments(path)
    missing = [c for c in COLUMNS if c not in header and c not in OPTIONAL_COLUMNS]
    if missing:
        errors.append(f"{path}: missing column(s): {', '.join(missing)}")
        return ValidationReport(errors, warnings)
    unknown = [c for c in header if c not in COLUMNS]
    if unknown:
        warnings.append(f"{path}: extra column(s) ignored: {', '.join(unknown)}")
    manifest = _located(path, [], comments, root, paths)  # where the files are; the rows are streamed
    if check_files and manifest.path_map_file is not None:
        if manifest.map_root is None:
            errors.append(missing_map_message(path, manifest.path_map_file))
            check_files = False
        elif map_wider_than_root(manifest.path_map_file, manifest.map_root):
            warnings.append(
                f"{manifest.path_map_file}: the path map is readable by users the archive root does not let in "
                "(chmod go-r it)"
            )
    checks = _RowChecks(manifest if check_files else None)
    with _record_stream(path) as stream:
        for line, row in enumerate(stream.rows(), start=2):
            checks.add(line, row)
    checks.finish()
    if not checks.summary.rows:
        errors.append(f"{path}: manifest has no rows")
    errors.extend(checks.repeats(path))
    errors.extend(checks.errors)
    errors.extend(checks.leakage(path))
    warnings.extend(checks.warnings)
    return ValidationReport(errors, warnings, checks.summary.result())


_SPLIT_BITS = {"train": 1, "val": 2, "test": 4}
_OTHER_SPLIT = 8  # a split name that is none of the above (already an error): leakage is then checked by name


class _RowChecks:
    """:func:`validate_manifest`'s checks of rows streamed one at a time.

    Per row: values (``errors``, ``warnings``, in row order) and files (``files``: the manifest that locates them, or
    None). Across rows, without holding them: 32-bit hashes ``[N]`` of ids and of (path, series), and per subject
    (hash) the bit set of its splits; :meth:`repeats` and :meth:`leakage` name the values by reading the manifest
    again, only when some hash repeats or some subject has several splits.
    """

    def __init__(self, files: Manifest | None) -> None:
        self.files = files
        # a keyed manifest's files are looked up in the map as the rows come (both in key order): one entry held
        self.cursor = PathCursor(files.path_map_file) if files is not None and files.path_map_file else None
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.summary = ManifestCounts()
        self.id_hashes = array("I")  # 32-bit: a collision is only a suspect, confirmed or not by a second read
        self.key_hashes = array("I")
        self.split_bits: dict[int, int] = {}

    def add(self, line: int, row: ManifestRow) -> None:
        """Check one row (``line``: its line in the file, for messages)."""
        self.summary.add(row)
        self.id_hashes.append(_hash32(row.id))
        self.key_hashes.append(_hash32(_file_name(row)))
        where = f"line {line} ({row.path})"
        self.errors.extend(f"{where}: {problem}" for problem in _value_problems(row))
        if not row.subject:
            self.warnings.append(f"{where}: no subject; splits cannot be checked for leakage")
        elif row.split:
            subject = hash(row.subject)
            self.split_bits[subject] = self.split_bits.get(subject, 0) | _SPLIT_BITS.get(row.split, _OTHER_SPLIT)
        if self.files is not None:
            self.errors.extend(f"{where}: {problem}" for problem in _file_problems(self.files, row, self.cursor))

    def finish(self) -> None:
        """After the last row: the map entries no row named are read too (a bad entry anywhere is an error)."""
        if self.cursor is not None:
            self.cursor.finish()

    def repeats(self, path: Path) -> list[str]:
        """Duplicate ids, then files listed more than once, each in the order of its first row."""
        ids, names = _repeated(self.id_hashes), _repeated(self.key_hashes)
        if not ids and not names:
            return []
        id_counts: Counter[str] = Counter()
        name_counts: Counter[str | tuple[str, str]] = Counter()
        for row in _stream_rows(path):  # again, for the values behind the repeated hashes
            if _hash32(row.id) in ids:
                id_counts[row.id] += 1
            name = _file_name(row)
            if _hash32(name) in names:
                name_counts[name] += 1
        problems = [f"duplicate id {ident!r} ({count} rows)" for ident, count in id_counts.items() if count > 1]
        for name, count in name_counts.items():
            if count > 1:
                rel, series = (name, "") if isinstance(name, str) else name
                problems.append(f"{rel}: listed {count} times" + (f" (series {series})" if series else ""))
        return problems

    def leakage(self, path: Path) -> list[str]:
        """Subjects with rows in several splits, by subject."""
        suspects = {h for h, bits in self.split_bits.items() if bits & _OTHER_SPLIT or bits & (bits - 1)}
        if not suspects:
            return []
        splits_of_subject: dict[str, set[str]] = defaultdict(set)
        for row in _stream_rows(path):
            if row.subject and row.split and hash(row.subject) in suspects:
                splits_of_subject[row.subject].add(row.split)
        return [
            f"subject {subject} appears in several splits ({', '.join(sorted(splits))}): split leakage"
            for subject, splits in sorted(splits_of_subject.items())
            if len(splits) > 1
        ]


def _file_name(row: ManifestRow) -> str | tuple[str, str]:
    """What makes a row's file unique: its path, with its series when it has one (no tuple a row otherwise)."""
    return (row.path, row.series) if row.series else row.path


def _stream_rows(path: Path) -> Iterator[ManifestRow]:
    with _record_stream(path) as stream:
        yield from stream.rows()


def _value_problems(row: ManifestRow) -> list[str]:
    """What is wrong with the values of ``row`` (empty id, unknown format or split, dims, shape, spacing)."""
    problems = []
    if not row.id:
        problems.append("empty id")
    if row.format not in FORMATS:
        problems.append(f"format {row.format!r} is not one of {', '.join(FORMATS)}")
    if row.dims not in (2, 3):
        problems.append(f"dims must be 2 or 3, got {row.dims}")
    elif row.shape and len(row.shape) != row.dims:
        problems.append(f"shape {row.shape} does not have {row.dims} dimensions")
    if row.spacing and not all(math.isfinite(s) and s > 0 for s in row.spacing):
        problems.append(f"spacing must be positive and finite, got {row.spacing}")
    if row.split not in SPLITS:
        problems.append(f"split {row.split!r} is not one of train, val, test or empty")
    return problems


def _file_problems(manifest: Manifest, row: ManifestRow, cursor: PathCursor | None = None) -> list[str]:
    """Missing files of ``row`` (``cursor``: the path map read in step with the rows); the path is shown only for
    manifests that hold paths themselves (a keyed one names the file by its key and the root by a phrase: the root may
    be named after a patient too)."""
    problems = []
    for name, what in ((row.path, "file"), (row.mask, "mask file")):
        if not name:
            continue
        try:  # a string, not a Path: a Path a file fills pathlib's table of interned strings with its parts
            if cursor is None:
                target = str(manifest.locate(name))
            else:
                target = os.path.join(manifest.root, _mapped(name, cursor))
        except DataError as exc:
            problems.append(f"{what} {name}: {exc.reason}")
            continue
        exists = os.path.exists(target) if what == "file" else os.path.isfile(target)
        if exists:
            continue
        if manifest.path_map_file is None:
            problems.append(f"{what} not found: {target}")
        else:  # the root may be named after a patient (a one-patient PACS export): never printed, like the paths
            given = manifest.map_root is None or Path(manifest.root) != Path(manifest.map_root)
            where = "the root given (--root)" if given else "the path map's root"
            problems.append(
                f"{what} not found: key {name} under {where} (moved? rewrite the root of "
                f"{manifest.path_map_file.name} with `medssl manifest relocate` or pass --root)"
            )
    return problems


def _locate(manifest: Manifest, name: str, cursor: PathCursor | None) -> Path:
    """:meth:`Manifest.locate` through ``cursor`` where there is one (a keyed manifest's rows in order)."""
    return manifest.locate(name) if cursor is None else manifest.root / _mapped(name, cursor)


def _mapped(name: str, cursor: PathCursor) -> str:
    """The relative path ``cursor`` gives the file key ``name``.

    Raises:
        DataError: the map has no such key (the message names the key, never a path).
    """
    relative = cursor.get(name)
    if relative is None:
        raise DataError(name, f"file key not in the path map {cursor.path.name}")
    return relative

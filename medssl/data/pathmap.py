"""The path map: where each file of a manifest is, kept apart from the manifest.

Folder and file names in hospital archives often hold a patient's name, ID or study date (PACS exports:
``DOE^JANE_123456/20240101_CT/...``). For DICOM the scanner could compare paths with the header, but for NIfTI,
PNG or JPEG files nothing tells whether a folder name is a person's name. So a scanned manifest never holds a path:
its ``path`` and ``mask`` columns hold **file keys**, keyed hashes (HMAC with the pseudonymisation salt) of the path
relative to the archive root, and the map from key to relative path lives in a separate file::

    # medssl-paths v1
    # root: ../archive        <- the archive root, relative to this file's folder (or absolute)
    key,path
    p3f0c...,DOE^JANE_123456/20240101_CT
    ...

The map (``<manifest stem>.paths.csv`` beside the manifest unless ``--paths`` says otherwise) is written atomically
with permissions no wider than the archive's own: readable by the group and others only when the archive root and
every mapped file are, never writable by them. It also lists the files the scan could not use, under the keys the
errors CSV names them by. Keys depend on the relative path and the salt only: moving the archive changes nothing
but the map's ``root`` line (or pass ``--root`` / ``data.root``); the manifest, the cache and its keys stay as they
are. The map is read only to open files (:meth:`medssl.data.manifest.Manifest.locate`) and to check or move them
(``validate``, ``relocate``); it is never logged or copied into a run, a cache or a bundle.
"""

from __future__ import annotations

import csv
import heapq
import io
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from medssl.data.compact import DuplicateKeyError, StringMap, sorted_pairs
from medssl.data.errors import ManifestError
from medssl.data.pseudonym import pseudonym
from medssl.runtime.csv_lines import CsvLines, at_record_start
from medssl.runtime.files import atomic_binary

PATHS_MAGIC = "# medssl-paths v1"
PATHS_SUFFIX = ".paths.csv"
KEY_PREFIX = "p"


def file_key(relative_path: str, salt: str) -> str:
    """The opaque key of a file or series folder: a keyed hash of its path relative to the archive root.

    >>> file_key("DOE^JANE/ct", "s") == file_key("DOE^JANE/ct", "s") != file_key("DOE^JANE/mr", "s")
    True
    """
    return pseudonym(f"path:{relative_path}", salt, prefix=KEY_PREFIX, length=20)


def default_map_path(manifest: Path) -> Path:
    """``<manifest stem>.paths.csv`` beside the manifest."""
    manifest = Path(manifest)
    return manifest.with_name(manifest.name.removesuffix(".csv") + PATHS_SUFFIX)


@dataclass(frozen=True)
class PathMap:
    """A read path map: the archive root it names and ``key -> path relative to the root`` (a
    :class:`medssl.data.compact.StringMap` when read from a file: about 80 bytes an entry, not 250)."""

    file: Path
    root: Path
    paths: Mapping[str, str]

    def __len__(self) -> int:
        return len(self.paths)


WINDOWS_PATHS = os.name == "nt"
"""Whether this machine reads ``\\`` as a separator and ``C:`` as a drive (what :func:`root_escape` checks by
default)."""


def root_escape(relative: str, windows: bool = WINDOWS_PATHS) -> str | None:
    """Why ``relative`` could name a file outside its root on the machine that opens it, on the text alone: ``an
    absolute path`` or ``a path with a '..' component``, else None.

    POSIX (``windows=False``): a leading ``/`` or a ``..`` between ``/``. A backslash and a colon are ordinary
    characters of a name there (a file may be called ``\\x.png`` or ``C:x.png``), so such a path stays under the root.
    Windows: also ``C:\\x``, ``C:x``, ``\\\\server\\x`` and a ``..`` between either separator (what
    ``PureWindowsPath`` would say). Each machine checks what its own file system would do, so a manifest made on one
    and read on the other is refused there when it would leave the root.

    Worked on the string, not by making a ``Path``: a map of 100,000 entries would fill pathlib's table of interned
    strings with every part."""
    first = relative[:1]
    if windows:
        if first in ("/", "\\") or (relative[1:2] == ":" and first.isascii() and first.isalpha()):  # a root, a drive
            return "an absolute path"
        if ".." in relative.replace("\\", "/").split("/"):
            return "a path with a '..' component"
        return None
    if first == "/":
        return "an absolute path"
    if ".." in relative.split("/"):
        return "a path with a '..' component"
    return None


def _check_relative(relative: str, where: str) -> None:
    """Refuse an entry that could leave the root (empty, or :func:`root_escape`) or that no file system can hold (a
    NUL character); the message never quotes it."""
    if not relative or "\x00" in relative or root_escape(relative) is not None:
        raise ManifestError(f"{where}: paths must be relative to the root, without '..' (found a bad entry)")


class _MapFile:
    """A path map read line by line: :meth:`records` gives its entries as they are read (the file is never held
    whole), :attr:`root` its ``# root:`` line once they all were (a comment line may come anywhere)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.root: str | None = None
        self.line = 1  # the file's line of the last CSV line read: where the CSV reader is (a quoted field may span
        # lines: its last one)

    def _csv_lines(self, handle: TextIO) -> Iterator[str]:
        """The lines after the first that are not comments; keeps the ``root`` line and :attr:`line`."""
        for number, (record_start, text) in enumerate(at_record_start(handle), start=2):
            if record_start and text.startswith("#"):  # not the continuation of a quoted path holding "\r#"
                if text.startswith("# root:"):
                    self.root = text.split(":", 1)[1].strip()
                continue
            self.line = number
            yield text

    def records(self) -> Iterator[tuple[int, str, str]]:
        """``(line, key, relative path)`` of every entry, each checked on its own (the repeated key and the ``root``
        line are :func:`read_path_map`'s checks).

        Raises:
            ManifestError: see :func:`read_path_map`.
        """
        path = self.path
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                if handle.readline().rstrip("\r\n") != PATHS_MAGIC:
                    raise ManifestError(f"{path}: not a medssl path map (first line is not {PATHS_MAGIC!r})")
                reader = csv.DictReader(self._csv_lines(handle))
                try:
                    if reader.fieldnames is None or not {"key", "path"} <= set(reader.fieldnames):
                        raise ManifestError(f"{path}: a path map needs the columns key,path")
                    for record in reader:
                        key, relative, where = record["key"], record["path"], f"{path}:{self.line}"
                        if key is None or relative is None:  # csv gives None for the fields past a short row's end
                            raise ManifestError(f"{where}: the row has fewer fields than the header key,path")
                        if not key:
                            raise ManifestError(f"{where}: empty key")
                        _check_relative(relative, where)
                        yield self.line, key, relative
                except csv.Error as exc:
                    raise ManifestError(f"{path}:{self.line}: unreadable CSV ({exc})") from None
        except UnicodeDecodeError as exc:
            raise ManifestError(f"{path}: not a UTF-8 text file ({exc.reason})") from None


def read_path_map(path: Path) -> PathMap:
    """Read a path map line by line (never the whole file at once); its ``root`` is resolved against the map's
    folder.

    Raises:
        ManifestError: the file is not a path map (not UTF-8, not CSV, no ``root`` line, no ``key,path`` header), a
            key is empty or repeated, or an entry is not a plain relative path. Messages name the map and the line,
            never quote an entry (they are the private part). The first problem met in reading is the one reported
            (bytes that are not UTF-8 are met when the block of the file holding them is decoded).
    """
    path = Path(path)
    source = _MapFile(path)
    try:
        paths = StringMap.from_pairs((key, relative) for _, key, relative in source.records())
    except DuplicateKeyError as exc:  # its lines: found by reading again, rather than kept for every entry
        first, again = ([n for n, k, _ in _MapFile(path).records() if k == exc.args[0]] + [0, 0])[:2]
        raise ManifestError(f"{path}:{again}: the key on this line is also on line {first}") from None
    root = source.root
    if root is None:
        raise ManifestError(f"{path}: no '# root:' line (the archive root, relative to this file or absolute)")
    return PathMap(file=path, root=_resolved_root(path, root), paths=paths)


def read_map_root(path: Path) -> Path:
    """The archive root a path map names (resolved against the map's folder), from the lines above its header: the
    entries are not read (the whole map is, through :func:`read_path_map`, where the root line is not up there).

    Raises:
        ManifestError: see :func:`read_path_map`.
    """
    path = Path(path)
    root: str | None = None
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            if handle.readline().rstrip("\r\n") != PATHS_MAGIC:
                raise ManifestError(f"{path}: not a medssl path map (first line is not {PATHS_MAGIC!r})")
            for line in handle:
                if not line.startswith("#"):
                    break
                if line.startswith("# root:"):
                    root = line.split(":", 1)[1].strip()
                    break
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
    if root is None:
        return read_path_map(path).root
    return _resolved_root(path, root)


def _resolved_root(path: Path, root: str) -> Path:
    """The map's ``# root:`` value against the map's folder (refusing a NUL)."""
    if "\x00" in root:
        raise ManifestError(f"{path}: the '# root:' line holds a NUL character")
    return Path(root) if os.path.isabs(root) else path.parent / root


def private_mode(root: Path, relatives: Iterable[str] = ()) -> tuple[int, int | None]:
    """Permission bits and group for a file that names the archive's files: no wider than the archive's own.

    Owner read/write; group (and others) read only when the root folder is readable and searchable by them and
    every listed file or folder is readable by them; nobody else ever writes. Returns ``(mode, group id)``; the group
    is the root folder's (``None`` where the platform has no groups).
    """
    root_stat = Path(root).stat()
    mode = stat.S_IRUSR | stat.S_IWUSR
    for read, search in ((stat.S_IRGRP, stat.S_IXGRP), (stat.S_IROTH, stat.S_IXOTH)):
        if root_stat.st_mode & read and root_stat.st_mode & search:
            mode |= read
    for relative in relatives:
        if not mode & (stat.S_IRGRP | stat.S_IROTH):
            break
        try:
            file_mode = os.stat(os.path.join(root, relative)).st_mode  # not a Path: no interned parts
        except OSError:  # vanished since the scan: it grants nothing
            continue
        mode &= file_mode | stat.S_IRUSR | stat.S_IWUSR
    group = root_stat.st_gid if hasattr(os, "getgid") else None
    return mode, group


def write_path_map(path: Path, root: Path, paths: Mapping[str, str] | MapEntries) -> Path:
    """Write the map of ``paths`` (key -> path relative to ``root``) atomically, with :func:`private_mode`, as a
    stream (never the whole text at once).

    ``root`` is written relative to the map's folder when it can be (else absolute). An entry that is not a plain
    relative path stops the write before the file is replaced.
    """
    path = Path(path)
    try:
        written_root = os.path.relpath(Path(root).resolve(), path.resolve().parent)
    except ValueError:  # another drive on Windows
        written_root = str(Path(root).resolve())
    mode, group = private_mode(root, (relative for _, relative in sorted_pairs(paths)))
    with atomic_binary(path, mode=mode, group=group) as handle:
        text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
        try:
            text.write(f"{PATHS_MAGIC}\n# root: {written_root}\n")
            writer = CsvLines(text)  # a "\r" in a path is quoted, not read back as a line break
            writer.writerow(("key", "path"))
            for key, relative in sorted_pairs(paths):
                _check_relative(relative, str(path))
                writer.writerow((key, relative))
        finally:
            text.detach()  # flushes; atomic_binary closes (and renames) the file
    return path


def rewrite_root(path: Path, root: Path) -> Path:
    """Point an existing map at a moved archive: the same keys and relative paths under the new ``root``."""
    return write_path_map(path, root, read_path_map(path).paths)


class PathCursor:
    """``key -> relative path`` for keys asked in ascending order, read from the map file in step with them: a
    scanned manifest and its map are both in key order, so checking every row's file holds one entry of the map, not
    the map. A key asked out of order (a mask's, or a manifest sorted otherwise), a key the map does not have where
    it would be, or a map not in key order, reads the whole map once (:func:`read_path_map`) and answers from it.

    Raises (from :meth:`get`):
        ManifestError: the map is not a path map, or has a bad or repeated entry (see :func:`read_path_map`).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._records = _MapFile(self.path).records()
        self._key: str | None = None  # the entry the map file is at
        self._asked: str | None = None  # the last key asked
        self._value = ""
        self._ended = False
        self._whole: Mapping[str, str] | None = None

    def get(self, key: str) -> str | None:
        """The relative path of ``key``, or None where the map has no such key."""
        if self._whole is None and self._asked is not None and key < self._asked:
            self._whole = read_path_map(self.path).paths  # asked out of order: answer from the whole map
        if self._whole is not None:
            return self._whole.get(key)
        self._asked = key
        while not self._ended and (self._key is None or self._key < key):
            entry = next(self._records, None)
            if entry is None:
                self._ended = True
                break
            _, entry_key, relative = entry
            if self._key is not None and entry_key <= self._key:  # the map is not in key order (or repeats a key)
                self._whole = read_path_map(self.path).paths
                return self._whole.get(key)
            self._key, self._value = entry_key, relative
        if self._key == key:
            return self._value
        self._whole = read_path_map(self.path).paths  # not here: sure only from the whole map (which may be unsorted)
        return self._whole.get(key)

    def finish(self) -> None:
        """Read (and check) the entries not asked for, so that a bad or repeated entry anywhere in the map is found
        (then no more lookups)."""
        if self._whole is not None:
            return
        for _, entry_key, _ in self._records:
            if self._key is not None and entry_key <= self._key:  # not in key order: the whole map's own checks
                read_path_map(self.path)
                return
            self._key = entry_key
        self._ended = True

    @property
    def whole_map_read(self) -> bool:
        """Whether a key out of order made it read the whole map."""
        return self._whole is not None


def map_wider_than_root(map_file: Path, root: Path) -> bool:
    """Whether the map file can be read by users the archive ``root`` does not let in (a warning for ``validate``)."""
    try:
        wanted, _ = private_mode(root)
        actual = Path(map_file).stat().st_mode
    except OSError:
        return False
    return bool(actual & (stat.S_IRGRP | stat.S_IROTH) & ~wanted)


class MapEntries:
    """The ``(key, relative path)`` entries of a scan's path map, made in key order each time they are iterated from
    what the scan holds anyway (its rows' file keys and relative paths, and their order): the map is written from
    them without a copy of its own (:func:`write_path_map`). A key given twice with the same path is one entry.

    Raises (while iterated):
        ManifestError: two different paths share one key (an 80-bit collision: never expected, never silent).
    """

    def __init__(self, sources: Callable[[], Sequence[Iterable[tuple[str, str]]]]) -> None:
        self._sources = sources  # each source in key order

    def pairs(self) -> Iterator[tuple[str, str]]:
        last_key, last_path = None, ""
        for key, relative in heapq.merge(*self._sources()):
            if key == last_key:
                if relative != last_path:
                    raise ManifestError("two paths share one file key; scan again with another salt")
                continue
            yield key, relative
            last_key, last_path = key, relative

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self.pairs())

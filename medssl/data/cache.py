"""On-disk cache of preprocessed arrays, keyed by content hash and preprocessing settings.

Layout::

    <cache>/file_hashes.json                      # (device, inode) -> (size, mtime, content digest) memo; no paths
    <cache>/<settings>/settings.json              # the PreprocessConfig that made the entries
    <cache>/<settings>/<key>.npy                  # float16/uint8 [C, X, Y, Z] or [C, H, W]
    <cache>/<settings>/<key>.json                 # geometry + per-slice foreground (no identifiers)
    <cache>/<settings>/index/<manifest>.csv       # one line a manifest row: its id and key (empty: failed)
    <cache>/<settings>/index/<manifest>.errors.csv  # the failures: file key and reason

Every file is written to a temporary name and renamed, and an entry's ``.json`` is written
after its ``.npy``: an interrupted build leaves no partial entry, and the next build only
builds what is missing (the manifest may have grown). Nothing in the cache names a file: entries are keyed by
content, indexes by manifest row id, failures by the name the manifest gives the file (its file key, see
:mod:`medssl.data.pathmap`), and the digest memo by device and inode number. Moving the archive therefore keeps
every entry (the files are hashed again, not preprocessed again).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import multiprocessing
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medssl.data.dicom import DICOM_SUFFIXES, looks_like_dicom
from medssl.data.errors import DataError
from medssl.data.manifest import Manifest, ManifestRow, RowTable, write_csv
from medssl.data.preprocess import CT_MODALITIES, PreprocessConfig, preprocess
from medssl.data.readers import read_row
from medssl.runtime.csv_lines import CsvLines
from medssl.runtime.files import atomic_write_text, atomic_write_with, remove_stale_temporaries
from medssl.runtime.preflight import check_room
from medssl.runtime.progress import progress as progress_of

CACHE_FORMAT_VERSION = 2  # 2: resampling repeats the border instead of 0 past the last voxel (preprocess._resample)


def settings_digest(config: PreprocessConfig) -> str:
    payload = json.dumps({"version": CACHE_FORMAT_VERSION, **config.to_dict()}, sort_keys=True)
    return hashlib.blake2b(payload.encode(), digest_size=6).hexdigest()


def manifest_digest(rows: Iterable[ManifestRow]) -> str:
    """Digest of what decides the cached content (not labels or splits)."""
    h = hashlib.blake2b(digest_size=8)
    for row in rows:
        h.update(f"{row.id}|{row.path}|{row.series}|{row.format}|{row.dims}|{row.modality}\n".encode())
    return h.hexdigest()


def source_files(row: ManifestRow, path: Path) -> list[Path]:
    """The files whose bytes make up a row (all DICOM files of a series' folder)."""
    if not path.exists():
        raise DataError(path, "file not found (moved or deleted since the scan?)")
    if row.format != "dicom_series":
        return [path]
    files = sorted(
        p for p in path.iterdir() if p.is_file() and (p.suffix.lower() in DICOM_SUFFIXES or looks_like_dicom(p))
    )
    if not files:
        raise DataError(path, "series folder holds no DICOM file")
    return files


class FileDigests:
    """Content digests of files, memoised on (size, mtime) so unchanged files are not re-read.

    The memo is keyed by ``device:inode``, never by path (paths may name patients); entries of older memos, which
    were keyed by path, are dropped on reading.
    """

    def __init__(self, memo_path: Path) -> None:
        self.memo_path = memo_path
        self.memo: dict[str, list[Any]] = {}
        self.changed = False
        if memo_path.is_file():
            try:
                memo = json.loads(memo_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, OSError):
                memo = {}
            memo = memo if isinstance(memo, dict) else {}
            self.memo = {k: v for k, v in memo.items() if _is_inode_key(k)}
            self.changed = len(self.memo) != len(memo)  # rewritten without the old entries

    def digest(self, path: Path) -> str:
        stat = path.stat()
        key = f"{stat.st_dev}:{stat.st_ino}" if stat.st_ino else ""
        cached = self.memo.get(key) if key else None
        if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
            return str(cached[2])
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
        value = h.hexdigest()
        if key:
            self.memo[key] = [stat.st_size, stat.st_mtime_ns, value]
            self.changed = True
        return value

    def key(self, row: ManifestRow, path: Path) -> str:
        h = hashlib.blake2b(digest_size=12)
        h.update(f"{row.format}|{row.series}|{row.dims}|{row.modality}".encode())
        for file in source_files(row, path):
            h.update(self.digest(file).encode())
        return h.hexdigest()

    def save(self) -> None:
        if self.changed:
            atomic_write_text(self.memo_path, json.dumps(self.memo))


def _is_inode_key(key: str) -> bool:
    device, colon, inode = key.partition(":")
    return bool(colon) and device.isdigit() and inode.isdigit()


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write_with(path, lambda handle: np.save(handle, array), durable=False)  # a cache: rebuilt if lost


def build_entry(row: ManifestRow, path: Path, directory: Path, key: str, config: PreprocessConfig) -> None:
    """Read, preprocess and store one row; raises ``DataError`` naming the file on failure."""
    loaded = read_row(row, path)
    result = preprocess(loaded, config, source=str(path))
    if config.storage_dtype == "uint8":
        stored = np.round(result.array * 255.0).astype(np.uint8)
    else:
        stored = result.array.astype(np.float16)
    _atomic_save_npy(directory / f"{key}.npy", stored)
    meta = {
        "version": CACHE_FORMAT_VERSION,
        "dims": row.dims,
        "shape": list(stored.shape),
        "dtype": config.storage_dtype,
        "spacing": list(result.spacing),
        "affine": None if result.affine is None else np.asarray(result.affine).round(6).tolist(),
        "modality": result.modality,
        "foreground": result.foreground,
    }
    atomic_write_text(directory / f"{key}.json", json.dumps(meta))


def _build_task(task: tuple[ManifestRow, str, str, str, PreprocessConfig]) -> tuple[str, str | None]:
    row, path, directory, key, config = task
    try:
        build_entry(row, Path(path), Path(directory), key, config)
    except DataError as exc:
        return row.id, exc.reason
    except MemoryError:
        return row.id, "out of memory while preprocessing"
    except Exception as exc:  # one bad file must not stop the build; the type names the cause
        return row.id, f"preprocessing failed ({type(exc).__name__})"
    return row.id, None


def _init_worker() -> None:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


@dataclass
class CacheReport:
    directory: Path
    index_path: Path
    errors_path: Path
    built: int = 0
    reused: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)  # (file key or relative path, reason)
    seconds: float = 0.0


def build_cache(
    manifest: Manifest,
    cache_root: Path,
    config: PreprocessConfig,
    workers: int = 2,
    progress: bool = True,
) -> CacheReport:
    """Build the missing cache entries of ``manifest`` in parallel and write its index.

    Rows that fail are listed (the manifest's name for the file, never its path when that is a key, and the reason)
    in the report and the index; the others are built. Interrupting is safe: finished entries are kept, nothing
    partial remains. A keyed manifest whose path map is missing stops the build with a :class:`ManifestError`.

    The rows are only passed over (twice: the manifest's digest, then hashing), so a manifest read with
    ``hold_rows=False`` is built without holding its rows; what the build holds grows with the entries it has to
    write (and the digest memo with the distinct files), not with the rows.
    """
    start = time.perf_counter()
    cache_root = Path(cache_root)
    directory = cache_root / settings_digest(config)
    (directory / "index").mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory)  # left by an interrupted build
    settings_path = directory / "settings.json"
    if not settings_path.exists():
        atomic_write_text(settings_path, json.dumps(config.to_dict(), indent=2))
    mdigest = manifest_digest(manifest.rows)
    report = CacheReport(
        directory=directory,
        index_path=directory / "index" / f"{mdigest}.csv",
        errors_path=directory / "index" / f"{mdigest}.errors.csv",
    )
    digests = FileDigests(cache_root / "file_hashes.json")
    todo: dict[str, tuple[ManifestRow, str, str, str, PreprocessConfig]] = {}
    waiting: Counter[str] = Counter()  # content key -> how many other rows have that content
    # reports name a row by ``row.path``: a file key (or the manifest's own relative path), never a mapped path
    locate = manifest.locator()  # the path map read in step with the rows, not held
    # each row's (id, content key, name) goes to an unnamed temporary file (gone with the process, whatever ends it)
    # and the index is written from it once the build says which contents failed: nothing a row is held
    with tempfile.TemporaryFile("w+", encoding="utf-8", newline="", dir=directory / "index") as spool:
        spooled = CsvLines(spool)
        for row in progress_of(manifest.rows, desc="hash", unit="item", enabled=progress):
            try:
                path = locate(row.path)
                key = digests.key(row, path)
            except DataError as exc:
                report.errors.append((row.path, exc.reason))
                spooled.writerow((row.id, "", row.path))
                continue
            except OSError as exc:
                report.errors.append((row.path, f"cannot read ({type(exc).__name__})"))
                spooled.writerow((row.id, "", row.path))
                continue
            spooled.writerow((row.id, key, row.path))
            if (directory / f"{key}.json").exists():
                report.reused += 1
            elif key in todo:
                waiting[key] += 1
            else:
                todo[key] = (row, str(path), str(directory), key, config)
        digests.save()
        # Room for the entries this build writes, before it writes any (a clear error now, not a full disk later).
        check_room([(directory, sum(estimated_entry_bytes(task[0], config) for task in todo.values()),
                     "data.cache_dir")], margin=0)  # fmt: skip
        failed: dict[str, str] = {}  # content key -> the id of the row whose build failed
        built_rows = {task[0].id: key for key, task in todo.items()}
        try:
            for row_id, reason in _run(list(todo.values()), workers, progress):
                if reason is None:
                    report.built += 1
                else:
                    key = built_rows[row_id]
                    failed[key] = row_id
                    report.errors.append((todo[key][0].path, reason))
        finally:
            report.reused += sum(count for key, count in waiting.items() if key not in failed)
            spool.seek(0)
            write_index(report.index_path, _index_records(csv.reader(spool), failed, report.errors))
            write_csv(report.errors_path, ("path", "reason"), sorted(report.errors))
    report.seconds = time.perf_counter() - start
    return report


def estimated_entry_bytes(row: ManifestRow, config: PreprocessConfig) -> int:
    """About what the cache entry of ``row`` takes on disk: its array after resampling (``preprocess.spacing`` for
    volumes, ``preprocess.max_side_2d`` for images), one channel per CT window, at the storage dtype's size, plus its
    metadata (foreground fractions per slice). 0 for a row without a shape."""
    if not row.shape or any(n <= 0 for n in row.shape):
        return 0
    sizes = [float(n) for n in row.shape]
    if row.dims == 3 and config.spacing is not None and len(row.spacing) == len(sizes):
        sizes = [n * s / t if t else n for n, s, t in zip(sizes, row.spacing, config.spacing, strict=True)]
    elif row.dims == 2 and config.max_side_2d is not None and max(sizes) > config.max_side_2d:
        sizes = [n * config.max_side_2d / max(sizes) for n in sizes]
    channels = len(config.ct_windows) if row.modality in CT_MODALITIES else 1
    itemsize = np.dtype(config.storage_dtype).itemsize
    return int(channels * math.prod(max(1.0, round(n)) for n in sizes) * itemsize + 8 * sum(sizes) + 1024)


def _run(
    tasks: Sequence[tuple[ManifestRow, str, str, str, PreprocessConfig]], workers: int, progress: bool
) -> Iterable[tuple[str, str | None]]:
    bar = progress_of(total=len(tasks), desc="preprocess", unit="item", enabled=progress)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                yield _build_task(task)
                bar.update()
            return
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker) as pool:
            pending: set[Future[tuple[str, str | None]]] = set()
            queue = iter(tasks)
            try:
                for task in queue:  # keep a bounded number of tasks in flight
                    pending.add(pool.submit(_build_task, task))
                    if len(pending) >= 4 * workers:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            yield future.result()
                            bar.update()
                for future in list(pending):
                    yield future.result()
                    bar.update()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        bar.close()


@dataclass(slots=True)
class CacheEntry:
    """One preprocessed item: a memory-mapped array and its metadata.

    ``dtype``: the storage dtype when the opener knows it (:func:`open_cache`: the settings'), so that :attr:`scale`
    needs no metadata. :attr:`meta` is parsed once and kept; :meth:`read_meta` parses without keeping (the datasets
    take what they need from it, a few numbers, instead of every entry's JSON).
    """

    key: str
    directory: Path
    dtype: str | None = field(default=None, compare=False)
    _meta: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def meta(self) -> dict[str, Any]:
        """The entry's metadata (``dims``, ``shape``, ``dtype``, ``spacing``, ``affine``, ``modality``,
        ``foreground``), read on first use and kept."""
        if self._meta is None:
            self._meta = self.read_meta()
        return self._meta

    def read_meta(self) -> dict[str, Any]:
        """The entry's metadata, parsed from its ``.json`` now (kept only if :attr:`meta` was read before)."""
        if self._meta is not None:
            return self._meta
        return json.loads((self.directory / f"{self.key}.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]

    def array(self) -> np.ndarray:
        """Memory-mapped ``[C, X, Y, Z]`` or ``[C, H, W]`` (float16 or uint8; see ``to_float``)."""
        return np.load(self.directory / f"{self.key}.npy", mmap_mode="r")

    @property
    def scale(self) -> float:
        dtype = self.dtype if self.dtype is not None else self.meta["dtype"]
        return 1.0 / 255.0 if dtype == "uint8" else 1.0


INDEX_HEADER = ("id", "entry")


def write_index(path: Path, records: Iterable[tuple[str, str]]) -> None:
    """A manifest's cache index, atomically, one line a row in manifest order: ``id,entry`` (the content key, empty
    for a row that has none); streamed, never held as one text."""
    write_csv(path, INDEX_HEADER, records)


def _index_records(
    spooled: Iterable[Sequence[str]], failed: Mapping[str, str], errors: list[tuple[str, str]]
) -> Iterator[tuple[str, str]]:
    """The index's ``(id, entry)`` of each spooled ``(id, content key, name)``: no entry for a content whose build
    failed, and then an error for every other row with that content (the failed row has its own)."""
    for row_id, key, name in spooled:
        if key in failed:
            if failed[key] != row_id:
                errors.append((name, "same content as a file that failed"))
            yield row_id, ""
        else:
            yield row_id, key


def _ids(rows: Sequence[ManifestRow]) -> Sequence[str]:
    """The rows' ids, without making rows where ``rows`` is a :class:`RowTable`."""
    return rows.column("id") if isinstance(rows, RowTable) else [row.id for row in rows]


class CacheIndex(Mapping[str, "CacheEntry"]):
    """The cache entries of a manifest's rows: by row position (:meth:`entry_at`, what the datasets use: a 4-byte code
    a row) and, as a mapping, by row id (rows without an entry are absent; the id lookup is built on first use).
    Rows with the same content share one :class:`CacheEntry`."""

    def __init__(self, ids: Sequence[str], codes: array, entries: list[CacheEntry]) -> None:
        self._ids = ids
        self._codes = codes  # [N] int32: index into ``entries``, -1 for a row without an entry
        self._entries = entries
        self._by_id: dict[str, int] | None = None
        self._size = sum(code >= 0 for code in codes)

    def entry_at(self, position: int) -> CacheEntry | None:
        """The entry of the manifest's row at ``position``, or None."""
        code = self._codes[position]
        return self._entries[code] if code >= 0 else None

    def _positions(self) -> dict[str, int]:
        if self._by_id is None:
            self._by_id = {rid: i for i, rid in enumerate(self._ids) if self._codes[i] >= 0}
        return self._by_id

    def __getitem__(self, row_id: str) -> CacheEntry:
        return self._entries[self._codes[self._positions()[row_id]]]

    def __contains__(self, row_id: object) -> bool:
        return row_id in self._positions()

    def __iter__(self) -> Iterator[str]:
        return (rid for rid, code in zip(self._ids, self._codes, strict=True) if code >= 0)

    def __len__(self) -> int:
        return self._size


def open_cache(manifest: Manifest, cache_root: Path, config: PreprocessConfig) -> CacheIndex:
    """The built cache's entries of ``manifest``'s rows (failed rows have none).

    The index (``index/<manifest digest>.csv``) is read a line at a time, beside the rows it must match: the digest
    names the exact rows in their order, and each line's id is checked against its row.

    Raises:
        DataError: no index for this manifest and these settings (run ``medssl manifest preprocess``), or an index
            that does not match the rows.
    """
    directory = Path(cache_root) / settings_digest(config)
    index_path = directory / "index" / f"{manifest_digest(manifest.rows)}.csv"
    if not index_path.is_file():
        raise DataError(
            index_path,
            "no cache index for this manifest and these settings; run `medssl manifest preprocess` first",
        )
    ids = _ids(manifest.rows)
    codes = array("i")
    entries: list[CacheEntry] = []
    by_key: dict[str, int] = {}
    mismatch = DataError(index_path, "the cache index does not match the manifest's rows; run `medssl manifest "
                                     "preprocess` again")  # fmt: skip
    try:
        with open(index_path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            if tuple(next(reader, ())) != INDEX_HEADER:
                raise mismatch
            for record, rid in zip(reader, ids, strict=True):
                if len(record) != 2 or record[0] != rid:
                    raise mismatch
                key = record[1]
                if not key:
                    codes.append(-1)
                    continue
                code = by_key.get(key)
                if code is None:
                    code = by_key[key] = len(entries)
                    entries.append(CacheEntry(key, directory, config.storage_dtype))
                codes.append(code)
    except (ValueError, csv.Error, UnicodeDecodeError):  # ValueError: fewer or more lines than rows (zip strict)
        raise mismatch from None
    return CacheIndex(ids, codes, entries)

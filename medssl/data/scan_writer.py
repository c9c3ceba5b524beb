"""A scan's outputs written in file-key order, whatever the archive's size: an external sort.

The manifest lists its rows in key order (an order that says nothing about names), and the path map and the errors
CSV are in key order too (:mod:`medssl.data.pathmap`). A scan finds its rows in path order, and file keys are keyed
hashes of the paths, so the order has to be made: :class:`ScanWriter` takes rows and errors one at a time, keeps
them as CSV lines, sorts and spills every :data:`RUN_LINES` of them to an unnamed temporary file beside the outputs
(:func:`tempfile.TemporaryFile`: readable by its owner only; on POSIX systems its name is removed as it is created,
so it is gone with the process however that ends), then merges the runs as it writes the map, the errors and the
manifest. What it holds is one run and a read buffer per open run (at most :data:`MAX_RUNS`), not the rows.
"""

from __future__ import annotations

import contextlib
import csv
import heapq
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import IO

from medssl.data.manifest import COLUMNS, ManifestCounts, ManifestRow, write_csv, write_manifest
from medssl.data.pathmap import MapEntries, default_map_path, file_key, write_path_map
from medssl.runtime.csv_lines import CsvLines

RUN_LINES = 10_000
"""Records held before a run is sorted and spilled (about 2 MB of CSV lines for manifest rows)."""
MAX_RUNS = 64
"""Runs kept open before they are merged into one (a bound on the temporary files open at once)."""

_PATH = 2 + COLUMNS.index("path")  # a row record: key, series, then the manifest's columns


class SortedRuns:
    """Records (sequences of strings) given in any order and read back in the order of their first ``fields``
    values (compared as strings; those values must be ones CSV does not quote, like file keys and digests).

    Records are held as CSV lines up to ``run_lines``, then sorted and written to an unnamed temporary file in
    ``directory`` (a run; ``None``: the system's temporary folder); iterating merges the runs and the lines held
    (:func:`heapq.merge`, stable: records with equal sort values come back in the order they were added), and may
    be repeated. At :data:`MAX_RUNS` runs they are merged into one. :meth:`close` drops the runs.
    """

    def __init__(self, directory: Path | None, fields: int, run_lines: int | None = None) -> None:
        self._directory = directory  # None: the system's temporary folder
        self._fields = fields
        self._run_lines = max(1, RUN_LINES if run_lines is None else run_lines)
        self._lines: list[str] = []
        self._runs: list[IO[str]] = []
        self._csv = CsvLines()  # a "\r" or "\n" in a field quoted
        self.count = 0

    def add(self, record: Sequence[str]) -> None:
        self._lines.append(self._csv.line(record))
        self.count += 1
        if len(self._lines) >= self._run_lines:
            self._spill()

    def _order(self, line: str) -> list[str]:
        return line.split(",", self._fields)[: self._fields]

    def _new_run(self) -> IO[str]:
        return tempfile.TemporaryFile("w+", encoding="utf-8", newline="", dir=self._directory)

    def _spill(self) -> None:
        self._lines.sort(key=self._order)
        run = self._new_run()
        run.writelines(self._lines)
        self._lines = []
        self._runs.append(run)
        if len(self._runs) >= MAX_RUNS:
            merged = self._new_run()
            CsvLines(merged).writerows(self._merge(self._runs, []))
            self.close()
            self._runs = [merged]

    def _merge(self, runs: Sequence[IO[str]], lines: list[str]) -> Iterator[list[str]]:
        fields = self._fields
        return heapq.merge(*(_records(run) for run in runs), csv.reader(lines), key=lambda record: record[:fields])

    def __iter__(self) -> Iterator[list[str]]:
        self._lines.sort(key=self._order)
        return self._merge(self._runs, self._lines)

    def close(self) -> None:
        for run in self._runs:
            with contextlib.suppress(OSError):
                run.close()
        self._runs = []


def _records(run: IO[str]) -> Iterator[list[str]]:
    run.seek(0)
    yield from csv.reader(run)


class ScanWriter:
    """Write a scan's manifest, errors CSV and path map with every relative path replaced by its file key.

    Give it rows (:meth:`add_row`, ``path`` and ``mask`` relative to ``root``) and failures (:meth:`add_error`) in
    any order, then :meth:`finish`: the path map (default ``<out stem>.paths.csv`` beside ``out``) gets the root and
    ``key -> relative path`` of every row, mask and failed file, with permissions no wider than the archive's
    (:func:`medssl.data.pathmap.write_path_map`); ``<out stem>.errors.csv`` names failures by key; the manifest
    ``out`` (written only when there are rows, after the map) names its files by key, in key order. Use it as a
    context manager: the temporary runs are dropped however the block ends.
    """

    def __init__(
        self, out: Path, root: Path, salt: str, path_map: Path | None = None, run_lines: int | None = None
    ) -> None:
        self.out = Path(out)
        self.root = Path(root)
        self.salt = salt
        self.map_file = Path(path_map) if path_map is not None else default_map_path(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._rows = SortedRuns(self.out.parent, 2, run_lines)  # (key, series): a folder may hold several series
        self._masks = SortedRuns(self.out.parent, 1, run_lines)
        self._errors = SortedRuns(self.out.parent, 1, run_lines)
        self.counts = ManifestCounts()  # of the rows written (after ``finish``'s transform)

    def __enter__(self) -> ScanWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for runs in (self._rows, self._masks, self._errors):
            runs.close()

    def add_row(self, row: ManifestRow) -> None:
        record = row.to_record()
        self._rows.add((file_key(row.path, self.salt), record["series"], *(record[c] for c in COLUMNS)))
        if row.mask:
            self._masks.add((file_key(row.mask, self.salt), row.mask))

    def add_error(self, relative: str, reason: str) -> None:
        self._errors.add((file_key(relative, self.salt), relative, reason))

    def finish(self, transform: Callable[[ManifestRow], ManifestRow] | None = None) -> ScanOutputs:
        """Write the map, the errors and the manifest (its rows through ``transform``, in key order, as written).

        Raises:
            ManifestError: two paths share one file key (nothing is written then: the map comes first).
        """
        entries = MapEntries(
            lambda: (
                ((record[0], record[_PATH]) for record in self._rows),
                ((record[0], record[1]) for record in self._masks),
                ((record[0], record[1]) for record in self._errors),
            )
        )
        write_path_map(self.map_file, self.root, entries)
        errors_file = errors_csv_path(self.out)
        write_csv(errors_file, ("path", "reason"), ((record[0], record[2]) for record in self._errors))
        if not self._rows.count:
            return ScanOutputs(manifest=None, errors=errors_file, path_map=self.map_file)
        write_manifest(self.out, self._keyed_rows(transform), None, path_map=self.map_file)
        return ScanOutputs(manifest=self.out, errors=errors_file, path_map=self.map_file)

    def _keyed_rows(self, transform: Callable[[ManifestRow], ManifestRow] | None) -> Iterator[ManifestRow]:
        for record in self._rows:
            row = ManifestRow.from_record(dict(zip(COLUMNS, record[2:], strict=True)), 0)
            row = replace(row, path=record[0], mask=file_key(row.mask, self.salt) if row.mask else "")
            if transform is not None:
                row = transform(row)
            self.counts.add(row)
            yield row


@dataclass(frozen=True)
class ScanOutputs:
    """The files :meth:`ScanWriter.finish` wrote (``manifest`` only when there were rows)."""

    manifest: Path | None
    errors: Path
    path_map: Path


def errors_csv_path(manifest: Path) -> Path:
    """``<manifest stem>.errors.csv`` beside the manifest."""
    return manifest.with_name(manifest.name.removesuffix(".csv") + ".errors.csv")

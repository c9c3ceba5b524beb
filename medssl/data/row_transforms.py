"""Per-row transforms of a scan's rows: label maps paired by file name, a labels CSV joined by path, splits
assigned by subject. Each takes one row at a time (what ``medssl manifest scan`` streams, :func:`medssl.data.scan.
scan_archive`) and holds only its own side input (the masks folder's names, the labels CSV, the subjects with a
split); the functions of the same names apply them to rows held in memory.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from medssl.data.errors import DataError
from medssl.data.manifest import SPLITS, ManifestRow, RowTable
from medssl.data.pseudonym import pseudonym

LABEL_COLUMNS = ("split", "group", "label", "subject", "modality", "mask")


class LabelJoin:
    """Join a CSV keyed by ``path`` (relative to the CSV's folder, or absolute) onto rows, one row at a time.

    Columns used when present: split, group, label, subject (pseudonymised here), modality, mask (a label map,
    relative to the CSV's folder or absolute; stored relative to ``root``). The CSV's records are held (they are
    the labels, not the archive); :meth:`warnings`, once the rows have passed: unmatched entries, bad values, a file
    listed twice (the later line wins), naming the CSV and its lines (``<csv>:<line>:``, the line a record ends
    on), never a path.

    Raises:
        DataError: naming the CSV: not found or unreadable, not UTF-8, no ``path`` column, or not CSV (a field over
            the csv module's limit, an unclosed quote at the end; the message gives the line).
    """

    def __init__(self, labels_csv: Path, root: Path, salt: str) -> None:
        self.labels_csv = Path(labels_csv)
        if not self.labels_csv.is_file():
            raise DataError(self.labels_csv, "labels file not found")
        self.salt = salt
        self._root = Path(root).resolve()
        self._by_path, self._warnings = _read_labels(self.labels_csv, self._root)
        self._matched = 0

    def __call__(self, row: ManifestRow) -> ManifestRow:
        line, record = self._by_path.get(row.path, (0, {}))
        if not record:
            return row
        self._matched += 1
        updates = {c: value.strip() for c in LABEL_COLUMNS if (value := record.get(c)) and value.strip()}
        if "subject" in updates:
            updates["subject"] = pseudonym(updates["subject"], self.salt, prefix="s")
        if "modality" in updates:
            updates["modality"] = updates["modality"].upper()
        if "mask" in updates:
            mask, problem = _under_root(updates.pop("mask"), self.labels_csv.parent, self._root)
            if mask is None:
                self._warnings.append(f"{self.labels_csv}:{line}: the mask {problem}; ignored")
            else:
                updates["mask"] = mask
        return replace(row, **updates)

    def warnings(self) -> list[str]:
        unmatched = len(self._by_path) - self._matched
        if unmatched <= 0:
            return list(self._warnings)
        return [
            *self._warnings,
            f"{self.labels_csv}: {unmatched} of {len(self._by_path)} entries match no scanned file",
        ]


def join_labels(rows: Iterable[ManifestRow], labels_csv: Path, root: Path, salt: str) -> tuple[RowTable, list[str]]:
    """:class:`LabelJoin` over ``rows``: the joined rows and the warnings."""
    join = LabelJoin(labels_csv, root, salt)
    joined = RowTable(join(row) for row in rows)
    return joined, join.warnings()


def _read_labels(labels_csv: Path, root: Path) -> tuple[dict[str, tuple[int, dict[str, str | None]]], list[str]]:
    """The records of a labels CSV by path relative to ``root`` (resolved), each with its line; and warnings.

    Lines are the CSV reader's (``line_num``: right after blank lines and quoted newlines)."""
    by_path: dict[str, tuple[int, dict[str, str | None]]] = {}
    warnings: list[str] = []
    try:
        with open(labels_csv, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            try:
                if not reader.fieldnames or "path" not in reader.fieldnames:
                    raise DataError(labels_csv, "labels file needs a 'path' column")
                for record in reader:
                    line = reader.line_num
                    where = f"{labels_csv}:{line}"
                    if record["path"] is None:  # csv gives None for the fields past the end of a short row
                        warnings.append(f"{where}: the row has fewer fields than the header; skipped")
                        continue
                    key, problem = _under_root(record["path"], labels_csv.parent, root)
                    if key is None:
                        warnings.append(f"{where}: the path {problem}; skipped")
                        continue
                    split = (record.get("split") or "").strip()
                    if split not in SPLITS:
                        warnings.append(f"{where}: split {split!r} is not train/val/test; ignored")
                        record["split"] = ""
                    if key in by_path:
                        first = by_path[key][0]
                        warnings.append(f"{where}: the same file as line {first}; the values of line {line} are used")
                    by_path[key] = (line, record)
            except csv.Error as exc:
                # the csv reader's own count: DictReader.line_num is updated only after a record is read
                raise DataError(labels_csv, f"line {reader.reader.line_num}: unreadable CSV ({exc})") from None
    except UnicodeDecodeError as exc:
        raise DataError(labels_csv, f"not a UTF-8 text file ({exc.reason})") from None
    except OSError as exc:
        raise DataError(labels_csv, f"cannot read the labels file ({type(exc).__name__})") from None
    return by_path, warnings


def _under_root(value: str, base: Path, root: Path) -> tuple[str | None, str]:
    """``value`` (relative to ``base``, or absolute) as a path relative to ``root`` (resolved), or ``None`` and why
    not (for a warning: never quotes the path)."""
    if not value.strip():
        return None, "is empty"
    if "\x00" in value:
        return None, "holds a NUL character"
    target = Path(value)
    target = target if target.is_absolute() else base / target
    try:
        return target.resolve().relative_to(root).as_posix(), ""
    except ValueError:
        return None, "is outside the scanned folder"
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop
        return None, f"cannot be resolved ({type(exc).__name__})"


class MaskPairing:
    """Give each row the label map of the same file name in the folder ``masks`` (relative to ``root``), one row at a
    time: the Medical Segmentation Decathlon layout (``imagesTr/x.nii.gz`` + ``labelsTr/x.nii.gz``) pairs this way.

    Calling it on a row inside ``masks`` gives None (they are the label maps: dropped). :meth:`warnings`, once the
    rows have passed: images without a mask, ambiguous names (counts only, never a name). The masks folder's file
    names are held (a list of the label maps, not of the archive).
    """

    def __init__(self, root: Path, masks: str) -> None:
        self.masks = masks
        folder = (Path(root) / masks).resolve()
        if not folder.is_dir():
            raise DataError(folder, "masks folder not found")
        self._prefix = folder.relative_to(Path(root).resolve()).as_posix().rstrip("/") + "/"
        self._by_name: dict[str, list[str]] = defaultdict(list)
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                self._by_name[path.name].append(path.relative_to(Path(root).resolve()).as_posix())
        self._paired = self._unmatched = self._ambiguous = 0

    def __call__(self, row: ManifestRow) -> ManifestRow | None:
        if row.path.startswith(self._prefix):
            return None
        self._paired += 1
        candidates = self._by_name.get(row.path.rsplit("/", 1)[-1], [])
        if len(candidates) == 1:
            return replace(row, mask=candidates[0])
        self._ambiguous += len(candidates) > 1
        self._unmatched += 1
        return row

    def warnings(self) -> list[str]:
        warnings: list[str] = []
        if self._ambiguous:
            warnings.append(
                f"{self._ambiguous} image(s) match several masks of their file name in {self.masks}; none taken"
            )
        if self._unmatched:
            warnings.append(f"{self._unmatched} of {self._paired} images have no mask in {self.masks}")
        return warnings


def pair_masks(rows: Sequence[ManifestRow], root: Path, masks: str) -> tuple[RowTable, list[str]]:
    """:class:`MaskPairing` over ``rows``: the rows (label maps dropped) and the warnings."""
    pairing = MaskPairing(root, masks)
    paired = RowTable(row for row in map(pairing, rows) if row is not None)
    return paired, pairing.warnings()


class SplitAssignment:
    """Assign train/val/test by subject (never by image) to rows without a split.

    A subject that already has a split (from a labels file) keeps it for all its rows: every row is first shown to
    :meth:`observe` (the subjects with a split are held, not the rows); then calling it on a row gives the row with
    its split. The others fall in a bucket drawn from a keyed hash of the subject, so the assignment is stable and
    does not depend on the order of the rows.

    Raises:
        ValueError: fractions that are not non-negative train/val/test values with a positive sum.
    """

    def __init__(self, fractions: dict[str, float], salt: str) -> None:
        total = sum(fractions.values())
        if (
            not fractions
            or total <= 0
            or any(v < 0 for v in fractions.values())
            or not set(fractions) <= {"train", "val", "test"}
        ):
            raise ValueError(f"split fractions must be non-negative train/val/test values, got {fractions}")
        self._bounds = np.cumsum([fractions[k] / total for k in fractions])
        self._names = list(fractions)
        self._salt = salt
        self._known: dict[str, str] = {}

    def observe(self, row: ManifestRow) -> None:
        if row.split and row.subject:
            self._known[row.subject] = row.split

    def __call__(self, row: ManifestRow) -> ManifestRow:
        if row.split:
            return row
        subject = row.subject or row.id
        split = self._known.get(subject)
        if split is None:
            u = int(pseudonym(f"split:{subject}", self._salt, length=12), 16) / 16**12
            split = self._names[int(np.searchsorted(self._bounds, u, side="right").clip(0, len(self._names) - 1))]
        return replace(row, split=split)


def assign_splits(rows: Sequence[ManifestRow], fractions: dict[str, float], salt: str) -> RowTable:
    """:class:`SplitAssignment` over ``rows`` (read twice: subjects with a split first)."""
    assignment = SplitAssignment(fractions, salt)
    for row in rows:
        assignment.observe(row)
    return RowTable(map(assignment, rows))

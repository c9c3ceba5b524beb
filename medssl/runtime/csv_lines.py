"""CSV records written one line each, ending in ``"\\n"``, whatever their fields hold.

:func:`csv.writer` quotes a field that holds the delimiter, the quote character or a character of the line
terminator. With the terminator ``"\\n"`` (medssl's files: manifests, path maps, errors, indices, embeddings) a
field holding a bare carriage return (a file named ``"a\\rb.png"``, a label pasted from another system) was written
unquoted, and a reader took the ``"\\r"`` for a line break: one record read back as two, a path map's entry cut in
half. :class:`CsvLines` writes each record with the terminator ``"\\r\\n"`` (so that either character makes the
field quoted) and ends the line with ``"\\n"``: the same bytes as before for every record without a ``"\\r"``.

Reading such a file line by line (``open(..., newline="")`` still splits lines at a ``"\\r"``), a quoted field can span
physical lines: :func:`at_record_start` says which lines begin a record, so that a comment filter (``# root:``) does
not take the continuation of a field that starts with ``#`` (a label ``"\\r# note"``) for a comment.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Sequence
from typing import TextIO


class CsvLines:
    """``writerow`` / ``writerows`` of :func:`csv.writer` with ``lineterminator="\\n"``, a carriage return in a field
    quoted."""

    __slots__ = ("_line", "_text", "_writer")

    def __init__(self, text: TextIO | None = None) -> None:  # None: lines made with :meth:`line` only
        self._text = text
        self._line = io.StringIO()
        self._writer = csv.writer(self._line, lineterminator="\r\n")

    def line(self, record: Sequence[object]) -> str:
        """``record`` as one CSV line ending in ``"\n"`` (what :meth:`writerow` writes)."""
        self._writer.writerow(record)
        line = self._line.getvalue()
        self._line.seek(0)
        self._line.truncate()
        return line[:-2] + "\n"

    def writerow(self, record: Sequence[object]) -> None:
        assert self._text is not None, "CsvLines(None) makes lines only"
        self._text.write(self.line(record))

    def writerows(self, records: Iterable[Sequence[object]]) -> None:
        for record in records:
            self.writerow(record)


def at_record_start(lines: Iterable[str]) -> Iterator[tuple[bool, str]]:
    """Each physical line with whether it begins a CSV record (``False``: it continues a quoted field of the record
    before), for :mod:`csv`'s default dialect (``,`` delimiter, ``"`` quotes doubled inside a quoted field).

    A ``"`` opens a quoted field only at the start of a field, as :func:`csv.reader` reads it; lines without a ``"``
    outside a quoted field are passed through without a character scan.
    """
    inside = False
    for line in lines:
        yield not inside, line
        if inside or '"' in line:
            inside = _ends_inside_quotes(line, inside)


def _ends_inside_quotes(line: str, inside: bool) -> bool:
    """Whether a quoted field is still open at the end of ``line`` (``inside``: one was open at its start)."""
    field_start = not inside
    i, n = 0, len(line)
    while i < n:
        char = line[i]
        if inside:
            if char == '"':
                if i + 1 < n and line[i + 1] == '"':
                    i += 2  # an escaped quote
                    continue
                inside, field_start = False, False
        elif char == '"' and field_start:
            inside = True
        else:
            field_start = char in ",\r\n"
        i += 1
    return inside

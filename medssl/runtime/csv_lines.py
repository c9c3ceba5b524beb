"""CSV records written one line each, ending in ``"\\n"``, whatever their fields hold.

:func:`csv.writer` quotes a field that holds the delimiter, the quote character or a character of the line
terminator. With the terminator ``"\\n"`` (medssl's files: manifests, path maps, errors, indices, embeddings) a
field holding a bare carriage return (a file named ``"a\\rb.png"``, a label pasted from another system) was written
unquoted, and a reader took the ``"\\r"`` for a line break: one record read back as two, a path map's entry cut in
half. :class:`CsvLines` writes each record with the terminator ``"\\r\\n"`` (so that either character makes the
field quoted) and ends the line with ``"\\n"``: the same bytes as before for every record without a ``"\\r"``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
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

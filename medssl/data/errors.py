"""Errors raised by the data layer. Every message names the file (or manifest key) at fault."""

from __future__ import annotations

from pathlib import Path


class DataError(Exception):
    """A single input (file, series or manifest row) cannot be used.

    The message always starts with the offending path so that a user can find it,
    and never contains a DICOM identifier (names, IDs, dates).
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ManifestError(Exception):
    """The manifest as a whole is unusable (missing columns, unreadable CSV, nothing found)."""


class UnreadableCacheError(Exception):
    """Too many entries of the preprocessed cache could not be read while sampling (more than a dataset's
    ``max_unreadable`` fraction, or no readable substitute found): training stops rather than go on with little data.
    The message names cache entry keys (content hashes), never a file of the archive."""

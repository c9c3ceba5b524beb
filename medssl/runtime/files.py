"""Atomic file writes: a reader sees the old file or the new one, never a part of it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_binary(path: Path, durable: bool = True) -> Iterator[IO[bytes]]:
    """A binary handle on a temporary file beside ``path``, renamed onto ``path`` when the block ends without error.

    An error (or a kill) leaves the previous ``path`` intact and removes the temporary file. ``durable``: flush and
    fsync before the rename, so that a power cut cannot leave an empty file under the new name either (off for
    files that can be rebuilt, like the preprocessing cache, where an fsync per file costs more than it saves).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_binary(path) as handle:
        handle.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: Path, write: Callable[[IO[bytes]], Any], durable: bool = True) -> Path:
    """Call ``write(handle)`` on a temporary binary file and rename it onto ``path`` (``torch.save``, ``np.save``)."""
    with atomic_binary(path, durable) as handle:
        write(handle)
    return path

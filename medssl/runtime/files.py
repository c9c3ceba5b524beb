"""Atomic file writes: a reader sees the old file or the new one, never a part of it."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_binary(
    path: Path, durable: bool = True, mode: int | None = None, group: int | None = None
) -> Iterator[IO[bytes]]:
    """A binary handle on a temporary file beside ``path``, renamed onto ``path`` when the block ends without error.

    An error (or a kill) leaves the previous ``path`` intact and removes the temporary file. ``durable``: flush and
    fsync before the rename, so that a power cut cannot leave an empty file under the new name either (off for
    files that can be rebuilt, like the preprocessing cache, where an fsync per file costs more than it saves).
    ``mode``: permission bits of the new file (private files): the temporary file is created readable by its owner
    only and gets ``mode`` before the rename, so no other user can open it at any moment in between. ``group``
    (with ``mode``): the group that owns the new file; where it cannot be given (not a member of it), the group
    permission bits of ``mode`` are dropped rather than granted to another group.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if mode is None:
            handle = open(tmp, "wb")  # noqa: SIM115  # closed by the with block below
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()  # a leftover of a killed writer may have other permissions
            handle = os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
        with handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
            if mode is not None:
                _set_owner_and_mode(handle.fileno(), tmp, mode, group)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _set_owner_and_mode(fd: int, path: Path, mode: int, group: int | None) -> None:
    if group is not None and hasattr(os, "fchown") and os.fstat(fd).st_gid != group:
        try:
            os.fchown(fd, -1, group)
        except OSError:  # not a member of that group: nobody else gets access through the group
            mode &= ~0o070
    if os.chmod in os.supports_fd:
        os.chmod(fd, mode)
    else:
        os.chmod(path, mode)


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None, group: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (``mode``, ``group``: see :func:`atomic_binary`)."""
    with atomic_binary(path, mode=mode, group=group) as handle:
        handle.write(data)


def atomic_write_text(path: Path, text: str, mode: int | None = None, group: int | None = None) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically (``mode``, ``group``: see
    :func:`atomic_binary`)."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode, group=group)


def atomic_write_with(path: Path, write: Callable[[IO[bytes]], Any], durable: bool = True) -> Path:
    """Call ``write(handle)`` on a temporary binary file and rename it onto ``path`` (``torch.save``, ``np.save``)."""
    with atomic_binary(path, durable) as handle:
        write(handle)
    return path


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (the temporary files of a writer that is gone can be removed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_binary` left in ``directory`` when its writer was killed mid-write
    (``.<name>.<pid>.tmp`` whose process is gone; those of live writers are kept). Returns what was removed."""
    removed = []
    for tmp in directory.glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and process_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hexadecimal (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()

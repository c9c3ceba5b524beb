"""Checkpoint files: written atomically with a SHA-256 beside them, read back with ``weights_only=True``, found
through a run's ``latest``.

A checkpoint is a plain dictionary of tensors, numbers, strings and containers of those, so
that ``torch.load(..., weights_only=True)`` can read it without unpickling arbitrary objects.
Random-number-generator states (Python, NumPy, torch) are stored in that form too. A file that asks the unpickler for
anything else (an object whose ``__reduce__`` would run code) is refused with :class:`UnsafeCheckpointError` before
any of it runs.

``save_checkpoint`` writes ``<name>.sha256`` (``sha256sum`` format) atomically after the checkpoint itself;
``load_checkpoint`` verifies it when it is there (files of older runs have none and load unverified), so a file
truncated or corrupted on disk is refused with :class:`CorruptCheckpointError` instead of being half read.
"""

from __future__ import annotations

import hashlib
import pickle
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.runtime.files import atomic_write_text, atomic_write_with, file_sha256

CHECKSUM_SUFFIX = ".sha256"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message starts with its path."""


class CorruptCheckpointError(CheckpointError):
    """Truncated, corrupted on disk, or its checksum does not match: a run resuming from its folder skips it."""


class UnsafeCheckpointError(CheckpointError):
    """Not a plain weights file: its pickle asks for Python objects (code) that ``weights_only=True`` refuses."""


class _HashingWriter:
    """A write-only binary stream that hashes what passes through it (``torch.save`` writes sequentially)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return int(self.handle.write(data))

    def flush(self) -> None:
        self.handle.flush()


def checksum_path(path: str | Path) -> Path:
    """Where the SHA-256 of the checkpoint ``path`` is kept: ``<path>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def save_checkpoint(path: str | Path, state: dict[str, Any], checksum: bool = True) -> Path:
    """Write ``state`` to ``path`` through a temporary file and an atomic rename, then (``checksum``) its SHA-256 to
    ``<path>.sha256``, atomically too.

    A crash or a kill during the write leaves the previous checkpoint intact; a kill between the two writes leaves a
    complete checkpoint without a checksum (which loads unverified, like the files of older runs).
    """
    path = Path(path)
    digest: list[str] = []

    def write(handle: Any) -> None:
        stream = _HashingWriter(handle)
        torch.save(state, stream)
        digest.append(stream.sha256.hexdigest())

    atomic_write_with(path, write)
    if checksum:
        atomic_write_text(checksum_path(path), f"{digest[0]}  {path.name}\n")
    return path


def verify_checksum(path: str | Path) -> bool:
    """Compare ``path`` with its ``<path>.sha256``: True when it matches, False when there is no checksum file.

    Raises:
        CorruptCheckpointError: the file's SHA-256 differs from the recorded one, or the checksum file is garbled.
    """
    path = Path(path)
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        return False
    recorded = sidecar.read_text(encoding="utf-8", errors="replace").split()
    if not recorded or not re.fullmatch(r"[0-9a-f]{64}", recorded[0]):
        raise CorruptCheckpointError(f"{path}: its checksum file {sidecar.name} is garbled")
    actual = file_sha256(path)
    if actual != recorded[0]:
        raise CorruptCheckpointError(
            f"{path}: checksum mismatch: {sidecar.name} records sha256 {recorded[0][:16]}..., the file has "
            f"{actual[:16]}... (truncated or corrupted on disk)"
        )
    return True


def _refusal(exc: Exception) -> str:
    """What ``torch.load(weights_only=True)`` refused, in one short phrase (the global or opcode it met)."""
    text = str(exc)
    found = re.search(r"(unsupported GLOBAL [\w.]+|Unsupported global: GLOBAL [\w.]+|Unsupported operand \w+)", text)
    if found:
        return found.group(1)
    lines = [line.strip() for line in text.splitlines() if line.strip() and "documentation" not in line]
    return lines[-1][:200] if lines else type(exc).__name__


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint (or any weights file medssl wrote) with ``weights_only=True``, after verifying its checksum
    when it has one.

    Raises:
        FileNotFoundError: no such file.
        CorruptCheckpointError: truncated, corrupted, or not matching its checksum.
        UnsafeCheckpointError: a pickle of Python objects rather than plain weights; nothing of it is run.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    verify_checksum(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise CorruptCheckpointError(f"{path}: not a readable medssl checkpoint (UnpicklingError: {exc})") from None
        raise UnsafeCheckpointError(
            f"{path}: not a plain weights file: it holds pickled Python objects ({_refusal(exc)}) that could run code "
            "when loaded, so it was refused without loading it (torch.load weights_only=True); medssl reads only "
            "tensors, numbers, strings and containers of those"
        ) from None
    except Exception as exc:  # truncated file, not a checkpoint at all
        raise CorruptCheckpointError(
            f"{path}: not a readable medssl checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})"
        ) from None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint named by ``<run_dir>/checkpoints/latest``, if any."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text(encoding="utf-8").strip()
    return path if path.is_file() else None


def checkpoint_step(path: Path) -> int | None:
    """The step of a ``step_<k>.pt`` file name (None for other names)."""
    found = _STEP_FILE.match(path.name)
    return int(found.group(1)) if found else None


def resume_candidates(run_dir: Path) -> list[Path]:
    """The checkpoints a run folder may resume from, in order: the one ``checkpoints/latest`` names, then the older
    ``step_<k>.pt`` files, newest first. Empty without a ``latest`` pointer (nothing was ever committed); files newer
    than the pointer (a kill between writing a checkpoint and moving the pointer) are not candidates."""
    directory = run_dir / "checkpoints"
    pointer = directory / "latest"
    if not pointer.is_file():
        return []
    named = directory / pointer.read_text(encoding="utf-8").strip()
    newest = checkpoint_step(named)
    older = [
        (step, path)
        for path in directory.glob("step_*.pt")
        if (step := checkpoint_step(path)) is not None and (newest is None or step < newest) and path != named
    ]
    return [named, *(path for _, path in sorted(older, reverse=True))]


def load_latest_checkpoint(
    run_dir: Path, warn: Callable[[str], None] = print, map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of ``run_dir`` that loads: the latest one, else the one before it, and so on; each
    skipped file (missing, truncated, checksum mismatch) is reported through ``warn`` with its name and why.

    Returns:
        ``(path, state)``, or None when the folder has no ``checkpoints/latest``.
    Raises:
        UnsafeCheckpointError: a candidate that is not a plain weights file (never skipped silently: look at it).
        CorruptCheckpointError: no candidate loads (the message lists them).
    """
    candidates = resume_candidates(run_dir)
    if not candidates:
        return None
    skipped: list[str] = []
    for path in candidates:
        try:
            return path, load_checkpoint(path, map_location)
        except (FileNotFoundError, CorruptCheckpointError) as exc:
            reason = str(exc).removeprefix(f"{path}: ")
        skipped.append(f"{path.name} ({reason})")
        warn(f"warning: checkpoint {path} skipped: {reason}; trying the previous one")
    raise CorruptCheckpointError(
        f"{run_dir / 'checkpoints'}: no checkpoint loads ({'; '.join(skipped)}); set trainer.resume=null to start over"
    )


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch (CPU and CUDA) generator states, as plain data."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["name"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

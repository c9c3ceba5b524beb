"""Checks before a long run's first step: the folders it writes can be written, and the disk has room for its
checkpoints (a clear error now rather than a failed write hours later)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only for the annotation: the cache build imports this module without needing torch
    from torch import nn

MiB = 1 << 20
MARGIN_BYTES = 256 * MiB  # beyond two checkpoints: the backbone, pictures, logs, the MLflow store


class PreflightError(ValueError):
    """A folder a run needs cannot be written, or its disk is too full; the message names the folder."""


def _size(n: int) -> str:
    """Bytes for people: ``1.5 GiB``, ``300.0 MiB``, ``12.0 KiB``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` (with its parents) and create, write, fsync and delete a probe file in it.

    Args:
        what: the setting the folder comes from, for the message (e.g. ``run.output_dir``).
    Raises:
        PreflightError: any step fails (read-only folder or file system, a path under a file, a full disk).
    """
    probe = folder / f".medssl-write-probe.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"medssl preflight\n")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as exc:
        raise PreflightError(
            f"{what}: {folder} cannot be written ({exc.strerror or exc}); nothing was trained: make it writable or "
            f"point {what} elsewhere"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)


def checkpoint_bytes(module: nn.Module, optimizer_slots: int = 2) -> int:
    """An estimate of one checkpoint of ``module``: its state dict plus ``optimizer_slots`` tensors the size of its
    trainable parameters (momentum: 1; AdamW: 2), which the optimiser only creates at its first step."""
    state = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    params = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return int(state + optimizer_slots * params)


def _existing(folder: Path) -> Path:
    """``folder`` or its nearest existing parent (a folder not made yet lives on its parent's file system)."""
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_room(demands: list[tuple[Path, int, str]], margin: int = MARGIN_BYTES) -> None:
    """Room for what a run will write, file system by file system: ``(folder, bytes, what)`` for each place (the
    run's checkpoints, the MLflow store's artifacts, the cache); places on the same file system add up, with one
    ``margin`` per file system.

    Raises:
        PreflightError: a file system has less free than its places need together (the message lists them).
    """
    by_device: dict[int, list[tuple[Path, int, str]]] = {}
    for folder, size, what in demands:
        by_device.setdefault(_existing(folder).stat().st_dev, []).append((folder, size, what))
    for places in by_device.values():
        needed = sum(size for _, size, _ in places) + margin
        free = shutil.disk_usage(_existing(places[0][0])).free
        if free < needed:
            listed = "; ".join(f"{what}: {folder} needs about {_size(size)}" for folder, size, what in places)
            raise PreflightError(
                f"{places[0][2]}: {places[0][0]} has {_size(free)} free, this run needs at least {_size(needed)} "
                f"there ({listed}; plus a {_size(margin)} margin); nothing was trained: free some space or point "
                f"{' / '.join(what for _, _, what in places)} to another disk"
            )

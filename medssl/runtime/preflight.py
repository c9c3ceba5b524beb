"""Checks before a long run's first step: the folders it writes can be written, and the disk has room for its
checkpoints (a clear error now rather than a failed write hours later)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

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


def check_free_space(folder: Path, checkpoint: int, what: str, copies: int = 2, margin: int = MARGIN_BYTES) -> None:
    """``folder``'s file system has room for ``copies`` checkpoints of ``checkpoint`` bytes plus ``margin``.

    Raises:
        PreflightError: less is free (the message says what was needed and what is free).
    """
    needed = copies * checkpoint + margin
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise PreflightError(
            f"{what}: {folder} has {_size(free)} free, this run needs at least {_size(needed)} ({copies} checkpoints "
            f"of about {_size(checkpoint)} each plus a {_size(margin)} margin); nothing was trained: free some space "
            f"or point {what} to another disk"
        )

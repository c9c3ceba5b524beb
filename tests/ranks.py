"""Run a test function on several CPU ranks (gloo), retrying a rare teardown abort of gloo."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def spawn_ranks(fn: Callable[..., None], args: tuple[Any, ...], nprocs: int = 2, attempts: int = 3) -> None:
    """``fn(rank, init_file, *args)`` on ``nprocs`` processes.

    A worker killed by a signal (gloo occasionally aborts with "terminate called without an active
    exception" while shutting down) is retried with a fresh rendezvous file; an exception raised by
    a worker (a failed assertion) is not retried.
    """
    for attempt in range(attempts):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                mp.spawn(fn, args=(str(Path(tmp) / "init"), *args), nprocs=nprocs, join=True)
                return
            except mp.ProcessExitedException:
                if attempt == attempts - 1:
                    raise

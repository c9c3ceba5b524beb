"""Process-group setup for ``torchrun`` (one node or several) and plain single-process runs."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from medssl.runtime.devices import resolve_device


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def setup_distributed(device: str = "auto", backend: str = "auto", timeout_minutes: int = 30) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), or return a single-process context.

    ``backend``: ``auto`` picks NCCL for CUDA devices and gloo for CPU processes.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistributedContext(device=resolve_device(device))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    target = resolve_device(device, local)
    chosen = backend if backend != "auto" else ("nccl" if target.type == "cuda" else "gloo")
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(
            chosen,
            store=_attempt_store(rank, world, timeout),
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=target if target.type == "cuda" else None,
        )
    return DistributedContext(rank=rank, world_size=world, local_rank=local, device=target)


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's key-value store (``env://``), its keys prefixed with this attempt's number.

    Under ``torchrun --max-restarts`` the restarted workers meet in the same store as the attempt that failed; without
    a prefix of their own, gloo reads the dead workers' addresses from the previous attempt and every restart fails
    ("connectFullMesh failed ... Connection refused"). ``TORCHELASTIC_RESTART_COUNT`` numbers the attempts.
    """
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"medssl/attempt_{attempt}", store)


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(value: object, src: int = 0) -> object:
    """``value`` from rank ``src`` on every rank (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def raise_any_rank_error(error: Exception | None) -> None:
    """Every rank calls this with its own outcome (an exception, or None): if any rank failed, every rank raises the
    failure of the lowest such rank, its message prefixed with that rank. Without it, a rank that fails alone (a
    checkpoint it cannot read) leaves the others waiting at the next collective until the process group's timeout.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if error is not None:
            raise error
        return
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, None if error is None else (type(error).__name__, str(error), error))
    for rank, item in enumerate(gathered):
        if item is None:
            continue
        name, message, original = item  # type: ignore[misc]
        if rank == dist.get_rank():
            raise original
        failure = original if isinstance(original, Exception) else RuntimeError(f"{name}: {message}")
        failure.args = (f"rank {rank}: {message}",)
        raise failure

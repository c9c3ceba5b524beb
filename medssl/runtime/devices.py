"""Which device a process computes on."""

from __future__ import annotations

import torch


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (this process's CUDA device when there is one, else the CPU).

    ``local_rank`` picks the GPU of a process launched by torchrun (modulo the visible devices).
    """
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is available (use trainer.device=cpu or auto)")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)

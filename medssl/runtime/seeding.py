"""One seed for Python's, NumPy's and torch's generators."""

from __future__ import annotations

import torch
from monai.utils import set_determinism


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed ``random``, NumPy and torch (CPU and CUDA) through MONAI's ``set_determinism`` (seed modulo 2**32).

    ``set_determinism`` also makes cuDNN pick deterministic kernels and turns its autotuner off; that costs GPU
    speed, so unless ``deterministic`` the two cuDNN flags keep the values they had.
    """
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    set_determinism(seed=seed)
    if not deterministic:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags

"""Small numeric helpers shared by the objectives and the health metrics."""

from __future__ import annotations

import torch
from torch import Tensor


def at_least_float32(t: Tensor) -> Tensor:
    """``t`` in float32 if it is half/bfloat16 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) of probability vectors along ``dim``, with ``0 log 0 = 0``."""
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=dim)


def perplexity(usage: Tensor) -> Tensor:
    """``exp`` of the entropy of a usage histogram or mean assignment ``[K]`` (normalised here).

    The effective number of used prototypes: 1 when one prototype takes everything, K when usage
    is uniform; 0 for an empty histogram.
    """
    total = usage.sum()
    value = torch.exp(entropy(usage / total.clamp_min(1e-30)))
    return torch.where(total > 0, value, torch.zeros_like(value))

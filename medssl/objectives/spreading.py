"""Spreading terms that keep embeddings from drawing into a cone on the unit sphere.

* :func:`koleo_loss`: the Kozachenko–Leonenko differential-entropy estimator used as a regulariser (Sablayrolles et al.,
  "Spreading vectors for similarity search", ICLR 2019), as DINOv2 adds it to its prototype loss with weight 0.1
  (Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024; ``dinov2/loss/koleo_loss.py``
  applies it to each global crop's embeddings separately and sums).
* :func:`uniformity_loss`: the uniformity term of Wang & Isola ("Understanding Contrastive Representation Learning
  through Alignment and Uniformity on the Hypersphere", ICML 2020), with gradient.

Both are pure functions on one batch of embeddings of one view; under DDP they are computed per process (local batch),
as DINOv2 does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["koleo_loss", "uniformity_loss"]


def _check(z: Tensor, name: str) -> None:
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"{name} needs [B, D] embeddings with B >= 2, got {tuple(z.shape)}")


def koleo_loss(z: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo: ``-1/B Σ_i log(min_{j≠i} ‖x_i − x_j‖ + eps)`` with ``x = normalize(z)``.

    The nearest neighbour of each row is chosen without gradient (largest cosine similarity); the gradient flows
    through the distance to it, pushing each embedding away from its nearest neighbour.

    Args:
        z: ``[B, D]`` embeddings of one view (normalised here), ``B >= 2``.
        eps: added inside the logarithm (and to the distance, as ``F.pairwise_distance`` does), so identical rows give
            a large finite loss instead of infinity.
    Returns:
        0-dim tensor in the dtype of ``z`` (at least float32); lower when the rows are spread out.
    """
    _check(z, "koleo_loss")
    x = F.normalize(z.float() if z.dtype in (torch.float16, torch.bfloat16) else z, dim=1, eps=eps)
    with torch.no_grad():
        similarity = x @ x.T
        similarity.fill_diagonal_(-math.inf)
        nearest = similarity.argmax(dim=1)  # [B]
    distances = F.pairwise_distance(x, x[nearest], eps=eps)  # [B]
    return -torch.log(distances + eps).mean()


def uniformity_loss(z: Tensor, t: float = 2.0) -> Tensor:
    """Uniformity ``log mean_{i<j} exp(−t ‖x_i − x_j‖²)`` with ``x = normalize(z)`` (Wang & Isola, ICML 2020).

    Args:
        z: ``[B, D]`` embeddings of one view, ``B >= 2``.
        t: kernel scale (paper: 2).
    Returns:
        0-dim tensor ``<= 0``; 0 when every row is the same point, lower when they are spread out.
    """
    _check(z, "uniformity_loss")
    if not t > 0:
        raise ValueError(f"t must be > 0, got {t}")
    x = F.normalize(z.float() if z.dtype in (torch.float16, torch.bfloat16) else z, dim=1)
    squared = torch.pdist(x, p=2).pow(2)  # [B (B - 1) / 2], the pairs i < j
    return torch.logsumexp(-t * squared, dim=0) - math.log(squared.numel())

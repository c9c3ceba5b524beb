"""Cheap, label-free health metrics logged during every run (DESIGN §2.4).

All functions run under ``torch.no_grad()`` in float32 and never change their inputs.

* :func:`alignment` and :func:`uniformity`: Wang & Isola, "Understanding Contrastive Representation Learning through
  Alignment and Uniformity on the Hypersphere", ICML 2020 (lower is better for both; uniformity → 0 means collapse).
* :func:`effective_prototypes`: exp of the entropy of the mean cluster assignment (1 = every sample in one cluster,
  K = all K prototypes used equally), for SwAV/DeepCluster-style methods.
* :func:`embedding_std`: per-dimension std of the L2-normalised embedding (collapse alarm, as in SimSiam): 0 when all
  rows are equal, about ``1/sqrt(D)`` for an isotropic embedding in D dimensions.
* :func:`similarity_histograms`: cosine-similarity histograms of positive and negative pairs (the score statistics of
  Zhu et al., ICCV 2021, "Improving Contrastive Learning by Visualizing Feature Transformation").
* :func:`collapse_report`: all scalar metrics above in one dict of Python floats.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from medssl.objectives.numerics import perplexity
from medssl.objectives.sepclr import align_loss, uniform_loss
from medssl.runtime.checks import at_least

__all__ = [
    "alignment",
    "collapse_report",
    "effective_prototypes",
    "embedding_std",
    "per_dimension_std",
    "similarity_histograms",
    "uniformity",
]


def _as_matrix(z: Tensor, name: str, min_rows: int = 1) -> Tensor:
    if z.dim() != 2 or z.shape[0] < min_rows:
        raise ValueError(f"{name} must be [N, D] with N >= {min_rows}, got {tuple(z.shape)}")
    return z.detach().float()


@torch.no_grad()
def alignment(x: Tensor, y: Tensor, alpha: float = 2.0, normalize: bool = True) -> Tensor:
    """Alignment ``mean_i ‖x_i - y_i‖^alpha`` of positive pairs (Wang & Isola, ICML 2020).

    Args:
        x: ``[N, D]`` embeddings of view 1.
        y: ``[N, D]`` embeddings of view 2, paired row by row.
        alpha: distance exponent (> 0; paper: 2).
        normalize: L2-normalise the rows first (the metric is defined on the unit sphere).
    Returns:
        0-dim float32 tensor in ``[0, 2^alpha]`` for normalised inputs; 0 for identical views.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    x, y = _as_matrix(x, "x"), _as_matrix(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if normalize:
        x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    return align_loss(x, y, alpha=alpha, tau=0.5)  # SepCLR's alignment with 2 tau = 1


@torch.no_grad()
def uniformity(x: Tensor, t: float = 2.0, normalize: bool = True) -> Tensor:
    """Uniformity ``log mean_{i<j} exp(-t ‖x_i - x_j‖²)`` (Wang & Isola, ICML 2020).

    Args:
        x: ``[N, D]`` with ``N >= 2``.
        t: kernel scale (> 0; paper: 2).
        normalize: L2-normalise the rows first.
    Returns:
        0-dim float32 tensor, ``<= 0``; 0 for a collapsed embedding, about ``-4`` (t=2) when spread on the sphere.
    """
    if not t > 0:
        raise ValueError(f"t must be > 0, got {t}")
    x = _as_matrix(x, "x", min_rows=2)
    if normalize:
        x = F.normalize(x, dim=1)
    return uniform_loss(x, tau=1.0 / (2.0 * t))  # SepCLR's uniformity with t = 1 / (2 tau)


@torch.no_grad()
def effective_prototypes(assignments: Tensor, num_prototypes: int | None = None) -> float:
    """Effective number of used prototypes: ``exp(H(mean_i p_i))``.

    Args:
        assignments: ``[B, K]`` soft assignments (rows of probabilities, e.g. Sinkhorn codes or softmax scores), or
            ``[B]`` integer hard labels in ``[0, K)``.
        num_prototypes: K; required for hard labels, checked against the width for soft assignments.
    Returns:
        a float in ``[1, K]``: 1 when every sample uses the same prototype, K when usage is uniform.
    """
    if num_prototypes is not None and num_prototypes < 1:
        raise ValueError(f"num_prototypes must be >= 1, got {num_prototypes}")
    if assignments.dim() == 1:
        if num_prototypes is None:
            raise ValueError("num_prototypes is required when assignments are hard labels [B]")
        if assignments.is_floating_point() or assignments.is_complex():
            raise ValueError(f"hard labels must be integers, got dtype {assignments.dtype}")
        labels = assignments.detach().long()
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= num_prototypes:
            raise ValueError(f"hard labels must be a non-empty [B] in [0, {num_prototypes}), got {labels.tolist()[:8]}")
        usage = torch.bincount(labels, minlength=num_prototypes).float()
    elif assignments.dim() == 2 and assignments.shape[0] >= 1:
        if num_prototypes is not None and assignments.shape[1] != num_prototypes:
            raise ValueError(f"assignments have {assignments.shape[1]} columns but num_prototypes={num_prototypes}")
        probs = assignments.detach().float()
        if probs.min() < 0:
            raise ValueError("soft assignments must be non-negative probabilities")
        usage = probs.mean(dim=0)
    else:
        raise ValueError(f"assignments must be [B, K] probabilities or [B] labels, got {tuple(assignments.shape)}")
    return float(perplexity(usage))


@torch.no_grad()
def per_dimension_std(z: Tensor) -> Tensor:
    """Per-dimension standard deviation (unbiased) of the L2-normalised embedding: ``[N, D] -> [D]`` float32.

    Its mean is the collapse metric the trainer logs every step (``health/*std_mean``): a tensor, so that it is
    averaged with the other metrics without a host synchronisation.
    """
    return F.normalize(_as_matrix(z, "z", min_rows=2), dim=1).std(dim=0)


@torch.no_grad()
def embedding_std(z: Tensor) -> dict[str, float]:
    """Per-dimension standard deviation of the L2-normalised embedding (collapse alarm).

    Args:
        z: ``[N, D]`` with ``N >= 2``.
    Returns:
        ``{"std_mean", "std_min", "std_isotropic"}``: mean and minimum over dimensions of the per-dimension std
        (unbiased), and the reference ``1/sqrt(D)`` of an isotropic embedding. A collapsed embedding has std 0.
    """
    std = per_dimension_std(z)
    return {"std_mean": float(std.mean()), "std_min": float(std.min()), "std_isotropic": 1.0 / math.sqrt(z.shape[1])}


@torch.no_grad()
def similarity_histograms(z1: Tensor, z2: Tensor, bins: int = 20) -> tuple[Tensor, Tensor]:
    """Histograms of the cosine similarities of positive and negative pairs over ``[-1, 1]``.

    Positives are the ``N`` pairs ``(z1_i, z2_i)``; negatives are all other pairs among the ``2N`` rows of
    ``cat(z1, z2)`` (each unordered pair once, self pairs and positive pairs excluded), as in SimCLR's InfoNCE.

    Args:
        z1: ``[N, D]`` view 1.
        z2: ``[N, D]`` view 2, paired row by row.
        bins: number of equal-width bins; edges are ``torch.linspace(-1, 1, bins + 1)``.
    Returns:
        ``(positive, negative)``: two ``[bins]`` float32 tensors of fractions (each sums to 1, or is all 0 when it has
        no pair).
    """
    at_least(1, bins=bins)
    z1, z2 = _as_matrix(z1, "z1"), _as_matrix(z2, "z2")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T).clamp(-1.0, 1.0)
    idx = torch.arange(2 * n, device=z.device)
    positive = sim[idx[:n], idx[:n] + n]
    upper = idx[:, None] < idx[None, :]
    not_positive = idx[None, :] != idx[:, None] + n
    negative = sim[upper & not_positive]

    def hist(values: Tensor) -> Tensor:
        counts = torch.histc(values, bins=bins, min=-1.0, max=1.0)
        return counts / counts.sum().clamp_min(1.0)

    return hist(positive), hist(negative)


@torch.no_grad()
def collapse_report(z1: Tensor, z2: Tensor | None = None, t: float = 2.0) -> dict[str, float]:
    """All scalar health metrics of an embedding in one dict of Python floats.

    Args:
        z1: ``[N, D]`` embeddings (view 1), ``N >= 2``.
        z2: optional ``[N, D]`` embeddings of view 2 for the pair metrics.
        t: uniformity kernel scale.
    Returns:
        ``uniformity``, ``std_mean``, ``std_min``, ``std_isotropic`` (on ``z1``, or averaged over both views when ``z2``
        is given), plus ``alignment``, ``positive_similarity`` and ``negative_similarity`` (mean cosine of positive
        pairs and of cross-view negative pairs) when ``z2`` is given.
    """
    views = [z1] if z2 is None else [z1, z2]
    report: dict[str, float] = {"uniformity": sum(float(uniformity(v, t)) for v in views) / len(views)}
    stds = [embedding_std(v) for v in views]
    for key in stds[0]:
        report[key] = sum(s[key] for s in stds) / len(stds)
    if z2 is not None:
        report["alignment"] = float(alignment(z1, z2))
        a, b = F.normalize(z1.detach().float(), dim=1), F.normalize(z2.detach().float(), dim=1)
        sim = a @ b.T
        n = sim.shape[0]
        report["positive_similarity"] = float(sim.diagonal().mean())
        off = ~torch.eye(n, dtype=torch.bool, device=sim.device)
        report["negative_similarity"] = float(sim[off].mean()) if n > 1 else float("nan")
    return report

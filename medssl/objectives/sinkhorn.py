"""Sinkhorn-Knopp equipartition of a batch over prototypes, as used by SwAV (Caron et al., "Unsupervised Learning of
Visual Features by Contrasting Cluster Assignments", NeurIPS 2020, Eq. 3 and ``distributed_sinkhorn`` in
facebookresearch/swav).

The codes solve ``max_Q Tr(Qᵀ Cᵀ Z) + ε H(Q)`` over the transportation polytope where every prototype receives
``1/K`` of the mass and every sample ``1/B``; the solution ``Q = Diag(u) exp(Cᵀ Z / ε) Diag(v)`` is found by
alternately normalising rows (prototypes) and columns (samples). Under DDP the batch is the global batch: the
per-prototype sums are all-reduced across ranks, the per-sample sums are local.

Example:
    >>> codes = sinkhorn_knopp(z @ prototypes.weight.T, epsilon=0.05, iterations=3)  # [B, K], rows sum to 1
"""

from __future__ import annotations

import torch
from torch import Tensor

from medssl.objectives.distributed import all_reduce_max, all_reduce_sum, is_distributed
from medssl.runtime.checks import at_least

__all__ = ["sinkhorn_knopp"]


def _global_logsumexp_over_batch(log_q: Tensor) -> Tensor:
    """``log Σ_b exp(log_q[k, b])`` over the global batch (all ranks): ``[K, B_local] -> [K, 1]``.

    Shifted by the row maximum (itself all-reduced with MAX) so that nothing overflows or underflows to an empty row.
    """
    row_max = log_q.amax(dim=1, keepdim=True)  # [K, 1]
    if is_distributed():
        row_max = all_reduce_max(row_max.clone())
    row_sum = torch.exp(log_q - row_max).sum(dim=1, keepdim=True)  # [K, 1], >= 1 on the rank holding the max
    row_sum = all_reduce_sum(row_sum)
    return row_max + torch.log(row_sum)


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Soft, equipartitioned cluster assignments (codes) of a batch (SwAV, Caron et al. NeurIPS 2020).

    Computes the same codes as SwAV's ``distributed_sinkhorn``::

        Q = exp(scores / ε)ᵀ;  Q /= Σ Q                      # [K, B], B = global batch (all ranks)
        repeat `iterations`:  Q /= Q.sum(rows);  Q /= K       # each prototype gets mass 1/K   (all-reduced)
                              Q /= Q.sum(cols);  Q /= B       # each sample gets mass 1/B      (local)
        return (B · Q)ᵀ                                       # each sample's code sums to 1

    but in the log domain (log-sum-exp with the maximum subtracted), so large scores or a small ``ε`` neither overflow
    nor leave a prototype with zero mass. The constant factors (the initial total, ``1/K``, ``1/B`` and the final
    ``× B``) cancel out against the next normalisation and are therefore not applied explicitly.

    Runs under ``torch.no_grad()``, with autocast disabled, in float32 for half/bfloat16 inputs (float64 stays
    float64). When ``torch.distributed`` is initialised, every rank must call it with the same ``K``; the batch may
    differ between ranks.

    Args:
        scores: ``[B, K]`` similarities ``z · Cᵀ`` of B (local) samples to K prototypes, e.g. in ``[-1, 1]``.
        epsilon: ε, entropic regularisation (SwAV: 0.05; 0.03 if the model collapses).
        iterations: number of Sinkhorn row/column normalisation rounds (SwAV: 3); at least 1.
    Returns:
        ``[B, K]`` codes ``Q`` (no gradient), rows summing to 1; over the global batch, ``Q.sum(0) ≈ B_global / K``
        (exactly after convergence).
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    at_least(1, iterations=iterations)
    if scores.dim() != 2 or scores.shape[0] < 1 or scores.shape[1] < 1:
        raise ValueError(f"scores must be a non-empty [B, K] tensor, got shape {tuple(scores.shape)}")
    dtype = torch.promote_types(scores.dtype, torch.float32)
    with torch.autocast(device_type=scores.device.type, enabled=False):
        log_q = scores.detach().to(dtype).T / epsilon  # [K, B]
        for _ in range(iterations):
            log_q = log_q - _global_logsumexp_over_batch(log_q)  # rows (prototypes): equal mass
            log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True)  # columns (samples): sum to 1
        return torch.exp(log_q).T.contiguous()

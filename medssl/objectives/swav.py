"""SwAV swapped-prediction loss and its embedding queue (Caron et al., "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments", NeurIPS 2020; facebookresearch/swav ``main_swav.py``).

For crops ``v = 1..V`` with unit embeddings ``z_v`` and unit prototypes ``C`` (``K × D``), the caller computes the
scores ``s_v = z_v Cᵀ`` (``[B, K]``). The codes ``q_a`` of the assigned crops ``a ∈ A`` (the global crops) come from
Sinkhorn-Knopp on the detached scores (optionally with a queue of earlier embeddings prepended), and every other crop
predicts them with ``p_v = softmax(s_v / τ)``::

    L = 1/|A| Σ_{a∈A} 1/(V−1) Σ_{v≠a} mean_b [ −Σ_k q_a[b, k] log p_v[b, k] ]

Example:
    >>> criterion = SwAVLoss(temperature=0.1, epsilon=0.05, sinkhorn_iterations=3, crops_for_assign=(0, 1))
    >>> queue = EmbeddingQueue(length=3840, dim=128, n_assign=2)
    >>> with torch.no_grad():
    ...     prototypes.weight.copy_(F.normalize(prototypes.weight, dim=1))
    >>> z = [F.normalize(projector(encoder(crop)), dim=1) for crop in crops]  # V × [B, 128]
    >>> scores = [prototypes(zv) for zv in z]  # V × [B, K]
    >>> queue_scores = queue.scores(prototypes.weight) if queue.is_full else None
    >>> loss, metrics = criterion(scores, queue_scores)
    >>> queue.push([z[0], z[1]])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medssl.objectives.numerics import at_least_float32, entropy, perplexity
from medssl.objectives.sinkhorn import sinkhorn_knopp
from medssl.runtime.checks import at_least

__all__ = ["EmbeddingQueue", "SwAVLoss"]


class SwAVLoss(nn.Module):
    """Swapped prediction of Sinkhorn codes between crops (SwAV, Caron et al., NeurIPS 2020).

    One prototype head: ``scores[v] = z_v · Cᵀ``. For several prototype heads, call the loss once per head and average.
    The codes carry no gradient; the gradient reaches the embeddings and the prototypes through the prediction terms
    ``log softmax(scores[v] / τ)`` only. Computed in float32 (float64 inputs stay float64) with autocast disabled.

    Args:
        temperature: τ of the prediction softmax (SwAV: 0.1).
        epsilon: ε of Sinkhorn-Knopp (SwAV: 0.05; 0.03 if the model collapses).
        sinkhorn_iterations: Sinkhorn-Knopp rounds (SwAV: 3).
        crops_for_assign: indices of the crops whose codes are predicted (SwAV: the two global crops, ``(0, 1)``).
    """

    def __init__(
        self,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        crops_for_assign: Sequence[int] = (0, 1),
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        at_least(1, sinkhorn_iterations=sinkhorn_iterations)
        crops = tuple(int(a) for a in crops_for_assign)
        if not crops or min(crops) < 0 or len(set(crops)) != len(crops):
            raise ValueError(f"crops_for_assign must be distinct non-negative crop indices, got {crops_for_assign}")
        self.temperature = float(temperature)
        self.epsilon = float(epsilon)
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.crops_for_assign = crops

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, epsilon={self.epsilon}, "
            f"sinkhorn_iterations={self.sinkhorn_iterations}, crops_for_assign={self.crops_for_assign}"
        )

    def codes(self, scores: Tensor, queue_scores: Tensor | None = None) -> Tensor:
        """Sinkhorn codes of one assigned crop: ``[B, K]`` (no gradient), rows summing to 1.

        Args:
            scores: ``[B, K]`` scores of the assigned crop (detached here).
            queue_scores: optional ``[L, K]`` scores of queued embeddings under the current prototypes; they are
                prepended to the batch for the equipartition and their codes are dropped.
        """
        batch = scores.shape[0]
        s = scores.detach()
        if queue_scores is not None:
            if queue_scores.dim() != 2 or queue_scores.shape[1] != s.shape[1]:
                raise ValueError(
                    f"queue scores must be [L, {s.shape[1]}], got {tuple(queue_scores.shape)}",
                )
            s = torch.cat([queue_scores.detach().to(s.dtype), s], dim=0)
        return sinkhorn_knopp(s, self.epsilon, self.sinkhorn_iterations)[-batch:]

    def forward(
        self, scores: Sequence[Tensor], queue_scores: Sequence[Tensor | None] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Swapped-prediction loss.

        Args:
            scores: V tensors ``[B, K]``, ``scores[v] = z_v · Cᵀ`` for crop v (unit embeddings, unit prototypes);
                ``V >= 2`` and every index of ``crops_for_assign`` must be ``< V``.
            queue_scores: optional, one entry per assigned crop, in the order of ``crops_for_assign``
                (``queue_scores[i]`` goes with crop ``crops_for_assign[i]``, as :meth:`EmbeddingQueue.scores` returns
                them): ``[L, K]`` scores of the queued embeddings of that crop, or None for no queue.
        Returns:
            ``(loss, metrics)``: the scalar loss (float32, or float64 for float64 scores) and detached scalars
            ``loss_crop{a}`` (the term of each assigned crop); ``gap_to_uniform`` (``ln K − loss``, in nats: 0 at
            SwAV's trivial solution, where every prediction is uniform and the loss sits at ``ln K``; the
            facebookresearch/swav README reads a loss stuck near ``ln K`` as a failed run);
            ``gap_to_uniform_assigned`` and ``gap_to_uniform_other``, the same gap over the terms whose predicting
            crop is itself an assigned crop (with SwAV's multi-crop: a global crop predicting the other global's
            codes) and over the other terms (the local crops; absent without them), which tells whether a loss near
            ``ln K`` comes from the small crops' harder task;
            ``effective_prototypes`` (``exp`` of the entropy of the mean *prediction* ``softmax(scores / τ)`` over the
            batch and all crops, in ``[1, K]``: 1 when every sample predicts the same prototype; the codes are not
            used because Sinkhorn equipartitions them by construction); ``code_entropy`` (mean per-sample entropy of
            the codes, in nats) and ``prediction_entropy`` (mean per-sample entropy of the predictions over all
            crops, divided by ``ln K``: 1 when every prediction is uniform).
        """
        n_crops = len(scores)
        if n_crops < 2:
            raise ValueError(f"scores must hold at least 2 crops, got {n_crops}")
        if max(self.crops_for_assign) >= n_crops:
            raise ValueError(f"crops_for_assign={self.crops_for_assign} needs more than the {n_crops} crops given")
        shape = scores[0].shape
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"scores[0] must be a non-empty [B, K] tensor, got {tuple(shape)}")
        for v, s in enumerate(scores):
            if s.shape != shape:
                raise ValueError(f"scores[{v}] has shape {tuple(s.shape)}, expected {tuple(shape)} like scores[0]")
        if queue_scores is not None and len(queue_scores) != len(self.crops_for_assign):
            raise ValueError(
                f"queue_scores must have one entry per assigned crop ({len(self.crops_for_assign)}), "
                f"got {len(queue_scores)}"
            )

        with torch.autocast(device_type=scores[0].device.type, enabled=False):
            log_p = [F.log_softmax(at_least_float32(s) / self.temperature, dim=1) for s in scores]  # V × [B, K]
            terms: list[Tensor] = []
            all_codes: list[Tensor] = []
            by_role: dict[str, list[Tensor]] = {"assigned": [], "other": []}  # who predicts: an assigned crop or not
            metrics: dict[str, Tensor] = {}
            for i, a in enumerate(self.crops_for_assign):
                queued = None if queue_scores is None else queue_scores[i]
                q = self.codes(scores[a], queued).to(log_p[a].dtype)  # [B, K], no gradient
                all_codes.append(q)
                predictors = [v for v in range(n_crops) if v != a]
                cross = [-(q * log_p[v]).sum(dim=1).mean() for v in predictors]
                for v, c in zip(predictors, cross, strict=True):
                    by_role["assigned" if v in self.crops_for_assign else "other"].append(c.detach())
                term = torch.stack(cross).mean()
                terms.append(term)
                metrics[f"loss_crop{a}"] = term.detach()
            loss = torch.stack(terms).mean()

        with torch.no_grad():
            codes = torch.cat(all_codes)  # [|A| B, K]
            metrics["gap_to_uniform"] = math.log(shape[1]) - loss.detach()
            if by_role["assigned"]:
                metrics["gap_to_uniform_assigned"] = math.log(shape[1]) - torch.stack(by_role["assigned"]).mean()
            if by_role["other"]:
                metrics["gap_to_uniform_other"] = math.log(shape[1]) - torch.stack(by_role["other"]).mean()
            metrics["effective_prototypes"] = perplexity(torch.cat([lp.exp() for lp in log_p]).mean(dim=0))
            metrics["code_entropy"] = entropy(codes).mean()
            prediction = torch.stack([-(lp.exp() * lp).sum(dim=1).mean() for lp in log_p]).mean()
            metrics["prediction_entropy"] = prediction / math.log(shape[1]) if shape[1] > 1 else torch.ones(())
        return loss, metrics


class EmbeddingQueue(nn.Module):
    """FIFO of the last ``length`` unit embeddings of each assigned crop (SwAV's queue, Caron et al. NeurIPS 2020).

    It stores embeddings, not scores: :meth:`scores` recomputes them with the current prototypes each step. SwAV uses
    the queue only once it is full, and pushes the current batch after the loss is computed. Under DDP each rank keeps
    its own queue: pass ``length = queue_length // world_size`` (a multiple of the local batch size).

    The buffer ``queue`` ``[n_assign, length, dim]`` is in chronological order (oldest row first, newest last); the
    buffer ``filled`` counts the valid rows (both are saved in the ``state_dict``).

    Args:
        length: L, rows per assigned crop.
        dim: D, embedding width.
        n_assign: number of assigned crops (``len(crops_for_assign)``).
    """

    queue: Tensor
    filled: Tensor

    def __init__(self, length: int, dim: int, n_assign: int = 2) -> None:
        super().__init__()
        at_least(1, length=length, dim=dim, n_assign=n_assign)
        self.length = int(length)
        self.dim = int(dim)
        self.n_assign = int(n_assign)
        self.register_buffer("queue", torch.zeros(n_assign, length, dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"length={self.length}, dim={self.dim}, n_assign={self.n_assign}"

    @property
    def is_full(self) -> bool:
        """True once ``length`` rows have been pushed (since construction or :meth:`reset`)."""
        return int(self.filled) >= self.length

    def reset(self) -> None:
        """Empty the queue."""
        self.queue.zero_()
        self.filled.zero_()

    @torch.no_grad()
    def push(self, embeddings: Sequence[Tensor]) -> None:
        """Append a batch (detached, L2-normalised) and drop the oldest rows.

        Args:
            embeddings: ``n_assign`` tensors ``[B, dim]``, the embeddings of the assigned crops in the order of
                ``crops_for_assign``. If ``B >= length`` only the last ``length`` rows are kept.
        """
        if len(embeddings) != self.n_assign:
            raise ValueError(f"expected {self.n_assign} embedding tensors, got {len(embeddings)}")
        batch = embeddings[0].shape[0]
        for i, e in enumerate(embeddings):
            if e.dim() != 2 or e.shape[1] != self.dim or e.shape[0] != batch:
                raise ValueError(f"embeddings[{i}] must be [{batch}, {self.dim}], got {tuple(e.shape)}")
        keep = min(batch, self.length)
        new = torch.stack([F.normalize(e.detach()[-keep:].to(self.queue), dim=1) for e in embeddings])
        if keep < self.length:
            self.queue[:, : self.length - keep] = self.queue[:, keep:].clone()
        self.queue[:, self.length - keep :] = new
        self.filled.clamp_(max=self.length - keep).add_(keep)

    @torch.no_grad()
    def scores(self, prototype_weight: Tensor) -> list[Tensor]:
        """Scores of the queued embeddings under the current prototypes (no gradient).

        Args:
            prototype_weight: ``[K, dim]`` prototype matrix C (e.g. ``nn.Linear(dim, K, bias=False).weight``).
        Returns:
            ``n_assign`` tensors ``[F, K]`` with ``F = min(filled, length)`` valid rows (``[length, K]`` once full),
            oldest first, in the dtype of ``prototype_weight``.
        """
        if prototype_weight.dim() != 2 or prototype_weight.shape[1] != self.dim:
            raise ValueError(f"prototype_weight must be [K, {self.dim}], got {tuple(prototype_weight.shape)}")
        n = min(int(self.filled), self.length)
        w = prototype_weight.detach()
        return [self.queue[i, self.length - n :].to(w) @ w.T for i in range(self.n_assign)]

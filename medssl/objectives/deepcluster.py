"""DeepCluster-v2 (Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
NeurIPS 2020, Appendix; facebookresearch/swav ``main_deepclusterv2.py``).

A memory bank keeps last epoch's unit embeddings of the assigned crops. At the start of each epoch, spherical k-means
is run for each of H prototype heads (head h clusters bank view ``h mod n_views``) on the rows written since the
previous clustering only (as the reference, whose bank holds exactly one epoch of every rank's samples); the
centroids become the (frozen) prototypes and the cluster of every sample becomes its pseudo-label. The loss is the
cross-entropy between ``scores / τ`` of every crop and the pseudo-label of its sample, averaged over the heads.

Example:
    >>> bank = MemoryBank(size=len(dataset), dim=128, n_views=2)
    >>> criterion = DeepClusterV2(n_prototypes=[3000, 3000, 3000], temperature=0.1)
    >>> criterion.cluster(bank, [head.weight for head in prototype_heads])  # at each epoch start
    >>> z = [F.normalize(projector(encoder(crop)), dim=1) for crop in crops]  # V × [B, 128]
    >>> scores = [[head(zv) for zv in z] for head in prototype_heads]  # H × V × [B, K_h]
    >>> loss, metrics = criterion(scores, index)
    >>> bank.update(index, [z[0], z[1]])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from medssl.objectives.distributed import all_reduce_max, all_reduce_sum, is_distributed, rank, world_size
from medssl.objectives.numerics import at_least_float32, perplexity
from medssl.runtime.checks import at_least

__all__ = ["IGNORE_INDEX", "DeepClusterV2", "MemoryBank", "spherical_kmeans"]

IGNORE_INDEX = -100
"""Pseudo-label of samples without an assignment (not in the bank at the last clustering); ignored by the loss."""

_CHUNK = 8192  # rows per block in the k-means E-step, to bound the [N, k] similarity memory


def _assign(x: Tensor, centroids: Tensor) -> Tensor:
    """E-step: index of the most cosine-similar centroid for each row of ``x`` (``[N, D], [k, D] -> [N]``)."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    return torch.cat([(block @ centroids.T).argmax(dim=1) for block in x.split(_CHUNK)])


@torch.no_grad()
def spherical_kmeans(
    x: Tensor, k: int, iterations: int = 10, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Spherical k-means (cosine similarity) as in DeepCluster-v2's ``cluster_memory`` (Caron et al., 2020).

    Centroids start as ``k`` distinct random rows of ``x``; each iteration assigns every row to its most similar
    centroid (E-step) and sets each centroid to the normalised mean of its rows (M-step); an empty cluster keeps its
    previous centroid. A final E-step gives the returned assignments.

    Distributed: when ``torch.distributed`` is initialised each rank passes its own rows; rank 0's initial centroids
    are broadcast and the per-cluster sums and counts are all-reduced, so every rank ends with the same centroids and
    the assignments of its own rows. Every rank must call it with the same ``k`` and ``iterations``.

    Args:
        x: ``[N, D]`` embeddings with unit rows (they are not re-normalised), ``N >= k`` (on rank 0 when
            distributed; other ranks may hold fewer rows, even none).
        k: number of clusters.
        iterations: k-means iterations before the final E-step (DeepCluster-v2: 10).
        generator: optional RNG for the initial centroids (a CPU generator or one on ``x.device``).
    Returns:
        ``(centroids, assignments)``: ``[k, D]`` unit rows in the dtype of ``x`` (float32 for half inputs) and ``[N]``
        int64 cluster indices in ``[0, k)``.
    """
    if x.dim() != 2 or x.shape[1] < 1:
        raise ValueError(f"x must be [N, D], got shape {tuple(x.shape)}")
    at_least(1, k=k)
    at_least(0, iterations=iterations)
    x = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    n_init = x.shape[0]
    if is_distributed():  # the initial centroids come from rank 0: every rank checks rank 0's N
        n_rank0 = torch.tensor([n_init], device=x.device)
        dist.broadcast(n_rank0, src=0)
        n_init = int(n_rank0)
    if n_init < k:
        raise ValueError(f"k={k} clusters need at least k samples, got N={n_init}")
    if is_distributed() and dist.get_rank() != 0:
        centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    else:
        gen_device = generator.device if generator is not None else x.device
        init = torch.randperm(x.shape[0], generator=generator, device=gen_device)[:k].to(x.device)
        centroids = x[init].clone()  # [k, D]
    if is_distributed():
        dist.broadcast(centroids, src=0)
    for _ in range(iterations):
        assignments = _assign(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assignments, x)  # [k, D]
        counts = torch.bincount(assignments, minlength=k).to(x.dtype)  # [k]
        all_reduce_sum(sums)
        all_reduce_sum(counts)
        norms = sums.norm(dim=1, keepdim=True)
        keep_new = (counts[:, None] > 0) & (norms > 1e-12)
        centroids = torch.where(keep_new, sums / norms.clamp_min(1e-12), centroids)
    return centroids, _assign(x, centroids)


class MemoryBank(nn.Module):
    """Last epoch's unit embeddings of each assigned crop, indexed by dataset index (DeepCluster-v2 memory bank).

    Buffers (saved in the ``state_dict``, so that a resumed run clusters exactly the same rows):
    ``embeddings`` ``[n_views, size, dim]``; ``filled`` ``[size]`` (bool), True for the indices written at least once;
    ``stamp`` ``[size]`` (int64), the write count (``clock``) of each index's last write since the last
    :meth:`reset`, 0 for the indices not written since; ``clock`` (int64 scalar), the number of :meth:`update` calls.

    Only the rows written since the last clustering (:attr:`fresh`) are clustered; :meth:`DeepClusterV2.cluster`
    resets the stamps afterwards, as the reference's bank holds exactly last epoch's embeddings. Under DDP each rank
    holds the full-size table but writes only the indices of its own samples; :meth:`rows_to_cluster` gives every
    fresh index to exactly one rank (the one that wrote it last), and the ranks cluster their rows jointly.

    Args:
        size: number of samples in the dataset (largest index + 1).
        dim: embedding width D.
        n_views: number of assigned crops stored per sample (DeepCluster-v2: 2).
    """

    embeddings: Tensor
    filled: Tensor
    stamp: Tensor
    clock: Tensor

    def __init__(self, size: int, dim: int, n_views: int = 2) -> None:
        super().__init__()
        at_least(1, size=size, dim=dim, n_views=n_views)
        self.size = int(size)
        self.dim = int(dim)
        self.n_views = int(n_views)
        self.register_buffer("embeddings", torch.zeros(n_views, size, dim))
        self.register_buffer("filled", torch.zeros(size, dtype=torch.bool))
        self.register_buffer("stamp", torch.zeros(size, dtype=torch.long))
        self.register_buffer("clock", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, n_views={self.n_views}"

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Checkpoints written before ``stamp``/``clock`` existed: every filled row counts as fresh once.
        filled = state_dict.get(prefix + "filled")
        if isinstance(filled, Tensor) and prefix + "stamp" not in state_dict:
            state_dict[prefix + "stamp"] = filled.to(torch.long)
            state_dict[prefix + "clock"] = torch.ones((), dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def fresh(self) -> Tensor:
        """``[size]`` bool: the indices written since the last :meth:`reset` (on this rank)."""
        return self.stamp > 0

    @torch.no_grad()
    def reset(self) -> None:
        """Mark every row as stale (after a clustering); the embeddings stay, but are not clustered again."""
        self.stamp.zero_()

    @torch.no_grad()
    def rows_to_cluster(self) -> Tensor:
        """``[N]`` int64, ascending: the fresh indices this rank clusters.

        In one process, every fresh index. Under DDP (a collective: every rank must call it) each fresh index goes to
        the rank that wrote it last (largest ``stamp``; on a tie, the highest rank), so that an index written by
        several ranks since the last clustering is clustered once, with its newest embedding.
        """
        fresh = self.fresh
        if world_size() > 1:
            key = torch.where(fresh, self.stamp * world_size() + rank(), torch.full_like(self.stamp, -1))
            mine = fresh & (key == all_reduce_max(key.clone()))
        else:
            mine = fresh
        return mine.nonzero().squeeze(1)

    @property
    def is_full(self) -> bool:
        """True once every index has been written."""
        return bool(self.filled.all())

    @torch.no_grad()
    def update(self, index: Tensor, embeddings: Sequence[Tensor]) -> None:
        """Overwrite the rows ``index`` with the (detached, L2-normalised) embeddings of each view.

        Args:
            index: ``[B]`` int64 dataset indices in ``[0, size)``.
            embeddings: ``n_views`` tensors ``[B, dim]``.
        """
        if index.dim() != 1 or index.is_floating_point():
            raise ValueError(f"index must be a [B] integer tensor, got {index.dtype} {tuple(index.shape)}")
        if len(embeddings) != self.n_views:
            raise ValueError(f"expected {self.n_views} embedding tensors, got {len(embeddings)}")
        for v, e in enumerate(embeddings):
            if e.dim() != 2 or e.shape != (index.shape[0], self.dim):
                raise ValueError(f"embeddings[{v}] must be [{index.shape[0]}, {self.dim}], got {tuple(e.shape)}")
        idx = index.to(self.embeddings.device, torch.long)
        for v, e in enumerate(embeddings):
            self.embeddings[v, idx] = F.normalize(e.detach().to(self.embeddings), dim=1)
        self.filled[idx] = True
        self.clock += 1
        self.stamp[idx] = self.clock


class DeepClusterV2(nn.Module):
    """DeepCluster-v2 loss with per-epoch spherical k-means pseudo-labels (Caron et al., NeurIPS 2020).

    Holds the pseudo-label table ``assignments`` ``[H, size]`` (int64 buffer, ``-100`` = unknown), filled by
    :meth:`cluster` and read by :meth:`forward`. The table is created at the first :meth:`cluster` call with the
    bank's size (a checkpointed table of any size loads into a fresh module).

    The prototypes are set by k-means only: keep them frozen (``requires_grad_(False)`` or no optimiser step), as the
    reference does. Computed in float32 (float64 inputs stay float64) with autocast disabled.

    Args:
        n_prototypes: K_h for each head h (DeepCluster-v2: ``[3000, 3000, 3000]``).
        temperature: τ of the softmax (0.1).
        kmeans_iterations: k-means iterations per clustering (10).
    """

    assignments: Tensor

    def __init__(self, n_prototypes: Sequence[int], temperature: float = 0.1, kmeans_iterations: int = 10) -> None:
        super().__init__()
        heads = [int(k) for k in n_prototypes]
        if not heads or min(heads) < 1:
            raise ValueError(f"n_prototypes must be a non-empty list of positive ints, got {n_prototypes}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        at_least(0, kmeans_iterations=kmeans_iterations)
        self.n_prototypes = heads
        self.temperature = float(temperature)
        self.kmeans_iterations = int(kmeans_iterations)
        self.register_buffer("assignments", torch.full((len(heads), 0), IGNORE_INDEX, dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"n_prototypes={self.n_prototypes}, temperature={self.temperature}, "
            f"kmeans_iterations={self.kmeans_iterations}"
        )

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "assignments"
        incoming = state_dict.get(key)
        if isinstance(incoming, Tensor) and incoming.shape != self.assignments.shape:
            self.assignments = torch.empty_like(incoming, device=self.assignments.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def cluster(
        self,
        bank: MemoryBank,
        prototypes_weights: Sequence[Tensor],
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Run spherical k-means per head, write the centroids into the prototypes in place, store the pseudo-labels.

        Head h clusters the rows of bank view ``h mod n_views`` written since the previous clustering
        (:meth:`MemoryBank.rows_to_cluster`); the other indices get the label ``-100``. The bank is then
        :meth:`~MemoryBank.reset`, so the next clustering sees only the rows written after this one. Under DDP
        (every rank must call it) each fresh index is clustered by exactly one rank, the sums are all-reduced inside
        :func:`spherical_kmeans` (the joint k-means of every rank's rows) and the per-rank label tables are merged
        with an all-reduce MAX (each index is labelled by the rank that holds it, ``-100`` elsewhere).

        Args:
            bank: the memory bank (last epoch's embeddings); reset on return.
            prototypes_weights: H tensors ``[K_h, dim]`` (e.g. ``head.weight``), overwritten in place.
            generator: optional RNG for the k-means initialisations.
        Returns:
            detached metrics ``effective_prototypes_h{h}``: ``exp`` of the entropy of each head's cluster sizes.
        """
        if len(prototypes_weights) != len(self.n_prototypes):
            raise ValueError(f"expected {len(self.n_prototypes)} prototype weights, got {len(prototypes_weights)}")
        for h, (w, k) in enumerate(zip(prototypes_weights, self.n_prototypes, strict=True)):
            if w.shape != (k, bank.dim):
                raise ValueError(f"prototypes_weights[{h}] must be [{k}, {bank.dim}], got {tuple(w.shape)}")
        device = bank.embeddings.device
        if self.assignments.shape[1] != bank.size or self.assignments.device != device:
            self.assignments = torch.empty(len(self.n_prototypes), bank.size, dtype=torch.long, device=device)
        rows = bank.rows_to_cluster()  # [N]: written since the last clustering, each index on one rank only
        metrics: dict[str, Tensor] = {}
        for h, (w, k) in enumerate(zip(prototypes_weights, self.n_prototypes, strict=True)):
            x = bank.embeddings[h % bank.n_views, rows]  # [N, dim]
            centroids, labels = spherical_kmeans(x, k, self.kmeans_iterations, generator)
            w.copy_(centroids.to(w))
            table = torch.full((bank.size,), IGNORE_INDEX, dtype=torch.long, device=device)
            table[rows] = labels
            self.assignments[h] = all_reduce_max(table)
            known = self.assignments[h][self.assignments[h] != IGNORE_INDEX]
            metrics[f"effective_prototypes_h{h}"] = perplexity(torch.bincount(known, minlength=k).float())
        bank.reset()
        return metrics

    def forward(self, scores: Sequence[Sequence[Tensor]], index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy of every crop's scores against its sample's k-means pseudo-label.

        Args:
            scores: H lists (one per head) of V tensors ``[B, K_h]`` (``z_v · C_hᵀ`` for crop v).
            index: ``[B]`` int64 dataset indices of the batch.
        Returns:
            ``(loss, metrics)``: ``loss = 1/H Σ_h CE(cat_v(scores[h][v]) / τ, assignments[h][index] repeated V
            times, ignore_index=-100)`` (0 for a head whose labels are all unknown), and detached scalars
            ``loss_head{h}``, ``effective_prototypes`` (``exp`` of the entropy of the batch's label histogram,
            mean over heads) and ``unassigned_fraction`` (share of the batch without a label).
        """
        if self.assignments.shape[1] == 0:
            raise RuntimeError("DeepClusterV2.cluster() must run before the loss (no pseudo-labels yet)")
        if len(scores) != len(self.n_prototypes):
            raise ValueError(f"scores must hold one list per head ({len(self.n_prototypes)}), got {len(scores)}")
        if index.dim() != 1 or index.is_floating_point():
            raise ValueError(f"index must be a [B] integer tensor, got {index.dtype} {tuple(index.shape)}")
        batch = index.shape[0]
        for h, (views, k) in enumerate(zip(scores, self.n_prototypes, strict=True)):
            if len(views) < 1:
                raise ValueError(f"scores[{h}] must hold at least one crop")
            for v, s in enumerate(views):
                if s.shape != (batch, k):
                    raise ValueError(f"scores[{h}][{v}] must be [{batch}, {k}], got {tuple(s.shape)}")
        idx = index.to(self.assignments.device, torch.long)
        terms: list[Tensor] = []
        metrics: dict[str, Tensor] = {}
        usage: list[Tensor] = []
        with torch.autocast(device_type=scores[0][0].device.type, enabled=False):
            for h, views in enumerate(scores):
                logits = torch.cat([at_least_float32(s) for s in views]) / self.temperature  # [V B, K_h]
                target = self.assignments[h, idx].to(logits.device)  # [B]
                targets = target.repeat(len(views))  # [V B], crop-major like the logits
                total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
                term = total / (targets != IGNORE_INDEX).sum().clamp_min(1)
                terms.append(term)
                metrics[f"loss_head{h}"] = term.detach()
                with torch.no_grad():
                    valid = target[target != IGNORE_INDEX]
                    usage.append(perplexity(torch.bincount(valid, minlength=self.n_prototypes[h]).float()))
            loss = torch.stack(terms).mean()
        with torch.no_grad():
            metrics["effective_prototypes"] = torch.stack(usage).mean()
            known = self.assignments[:, idx] != IGNORE_INDEX
            metrics["unassigned_fraction"] = 1.0 - known.float().mean()
        return loss, metrics


class DeepClusterHead(nn.Module):
    """DeepCluster-v2 for one embedding stream (2D crops or volume embeddings).

    Each step writes the (detached) embeddings of the two assigned views into the memory bank and,
    once a first clustering exists, returns the cross-entropy to last epoch's pseudo-labels. The
    trainer calls :meth:`cluster` at the start of every epoch: spherical k-means on the bank, whose
    centroids become the prototypes (which therefore take no gradient).

    Args:
        size: dataset size (largest sample index + 1).
        dim: embedding width.
        n_prototypes: clusters per head.
    """

    clustered: Tensor

    def __init__(
        self, size: int, dim: int, n_prototypes: Sequence[int], temperature: float = 0.1, kmeans_iterations: int = 10
    ) -> None:
        super().__init__()
        self.bank = MemoryBank(size, dim, n_views=2)
        self.deepcluster = DeepClusterV2(n_prototypes, temperature, kmeans_iterations)
        self.register_buffer("clustered", torch.zeros((), dtype=torch.bool))

    def forward(
        self, prototype_heads: Sequence[nn.Module], embeddings: Sequence[Tensor], index: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss for V unit embeddings ``[B, dim]`` (the first two are stored in the bank) of samples ``index`` [B]."""
        if len(embeddings) < 2:
            raise ValueError(f"DeepCluster-v2 needs at least two views, got {len(embeddings)}")
        self.bank.update(index, [embeddings[0].detach(), embeddings[1].detach()])
        if not bool(self.clustered):
            zero = torch.stack([e.sum() for e in embeddings]).sum() * 0.0
            return zero, {"waiting_for_clustering": torch.ones(())}
        scores = [[head(z) for z in embeddings] for head in prototype_heads]
        return self.deepcluster(scores, index)

    @torch.no_grad()
    def cluster(
        self, prototype_heads: Sequence[nn.Module], generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """k-means on the rows written since the last clustering; writes the centroids into the heads' weights.

        No-op (keeping the previous prototypes and pseudo-labels) when no rank wrote a row since the last clustering.
        """
        written = torch.tensor(int(self.bank.fresh.any()), device=self.bank.stamp.device)
        if not bool(all_reduce_max(written)):  # agreed by every rank: k-means is a collective
            return {}
        metrics = self.deepcluster.cluster(self.bank, [head.weight for head in prototype_heads], generator)
        self.clustered.fill_(True)
        return metrics

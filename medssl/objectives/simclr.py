"""SimCLR's InfoNCE / NT-Xent loss (Chen et al., "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020) with optional hard negative mixing, MoCHi (Kalantidis et al., "Hard Negative Mixing for
Contrastive Learning", NeurIPS 2020).

For a batch of ``B`` samples seen in two views on each of ``W`` ranks, each of the ``2B`` local embeddings is an
anchor: its positive is its other view, its negatives are the other ``2BW - 2`` embeddings of the global batch
(gathered with gradient across ranks). The loss is the mean cross-entropy of picking the positive among the
``2BW - 1`` candidates with logits ``cos / temperature``.

Example:
    >>> criterion = InfoNCELoss(temperature=0.1, hard_negative_mixing=MoCHiConfig(n_hardest=64, n_synthetic=32))
    >>> loss, metrics = criterion(projector(encoder(view1)), projector(encoder(view2)), step=global_step)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medssl.objectives.distributed import all_gather_with_grad, is_distributed, rank

__all__ = ["InfoNCELogits", "InfoNCELoss", "MoCHiConfig", "mix_hard_negatives"]


@dataclass(frozen=True)
class MoCHiConfig:
    """Settings of hard negative mixing (Kalantidis et al., NeurIPS 2020), written MoCHi(N, s, s') in the paper.

    Args:
        n_hardest: N, the number of hardest negatives per anchor mixed from (capped at the number available).
        n_synthetic: s, synthetic negatives ``normalize(α n_i + (1-α) n_j)`` per anchor, ``α ~ U(0, 1)``.
        n_synthetic_query: s', harder synthetic negatives ``normalize(β q + (1-β) n_j)`` per anchor,
            ``β ~ U(0, 0.5)``.
        start_step: first training step at which mixing is applied (warm-up without mixing before it).
    """

    n_hardest: int = 64
    n_synthetic: int = 32
    n_synthetic_query: int = 8
    start_step: int = 0

    def __post_init__(self) -> None:
        if self.n_hardest < 1:
            raise ValueError(f"n_hardest must be >= 1, got {self.n_hardest}")
        if self.n_synthetic < 0:
            raise ValueError(f"n_synthetic must be >= 0, got {self.n_synthetic}")
        if self.n_synthetic_query < 0:
            raise ValueError(f"n_synthetic_query must be >= 0, got {self.n_synthetic_query}")
        if self.start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {self.start_step}")

    @property
    def n_total(self) -> int:
        """Number of synthetic negatives (logit columns) added per anchor: ``s + s'``."""
        return self.n_synthetic + self.n_synthetic_query


@dataclass
class SimCLRConfig:
    """``method.simclr``: the InfoNCE temperature (Chen et al., ICML 2020) and optional hard negative mixing."""

    temperature: float = 0.1
    hard_negative_mixing: MoCHiConfig | None = None


def mix_hard_negatives(
    anchors: Tensor,
    keys: Tensor,
    negative_mask: Tensor,
    config: MoCHiConfig,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Synthesise hard negatives for each anchor by mixing its hardest negatives (MoCHi, Kalantidis et al. 2020).

    For anchor ``q``, the ``N = min(n_hardest, #negatives)`` negatives with the highest cosine similarity are kept;
    ``s`` keys ``normalize(α n_i + (1-α) n_j)`` are made from random pairs ``(i, j)`` of them with ``α ~ U(0, 1)``,
    and ``s'`` keys ``normalize(β q + (1-β) n_j)`` with ``β ~ U(0, 0.5)`` and random ``j``. Everything is computed
    from detached inputs, so no gradient flows through the synthetic keys (only through the anchor in ``q · h``).

    Randomness comes from ``generator`` (which must live on ``anchors.device``) or, when None, from torch's global
    RNG of that device.

    Args:
        anchors: ``[A, D]`` unit-norm anchors (queries).
        keys: ``[K, D]`` unit-norm candidate keys.
        negative_mask: ``[A, K]`` bool, True where ``keys[k]`` is a negative of ``anchors[a]``; every row needs at
            least one True.
        config: the MoCHi settings.
        generator: optional ``torch.Generator`` for reproducible mixing.
    Returns:
        ``[A, s + s', D]`` detached unit-norm synthetic negatives.
    """
    anchors, keys = anchors.detach(), keys.detach()
    if anchors.dim() != 2 or keys.dim() != 2 or anchors.shape[1] != keys.shape[1]:
        raise ValueError(f"anchors [A, D] and keys [K, D] expected, got {tuple(anchors.shape)}, {tuple(keys.shape)}")
    if negative_mask.shape != (anchors.shape[0], keys.shape[0]):
        raise ValueError(
            f"negative_mask must be [A, K] = {(anchors.shape[0], keys.shape[0])}, got {negative_mask.shape}"
        )
    n_available = int(negative_mask.sum(dim=1).min()) if anchors.shape[0] else 0
    if n_available < 1:
        raise ValueError("hard negative mixing needs at least one negative per anchor")
    n_anchors, device = anchors.shape[0], anchors.device
    n_hardest = min(config.n_hardest, n_available)
    similarity = (anchors @ keys.T).masked_fill(~negative_mask, float("-inf"))
    hardest = similarity.topk(n_hardest, dim=1).indices  # [A, N] key indices

    def pick(count: int) -> Tensor:  # [A, count, D] keys drawn uniformly among each anchor's hardest
        slots = torch.randint(n_hardest, (n_anchors, count), generator=generator, device=device)
        return keys[hardest.gather(1, slots)]

    parts = []
    if config.n_synthetic:
        alpha = torch.rand(n_anchors, config.n_synthetic, 1, generator=generator, device=device, dtype=keys.dtype)
        parts.append(alpha * pick(config.n_synthetic) + (1 - alpha) * pick(config.n_synthetic))
    if config.n_synthetic_query:
        beta = 0.5 * torch.rand(
            n_anchors, config.n_synthetic_query, 1, generator=generator, device=device, dtype=keys.dtype
        )
        parts.append(beta * anchors[:, None, :] + (1 - beta) * pick(config.n_synthetic_query))
    if not parts:
        return keys.new_zeros(n_anchors, 0, keys.shape[1])
    return F.normalize(torch.cat(parts, dim=1), dim=-1)


class InfoNCELogits(NamedTuple):
    """What :meth:`InfoNCELoss.logits` returns."""

    logits: Tensor
    targets: Tensor
    n_real: int


class InfoNCELoss(nn.Module):
    """NT-Xent / InfoNCE loss of SimCLR (Chen et al., ICML 2020), optionally with MoCHi hard negative mixing.

    Inputs are L2-normalised inside; logits are computed in float32. With ``gather_distributed`` and an initialised
    process group, the embeddings of all ranks are gathered with gradient (``all_gather_with_grad``) so that every
    anchor sees the ``2BW - 2`` negatives of the global batch; every rank must then use the same batch size ``B``.

    With ``hard_negative_mixing``, each anchor's logits gain ``s + s'`` columns for synthetic negatives built from its
    hardest in-batch negatives (see :func:`mix_hard_negatives`); the cross-entropy is otherwise unchanged. Mixing is
    applied only in training mode and from ``start_step`` on; the step is the ``step`` argument of ``forward`` or,
    when it is None, the number of training-mode ``forward`` calls made before this one.

    Args:
        temperature: softmax temperature τ (> 0; SimCLR: 0.1–0.5).
        gather_distributed: gather negatives across ranks when ``torch.distributed`` is initialised.
        hard_negative_mixing: MoCHi settings, or None for plain InfoNCE.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        gather_distributed: bool = True,
        hard_negative_mixing: MoCHiConfig | None = None,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if hard_negative_mixing is not None and not isinstance(hard_negative_mixing, MoCHiConfig):
            raise ValueError(f"hard_negative_mixing must be a MoCHiConfig or None, got {type(hard_negative_mixing)}")
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed
        self.hard_negative_mixing = hard_negative_mixing
        self.num_calls = 0

    def mixing_active(self, step: int) -> bool:
        """Whether MoCHi is applied at ``step`` (configured, training mode, ``step >= start_step``)."""
        config = self.hard_negative_mixing
        return config is not None and self.training and step >= config.start_step

    def logits(
        self, z1: Tensor, z2: Tensor, step: int | None = None, generator: torch.Generator | None = None
    ) -> InfoNCELogits:
        """The logits and targets behind :meth:`forward` (no side effects; ``step=None`` reads the call counter).

        Args:
            z1: ``[B, D]`` embeddings of view 1 (any norm).
            z2: ``[B, D]`` embeddings of view 2, paired row by row with ``z1``.
            step: global training step (for ``MoCHiConfig.start_step``); None uses the internal call counter.
            generator: ``torch.Generator`` on the embeddings' device for MoCHi's sampling; None uses the global RNG.
        Returns:
            :class:`InfoNCELogits`: ``logits`` ``[2B, 2BW + s + s']`` float32 (rows: view-1 anchors then view-2
            anchors; columns: the ``2BW`` gathered embeddings, rank-major, each rank's view 1 then view 2, with the
            anchor's own column at ``-inf``, then the synthetic negatives when mixing is active), ``targets`` ``[2B]``
            (column of each anchor's positive) and ``n_real`` (= ``2BW``, the number of non-synthetic columns).
        """
        if z1.dim() != 2 or z1.shape != z2.shape or z1.shape[0] < 1:
            raise ValueError(f"z1 and z2 must be [B, D] of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
        if step is None:
            step = self.num_calls
        batch = z1.shape[0]
        with torch.autocast(device_type=z1.device.type, enabled=False):
            anchors = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # [2B, D]: view 1 then view 2
            this_rank = 0
            keys = anchors
            if self.gather_distributed and is_distributed():
                keys = all_gather_with_grad(anchors)  # [W * 2B, D], rank-major
                this_rank = rank()
            n_anchors, device = anchors.shape[0], anchors.device
            local = torch.arange(n_anchors, device=device)
            self_idx = this_rank * n_anchors + local
            targets = this_rank * n_anchors + (local + batch) % n_anchors
            columns = torch.arange(keys.shape[0], device=device)
            is_self = columns[None, :] == self_idx[:, None]
            logits = (anchors @ keys.T / self.temperature).masked_fill(is_self, float("-inf"))  # [2B, 2BW]
            config = self.hard_negative_mixing
            if config is not None and self.mixing_active(step) and keys.shape[0] > 2:
                negative_mask = ~(is_self | (columns[None, :] == targets[:, None]))
                synthetic = mix_hard_negatives(anchors, keys, negative_mask, config, generator)  # [2B, s+s', D]
                synthetic_logits = torch.einsum("ad,asd->as", anchors, synthetic) / self.temperature
                logits = torch.cat([logits, synthetic_logits], dim=1)
        return InfoNCELogits(logits, targets, keys.shape[0])

    def forward(
        self, z1: Tensor, z2: Tensor, step: int | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the loss for two views (arguments as in :meth:`logits`); counts one call in training mode.

        Returns:
            ``(loss, metrics)``: scalar float32 loss (mean over the ``2B`` local anchors) and detached scalars
            ``positive_similarity`` (mean cosine of positive pairs), ``negative_similarity`` (mean cosine over real
            negatives; 0 when there are none), ``accuracy`` (fraction of anchors whose largest logit is the
            positive, synthetic negatives included) and, when mixing is active, ``synthetic_similarity``.
        """
        out = self.logits(z1, z2, step, generator)
        if self.training:
            self.num_calls += 1
        loss = F.cross_entropy(out.logits, out.targets)

        with torch.no_grad():
            logits = out.logits.detach()
            similarity = logits[:, : out.n_real] * self.temperature
            rows = torch.arange(logits.shape[0], device=logits.device)
            negative_mask = torch.isfinite(similarity)
            negative_mask[rows, out.targets] = False
            metrics = {
                "positive_similarity": similarity[rows, out.targets].mean(),
                "negative_similarity": similarity[negative_mask].mean()
                if bool(negative_mask.any())
                else similarity.new_zeros(()),
                "accuracy": (logits.argmax(dim=1) == out.targets).float().mean(),
            }
            if logits.shape[1] > out.n_real:
                metrics["synthetic_similarity"] = (logits[:, out.n_real :] * self.temperature).mean()
        return loss, metrics

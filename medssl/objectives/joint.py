"""The joint objective: L = λ_intra L_intra + λ_inter L_inter + λ_mask L_mask + λ_sep L_sep in one step.

* ``L_intra``: SwAV swapped prediction (Caron et al., NeurIPS 2020) on the 2D multi-crop views of
  images and of slices of volumes (shared encoder, projector, 2D prototypes); or DeepCluster-v2 (same paper), or
  SimCLR's InfoNCE on the two global crops (Chen et al., ICML 2020; ``intra_clustering=simclr``), so that the 3D
  terms can sit on the 2D objective that learns best at a given budget.
* Spreading terms on the 2D embeddings of the global crops (optional): KoLeo (Sablayrolles et al., ICLR 2019, as in
  DINOv2) or uniformity (Wang & Isola, ICML 2020), against the cone the clustering streams draw them into.
* ``L_inter``: SwAV on the volume embeddings of two views of the same stack of slices
  (Nguyen et al., AAAI 2023), through the deformable slice transformer.
* ``L_mask``: masked slice-embedding prediction on the stacks' slice embeddings (same paper).
* ``L_sep``: SepCLR common/salient separation on background/target batches (Louiset et al., ICLR 2024).

``StagedSchedule`` reproduces the released paper code's schedule in one run: 2D only, then the
masked objective with the encoder frozen, then 3D cluster agreement end to end.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from medssl.models.heads import Prototypes
from medssl.models.joint import JointModel
from medssl.objectives.deepcluster import DeepClusterHead
from medssl.objectives.distributed import world_size
from medssl.objectives.health import alignment, per_dimension_std, uniformity
from medssl.objectives.masked import masked_slice_loss
from medssl.objectives.numerics import at_least_float32
from medssl.objectives.sepclr import SepCLRLoss
from medssl.objectives.simclr import InfoNCELoss
from medssl.objectives.spreading import koleo_loss, uniformity_loss
from medssl.objectives.swav import EmbeddingQueue, SwAVLoss

CLUSTERINGS = {"intra": ("swav", "deepcluster", "simclr"), "inter": ("swav", "deepcluster")}


@dataclass
class LossWeights:
    intra: float = 1.0
    inter: float = 1.0
    mask: float = 1.0
    sep: float = 0.0

    def __post_init__(self) -> None:
        for name in ("intra", "inter", "mask", "sep"):
            if getattr(self, name) < 0:
                raise ValueError(f"weights.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class SepCLRWeights:
    """SepCLR loss weights (``objective.sepclr``; :class:`medssl.objectives.sepclr.SepCLRLoss`).

    The defaults are the authors' values for an encoder trained from scratch, as medssl always pretrains
    (neurospin-projects/2024_rlouiset_sep_clr, ``celeba_accessories/sep_clr_k-jem.py`` and
    ``cifar_mnist/sep_clr_k-jem.py``: ``salient_term_beta = 1000``, ``salient_reg_beta = 1000``,
    ``jem_lambda = 10``, ``tau = 0.5`` from ``losses.py``). Their ImageNet-initialised scripts use
    ``beta_salient = 1`` with ``beta_infoless = 10`` (``chexpert_subtypes``) or 100 (``odir_subtypes``).
    """

    beta_salient: float = 1000.0
    beta_infoless: float = 1000.0
    lambda_jem: float = 10.0
    tau: float = 0.5


@dataclass
class JointObjectiveConfig:
    """Loss settings (``configs/method/*.yaml``).

    ``stages``: ``None`` for joint training, or ``[end_of_2d, end_of_masked]`` steps for the staged
    preset (2D -> masked with frozen encoder -> 3D end to end).

    ``intra_clustering``: ``swav``, ``deepcluster`` or ``simclr`` (InfoNCE on the two global crops at
    ``instance_temperature``; local crops are not used). ``queue_length`` / ``inter_queue_length``: SwAV queues of the
    2D and the volume embeddings, global lengths (each process keeps ``length / world size`` rows); size them so that
    queue + batch covers the prototypes. ``freeze_prototypes_steps`` counts from the first step of each stream: from
    step 0 for L_intra, from the start of the 3D stage for L_inter in the staged preset. ``koleo_weight``,
    ``uniformity_weight``: spreading terms on the 2D embeddings of the global crops.
    """

    weights: LossWeights = field(default_factory=LossWeights)
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    freeze_prototypes_steps: int = 300
    intra_clustering: str = "swav"  # or "deepcluster" (memory bank + k-means each epoch) or "simclr" (InfoNCE)
    inter_clustering: str = "swav"
    kmeans_iterations: int = 10
    instance_temperature: float = 0.1  # InfoNCE temperature of intra_clustering=simclr
    queue_length: int = 0  # SwAV queue of 2D embeddings for small batches (0 = none)
    queue_start_step: int = 0
    inter_queue_length: int = 0  # SwAV queue of volume embeddings (L_inter), from queue_start_step too
    koleo_weight: float = 0.0  # KoLeo on the 2D embeddings of the two global crops (DINOv2: 0.1)
    uniformity_weight: float = 0.0  # Wang & Isola uniformity on the same embeddings
    sepclr: SepCLRWeights = field(default_factory=SepCLRWeights)
    stages: list[int] | None = None

    def __post_init__(self) -> None:
        if self.stages is not None and (len(self.stages) != 2 or not 0 <= self.stages[0] <= self.stages[1]):
            raise ValueError(f"stages must be null or [end_of_2d, end_of_masked] with 0 <= a <= b, got {self.stages}")
        for stream, allowed in CLUSTERINGS.items():
            name = f"{stream}_clustering"
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("queue_length", "queue_start_step", "inter_queue_length", "freeze_prototypes_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("temperature", "epsilon", "instance_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("koleo_weight", "uniformity_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class StagePlan:
    weights: LossWeights
    freeze_encoder: bool
    name: str


class StagedSchedule:
    """The released code's three stages as one schedule over steps.

    ``[0, a)``: L_intra only; ``[a, b)``: L_mask only, encoder frozen (its features detached);
    ``[b, ∞)``: L_inter (+ L_intra and L_mask at their configured weights) end to end.
    """

    def __init__(self, boundaries: list[int], weights: LossWeights) -> None:
        self.boundaries = boundaries
        self.weights = weights

    def at(self, step: int) -> StagePlan:
        first, second = self.boundaries
        if step < first:
            return StagePlan(LossWeights(intra=self.weights.intra or 1.0, inter=0, mask=0, sep=0), False, "2d")
        if step < second:
            return StagePlan(LossWeights(intra=0, inter=0, mask=self.weights.mask or 1.0, sep=0), True, "masked")
        return StagePlan(self.weights, False, "3d")


@dataclass
class StackBatch:
    """Two views of stacks of slices: ``views`` 2 x ``[B, N, C, H, W]``, ``mask`` ``[B, N]`` (True = real
    slice), ``positions`` ``[B, N]`` mm, ``index`` ``[B]`` dataset indices, ``mask_noise`` ``[B, 2, N]``
    uniform scores that choose the masked slices of each view (drawn here when None)."""

    views: list[Tensor]
    mask: Tensor
    positions: Tensor | None = None
    index: Tensor | None = None  # [B] dataset indices (DeepCluster-v2)
    mask_noise: Tensor | None = None


@dataclass
class SepBatch:
    """Two views ``[B, C, H, W]`` of a background/target balanced batch and ``is_target`` ``[B]``."""

    views: list[Tensor]
    is_target: Tensor


class JointObjective(nn.Module):
    """Computes the weighted sum of the active losses and the metrics worth logging.

    The trainer calls ``forward`` each step, ``normalize_prototypes()`` before it (SwAV keeps
    prototypes on the sphere) and ``after_backward(step)`` after ``backward`` (prototypes stay
    frozen for ``freeze_prototypes_steps``).
    """

    def __init__(
        self,
        model: JointModel,
        config: JointObjectiveConfig | None = None,
        dataset_sizes: tuple[int, int] | None = None,
    ) -> None:
        """``dataset_sizes``: (2D samples, volumes), needed by DeepCluster-v2's memory banks."""
        super().__init__()
        self.model = model
        self.config = config or JointObjectiveConfig()
        cfg = self.config
        self.swav = SwAVLoss(cfg.temperature, cfg.epsilon, cfg.sinkhorn_iterations, crops_for_assign=(0, 1))
        self.sepclr = SepCLRLoss(
            cfg.sepclr.beta_salient, cfg.sepclr.beta_infoless, cfg.sepclr.lambda_jem, tau=cfg.sepclr.tau
        )
        self.schedule = StagedSchedule(cfg.stages, cfg.weights) if cfg.stages is not None else None
        self.queue = self._queue(cfg.queue_length, model.config.projector_dim, "queue_length")
        self.inter_queue = (
            self._queue(cfg.inter_queue_length, model.config.transformer_dim, "inter_queue_length")
            if cfg.inter_clustering == "swav"
            else None
        )
        self.infonce = (
            InfoNCELoss(cfg.instance_temperature, gather_distributed=True) if cfg.intra_clustering == "simclr" else None
        )
        if "deepcluster" in (cfg.intra_clustering, cfg.inter_clustering) and dataset_sizes is None:
            raise ValueError("dataset_sizes (2D samples, volumes) are needed when a clustering is 'deepcluster'")
        sizes = dataset_sizes or (0, 0)

        def deepcluster_head(kind: str, size: int, dim: int, prototypes: list[int]) -> DeepClusterHead | None:
            if kind != "deepcluster":
                return None
            return DeepClusterHead(size, dim, prototypes, cfg.temperature, cfg.kmeans_iterations)

        mcfg = model.config
        self.intra_deepcluster = deepcluster_head(
            cfg.intra_clustering, sizes[0], mcfg.projector_dim, mcfg.intra_prototypes
        )
        self.inter_deepcluster = deepcluster_head(
            cfg.inter_clustering, sizes[1], mcfg.transformer_dim, mcfg.inter_prototypes
        )

    @staticmethod
    def _queue(length: int, dim: int, key: str) -> EmbeddingQueue | None:
        """A SwAV queue holding this process's share of ``length`` rows (SwAV: ``queue_length // world_size``)."""
        if not length:
            return None
        local = length // world_size()
        if local < 1:
            raise ValueError(f"{key}={length} is shorter than the world size {world_size()}")
        return EmbeddingQueue(local, dim, n_assign=2)

    def inter_start(self) -> int:
        """The first step at which L_inter trains (the start of the 3D stage in the staged preset, else 0)."""
        return 0 if self.schedule is None else self.schedule.boundaries[1]

    def plan(self, step: int) -> StagePlan:
        if self.schedule is None:
            return StagePlan(self.config.weights, False, "joint")
        return self.schedule.at(step)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        for prototypes in self.model.prototype_modules():
            prototypes.normalize_()

    def after_backward(self, step: int) -> None:
        """Cancel prototype gradients while frozen (always for DeepCluster-v2: k-means sets them; always for the
        unused 2D prototypes of ``intra_clustering=simclr``). Each stream's freeze counts from its own first step: the
        staged preset's L_inter starts with frozen prototypes like L_intra did (SwAV's first-epoch freeze)."""
        freeze = self.config.freeze_prototypes_steps
        if step < freeze or self.intra_deepcluster is not None or self.infonce is not None:
            self.model.intra_prototypes.cancel_gradients()
        if step < self.inter_start() + freeze or self.inter_deepcluster is not None:
            self.model.inter_prototypes.cancel_gradients()

    def cluster(self, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """DeepCluster-v2's epoch-start k-means (no-op for SwAV streams); returns its metrics."""
        metrics: dict[str, Tensor] = {}
        for name, head, prototypes in (
            ("intra", self.intra_deepcluster, self.model.intra_prototypes),
            ("inter", self.inter_deepcluster, self.model.inter_prototypes),
        ):
            if head is not None:
                metrics.update({f"cluster/{name}_{k}": v for k, v in head.cluster(prototypes.heads, generator).items()})
        return metrics

    def _cluster_loss(
        self,
        prototypes: Prototypes,
        embeddings: list[Tensor],
        deepcluster: DeepClusterHead | None,
        index: Tensor | None,
        queue: EmbeddingQueue | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if deepcluster is None:
            return self._swav_heads(prototypes, embeddings, queue)
        if index is None:
            raise ValueError("DeepCluster-v2 needs the batch's dataset indices (crop_index / StackBatch.index)")
        loss, metrics = deepcluster(prototypes.heads, embeddings, index)
        metrics.setdefault("effective_prototypes", torch.zeros(()))
        return loss, metrics

    def _swav_heads(
        self, prototypes: Prototypes, embeddings: list[Tensor], queue: EmbeddingQueue | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """SwAV averaged over prototype heads. ``embeddings``: V unit vectors ``[B, d]``, globals first.

        With a full ``queue``, the codes of the two global crops are computed over queue + batch."""
        per_head: list[list[Tensor]] = [[] for _ in range(prototypes.n_heads)]
        # Prototype scores in float32 outside autocast: with bf16 the scores of nearby prototypes round together and
        # the Sinkhorn codes and predictions built on them lose their contrast.
        with torch.autocast(device_type=embeddings[0].device.type, enabled=False):
            for z in embeddings:
                for h, scores in enumerate(prototypes(at_least_float32(z))):
                    per_head[h].append(scores)
        losses, metrics = [], {}
        for h, scores in enumerate(per_head):
            queued = queue.scores(prototypes.heads[h].weight) if queue is not None and queue.is_full else None
            loss, m = self.swav(scores, queued)
            losses.append(loss)
            if h == 0:
                metrics = m
        return torch.stack(losses).mean(), metrics

    def _intra_loss(self, z: list[Tensor], step: int, crop_index: Tensor | None, metrics: dict[str, Tensor]) -> Tensor:
        """L_intra on the unit 2D embeddings ``z`` (V × ``[B, d]``, globals first); adds its health to ``metrics``."""
        if self.infonce is not None:
            loss, m = self.infonce(z[0], z[1], step=step)
            metrics.update({f"health/intra_{k}": v for k, v in m.items()})
        else:
            queue = self.queue if step >= self.config.queue_start_step else None
            loss, m = self._cluster_loss(self.model.intra_prototypes, z, self.intra_deepcluster, crop_index, queue)
            if queue is not None and self.training:
                queue.push([z[0], z[1]])
            _cluster_health("intra", m, metrics)
        metrics["health/intra_alignment"] = alignment(z[0].detach(), z[1].detach())
        if z[0].shape[0] > 1:  # spread metrics need two samples
            metrics["health/intra_uniformity"] = uniformity(z[0].detach())
            metrics["health/intra_std_mean"] = per_dimension_std(z[0]).mean()
        return loss

    def _spreading(self, z: list[Tensor], metrics: dict[str, Tensor]) -> Tensor:
        """The weighted spreading terms on the global crops' embeddings ``z`` (2 × ``[B, d]``); 0 when off."""
        cfg = self.config
        total = z[0].new_zeros(())
        if z[0].shape[0] < 2:
            return total
        if cfg.koleo_weight > 0:  # DINOv2: summed over the two global crops
            koleo = torch.stack([koleo_loss(v) for v in z]).sum()
            total = total + cfg.koleo_weight * koleo
            metrics["loss/koleo"] = koleo.detach()
        if cfg.uniformity_weight > 0:  # Wang & Isola: averaged over the two views
            spread = torch.stack([uniformity_loss(v) for v in z]).mean()
            total = total + cfg.uniformity_weight * spread
            metrics["loss/uniformity"] = spread.detach()
        return total

    def forward(
        self,
        crops: list[Tensor] | None = None,
        stacks: StackBatch | None = None,
        sep: SepBatch | None = None,
        step: int = 0,
        crop_index: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One training step's loss.

        Args:
            crops: 2D multi-crop views, ``[B, C, h, w]`` each, the 2 global crops first.
            stacks: two views of slice stacks for L_inter and L_mask.
            sep: background/target views for L_sep.
            step: global step (staged schedule, prototype freezing).
            crop_index: ``[B]`` dataset indices of the 2D samples (DeepCluster-v2 only).
        Returns:
            ``(loss, metrics)``: metrics are 0-d tensors (``loss/*``, ``health/*``); the trainer refuses any other
            value, so that nothing computed here is dropped. The stage of ``step`` is ``self.plan(step).name``.
        """
        plan = self.plan(step)
        w = plan.weights
        views: dict[str, list[Tensor]] = {}  # each active term's images, encoded together below
        if w.intra > 0 and crops is not None:
            if self.infonce is not None:  # SimCLR's InfoNCE: the two global crops only
                if len(crops) < 2:
                    raise ValueError(f"intra_clustering=simclr needs the two global crops, got {len(crops)} crops")
                crops = crops[:2]
            views["intra"] = list(crops)
        if (w.inter > 0 or w.mask > 0) and stacks is not None:
            views["stacks"] = [view[stacks.mask] for view in stacks.views]  # real slices only
        if w.sep > 0 and sep is not None:
            views["sep"] = list(sep.views)
        if not views:
            raise ValueError(f"stage '{plan.name}' has no active loss for the given batches (weights {w})")
        features = self._encode(views, plan.freeze_encoder)

        metrics: dict[str, Tensor] = {}
        total = torch.zeros((), device=next(iter(views.values()))[0].device)
        if "intra" in features:
            total = total + self._intra_term(features["intra"], w.intra, step, crop_index, metrics)
        if "stacks" in features and stacks is not None:
            total = total + self._volume_terms(features["stacks"], stacks, w, step, metrics)
        if "sep" in features and sep is not None:
            total = total + self._sep_term(features["sep"], sep, w.sep, metrics)
        metrics["loss/total"] = total.detach()
        return total, metrics

    def _encode(self, views: dict[str, list[Tensor]], frozen: bool) -> dict[str, list[Tensor]]:
        """Every term's images in one encoder call (one pass per crop resolution); no gradient when ``frozen``."""
        images = [image for group in views.values() for image in group]
        with torch.no_grad() if frozen else contextlib.nullcontext():
            flat = self.model.encode(images)
        out, cursor = {}, 0
        for name, group in views.items():
            out[name] = flat[cursor : cursor + len(group)]
            cursor += len(group)
        return out

    def _intra_term(
        self, features: list[Tensor], weight: float, step: int, crop_index: Tensor | None, metrics: dict[str, Tensor]
    ) -> Tensor:
        """``weight * L_intra`` plus the spreading terms, on the projected crops ``[B, D]`` each."""
        z = [self.model.projector(f) for f in features]
        loss = self._intra_loss(z, step, crop_index, metrics)
        metrics["loss/intra"] = loss.detach()
        return weight * loss + self._spreading(z[:2], metrics)

    def _volume_terms(
        self, features: list[Tensor], stacks: StackBatch, w: LossWeights, step: int, metrics: dict[str, Tensor]
    ) -> Tensor:
        """``w.inter * L_inter + w.mask * L_mask`` on the two stack views' slice features (``[n_real, D]`` each,
        scattered back to ``[B, N, D]`` tokens)."""
        tokens = []
        for flat in features:
            dense = flat.new_zeros((*stacks.mask.shape, flat.shape[-1]))
            dense[stacks.mask] = flat
            tokens.append(dense)
        total = torch.zeros((), device=tokens[0].device)
        if w.inter > 0:
            volumes = [self.model.transformer(t, stacks.mask, stacks.positions).volume for t in tokens]
            queue = self.inter_queue if step >= self.config.queue_start_step else None
            loss, m = self._cluster_loss(
                self.model.inter_prototypes, volumes, self.inter_deepcluster, stacks.index, queue
            )
            if queue is not None and self.training:
                queue.push([volumes[0], volumes[1]])
            total = total + w.inter * loss
            metrics["loss/inter"] = loss.detach()
            _cluster_health("inter", m, metrics)
            metrics["health/inter_alignment"] = alignment(volumes[0].detach(), volumes[1].detach())
            if volumes[0].shape[0] > 1:
                metrics["health/inter_uniformity"] = uniformity(volumes[0].detach())
        if w.mask > 0:
            noise = stacks.mask_noise
            losses = [
                masked_slice_loss(
                    self.model.masked(
                        t,
                        stacks.mask,
                        self.model.transformer,
                        stacks.positions,
                        noise=None if noise is None else noise[:, v],
                    )
                )[0]
                for v, t in enumerate(tokens)
            ]
            loss = torch.stack(losses).mean()
            total = total + w.mask * loss
            metrics["loss/mask"] = loss.detach()
        return total

    def _sep_term(self, features: list[Tensor], sep: SepBatch, weight: float, metrics: dict[str, Tensor]) -> Tensor:
        """``weight * L_sep`` on the two views' common and salient projections."""
        (c1, s1), (c2, s2) = (self.model.sep_heads(f) for f in features[:2])
        loss, m = self.sepclr(c1, c2, s1, s2, sep.is_target)
        metrics["loss/sep"] = loss.detach()
        metrics["health/salient_norm_background"] = m["salient_norm_background"]
        metrics["health/salient_norm_target"] = m["salient_norm_target"]
        return weight * loss


_SWAV_ONLY_HEALTH = (
    "prediction_entropy",
    "gap_to_uniform",
    "gap_to_uniform_assigned",
    "gap_to_uniform_other",
    "code_entropy",
)


def _cluster_health(stream: str, m: dict[str, Tensor], metrics: dict[str, Tensor]) -> None:
    """Copy a clustering loss's health metrics under ``health/<stream>_*``: effective prototypes (of the predictions
    for SwAV, of the batch's k-means labels for DeepCluster-v2), and for SwAV the prediction entropy, the gap between
    ``ln K`` and the loss (also split by the predicting crop: ``_assigned`` for the global crops predicting each
    other, ``_other`` for the local crops), and the codes' entropy in nats (the loss is
    ``H(codes) + KL(codes || predictions)``, so ``loss − code_entropy`` is how far the predictions are from their
    targets, and a code entropy near ``ln K`` says that the Sinkhorn targets themselves are flat: the lever is then
    epsilon or a queue, not the encoder)."""
    metrics[f"health/{stream}_effective_prototypes"] = m["effective_prototypes"]
    for key in _SWAV_ONLY_HEALTH:  # DeepCluster-v2 swaps nothing
        if key in m:
            metrics[f"health/{stream}_{key}"] = m[key]

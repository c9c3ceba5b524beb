"""The joint image/volume model: one shared 2D encoder, heads, prototypes and the slice transformer.

Nguyen et al., "Joint Self-Supervised Image-Volume Representation Learning with Intra-Inter
Contrastive Clustering", AAAI 2023, with the slice axis as the transformer's token axis (as the
paper describes; the released code attends over the feature axis by mistake).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from medssl.models.encoders import create_encoder
from medssl.models.heads import ProjectionHead, Prototypes, SepCLRHeads
from medssl.models.masked import MaskedSliceHead
from medssl.models.slice_transformer import SliceTransformer


@dataclass
class JointModelConfig:
    """Architecture settings (``configs/model/*.yaml``)."""

    encoder: str = "resnet18"
    in_channels: int = 1
    stem_stride: int = 2
    max_pool: bool = False
    norm: str = "batch"  # batch | group | instance (encoder; heads drop BatchNorm unless "batch")
    multiscale: bool = False
    embed_dim: int | None = None  # encoder output (projected when set or when multiscale)
    projector_hidden: int = 1024
    projector_dim: int = 128
    intra_prototypes: list[int] = field(default_factory=lambda: [512])
    transformer_dim: int = 256
    transformer_depth: int = 2
    transformer_heads: int = 8
    reference_stride: int = 4
    max_offset: float = 2.0
    attention: str = "deformable"
    inter_prototypes: list[int] = field(default_factory=lambda: [128])
    mask_ratio: float = 0.15
    sep_common_dim: int = 32
    sep_salient_dim: int = 32
    sep_hidden: int = 128

    def __post_init__(self) -> None:
        from medssl.models.encoders import NORMS, available_encoders

        if self.encoder not in available_encoders():
            raise ValueError(f"encoder must be one of {available_encoders()}, got {self.encoder!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {sorted(NORMS)}, got {self.norm!r}")
        if self.attention not in ("deformable", "full"):
            raise ValueError(f"attention must be 'deformable' or 'full', got {self.attention!r}")

    def slice_transformer_kwargs(self, in_dim: int) -> dict[str, Any]:
        """The :class:`SliceTransformer` arguments of this architecture for ``in_dim``-d slice tokens (the model,
        the exported bundle and a random 2.5D transformer build it from the same place)."""
        return {
            "in_dim": in_dim,
            "dim": self.transformer_dim,
            "depth": self.transformer_depth,
            "heads": self.transformer_heads,
            "reference_stride": self.reference_stride,
            "max_offset": float(self.max_offset),
            "attention": self.attention,
        }


class JointModel(nn.Module):
    """All trainable parts of the joint method.

    * ``encoder``: shared 2D encoder, ``[B, C, H, W] -> [B, D]`` (what is exported downstream);
    * ``projector`` + ``intra_prototypes``: 2D clustering head (SwAV);
    * ``transformer``: deformable slice transformer, ``[B, N, D] -> tokens [B, N, d], volume [B, d]``;
    * ``inter_prototypes``: volume-level clustering head on ``volume``;
    * ``masked``: mask token and decoder of the masked slice-embedding objective;
    * ``sep_heads``: SepCLR common/salient heads on the encoder features.
    """

    def __init__(self, config: JointModelConfig | None = None) -> None:
        super().__init__()
        cfg = config or JointModelConfig()
        self.config = cfg
        self.encoder = create_encoder(
            cfg.encoder,
            in_channels=cfg.in_channels,
            stem_stride=cfg.stem_stride,
            max_pool=cfg.max_pool,
            multiscale=cfg.multiscale,
            out_dim=cfg.embed_dim,
            norm=cfg.norm,
        )
        dim = int(self.encoder.out_dim)
        batch_norm = cfg.norm == "batch"
        self.projector = ProjectionHead(dim, cfg.projector_hidden, cfg.projector_dim, batch_norm=batch_norm)
        self.intra_prototypes = Prototypes(cfg.projector_dim, cfg.intra_prototypes)
        self.transformer = SliceTransformer(**cfg.slice_transformer_kwargs(dim))
        self.inter_prototypes = Prototypes(cfg.transformer_dim, cfg.inter_prototypes)
        self.masked = MaskedSliceHead(dim, cfg.transformer_dim, cfg.mask_ratio)
        self.sep_heads = SepCLRHeads(
            dim, cfg.sep_common_dim, cfg.sep_salient_dim, cfg.sep_hidden, batch_norm=batch_norm
        )

    def encode(self, images: Sequence[Tensor]) -> list[Tensor]:
        """Encode several image batches with one encoder call per spatial size.

        Args:
            images: tensors ``[B_i, C, H_i, W_i]``.
        Returns:
            features ``[B_i, D]`` in the same order. Batches of equal size share a forward pass
            (and BatchNorm statistics), as SwAV groups its crops by resolution.
        """
        groups: dict[tuple[int, int], list[int]] = {}
        for i, batch in enumerate(images):
            groups.setdefault(tuple(batch.shape[-2:]), []).append(i)
        out: list[Tensor | None] = [None] * len(images)
        for members in groups.values():
            features = self.encoder(torch.cat([images[i] for i in members]))
            for i, chunk in zip(members, features.split([images[i].shape[0] for i in members]), strict=True):
                out[i] = chunk
        return out  # type: ignore[return-value]

    def prototype_modules(self) -> list[Prototypes]:
        return [self.intra_prototypes, self.inter_prototypes]

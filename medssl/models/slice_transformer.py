"""Slice transformer f_inter: slice tokens ``[B, N, in_dim]`` -> per-slice outputs and an L2-normalised volume vector.

Pre-norm Transformer over the slices of each volume (tokens = slices, as the paper describes; the released code
attended over the feature axis by mistake, see ``reference/methods.md`` §1.3) with deformable slice attention or, for
the ablation, full attention. The volume embedding is ``Z = L2norm(masked mean of the outputs over real slices)``.

Mask convention: ``mask[b, i]`` is True for a real slice and False for padding; padding is at the end of the sequence.
Padded input rows are never read (they may hold any value); padded output rows are zeros.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medssl.models.slice_attention import DeformableSliceAttention, FullSliceAttention
from medssl.runtime.checks import at_least

__all__ = ["SliceTransformer", "SliceTransformerLayer", "SliceTransformerOutput", "masked_mean"]

AttentionKind = Literal["deformable", "full"]


class SliceTransformerOutput(NamedTuple):
    """Outputs of :class:`SliceTransformer`.

    Attributes:
        tokens: per-slice outputs ``[B, N, dim]`` after the final LayerNorm; padded rows are zeros.
        volume: volume embedding ``[B, dim]``, unit L2 norm (zeros for a volume without real slices).
    """

    tokens: Tensor
    volume: Tensor


def masked_mean(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``tokens [B, N, D]`` over the slices where ``mask [B, N]`` is True -> ``[B, D]`` (zeros if none)."""
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype)[..., None]
    summed = torch.where(mask[..., None], tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device)).sum(1)
    return summed / weights.sum(dim=1).clamp(min=1.0)


class SliceTransformerLayer(nn.Module):
    """One pre-norm layer: ``x = x + Attn(LN(x))``, then ``x = x + MLP(LN(x))``.

    ``MLP = Linear(dim, hidden) -> GELU -> Dropout -> Linear(hidden, dim) -> Dropout``.

    Args:
        attention: a slice attention module with signature ``(x [B, N, dim], mask, positions) -> [B, N, dim]``.
        dim: token dimension.
        hidden: MLP hidden width.
        dropout: MLP dropout probability.
    """

    def __init__(self, attention: nn.Module, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = attention
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor, mask: Tensor | None, positions: Tensor | None) -> Tensor:
        """``x [B, N, dim]`` -> ``[B, N, dim]``."""
        x = x + self.attention(self.norm1(x), mask, positions)
        return x + self.mlp(self.norm2(x))


class SliceTransformer(nn.Module):
    """Pre-norm slice transformer with deformable (or full) attention over slices.

    ``Linear(in_dim, dim)`` (Identity when ``in_dim == dim``) -> ``depth`` x :class:`SliceTransformerLayer` ->
    ``LayerNorm(dim)``. The input tokens may be arbitrary (e.g. some replaced by a learned mask token upstream).

    Args:
        in_dim: dimension of the input slice tokens.
        dim: model dimension.
        depth: number of layers (>= 1).
        heads: attention heads; ``dim`` must be divisible by it.
        mlp_ratio: MLP hidden width is ``round(dim * mlp_ratio)``.
        reference_stride: spacing of the deformable reference points, in slices (ignored by full attention).
        max_offset: bound of the deformable offsets, in slices (ignored by full attention).
        dropout: dropout after attention output projections and in the MLPs.
        attention: ``"deformable"`` (:class:`DeformableSliceAttention`) or ``"full"`` (:class:`FullSliceAttention`).
        bias_hidden: hidden width of the continuous relative position bias MLP.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int = 256,
        depth: int = 4,
        heads: int = 8,
        mlp_ratio: float = 2.0,
        reference_stride: int = 4,
        max_offset: float = 2.0,
        dropout: float = 0.0,
        attention: AttentionKind = "deformable",
        bias_hidden: int = 64,
    ) -> None:
        super().__init__()
        at_least(1, in_dim=in_dim, dim=dim, depth=depth)
        if not (math.isfinite(mlp_ratio) and mlp_ratio > 0.0) or round(dim * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio must be > 0 with round(dim * mlp_ratio) >= 1, got {mlp_ratio}")
        if attention not in ("deformable", "full"):
            raise ValueError(f"attention must be 'deformable' or 'full', got {attention!r}")
        self.in_dim = in_dim
        self.dim = dim
        self.attention = attention
        self.input_proj: nn.Module = nn.Identity() if in_dim == dim else nn.Linear(in_dim, dim)
        hidden = round(dim * mlp_ratio)
        layers = []
        for _ in range(depth):
            attn: nn.Module
            if attention == "deformable":
                attn = DeformableSliceAttention(dim, heads, reference_stride, max_offset, bias_hidden, dropout)
            else:
                attn = FullSliceAttention(dim, heads, bias_hidden, dropout)
            layers.append(SliceTransformerLayer(attn, dim, hidden, dropout))
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(dim)

    def encode_tokens(self, tokens: Tensor, mask: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """Per-slice outputs.

        Args:
            tokens: slice tokens ``[B, N, in_dim]``.
            mask: ``[B, N]`` bool, True for real slices, padding at the end; ``None`` = all real.
            positions: ``[B, N]`` physical slice positions (mm); ``None`` = slice index.

        Returns:
            ``[B, N, dim]`` after the final LayerNorm; padded rows are zeros.
        """
        if tokens.dim() != 3 or tokens.shape[-1] != self.in_dim:
            raise ValueError(f"tokens must be [B, N, {self.in_dim}], got {tuple(tokens.shape)}")
        if mask is not None:
            if mask.shape != tokens.shape[:2]:
                raise ValueError(f"mask must be [B, N] = {tuple(tokens.shape[:2])}, got {tuple(mask.shape)}")
            mask = mask.to(device=tokens.device, dtype=torch.bool)
            # Zero padded rows first: arbitrary (even non-finite) padding must not reach any gradient.
            tokens = tokens.masked_fill(~mask[..., None], 0.0)
        x = self.input_proj(tokens)
        for layer in self.layers:
            x = layer(x, mask, positions)
        x = self.norm(x)
        return x if mask is None else x.masked_fill(~mask[..., None], 0.0)

    def forward(
        self, tokens: Tensor, mask: Tensor | None = None, positions: Tensor | None = None
    ) -> SliceTransformerOutput:
        """Per-slice outputs and the volume embedding.

        Args:
            tokens: slice tokens ``[B, N, in_dim]``.
            mask: ``[B, N]`` bool, True for real slices, padding at the end; ``None`` = all real.
            positions: ``[B, N]`` physical slice positions (mm); ``None`` = slice index.

        Returns:
            :class:`SliceTransformerOutput` with ``tokens [B, N, dim]`` and ``volume [B, dim]``
            (``L2norm(masked mean of tokens over real slices)``).
        """
        out = self.encode_tokens(tokens, mask, positions)
        volume = F.normalize(masked_mean(out, mask), dim=-1)
        return SliceTransformerOutput(tokens=out, volume=volume)

"""The masked slice-modelling head of L_mask (Nguyen et al., AAAI 2023; BERT/MAE-style).

A fraction of each volume's real slice tokens is replaced by a learned mask token, the slice transformer runs on
the corrupted sequence, and a light decoder predicts the original slice embeddings at the masked positions. This
module holds the mask token and the decoder and returns predictions and targets; the loss on them is
:func:`medssl.objectives.masked.masked_slice_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class _TransformerOutput(Protocol):
    tokens: torch.Tensor
    volume: torch.Tensor


class SliceSequenceModel(Protocol):
    def __call__(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> _TransformerOutput: ...


def sample_slice_mask(
    valid: torch.Tensor,
    ratio: float,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Choose ``ceil(ratio * L)`` real slices of each volume (at least one, at most ``L - 1``).

    Args:
        valid: ``[B, N]`` bool, True for real slices (padding at the end).
        noise: ``[B, N]`` uniform [0, 1) scores (the lowest are masked); drawn from ``generator`` when None. The
            trainer passes per-sample noise from the data loader, so that a sample's mask does not depend on which
            process or batch it lands in.
    Returns:
        ``[B, N]`` bool, True for the slices to mask; never a padded slice.
    """
    lengths = valid.sum(dim=1)
    counts = torch.clamp(torch.ceil(lengths.float() * ratio).long(), min=1)
    counts = torch.minimum(counts, torch.clamp(lengths - 1, min=0))
    if noise is None:
        noise = torch.rand(valid.shape, generator=generator, device=valid.device)
    elif noise.shape != valid.shape:
        raise ValueError(f"noise must have the shape of valid {tuple(valid.shape)}, got {tuple(noise.shape)}")
    noise = noise.masked_fill(~valid, 2.0)  # padded slices sort last
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < counts[:, None]


@dataclass(frozen=True)
class MaskedPrediction:
    """What the head predicted, for :func:`medssl.objectives.masked.masked_slice_loss`.

    Attributes:
        predictions: ``[B, N, D]`` decoded slice embeddings at every position.
        targets: ``[B, N, D]`` the original slice embeddings, detached (stop-gradient) and, by default,
            layer-normalised without affine parameters.
        masked: ``[B, N]`` bool, the slices that were replaced by the mask token.
        valid: ``[B, N]`` bool, the real slices.
    """

    predictions: torch.Tensor
    targets: torch.Tensor
    masked: torch.Tensor
    valid: torch.Tensor


class MaskedSliceHead(nn.Module):
    """Mask token and decoder of masked slice-embedding prediction.

    Args:
        token_dim: dimension D of the slice embeddings fed to the transformer ``[B, N, D]``.
        model_dim: output dimension of the transformer's per-slice tokens.
        mask_ratio: fraction of real slices masked per volume (paper code: 0.1; 0.1–0.15 typical).
        decoder_hidden: 0 for a linear decoder (as released), else a one-hidden-layer MLP.
        normalize_targets: layer-normalise targets (no affine) so that shrinking the embeddings cannot lower the
            loss (as MAE's normalised-pixel targets).
    """

    def __init__(
        self,
        token_dim: int,
        model_dim: int,
        mask_ratio: float = 0.15,
        decoder_hidden: int = 0,
        normalize_targets: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if token_dim < 1 or model_dim < 1 or decoder_hidden < 0:
            raise ValueError(f"token_dim/model_dim must be >= 1 and decoder_hidden >= 0, got {token_dim, model_dim}")
        self.mask_ratio = mask_ratio
        self.normalize_targets = normalize_targets
        self.mask_token = nn.Parameter(torch.randn(token_dim) * 0.02)
        if decoder_hidden:
            self.decoder: nn.Module = nn.Sequential(
                nn.Linear(model_dim, decoder_hidden), nn.GELU(), nn.Linear(decoder_hidden, token_dim)
            )
        else:
            self.decoder = nn.Linear(model_dim, token_dim)

    def forward(
        self,
        tokens: torch.Tensor,
        valid: torch.Tensor,
        transformer: SliceSequenceModel,
        positions: torch.Tensor | None = None,
        masked: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> MaskedPrediction:
        """Mask, run the transformer on the corrupted sequence, decode.

        Args:
            tokens: ``[B, N, D]`` slice embeddings from the encoder (targets are taken detached).
            valid: ``[B, N]`` bool, True for real slices.
            transformer: the slice transformer (called on the corrupted tokens).
            positions: ``[B, N]`` slice positions in mm (passed to the transformer).
            masked: ``[B, N]`` bool slices to mask; drawn with ``mask_ratio`` when None.
            noise: ``[B, N]`` uniform scores used to draw ``masked`` (see :func:`sample_slice_mask`).
        """
        if masked is None:
            masked = sample_slice_mask(valid, self.mask_ratio, generator, noise)
        if bool((masked & ~valid).any()):
            raise ValueError("masked slices must be real slices (valid)")
        targets = tokens.detach()
        if self.normalize_targets:
            targets = F.layer_norm(targets, targets.shape[-1:])
        corrupted = torch.where(masked[..., None], self.mask_token.to(tokens.dtype), tokens)
        output = transformer(corrupted, valid, positions)
        return MaskedPrediction(self.decoder(output.tokens), targets, masked, valid)

"""Heads on the encoder: SwAV / DeepCluster-v2 projector and prototypes (Caron et al., 2020; ``facebookresearch/swav``)
and SepCLR's common and salient projectors (Louiset et al., ICLR 2024)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medssl.runtime.checks import at_least

__all__ = ["ProjectionHead", "Prototypes", "SepCLRHeads"]


class ProjectionHead(nn.Module):
    """SwAV projector: ``Linear -> BatchNorm1d -> ReLU -> Linear``, then optional L2 normalisation.

    Args:
        in_dim: input dimension (the encoder's ``out_dim``).
        hidden_dim: hidden width; ``0`` means a single ``Linear(in_dim, out_dim)``.
        out_dim: output dimension.
        batch_norm: insert ``BatchNorm1d`` after the hidden Linear (ignored when ``hidden_dim == 0``).
        normalize: L2-normalise the output along dim 1.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        batch_norm: bool = True,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        at_least(1, in_dim=in_dim)
        at_least(0, hidden_dim=hidden_dim)
        at_least(1, out_dim=out_dim)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.normalize = normalize
        layers: list[nn.Module]
        if hidden_dim == 0:
            layers = [nn.Linear(in_dim, out_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Project features.

        Args:
            x: features ``[B, in_dim]``.

        Returns:
            ``[B, out_dim]``, unit rows when ``normalize``.
        """
        z = self.mlp(x)
        return F.normalize(z, dim=1) if self.normalize else z


class Prototypes(nn.Module):
    """Bias-free prototype heads: ``scores_h = z @ C_h.T`` for every head ``h``.

    One head for SwAV, several (e.g. 3) for DeepCluster-v2. Rows of each weight are the prototypes; they are
    initialised then projected onto the unit sphere. Call :meth:`normalize_` at the start of every step and
    :meth:`cancel_gradients` after ``backward`` during the first iterations (prototype freezing).

    Args:
        dim: embedding dimension.
        n_prototypes: number of prototypes ``K``, or one ``K_h`` per head.

    Attributes:
        heads: one ``nn.Linear(dim, K_h, bias=False)`` per head; weight ``[K_h, dim]``.
        n_prototypes: ``K_h`` per head.
    """

    def __init__(self, dim: int, n_prototypes: int | Sequence[int]) -> None:
        super().__init__()
        at_least(1, dim=dim)
        counts = [n_prototypes] if isinstance(n_prototypes, int) else list(n_prototypes)
        if not counts or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in counts):
            raise ValueError(f"n_prototypes must be a positive int or a non-empty list of them, got {n_prototypes!r}")
        self.dim = dim
        self.n_prototypes: list[int] = counts
        self.heads = nn.ModuleList(nn.Linear(dim, k, bias=False) for k in counts)
        self.normalize_()

    @property
    def n_heads(self) -> int:
        """Number of prototype heads."""
        return len(self.heads)

    def forward(self, z: Tensor) -> list[Tensor]:
        """Prototype scores.

        Args:
            z: embeddings ``[B, dim]`` (normally L2-normalised).

        Returns:
            one ``[B, K_h]`` score tensor per head.
        """
        return [head(z) for head in self.heads]

    @torch.no_grad()
    def normalize_(self) -> None:
        """L2-normalise every prototype (weight row) in place, outside the autograd graph."""
        for head in self.heads:
            head.weight.copy_(F.normalize(head.weight, dim=1))

    def cancel_gradients(self) -> None:
        """Drop the gradients of all prototypes (``.grad = None``) so the optimiser step leaves them unchanged."""
        for p in self.parameters():
            p.grad = None


def _projector(in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = True) -> nn.Sequential:
    norm: nn.Module = nn.BatchNorm1d(hidden_dim) if batch_norm else nn.Identity()
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), norm, nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class SepCLRHeads(nn.Module):
    """The two SepCLR projectors: ``Linear -> BatchNorm1d -> ReLU -> Linear`` each (Louiset et al., ICLR 2024).

    The common head's output is L2-normalised (sphere); the salient head's output is left as is (Euclidean, so that
    background samples can sit on the null vector ``s' = 0``).

    One trunk with two heads: call ``heads(features)``; both heads read the same ``[B, in_dim]`` features.
    Two encoders (the paper's variant): call ``heads(common_features, salient_features)``; each head reads its own
    encoder's features. The caller (model/trainer) decides which variant it builds.

    Args:
        in_dim: feature dimension read by the common head (and by the salient head unless ``salient_in_dim``).
        common_dim: dimension of ``c``.
        salient_dim: dimension of ``s``.
        hidden_dim: hidden width of both projectors (paper: 128).
        salient_in_dim: feature dimension of the salient encoder, when it differs from ``in_dim``.
        batch_norm: BatchNorm1d after the hidden Linear (off for batch-independent models, ``model.norm`` != batch).
    """

    def __init__(
        self,
        in_dim: int,
        common_dim: int = 32,
        salient_dim: int = 32,
        hidden_dim: int = 128,
        salient_in_dim: int | None = None,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        at_least(1, in_dim=in_dim, common_dim=common_dim, salient_dim=salient_dim, hidden_dim=hidden_dim)
        if salient_in_dim is not None and salient_in_dim < 1:
            raise ValueError(f"salient_in_dim must be >= 1 or None, got {salient_in_dim}")
        self.common_head = _projector(in_dim, hidden_dim, common_dim, batch_norm)
        self.salient_head = _projector(salient_in_dim or in_dim, hidden_dim, salient_dim, batch_norm)

    def forward(self, features: Tensor, salient_features: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Project features to the two spaces.

        Args:
            features: ``[B, in_dim]``; the common head's input (and the salient head's, if ``salient_features``
                is None).
            salient_features: ``[B, salient_in_dim]`` from a separate salient encoder, or None.
        Returns:
            ``(c, s)``: ``c`` ``[B, common_dim]`` unit-norm rows, ``s`` ``[B, salient_dim]`` unnormalised.
        """
        c = F.normalize(self.common_head(features), dim=1)
        s = self.salient_head(features if salient_features is None else salient_features)
        return c, s

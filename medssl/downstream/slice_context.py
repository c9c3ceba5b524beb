"""2.5D segmentation: the slice-wise U-Net with the joint method's slice transformer as inter-slice context.

The joint method (Nguyen et al., AAAI 2023) trains a slice transformer over the 2D encoder's per-slice features
(L_inter, L_mask). A slice-wise 2D U-Net never runs it, so the 3D terms could only help downstream through the
shared encoder. Here a crop of ``N`` consecutive slices is encoded slice by slice; the global average pool of each
slice's last stage is a token (exactly the token the transformer was pretrained on), the transformer attends over
the ``N`` tokens, and a zero-initialised linear layer adds its per-slice output to that slice's bottleneck before
the 2D decoder. At the start of fine-tuning the model is therefore exactly the slice-wise U-Net; the context is
learned from there (as ControlNet's zero convolutions, Zhang et al., ICCV 2023).

The transformer is the pretrained one when the source carries it (a bundle with ``models/slice_transformer.pt``, a
joint run's folder or checkpoint; an MLflow run id gives its logged encoder only), else a random one of the default
architecture (SimCLR, 2D SwAV, random init): ``slice_transformer=auto|pretrained|random``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from medssl.downstream.common import resnet_stages
from medssl.models.slice_transformer import SliceTransformer

TRANSFORMER_SOURCES = ("auto", "pretrained", "random")


def pretrained_slice_transformer(
    pretrained: str, tracking_uri: str | None = None
) -> tuple[SliceTransformer, str] | None:
    """The slice transformer that ``pretrained`` carries, loaded strictly, and where it came from; None when it has
    none (a run of a method without L_inter / L_mask, random init).

    ``pretrained``: a bundle folder (``configs/metadata.json`` -> ``medssl.slice_transformer``), a pretraining run
    folder or checkpoint file, an MLflow run id or model URI (:func:`medssl.export.sources.resolve_source`)."""
    if pretrained in ("none", "", "null"):
        return None
    from medssl.runtime.checkpoints import load_checkpoint

    path = Path(pretrained)
    metadata_file = path / "configs" / "metadata.json"
    if metadata_file.is_file():
        entry = json.loads(metadata_file.read_text(encoding="utf-8")).get("medssl", {}).get("slice_transformer")
        if not entry:
            return None
        kwargs, weights, where = entry["kwargs"], load_checkpoint(path / entry["file"]), path / entry["file"]
    else:
        from medssl.export.sources import resolve_source

        exported = resolve_source(pretrained, tracking_uri).slice_transformer
        if exported is None:
            return None
        kwargs, weights, where = exported.kwargs, exported.weights, Path(pretrained)
    with torch.random.fork_rng(devices=[]):  # the weights replace the draw: leave the seeded stream where it was
        transformer = SliceTransformer(**kwargs)
    transformer.load_state_dict(weights, strict=True)
    return transformer, f"slice transformer: pretrained, {len(weights)} tensors from {where}"


def slice_transformer_for(
    source: str, pretrained: str, in_dim: int, tracking_uri: str | None = None
) -> tuple[SliceTransformer, str]:
    """The 2.5D model's transformer: ``source`` ``auto`` (the pretrained one when ``pretrained`` carries it, else
    random), ``pretrained`` (required: an error names the source when it has none) or ``random`` (the default
    architecture, drawn from the seeded stream).

    Raises:
        ValueError: an unknown ``source``; ``pretrained`` asked of a source without one; a pretrained transformer
            whose token width is not the encoder's last stage (``in_dim``).
    """
    if source not in TRANSFORMER_SOURCES:
        raise ValueError(f"slice_transformer must be one of {TRANSFORMER_SOURCES}, got {source!r}")
    found = None if source == "random" else pretrained_slice_transformer(pretrained, tracking_uri)
    if found is not None:
        transformer, message = found
        if transformer.in_dim != in_dim:
            raise ValueError(
                f"model.pretrained={pretrained}: its slice transformer takes {transformer.in_dim}-d tokens, the "
                f"encoder's last stage has {in_dim} channels"
            )
        return transformer, message
    if source == "pretrained":
        raise ValueError(
            f"slice_transformer=pretrained, but model.pretrained={pretrained} carries none (only a joint run with "
            "L_inter or L_mask trains one); use slice_transformer=auto or random"
        )
    why = "asked for" if source == "random" else "the source carries none"
    from medssl.models.joint import JointModelConfig

    # the architecture a joint run pretrains by default
    transformer = SliceTransformer(**JointModelConfig().slice_transformer_kwargs(in_dim))
    return transformer, f"slice transformer: random init ({why})"


class SliceContextUNet(nn.Module):
    """A slice-wise U-Net whose bottleneck sees the other slices of the crop through a slice transformer.

    Args:
        unet: the 2D :class:`medssl.downstream.segmentation.PretrainedUNet` (its encoder and decoder are used).
        transformer: :class:`SliceTransformer` over ``[B, N, C_last]`` tokens (``C_last``: the encoder's last stage).
        slice_spacing: mm between neighbouring slices (the pretraining stacks' positions are in mm).

    Shapes:
        input ``[B, C, N, H, W]`` -> logits ``[B, num_classes, N, H, W]``.
    """

    def __init__(self, unet: nn.Module, transformer: SliceTransformer, slice_spacing: float = 1.0) -> None:
        super().__init__()
        if slice_spacing <= 0:
            raise ValueError(f"slice_spacing must be > 0 mm, got {slice_spacing}")
        self.unet = unet
        self.encoder = unet.encoder  # the optimiser's encoder group and freeze_encoder find it here
        self.transformer = transformer
        self.context = nn.Linear(transformer.dim, transformer.in_dim)
        nn.init.zeros_(self.context.weight)  # at step 0 the model is the slice-wise U-Net
        nn.init.zeros_(self.context.bias)
        self.slice_spacing = float(slice_spacing)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, N, H, W]`` -> ``[B, num_classes, N, H, W]``."""
        b, c, n, h, w = x.shape
        slices = x.transpose(1, 2).reshape(b * n, c, h, w)
        features = resnet_stages(self.encoder, slices)  # stem, layer1..layer4, each [B * N, C_i, h_i, w_i]
        tokens = features[-1].mean(dim=(-2, -1)).reshape(b, n, -1)  # [B, N, C_last]
        positions = (torch.arange(n, device=x.device, dtype=tokens.dtype) * self.slice_spacing).expand(b, n)
        context = self.context(self.transformer.encode_tokens(tokens, None, positions))  # [B, N, C_last]
        features = [*features[:-1], features[-1] + context.reshape(b * n, -1, 1, 1)]
        logits = self.unet.decode(features, slices)  # [B * N, K, H, W]
        return logits.reshape(b, n, -1, h, w).transpose(1, 2)

"""The shared 2D slice encoder and a name -> constructor registry (``timm.create_model`` style).

The encoder wraps a genuine :class:`monai.networks.nets.ResNet` (``spatial_dims=2``, ``feed_forward=False``) as
``self.backbone`` so that the pretrained weights under the ``backbone.`` prefix load with ``strict=True`` into a
plain MONAI ``ResNet`` built from :attr:`ResNetEncoder.backbone_config` (used for MONAI bundle export).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from monai.networks.layers.utils import get_norm_layer
from monai.networks.nets import ResNet
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import Tensor, nn

from medssl.runtime.checks import at_least

__all__ = ["ResNetEncoder", "available_encoders", "create_encoder", "register_encoder"]

_ModuleFactory = TypeVar("_ModuleFactory", bound=Callable[..., nn.Module])

_ENCODERS: dict[str, Callable[..., nn.Module]] = {}


def register_encoder(name: str) -> Callable[[_ModuleFactory], _ModuleFactory]:
    """Decorator registering an encoder constructor (class or function) under ``name``.

    Raises:
        ValueError: if ``name`` is empty or already registered.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")

    def decorator(factory: _ModuleFactory) -> _ModuleFactory:
        if name in _ENCODERS:
            raise ValueError(f"name {name!r} is already registered as an encoder")
        _ENCODERS[name] = factory
        return factory

    return decorator


def available_encoders() -> list[str]:
    """Sorted names accepted by :func:`create_encoder`."""
    return sorted(_ENCODERS)


def create_encoder(name: str, **kwargs: Any) -> nn.Module:
    """Build the encoder registered as ``name``; ``kwargs`` are passed to its constructor.

    Raises:
        ValueError: if ``name`` is not registered (the message lists the available names).
    """
    if name not in _ENCODERS:
        raise ValueError(f"unknown encoder name {name!r}; available: {', '.join(available_encoders())}")
    return _ENCODERS[name](**kwargs)


# depth -> (block, blocks per stage)
_RESNET_SPECS: dict[int, tuple[type[ResNetBlock] | type[ResNetBottleneck], list[int]]] = {
    10: (ResNetBlock, [1, 1, 1, 1]),
    18: (ResNetBlock, [2, 2, 2, 2]),
    34: (ResNetBlock, [3, 4, 6, 3]),
    50: (ResNetBottleneck, [3, 4, 6, 3]),
}
_BLOCK_INPLANES = [64, 128, 256, 512]
_DEFAULT_MULTISCALE_DIM = 512
# medssl name -> MONAI ``norm`` argument of ``monai.networks.nets.ResNet``
NORMS: dict[str, str | tuple[str, dict[str, int]]] = {
    "batch": "batch",
    "group": ("group", {"num_groups": 32}),
    "instance": ("instance", {"affine": True}),
}


def monai_resnet(backbone_config: Mapping[str, Any]) -> ResNet:
    """``monai.networks.nets.ResNet(**backbone_config)`` with ``norm`` applied in every block, in 1D, 2D or 3D.

    MONAI 1.6's ResNet applies its ``norm`` argument to the stem only and builds BatchNorm in the residual
    blocks and downsample shortcuts; for ``norm`` other than batch this replaces those BatchNorm layers, so that
    the network is the one its config describes. With the default BatchNorm it is exactly MONAI's network.

    Args:
        backbone_config: kwargs of ``monai.networks.nets.ResNet``; ``norm`` may be a list (as read back from JSON).
    Returns:
        The network, on the current default device (``torch.device("meta")`` works).
    """
    config = dict(backbone_config)
    norm = config.get("norm", "batch")
    if isinstance(norm, list):
        config["norm"] = norm = tuple(norm)
    net = ResNet(**config)
    if norm != "batch":
        _replace_batchnorm(net, norm, int(config.get("spatial_dims", 3)))
    return net


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _replace_batchnorm(module: nn.Module, norm: str | tuple[Any, ...], spatial_dims: int) -> None:
    for name, child in module.named_children():
        if type(child) in _BATCHNORMS:
            setattr(module, name, get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=child.num_features))
        else:
            _replace_batchnorm(child, norm, spatial_dims)


def resnet_stage_features(network: nn.Module, x: Tensor, stages: int = 4) -> list[Tensor]:
    """The stem output and the outputs of the first ``stages`` stages of a MONAI ``ResNet`` (2D or 3D), run as in
    pretraining: the max pool only when the network has it on. Encoders, segmentation and detection all run it.

    Args:
        network: a MONAI ``ResNet`` (``conv1``, ``bn1``, ``act``, ``maxpool``, ``layer1``..``layer4``).
        x: ``[B, C, *spatial]``.
        stages: how many of ``layer1``..``layer4`` to run.
    Returns:
        ``1 + stages`` tensors ``[B, C_i, *spatial_i]``: the stem (before the max pool), then each stage.
    """
    x = network.act(network.bn1(network.conv1(x)))
    features = [x]
    if not network.no_max_pool:
        x = network.maxpool(x)
    for layer in (network.layer1, network.layer2, network.layer3, network.layer4)[:stages]:
        x = layer(x)
        features.append(x)
    return features


class ResNetEncoder(nn.Module):
    """2D ResNet slice encoder on top of :class:`monai.networks.nets.ResNet`.

    Stage channels are ``(64, 128, 256, 512)`` for depths 10/18/34 and ``(256, 512, 1024, 2048)`` for depth 50.
    The total stride is ``stem_stride * 8`` (``* 2`` more with ``max_pool``): with the defaults a 96 px input gives a
    6x6 final map, 224 px gives 14x14; with ``max_pool=True`` they give 3x3 and 7x7. Inputs of any ``H, W >= 16``
    work, in contiguous or ``channels_last`` memory format.

    Args:
        depth: ResNet depth, one of 10, 18, 34, 50.
        in_channels: input channels (1 for grey medical images).
        stem_kernel: kernel size of the stem convolution (padding ``stem_kernel // 2``).
        stem_stride: stride of the stem convolution.
        max_pool: apply the 3x3 stride-2 max pool after the stem (off by default, suited to 64-224 px crops).
        multiscale: global-average-pool all four stages, L2-normalise each pooled vector separately, concatenate
            and project to ``out_dim`` with a Linear layer (as the slice embedding of Nguyen et al., AAAI 2023).
        out_dim: output dimension. ``None`` keeps the final stage's channel count (512 when ``multiscale``). When
            not ``multiscale`` and different from the final channel count, a Linear projection is added.
        norm: ``"batch"`` (default; converted to SyncBatchNorm under multi-GPU DDP), ``"group"`` (GroupNorm with 32
            groups: independent of the batch, for tiny per-device batches or exact CPU multi-process equivalence)
            or ``"instance"``.

    Attributes:
        backbone: the MONAI ``ResNet`` (its state dict is MONAI-compatible).
        backbone_config: keyword arguments that rebuild an identical plain ``monai.networks.nets.ResNet``.
        stage_channels: channels of the four stage outputs.
        out_dim: dimension of :meth:`forward`'s output.
        proj: the Linear projection, or ``None``.
    """

    def __init__(
        self,
        depth: int = 18,
        in_channels: int = 1,
        stem_kernel: int = 7,
        stem_stride: int = 2,
        max_pool: bool = False,
        multiscale: bool = False,
        out_dim: int | None = None,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
        if depth not in _RESNET_SPECS:
            raise ValueError(f"depth must be one of {sorted(_RESNET_SPECS)}, got {depth!r}")
        at_least(1, in_channels=in_channels, stem_kernel=stem_kernel, stem_stride=stem_stride)
        if out_dim is not None and out_dim < 1:
            raise ValueError(f"out_dim must be >= 1 or None, got {out_dim}")

        block, layers = _RESNET_SPECS[depth]
        self.depth = depth
        self.multiscale = bool(multiscale)
        self.backbone_config: dict[str, Any] = {
            "block": "basic" if block is ResNetBlock else "bottleneck",
            "layers": list(layers),
            "block_inplanes": list(_BLOCK_INPLANES),
            "spatial_dims": 2,
            "n_input_channels": in_channels,
            "conv1_t_size": stem_kernel,
            "conv1_t_stride": stem_stride,
            "no_max_pool": not max_pool,
            "feed_forward": False,
            "norm": NORMS[norm],
        }
        self.backbone = monai_resnet(self.backbone_config)
        self.stage_channels: tuple[int, ...] = tuple(c * block.expansion for c in _BLOCK_INPLANES)

        self.proj: nn.Linear | None
        if self.multiscale:
            self.out_dim: int = _DEFAULT_MULTISCALE_DIM if out_dim is None else out_dim
            self.proj = nn.Linear(sum(self.stage_channels), self.out_dim)
        elif out_dim is not None and out_dim != self.stage_channels[-1]:
            self.out_dim = out_dim
            self.proj = nn.Linear(self.stage_channels[-1], out_dim)
        else:
            self.out_dim = self.stage_channels[-1]
            self.proj = None

    def stages(self, x: Tensor) -> list[Tensor]:
        """The four stage feature maps.

        Args:
            x: images ``[B, C, H, W]``.

        Returns:
            ``[B, stage_channels[i], H_i, W_i]`` for i = 0..3, ``H_i = H / (stem_stride * 2**i)`` (halved once more
            with ``max_pool``), rounded up.
        """
        return resnet_stage_features(self.backbone, x)[1:]

    def forward(self, x: Tensor) -> Tensor:
        """Encode images.

        Args:
            x: images ``[B, C, H, W]``.

        Returns:
            embeddings ``[B, out_dim]`` (not normalised).
        """
        if self.multiscale:
            pooled = [F.normalize(f.mean(dim=(-2, -1)), dim=1) for f in self.stages(x)]
            assert self.proj is not None
            return self.proj(torch.cat(pooled, dim=1))
        h = self.stages(x)[-1].mean(dim=(-2, -1))
        return h if self.proj is None else self.proj(h)


def _resnet_factory(depth: int) -> Callable[..., ResNetEncoder]:
    def factory(**kwargs: Any) -> ResNetEncoder:
        return ResNetEncoder(depth=depth, **kwargs)

    factory.__name__ = f"resnet{depth}"
    factory.__doc__ = f"ResNet-{depth} slice encoder; see :class:`ResNetEncoder` for the keyword arguments."
    return factory


for _depth in _RESNET_SPECS:
    register_encoder(f"resnet{_depth}")(_resnet_factory(_depth))

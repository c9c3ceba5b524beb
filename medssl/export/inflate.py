"""2D -> 3D inflation of the pretrained slice encoder (I3D).

Carreira & Zisserman, "Quo Vadis, Action Recognition? A New Model and the Kinetics Dataset", CVPR 2017, section 2.4
("Inflating 2D ConvNets into 3D"): every 2D convolution kernel ``[O, I, kh, kw]`` becomes a 3D kernel
``[O, I, kd, kh, kw]`` made of ``kd`` copies of the 2D kernel divided by ``kd``, and every other parameter and buffer
is copied. On a volume that repeats one slice along depth ("boring video"), each inflated convolution then gives
the 2D convolution's output on that slice, so the 3D network reproduces the 2D network's features.

The pretrained encoder is a MONAI ``ResNet(spatial_dims=2, ...)`` (:class:`medssl.models.encoders.ResNetEncoder`'s
``backbone``, exported as ``backbone.pt`` + ``backbone.json``); the inflated one is the MONAI
``ResNet(spatial_dims=3, ...)`` of the same depth and widths, built from :func:`inflated_config` by
:func:`medssl.models.encoders.monai_resnet`::

    net_3d, config_3d = inflate_resnet(encoder.backbone, encoder.backbone_config)
    features = net_3d.eval()(volume)  # [B, C, D, H, W] -> [B, 512] (2048 for resnet50)

Kernel depths: the stem gets ``depth_kernel`` (default 3, see :func:`inflated_config`), the residual blocks' 3x3
convolutions become 3x3x3 and the 1x1 convolutions (bottleneck ``conv1``/``conv3``, downsample shortcuts) 1x1x1,
as MONAI builds them for ``spatial_dims=3``.

Where the I3D property is exact. MONAI pads every convolution with zeros in all dimensions, so along depth the
property holds exactly (BatchNorm in eval mode) only at positions whose depth receptive field lies inside the
volume: with a stem depth kernel ``kd`` (stride 1), ``kd // 2`` slices at each end of the stem output differ (their
pre-norm response is scaled by the fraction of taps inside the volume), every 3x3x3 convolution adds one position
per side, and each stage's stride 2 (MONAI strides stages 2-4 by 2 in every dimension, depth included) spreads the
margin over twice as many input slices. Globally pooled features therefore approach the 2D ones only as the depth
grows well past the margin of the last stage (tens of slices for a ResNet-18). GroupNorm and InstanceNorm
normalise with statistics over depth too, so for them the boundary slices perturb every position slightly and the
property is approximate everywhere (exact only in the limit of a deep volume).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.nets import ResNet
from torch import Tensor, nn

from medssl.models.encoders import monai_resnet

__all__ = [
    "DEFAULT_STEM_DEPTH_KERNEL",
    "inflate_conv_weight",
    "inflate_resnet",
    "inflate_state_dict",
    "inflated_config",
]

DEFAULT_STEM_DEPTH_KERNEL = 3
_MONAI_STEM_KERNEL = 7  # monai.networks.nets.ResNet defaults, used when a config leaves them out
_MONAI_STEM_STRIDE = 1


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _in_plane(value: Any, name: str) -> tuple[int, int]:
    """A 2D config's ``conv1_t_size``/``conv1_t_stride`` (an int or a pair) as ``(h, w)``."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 2:
            raise ValueError(f"config_2d[{name!r}] must be an int or a pair for a 2D network, got {value!r}")
        h, w = value
        return _positive_int(h, f"config_2d[{name!r}]"), _positive_int(w, f"config_2d[{name!r}]")
    v = _positive_int(value, f"config_2d[{name!r}]")
    return v, v


def inflated_config(
    config_2d: Mapping[str, Any], depth_kernel: int | None = None, depth_stride: int = 1
) -> dict[str, Any]:
    """Keyword arguments of the 3D MONAI ``ResNet`` that a 2D one inflates into (Carreira & Zisserman, CVPR 2017).

    Everything but the dimensionality and the stem is kept (block, layers, widths, channels, max pool, norm, ...):
    ``spatial_dims`` becomes 3, the stem kernel ``(kh, kw)`` becomes ``(depth_kernel, kh, kw)`` and its stride
    ``(sh, sw)`` becomes ``(depth_stride, sh, sw)`` (MONAI pads the stem with ``k // 2`` in each dimension).

    Default stem: a 3-slice kernel with depth stride 1, i.e. ``(3, 7, 7)`` / ``(1, 2, 2)`` for medssl's default
    7x7 stride-2 stem. Medical volumes are often anisotropic (slices 1.5-5 mm apart against < 1 mm pixels), so the
    stem neither halves the number of slices nor mixes 7 slices (up to 3.5 cm) in its first layer; the residual
    stages still stride depth by 2 and grow the depth receptive field. A short kernel also keeps the inflated
    network closer to per-slice 2D behaviour on real volumes and narrows the zero-padding margin at both ends of
    the volume (``depth_kernel // 2`` slices in the stem). Pass ``depth_kernel=7`` (the original I3D choice,
    ``N x N -> N x N x N``, also MedicalNet's stem) for isotropic volumes.

    Args:
        config_2d: kwargs of ``monai.networks.nets.ResNet`` with ``spatial_dims=2``, e.g.
            :attr:`medssl.models.encoders.ResNetEncoder.backbone_config` or ``backbone.json``'s ``"kwargs"``.
        depth_kernel: depth of the stem kernel, odd (MONAI pads ``k // 2``: an even kernel would add a slice and
            shift the output by half a slice). ``None``: :data:`DEFAULT_STEM_DEPTH_KERNEL` (3), or 1 when the 2D
            stem kernel is smaller than 3 in both dimensions.
        depth_stride: stride of the stem along depth (1 keeps every slice).

    Returns:
        A new dict (the input is not modified); ``conv1_t_size``/``conv1_t_stride`` are 3-tuples (lists after a
        JSON round trip, which MONAI accepts too).

    Raises:
        ValueError: if ``config_2d`` is not a 2D config (``spatial_dims`` missing or not 2; MONAI's default is 3),
            its stem kernel/stride are not positive ints or pairs, ``depth_kernel`` is not a positive odd int or
            ``depth_stride`` not a positive int.
    """
    if config_2d.get("spatial_dims", 3) != 2:
        raise ValueError(
            f"config_2d must be a 2D ResNet config (spatial_dims=2), got spatial_dims={config_2d.get('spatial_dims')!r}"
            " (MONAI's default is 3)"
        )
    kh, kw = _in_plane(config_2d.get("conv1_t_size", _MONAI_STEM_KERNEL), "conv1_t_size")
    sh, sw = _in_plane(config_2d.get("conv1_t_stride", _MONAI_STEM_STRIDE), "conv1_t_stride")
    if depth_kernel is None:
        depth_kernel = DEFAULT_STEM_DEPTH_KERNEL if max(kh, kw) >= DEFAULT_STEM_DEPTH_KERNEL else 1
    _positive_int(depth_kernel, "depth_kernel")
    if depth_kernel % 2 == 0:
        raise ValueError(
            f"depth_kernel must be odd, got {depth_kernel} (MONAI pads the stem by k // 2, so an even kernel adds "
            "a slice and shifts the output by half a slice)"
        )
    _positive_int(depth_stride, "depth_stride")
    config_3d = copy.deepcopy(dict(config_2d))
    config_3d["spatial_dims"] = 3
    config_3d["conv1_t_size"] = (depth_kernel, kh, kw)
    config_3d["conv1_t_stride"] = (depth_stride, sh, sw)
    return config_3d


def inflate_conv_weight(weight_2d: Tensor, depth: int) -> Tensor:
    """I3D inflation of one convolution kernel (Carreira & Zisserman, CVPR 2017).

    Args:
        weight_2d: 2D kernel ``[O, I, kh, kw]``.
        depth: kernel depth ``kd >= 1``.

    Returns:
        A new tensor ``[O, I, kd, kh, kw]`` (same dtype and device) whose every depth slice is ``weight_2d / kd``,
        so that convolving a volume constant along depth gives the 2D response (where no depth tap is padding).
    """
    if weight_2d.dim() != 4:
        raise ValueError(f"weight_2d must be a 2D kernel [O, I, kh, kw], got shape {tuple(weight_2d.shape)}")
    _positive_int(depth, "depth")
    w = weight_2d.detach()
    return (w.unsqueeze(2).expand(-1, -1, depth, -1, -1) / depth).contiguous()


def _key_list(keys: set[str]) -> str:
    shown = sorted(keys)[:5]
    more = f" and {len(keys) - len(shown)} more" if len(keys) > len(shown) else ""
    return ", ".join(shown) + more


def inflate_state_dict(state_2d: Mapping[str, Tensor], config_3d: Mapping[str, Any]) -> dict[str, Tensor]:
    """Inflate a 2D MONAI ResNet state dict into one that loads with ``strict=True`` into ``monai_resnet(config_3d)``.

    Every convolution kernel ``[O, I, kh, kw]`` becomes ``[O, I, kd, kh, kw]``: ``kd`` copies divided by ``kd``
    (I3D, Carreira & Zisserman, CVPR 2017), where ``kd`` is the 3D network's kernel depth for that layer (the stem's
    depth kernel, 3 for 3x3 convolutions, 1 for 1x1 ones). Every other tensor (norm weights, biases, running
    statistics, ``num_batches_tracked``, convolution biases, an ``fc`` layer) is copied unchanged. The shapes the
    3D network expects are read from a copy of it built on the meta device (no memory, no initialisation cost).

    Args:
        state_2d: state dict of ``monai_resnet(config_2d)`` (MONAI keys, no prefix: ``encoder.backbone``'s, or
            ``backbone.pt``), e.g. ``{"conv1.weight": [64, 1, 7, 7], "bn1.weight": [64], ...}``.
        config_3d: kwargs of the 3D network, normally ``inflated_config(config_2d, ...)``.

    Returns:
        A new state dict in the 3D network's key order; all tensors are fresh copies (dtype and device kept), so the
        3D network shares no storage with the 2D one.

    Raises:
        ValueError: if ``config_3d`` is not 3D, a key is missing or unexpected (a state dict of another depth or
            norm, or with a prefix such as ``backbone.``), or a tensor's shape does not match the 3D network's
            (the message names the key): a state dict that does not come from the 2D counterpart of ``config_3d``.
    """
    if config_3d.get("spatial_dims", 3) != 3:
        raise ValueError(
            f"config_3d must be a 3D ResNet config (spatial_dims=3), got {config_3d.get('spatial_dims')!r}"
        )
    with torch.device("meta"):
        reference = monai_resnet(config_3d)
    expected = reference.state_dict()
    conv_keys = {f"{name}.weight" for name, module in reference.named_modules() if isinstance(module, nn.Conv3d)}

    missing, unexpected = set(expected) - set(state_2d), set(state_2d) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_key_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_key_list(unexpected)}")
        hint = ""
        prefixed = [k for k in unexpected if "." in k and k.split(".", 1)[1] in missing]
        if prefixed:
            prefix = prefixed[0].split(".", 1)[0]
            hint = f" (strip the {prefix + '.'!r} prefix: pass encoder.backbone's state dict)"
        raise ValueError(f"state_2d does not match the 3D network of config_3d; {'; '.join(parts)}{hint}")

    inflated: dict[str, Tensor] = {}
    for key, want in expected.items():
        tensor = state_2d[key]
        if not isinstance(tensor, Tensor):
            raise ValueError(f"state_2d[{key!r}] is not a tensor ({type(tensor).__name__})")
        shape = tuple(tensor.shape)
        if key in conv_keys:
            if tensor.dim() != 4 or shape[:2] != tuple(want.shape[:2]) or shape[2:] != tuple(want.shape[3:]):
                raise ValueError(
                    f"{key}: 2D convolution kernel of shape {shape} does not inflate to the 3D network's "
                    f"{tuple(want.shape)} (expected [O, I, kh, kw] = {[*want.shape[:2], *want.shape[3:]]})"
                )
            inflated[key] = inflate_conv_weight(tensor, int(want.shape[2]))
        else:
            if shape != tuple(want.shape):
                raise ValueError(f"{key}: shape {shape} does not match the 3D network's {tuple(want.shape)}")
            inflated[key] = tensor.detach().clone()
    return inflated


def inflate_resnet(
    backbone_2d: nn.Module | Mapping[str, Tensor],
    config_2d: Mapping[str, Any],
    *,
    depth_kernel: int | None = None,
    depth_stride: int = 1,
) -> tuple[ResNet, dict[str, Any]]:
    """The 3D MONAI ResNet inflated from a pretrained 2D one (I3D, Carreira & Zisserman, CVPR 2017), and its config.

    Args:
        backbone_2d: the 2D MONAI ``ResNet`` (``encoder.backbone``) or its state dict (``backbone.pt``).
        config_2d: its kwargs (``encoder.backbone_config``, ``backbone.json``'s ``"kwargs"``).
        depth_kernel: stem kernel depth, see :func:`inflated_config` (default 3).
        depth_stride: stem stride along depth (default 1).

    Returns:
        ``(network, config_3d)``: ``network`` is ``monai_resnet(config_3d)`` holding the inflated weights (with the
        state dict's dtype and device, in training mode like any new module: call ``.eval()`` to use the pretrained
        BatchNorm statistics); it maps ``[B, C, D, H, W]`` to ``[B, C_out]`` globally pooled features when
        ``feed_forward`` is False (medssl's export). ``config_3d`` rebuilds it.

    Raises:
        ValueError: see :func:`inflated_config` and :func:`inflate_state_dict`.
    """
    state_2d = backbone_2d.state_dict() if isinstance(backbone_2d, nn.Module) else backbone_2d
    config_3d = inflated_config(config_2d, depth_kernel=depth_kernel, depth_stride=depth_stride)
    weights = inflate_state_dict(state_2d, config_3d)
    with torch.device("meta"):
        network = monai_resnet(config_3d)
    network.load_state_dict(weights, strict=True, assign=True)  # the fresh inflated tensors become the parameters
    leftover = [name for name, t in [*network.named_parameters(), *network.named_buffers()] if t.is_meta]
    if leftover:  # pragma: no cover - strict=True covers every persistent tensor of MONAI's ResNet
        raise RuntimeError(f"tensors not loaded: {leftover}")
    return network, config_3d

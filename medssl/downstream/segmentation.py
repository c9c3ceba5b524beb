"""``medssl finetune task=segmentation``: a U-Net on the pretrained encoder, trained slice-wise (2D), on stacks of
slices with the slice transformer as context (2.5D, :mod:`medssl.downstream.slice_context`) or on 3D crops.

The encoder is the pretrained MONAI ``ResNet`` (a bundle folder, an MLflow run id, or random initialisation as the
baseline; in 3D the 2D bundle is I3D-inflated, :func:`medssl.downstream.common.load_backbone`). A U-Net decoder
(Ronneberger et al., MICCAI 2015) built from MONAI blocks upsamples its stage features back to the input
resolution. Training minimises Dice + cross-entropy (Milletari et al., V-Net, 3DV 2016; MONAI ``DiceCELoss``) on
random crops that contain foreground preferentially; test cases are predicted with a sliding window over the whole
image (2D mode: slice by slice, stacked back into the volume) and scored per foreground class with the 3D Dice of
each case (MONAI ``DiceMetric``), averaged over the test cases.

Crops are not flipped or rotated: left/right and anterior/posterior can be what separates two classes (e.g. the
anterior and posterior hippocampus), and the display orientation is fixed by :meth:`LabelledCase.display`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetBasicBlock, UnetOutBlock, UnetResBlock
from monai.networks.nets import ResNet
from torch import Tensor, nn

from medssl.downstream.common import (
    FinetuneModelConfig,
    LabelledDataConfig,
    LoadedBackbone,
    TaskConfig,
    labelled_train_test,
    load_backbone,
    log_finetune_run,
    resnet_stages,
)
from medssl.runtime.progress import progress as progress_of
from medssl.runtime.seeding import seed_everything

MODES = ("2d", "2.5d", "3d")
MIN_ROI = 16  # medssl's default encoder strides 16 (stem 2 x stages 8); a max-pool stem is checked at run time
MIN_ROI_DEPTH = 8  # the inflated stem keeps every slice; the stages stride depth by 8


@dataclass
class SegmentationConfig(TaskConfig):
    """``configs/finetune/segmentation.yaml`` (``medssl finetune task=segmentation key=value ...``)."""

    TASK: ClassVar[str] = "segmentation"
    task: str = "segmentation"
    mode: str = "2d"  # 2d: slice-wise (volumes as axial slices, 2D images as they are) | 2.5d: stacks of slices,
    # the slice transformer between encoder and decoder | 3d: inflated encoder, 3D crops
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: LabelledDataConfig = field(default_factory=LabelledDataConfig)
    num_classes: int = 2  # including the background (label 0)
    class_names: list[str] = field(default_factory=list)  # foreground names (num_classes - 1); default class1, ...
    decoder_channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32, 16])  # deepest first
    residual_decoder: bool = False  # UnetResBlock instead of UnetBasicBlock in the decoder
    roi_size: int = 96  # side of the training crops and of the sliding window (pixels; 3d: H and W)
    roi_depth: int | None = None  # 3d: slices per crop/window (default roi_size); 2.5d: slices per stack (default 8)
    slice_transformer: str = "auto"  # 2.5d: auto (the source's when it has one, else random) | pretrained | random
    foreground_fraction: float = 0.67  # probability that a crop is centred on a foreground voxel
    batch_size: int = 8
    steps: int = 500
    lr: float = 1e-3
    weight_decay: float = 1e-4
    encoder_lr_scale: float = 1.0  # encoder learning rate = lr * encoder_lr_scale (1.0 won: BENCHMARKS.md)
    freeze_encoder: bool = False  # train the decoder only (encoder in eval mode, batch-norm statistics fixed)
    overlap: float = 0.5  # sliding-window overlap at inference
    log_every: int = 50  # the progress report's DiceCE: the mean of the last N steps (0: no progress report)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background included), got {self.num_classes}")
        if not self.class_names:
            self.class_names = [f"class{k}" for k in range(1, self.num_classes)]
        if len(self.class_names) != self.num_classes - 1 or len(set(self.class_names)) != len(self.class_names):
            raise ValueError(
                f"class_names must name the {self.num_classes - 1} foreground classes (num_classes={self.num_classes}"
                f" includes the background), distinct, got {list(self.class_names)}"
            )
        if len(self.decoder_channels) != 5 or min(self.decoder_channels) < 1:
            raise ValueError(f"decoder_channels must be 5 positive widths (deepest first), got {self.decoder_channels}")
        if self.roi_size < MIN_ROI:
            raise ValueError(f"roi_size must be at least {MIN_ROI} (the encoder's total stride), got {self.roi_size}")
        least = MIN_ROI_DEPTH if self.mode == "3d" else 2  # 2.5d: the encoder does not stride across slices
        if self.roi_depth is not None and self.roi_depth < least:
            raise ValueError(f"roi_depth must be at least {least} in mode {self.mode} (or null), got {self.roi_depth}")
        from medssl.downstream.slice_context import TRANSFORMER_SOURCES

        if self.slice_transformer not in TRANSFORMER_SOURCES:
            raise ValueError(f"slice_transformer must be one of {TRANSFORMER_SOURCES}, got {self.slice_transformer!r}")
        if not 0 <= self.foreground_fraction <= 1:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {self.foreground_fraction}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.lr <= 0 or self.weight_decay < 0 or self.encoder_lr_scale < 0:
            raise ValueError(
                f"lr must be > 0, weight_decay and encoder_lr_scale >= 0, got lr={self.lr}, "
                f"weight_decay={self.weight_decay}, encoder_lr_scale={self.encoder_lr_scale}"
            )
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be one of auto, cpu, cuda, got {self.device!r}")

    @property
    def spatial_dims(self) -> int:
        """Dimensions of the crops and of the prediction: 2 in mode 2d, else 3."""
        return 2 if self.mode == "2d" else 3

    @property
    def encoder_dims(self) -> int:
        """Dimensions of the encoder: 3 in mode 3d (inflated), else 2 (2.5d encodes slice by slice)."""
        return 3 if self.mode == "3d" else 2

    @property
    def roi(self) -> tuple[int, ...]:
        """Crop and window size: ``(roi_size, roi_size)`` in 2d, ``(roi_depth, roi_size, roi_size)`` in 2.5d (depth
        8 unless given) and 3d (depth ``roi_size`` unless given)."""
        if self.mode == "2d":
            return (self.roi_size, self.roi_size)
        depth = self.roi_depth or (8 if self.mode == "2.5d" else self.roi_size)
        return (depth, self.roi_size, self.roi_size)


class PretrainedUNet(nn.Module):
    """U-Net (Ronneberger et al., 2015) on the stages of a pretrained MONAI ``ResNet``, 2D or 3D.

    The equivalent of MONAI's ``FlexibleUNet`` with medssl's (possibly I3D-inflated) encoder. ``FlexibleUNet``'s
    decoder assumes that every encoder stage halves the resolution; medssl's encoders have no max pool by default,
    so the stem (stride 2) and ``layer1`` share a resolution, and the inflated stem keeps every slice. Here each
    decoder step therefore interpolates (bi/trilinear) to the actual size of its skip, concatenates and convolves:
    ``layer4 -> layer3 -> layer2 -> layer1 -> stem -> input``, the last step at full resolution with the input image
    as its skip, then a 1x1 convolution to the class logits. Any input size works (odd sizes included), and the
    output has the input's spatial size.

    Args:
        encoder: MONAI ``ResNet`` with ``feed_forward=False`` (its stem input channels are the image channels).
        stage_channels: channels of the stem and of the four stages (:attr:`LoadedBackbone.stage_channels`).
        num_classes: output channels (background included).
        spatial_dims: 2 or 3, as the encoder.
        in_channels: image channels (the encoder's ``n_input_channels``).
        decoder_channels: widths of the five decoder blocks, deepest first.
        residual: ``UnetResBlock`` instead of ``UnetBasicBlock`` (two 3x3 convolutions, instance norm, leaky ReLU).

    Shapes:
        input ``[B, in_channels, *S]`` -> logits ``[B, num_classes, *S]``, ``S`` = ``(H, W)`` or ``(D, H, W)``.
    """

    def __init__(
        self,
        encoder: ResNet,
        stage_channels: Sequence[int],
        num_classes: int,
        spatial_dims: int,
        in_channels: int = 1,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        residual: bool = False,
    ) -> None:
        super().__init__()
        if len(stage_channels) != 5 or len(decoder_channels) != 5:
            raise ValueError("stage_channels and decoder_channels need 5 entries (stem and four stages)")
        self.encoder = encoder
        self.spatial_dims = spatial_dims
        block_type = UnetResBlock if residual else UnetBasicBlock
        skips = [*list(stage_channels[:4])[::-1], in_channels]  # layer3, layer2, layer1, stem, input
        channels = int(stage_channels[4])
        blocks = []
        for skip, out in zip(skips, decoder_channels, strict=True):
            blocks.append(
                block_type(
                    spatial_dims,
                    channels + skip,
                    int(out),
                    kernel_size=3,
                    stride=1,
                    norm_name=("instance", {"affine": True}),
                )
            )
            channels = int(out)
        self.decoder = nn.ModuleList(blocks)
        self.head = UnetOutBlock(spatial_dims, channels, num_classes)
        self._mode = "bilinear" if spatial_dims == 2 else "trilinear"

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, *S]`` -> logits ``[B, num_classes, *S]``."""
        return self.decode(resnet_stages(self.encoder, x), x)

    def decode(self, features: Sequence[Tensor], x: Tensor) -> Tensor:
        """The decoder on the encoder's five stage outputs (stem, layer1..layer4) and the input ``x`` (the last
        skip) -> logits ``[B, num_classes, *S]``."""
        y = features[-1]
        for block, skip in zip(self.decoder, [*features[-2::-1], x], strict=True):
            if y.shape[2:] != skip.shape[2:]:
                y = F.interpolate(y, size=skip.shape[2:], mode=self._mode, align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        return self.head(y)


def build_segmentation_model(config: SegmentationConfig) -> tuple[nn.Module, LoadedBackbone]:
    """The U-Net on the encoder that ``config.model`` names (loaded strictly; inflated to 3D in mode 3d; in mode
    2.5d wrapped with the slice transformer, :class:`medssl.downstream.slice_context.SliceContextUNet`, whose
    source the loaded message names)."""
    loaded = load_backbone(
        config.model.pretrained,
        config.model.encoder,
        spatial_dims=config.encoder_dims,
        tracking_uri=config.tracking_uri,
        depth_kernel=config.model.depth_kernel if config.mode == "3d" else None,
    )
    model: nn.Module = PretrainedUNet(
        loaded.network,
        loaded.stage_channels,
        config.num_classes,
        config.encoder_dims,
        in_channels=int(loaded.kwargs.get("n_input_channels", 3)),
        decoder_channels=config.decoder_channels,
        residual=config.residual_decoder,
    )
    if config.mode == "2.5d":
        from medssl.downstream.slice_context import SliceContextUNet, slice_transformer_for

        transformer, message = slice_transformer_for(
            config.slice_transformer, config.model.pretrained, int(loaded.stage_channels[-1]), config.tracking_uri
        )
        model = SliceContextUNet(model, transformer)
        loaded.message = f"{loaded.message}; {message}"
    return model, loaded


def encoder_stride(loaded: LoadedBackbone) -> tuple[int, ...]:
    """Total stride of the encoder per spatial axis (stem stride x max pool x 8)."""
    stride = loaded.kwargs.get("conv1_t_stride", 1)
    strides = [int(s) for s in stride] if isinstance(stride, (list, tuple)) else [int(stride)] * loaded.spatial_dims
    pool = 1 if loaded.kwargs.get("no_max_pool", False) else 2
    return tuple(s * pool * 8 for s in strides)


# ---------------------------------------------------------------------------------------------------------- data


@dataclass
class SegmentationCase:
    """A case as the network sees it: ``image [C, *S]`` float32 in ``[0, 1]`` and ``mask [*S]`` int64, ``S`` =
    ``(D, H, W)`` (volumes, display orientation) or ``(H, W)`` (2D images)."""

    id: str
    subject: str
    image: np.ndarray
    mask: np.ndarray
    slice_spacing: float = 1.0  # mm between the axial slices of a volume (its Z spacing)


def match_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """``[C, ...]`` -> ``[channels, ...]``: the mean of the channels for a 1-channel encoder, a single channel
    repeated for a multi-channel one."""
    if image.shape[0] == channels:
        return image
    if channels == 1:
        return image.mean(axis=0, keepdims=True)
    if image.shape[0] == 1:
        return np.repeat(image, channels, axis=0)
    raise ValueError(f"images have {image.shape[0]} channels but the encoder takes {channels}")


def load_segmentation_cases(
    config: SegmentationConfig, channels: int
) -> tuple[list[SegmentationCase], list[SegmentationCase]]:
    """Train (``data.label_fraction`` of the subjects) and test cases, checked subject-disjoint, labels checked
    against ``num_classes``.

    Raises:
        ManifestError: no manifest, or an empty split. ValueError: labels >= num_classes, 2D images in mode 3d.
    """
    train, test, _ = labelled_train_test(config.data, config.seed, config.progress)
    converted: list[list[SegmentationCase]] = [[], []]
    for target, split in zip(converted, (train, test), strict=True):
        for case in split:
            if config.mode != "2d" and case.dims == 2:
                raise ValueError(f"mode={config.mode} needs volumes, but case {case.id} is a 2D image (use mode=2d)")
            image, mask = case.display()
            if int(mask.max(initial=0)) >= config.num_classes:
                raise ValueError(
                    f"num_classes={config.num_classes}, but case {case.id} has label {int(mask.max())} "
                    "(num_classes counts the background)"
                )
            spacing = float(case.spacing[-1]) if case.dims == 3 and case.spacing else 1.0
            target.append(SegmentationCase(case.id, case.subject, match_channels(image, channels), mask, spacing))
    return converted[0], converted[1]


class CropSampler:
    """Random training crops of ``roi`` from in-memory arrays, centred on a foreground voxel with probability
    ``foreground_fraction`` (as MONAI's ``RandCropByPosNegLabeld``), else anywhere; padded with zeros (background)
    where the image is smaller than ``roi``. Seeded through ``rng``.

    Args:
        items: ``(image [C, *S], mask [*S])`` pairs with ``len(S) == len(roi)`` (2D slices or volumes).
    """

    def __init__(
        self,
        items: Sequence[tuple[np.ndarray, np.ndarray]],
        roi: Sequence[int],
        foreground_fraction: float,
        rng: np.random.Generator,
    ) -> None:
        if not items:
            raise ValueError("no training images to sample crops from")
        self.items = list(items)
        self.roi = tuple(int(r) for r in roi)
        self.foreground_fraction = foreground_fraction
        self.rng = rng
        self.foreground = [np.flatnonzero(mask) for _, mask in self.items]
        self.with_foreground = [i for i, f in enumerate(self.foreground) if f.size]

    def crop(self) -> tuple[np.ndarray, np.ndarray]:
        """One crop: image ``[C, *roi]`` float32, mask ``[*roi]`` int64."""
        if self.with_foreground and self.rng.random() < self.foreground_fraction:
            index = self.with_foreground[self.rng.integers(len(self.with_foreground))]
            flat = self.foreground[index][self.rng.integers(self.foreground[index].size)]
            centre = np.unravel_index(flat, self.items[index][1].shape)
        else:
            index = int(self.rng.integers(len(self.items)))
            centre = tuple(int(self.rng.integers(n)) for n in self.items[index][1].shape)
        image, mask = self.items[index]
        window = []
        for c, n, r in zip(centre, mask.shape, self.roi, strict=True):
            start = int(np.clip(int(c) - r // 2, 0, max(n - r, 0)))
            window.append(slice(start, start + r))
        image_crop, mask_crop = image[(slice(None), *window)], mask[tuple(window)]
        pad = [(0, r - n) for n, r in zip(mask_crop.shape, self.roi, strict=True)]
        if any(p[1] for p in pad):
            image_crop = np.pad(image_crop, [(0, 0), *pad])
            mask_crop = np.pad(mask_crop, pad)
        return image_crop.astype(np.float32, copy=False), mask_crop.astype(np.int64, copy=False)

    def batch(self, size: int) -> tuple[Tensor, Tensor]:
        """``size`` crops: images ``[B, C, *roi]`` float32, masks ``[B, 1, *roi]`` int64."""
        crops = [self.crop() for _ in range(size)]
        images = torch.from_numpy(np.stack([c[0] for c in crops]))
        masks = torch.from_numpy(np.stack([c[1] for c in crops]))[:, None]
        return images, masks


def training_items(cases: Sequence[SegmentationCase], mode: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """What crops are drawn from: in mode 2d every axial slice ``([C, H, W], [H, W])`` of the volumes and the 2D
    images as they are; in modes 2.5d and 3d the volumes ``([C, D, H, W], [D, H, W])``."""
    items: list[tuple[np.ndarray, np.ndarray]] = []
    for case in cases:
        if mode == "2d" and case.mask.ndim == 3:
            items.extend((case.image[:, d], case.mask[d]) for d in range(case.mask.shape[0]))
        else:
            items.append((case.image, case.mask))
    return items


# ---------------------------------------------------------------------------------------------------- inference


@torch.no_grad()
def predict_case(
    model: nn.Module,
    image: np.ndarray,
    mode: str,
    roi: Sequence[int],
    overlap: float,
    device: torch.device,
    batch_size: int = 8,
) -> np.ndarray:
    """Label map of one case by sliding-window inference (MONAI ``sliding_window_inference``, Gaussian blending).

    Args:
        image: ``[C, D, H, W]`` (volume) or ``[C, H, W]`` (2D image).
        mode: ``2d`` (a volume is predicted slice by slice, in chunks of slices, and stacked back), ``2.5d`` or
            ``3d`` (3D windows of ``roi``).
        batch_size: windows per forward pass (2d: at least 32; 2.5d: at least 32 slices).
    Returns:
        int64 ``[D, H, W]`` or ``[H, W]``, the argmax class per voxel.
    """
    from monai.inferers import sliding_window_inference

    model.eval()

    def infer(x: Tensor) -> Tensor:
        logits = sliding_window_inference(
            x.to(device), tuple(roi), batch_size, model, overlap=overlap, mode="gaussian", padding_mode="constant"
        )
        return torch.as_tensor(logits).argmax(dim=1).cpu()

    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    if mode == "2.5d":  # windows of a few slices each: at least 32 slices per forward pass, as in 2d
        batch_size = max(batch_size, math.ceil(32 / int(roi[0])))
    if mode != "2d":
        return infer(tensor[None])[0].numpy().astype(np.int64)
    batch_size = max(batch_size, 32)  # 2D windows are small and need no gradients
    if tensor.ndim == 3:
        return infer(tensor[None])[0].numpy().astype(np.int64)
    slices = tensor.permute(1, 0, 2, 3)  # [D, C, H, W]
    chunk = batch_size
    parts = [infer(slices[start : start + chunk]) for start in range(0, slices.shape[0], chunk)]
    return torch.cat(parts).numpy().astype(np.int64)


def dice_per_class(
    predictions: Sequence[np.ndarray | Tensor], labels: Sequence[np.ndarray | Tensor], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Dice of each foreground class, per case and averaged over the cases (MONAI ``DiceMetric``,
    ``include_background=False``, ``reduction="mean_batch"``).

    A case without a class in its ground truth has no Dice for it (NaN) and is left out of that class's mean.

    Args:
        predictions, labels: per case, int label maps of the same shape (``[D, H, W]`` or ``[H, W]``).
    Returns:
        ``mean [num_classes - 1]`` and ``per_case [N, num_classes - 1]``.
    """
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    metric = DiceMetric(include_background=False, reduction="mean_batch")
    per_case = []
    for prediction, label in zip(predictions, labels, strict=True):
        p = one_hot(torch.as_tensor(np.asarray(prediction))[None, None].long(), num_classes)
        y = one_hot(torch.as_tensor(np.asarray(label))[None, None].long(), num_classes)
        per_case.append(torch.as_tensor(metric(p, y))[0].numpy())
    mean = torch.as_tensor(metric.aggregate()).reshape(-1).numpy()
    return mean.astype(np.float64), np.stack(per_case).astype(np.float64)


# ------------------------------------------------------------------------------------------------------ training


def _optimizer(model: nn.Module, config: SegmentationConfig) -> torch.optim.Optimizer:
    """AdamW: the encoder (``model.encoder``) at ``lr * encoder_lr_scale``, everything else at ``lr``."""
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    in_encoder = {id(p) for p in model.encoder.parameters()}
    decoder = [p for p in model.parameters() if id(p) not in in_encoder]
    groups = [{"params": decoder, "lr": config.lr}]
    if encoder and config.encoder_lr_scale > 0:
        groups.append({"params": encoder, "lr": config.lr * config.encoder_lr_scale})
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def train_segmentation(
    model: nn.Module, sampler: CropSampler, config: SegmentationConfig, device: torch.device
) -> list[float]:
    """``config.steps`` AdamW steps of DiceCE (``to_onehot_y``, softmax) on sampled crops, cosine learning-rate
    decay; returns the loss per step. The progress report (``progress``, ``log_every`` > 0) shows the mean DiceCE of
    the last ``log_every`` steps."""
    from monai.losses import DiceCELoss

    if config.freeze_encoder or config.encoder_lr_scale == 0:
        for p in model.encoder.parameters():
            p.requires_grad_(False)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / max(config.steps, 1)))
    )
    losses: list[float] = []
    steps = progress_of(
        range(1, config.steps + 1),
        desc="segmentation",
        unit="step",
        enabled=config.progress and config.log_every > 0,
        leave=None,
    )
    for step in steps:
        model.train()
        if config.freeze_encoder or config.encoder_lr_scale == 0:
            model.encoder.eval()
        images, masks = sampler.batch(config.batch_size)
        loss = loss_fn(model(images.to(device)), masks.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if config.log_every and (step % config.log_every == 0 or step == config.steps):
            recent = losses[-config.log_every :]
            steps.set_postfix(DiceCE=f"{sum(recent) / len(recent):.4f}", refresh=False)
    return losses


def run_segmentation(config: SegmentationConfig, project_dir: Path | None = None) -> dict[str, Any]:
    """Fine-tune the U-Net on the training cases and score the test cases.

    Returns:
        ``dice/<class name>`` and ``dice_mean`` (over the test cases), ``train_cases``, ``test_cases``,
        ``train_loss`` (mean of the last 10 steps), ``cases`` (per-case Dice), ``loaded`` (what loaded) and
        ``run_id`` (MLflow, None when ``mlflow=false``).
    """
    from medssl.runtime.devices import resolve_device

    seed_everything(config.seed)
    device = resolve_device(config.device)
    model, loaded = build_segmentation_model(config)
    print(f"medssl finetune: {loaded.message}")
    stride = encoder_stride(loaded)
    strided = config.roi[-len(stride) :]  # 2.5d: the encoder strides H and W only
    for axis, (size, s) in enumerate(zip(strided, stride, strict=True)):
        if size < s:
            key = "roi_depth" if config.mode == "3d" and axis == 0 else "roi_size"
            raise ValueError(f"{key}={size} is smaller than the encoder's total stride {s} along that axis")
    channels = int(loaded.kwargs.get("n_input_channels", 3))
    train, test = load_segmentation_cases(config, channels)
    if hasattr(model, "slice_spacing") and train:  # 2.5d: the transformer's positions in mm, as in pretraining
        model.slice_spacing = float(np.median([c.slice_spacing for c in train]))
    sampler = CropSampler(
        training_items(train, config.mode), config.roi, config.foreground_fraction, np.random.default_rng(config.seed)
    )
    model.to(device)
    losses = train_segmentation(model, sampler, config, device)
    predictions = [
        predict_case(model, c.image, config.mode, config.roi, config.overlap, device, config.batch_size)
        for c in progress_of(test, desc="segmentation test", unit="case", enabled=config.progress, leave=None)
    ]
    mean, per_case = dice_per_class(predictions, [c.mask for c in test], config.num_classes)
    metrics: dict[str, float] = {f"dice/{name}": float(v) for name, v in zip(config.class_names, mean, strict=True)}
    metrics["dice_mean"] = float(np.nanmean(mean)) if np.isfinite(mean).any() else float("nan")
    metrics["train_cases"] = float(len(train))
    metrics["test_cases"] = float(len(test))
    if losses:
        metrics["train_loss"] = float(np.mean(losses[-10:]))
    classes = ", ".join(f"{name} {v:.4f}" for name, v in zip(config.class_names, mean, strict=True))
    print(
        f"medssl finetune: segmentation {config.mode}, {len(train)} training cases ({config.data.label_fraction:g}), "
        f"{len(test)} test, {config.steps} steps: Dice mean {metrics['dice_mean']:.4f} ({classes})"
    )
    cases = [
        {"id": c.id, "subject": c.subject, "dice": dict(zip(config.class_names, map(float, row), strict=True))}
        for c, row in zip(test, per_case, strict=True)
    ]
    run_id = None
    if config.mlflow:
        run_id = log_finetune_run(
            config, metrics, loaded.message, f"segmentation-{config.mode}", project_dir, results={"cases": cases}
        )
    return {**metrics, "cases": cases, "loaded": loaded.message, "run_id": run_id}

"""Augmented views built from MONAI transforms: multi-crop for 2D, shared-geometry views for stacks.

All transforms act on ``[C, H, W]`` tensors. For a stack of ``N`` slices the slices are the
channels, so one random crop/flip/affine applies to every slice of the stack alike.
Grey-level images get no colour jitter; intensity augmentation is gamma, contrast, noise, blur.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandAffine,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandScaleCrop,
    RandScaleIntensity,
    RandShiftIntensity,
    Resize,
)


@dataclass
class AugmentConfig:
    """Random augmentation applied after the crop (probabilities and ranges)."""

    flip_prob: float = 0.5
    affine_prob: float = 0.5
    rotate_degrees: float = 10.0
    scale_range: float = 0.1
    gamma: list[float] = field(default_factory=lambda: [0.7, 1.5])
    gamma_prob: float = 0.5
    contrast_prob: float = 0.5
    contrast_range: float = 0.15
    noise_std: float = 0.03
    noise_prob: float = 0.2
    blur_sigma: list[float] = field(default_factory=lambda: [0.25, 1.0])
    blur_prob: float = 0.2

    def __post_init__(self) -> None:
        for name in ("flip_prob", "affine_prob", "gamma_prob", "contrast_prob", "noise_prob", "blur_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augment.{name} must be a probability in [0, 1], got {value}")
        if len(self.gamma) != 2 or not 0 < self.gamma[0] <= self.gamma[1]:
            raise ValueError(f"augment.gamma must be [low, high] with 0 < low <= high, got {self.gamma}")


@dataclass
class MultiCropConfig:
    """SwAV multi-crop (Caron et al., 2020): ``n_global`` large and ``n_local`` small random resized crops.

    Scales are fractions of the image area.
    """

    global_size: int = 96
    global_scale: list[float] = field(default_factory=lambda: [0.14, 1.0])
    n_global: int = 2
    local_size: int = 48
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.14])
    n_local: int = 4
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        for name in ("global_scale", "local_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise ValueError(f"views.{name} must be [low, high] with 0 < low <= high <= 1, got {[low, high]}")
        if self.n_global < 1 or self.n_local < 0:
            raise ValueError(f"views.n_global must be >= 1 and n_local >= 0, got {self.n_global}, {self.n_local}")
        if self.global_size < 8 or self.local_size < 8:
            raise ValueError("views.global_size and views.local_size must be at least 8 pixels")


def view_transform(size: int, area_scale: tuple[float, float] | list[float], augment: AugmentConfig) -> Compose:
    """Random resized crop (area fraction ``area_scale``) to ``size`` x ``size``, then augmentation."""
    side_low, side_high = math.sqrt(area_scale[0]), math.sqrt(area_scale[1])
    rotate = math.radians(augment.rotate_degrees)
    return Compose(
        [
            RandScaleCrop(roi_scale=side_low, max_roi_scale=side_high, random_size=True),
            Resize((size, size), mode="bilinear", align_corners=False),
            RandFlip(prob=augment.flip_prob, spatial_axis=1),
            RandAffine(
                prob=augment.affine_prob,
                rotate_range=(rotate,),
                scale_range=(augment.scale_range, augment.scale_range),
                padding_mode="zeros",
            ),
            RandAdjustContrast(prob=augment.gamma_prob, gamma=tuple(augment.gamma)),
            RandScaleIntensity(factors=augment.contrast_range, prob=augment.contrast_prob),
            RandShiftIntensity(offsets=augment.contrast_range / 2, prob=augment.contrast_prob),
            RandGaussianSmooth(
                sigma_x=tuple(augment.blur_sigma), sigma_y=tuple(augment.blur_sigma), prob=augment.blur_prob
            ),
            RandGaussianNoise(prob=augment.noise_prob, std=augment.noise_std),
        ],
        lazy=False,
    )


class MultiCrop:
    """Produce ``n_global + n_local`` views ``[C, size, size]`` of one image ``[C, H, W]``."""

    def __init__(self, config: MultiCropConfig) -> None:
        self.config = config
        self.global_view = view_transform(config.global_size, config.global_scale, config.augment)
        self.local_view = view_transform(config.local_size, config.local_scale, config.augment)

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> list[torch.Tensor]:
        views = []
        for count, transform in ((self.config.n_global, self.global_view), (self.config.n_local, self.local_view)):
            views.extend(apply_seeded(transform, image, rng) for _ in range(count))
        return views


def apply_seeded(transform: Compose, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Run ``transform`` with randomness drawn from ``rng`` (so results depend on the seed only,
    not on the worker that runs it). Metadata tracking is off meanwhile: views need none, and it
    costs about 40% of the time."""
    transform.set_random_state(seed=int(rng.integers(2**31 - 1)))
    tracking = get_track_meta()
    set_track_meta(False)
    try:
        return as_plain_tensor(transform(image))
    finally:
        set_track_meta(tracking)


def as_plain_tensor(value: object) -> torch.Tensor:
    """MONAI may return a MetaTensor; batches carry plain float tensors."""
    tensor = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
    return tensor.float().contiguous()

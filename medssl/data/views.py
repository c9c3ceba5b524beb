"""What the augmented views are: the multi-crop and augmentation settings and the crop-box procedure.

The views themselves are made in batch on the training device (:mod:`medssl.data.device_views`); for a stack of
``N`` slices the slices are the channels, so one crop/flip/affine applies to every slice of the stack alike.
Crop boxes follow torchvision's ``RandomResizedCrop.get_params`` (area fraction of the whole image
uniform in ``scale``, log aspect ratio uniform in ``log(ratio)``, 10 tries, then a central crop),
written here because torchvision is not a dependency.
Grey-level images get no colour jitter; intensity augmentation is gamma, contrast, noise, blur.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

DEFAULT_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
"""Aspect-ratio range (width / height) of the crop boxes, as torchvision's default."""


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

    Scales are fractions of the whole image area; ``ratio`` is the range of the crop boxes' aspect
    ratio (width / height), drawn log-uniformly (torchvision's ``RandomResizedCrop``).
    """

    global_size: int = 96
    global_scale: list[float] = field(default_factory=lambda: [0.14, 1.0])
    n_global: int = 2
    local_size: int = 48
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.14])
    n_local: int = 4
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        for name in ("global_scale", "local_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise ValueError(f"views.{name} must be [low, high] with 0 < low <= high <= 1, got {[low, high]}")
        check_ratio(self.ratio, "views.ratio")
        if self.n_global < 1 or self.n_local < 0:
            raise ValueError(f"views.n_global must be >= 1 and n_local >= 0, got {self.n_global}, {self.n_local}")
        if self.global_size < 8 or self.local_size < 8:
            raise ValueError("views.global_size and views.local_size must be at least 8 pixels")


def check_ratio(ratio: Sequence[float], key: str) -> None:
    """Raise ``ValueError`` naming ``key`` unless ``ratio`` is ``[low, high]`` with ``0 < low <= high``."""
    values = list(ratio)
    if len(values) != 2 or not all(math.isfinite(v) for v in values) or not 0 < values[0] <= values[1]:
        raise ValueError(f"{key} must be [low, high] (width / height) with 0 < low <= high, got {values}")


class BoxDraws(Protocol):
    """What a crop box is drawn from: ``numpy.random.RandomState`` or anything with its ``uniform`` and ``randint``."""

    def uniform(self, low: float, high: float) -> Any: ...

    def randint(self, low: int, high: int) -> Any: ...


def random_resized_crop_box(
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float] = DEFAULT_RATIO,
    state: BoxDraws | None = None,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """A crop box ``(top, left, box_height, box_width)`` inside a ``height`` x ``width`` image.

    torchvision's ``RandomResizedCrop.get_params``: up to ``attempts`` times, draw the box area
    as a fraction of the whole image area ``height * width`` uniformly in ``scale`` and the aspect
    ratio ``box_width / box_height`` log-uniformly in ``ratio``, round the sides, and keep the
    first box that fits, placed uniformly. If none fits, fall back to a central crop: the whole
    image when its aspect ratio ``width / height`` is in ``ratio``, else the largest box with the
    aspect ratio clamped to ``ratio`` (full height or full width). The draws, in order, are
    ``state.uniform`` (area), ``state.uniform`` (log ratio) per try, then ``state.randint``
    (top, then left) for a box that fits; the fallback draws nothing.
    """
    state = state if state is not None else np.random.RandomState()
    area = float(height * width)
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target_area = area * float(state.uniform(scale[0], scale[1]))
        aspect = math.exp(float(state.uniform(log_low, log_high)))
        box_width = round(math.sqrt(target_area * aspect))
        box_height = round(math.sqrt(target_area / aspect))
        if 0 < box_width <= width and 0 < box_height <= height:
            top = int(state.randint(0, height - box_height + 1))
            left = int(state.randint(0, width - box_width + 1))
            return top, left, box_height, box_width
    in_ratio = width / height
    if in_ratio < min(ratio):
        box_width = width
        box_height = min(height, max(1, round(box_width / min(ratio))))
    elif in_ratio > max(ratio):
        box_height = height
        box_width = min(width, max(1, round(box_height * max(ratio))))
    else:
        box_width, box_height = width, height
    return (height - box_height) // 2, (width - box_width) // 2, box_height, box_width

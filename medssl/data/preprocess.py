"""Preprocessing: resampling, modality-aware intensity normalisation, foreground per slice.

Output arrays are ``float32`` in ``[0, 1]`` with a leading channel axis: ``[C, X, Y, Z]`` for
volumes and ``[C, H, W]`` for images. ``C`` is 1 except for CT with several HU windows (one
channel per window).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from medssl.data.errors import DataError
from medssl.data.readers import LoadedImage
from medssl.runtime.configs import structured_config

CT_MODALITIES = frozenset({"CT"})
MR_MODALITIES = frozenset({"MR"})


@dataclass
class PreprocessConfig:
    """Settings that change the cached arrays (and therefore the cache key).

    Attributes:
        spacing: target voxel spacing in mm for volumes ``[X, Y, Z]``; ``None`` keeps the
            native spacing, and a ``None`` entry keeps that axis.
        max_side_2d: 2D images are downscaled (never upscaled) so their longer side is at most this.
        ct_windows: CT HU windows as ``[level, width]`` pairs, one output channel each.
        percentiles: low/high percentiles for MR (over non-zero voxels), X-ray and other modalities.
        foreground_threshold: normalised intensity above which a voxel counts as foreground.
        storage_dtype: ``float16`` or ``uint8`` (256 levels of ``[0, 1]``).
    """

    spacing: list[float | None] | None = None
    max_side_2d: int | None = 512
    ct_windows: list[Any] = field(default_factory=lambda: [[40.0, 400.0]])
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    foreground_threshold: float = 0.05
    storage_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.spacing is not None and (len(self.spacing) != 3 or any(s is not None and s <= 0 for s in self.spacing)):
            raise ValueError(f"preprocess.spacing must be null or 3 positive values (or nulls), got {self.spacing}")
        if self.max_side_2d is not None and self.max_side_2d < 8:
            raise ValueError(f"preprocess.max_side_2d must be at least 8, got {self.max_side_2d}")
        try:
            self.ct_windows = [[float(level), float(width)] for level, width in self.ct_windows]
        except (TypeError, ValueError):
            raise ValueError(f"preprocess.ct_windows must be [level, width] pairs, got {self.ct_windows}") from None
        if not self.ct_windows or any(width <= 0 for _, width in self.ct_windows):
            raise ValueError(f"preprocess.ct_windows must be [level, width>0] pairs, got {self.ct_windows}")
        if len(self.percentiles) != 2 or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(
                f"preprocess.percentiles must be [low, high] with 0<=low<high<=100, got {self.percentiles}"
            )
        if not 0 <= self.foreground_threshold < 1:
            raise ValueError(f"preprocess.foreground_threshold must be in [0, 1), got {self.foreground_threshold}")
        if self.storage_dtype not in ("float16", "uint8"):
            raise ValueError(f"preprocess.storage_dtype must be float16 or uint8, got {self.storage_dtype!r}")

    @classmethod
    def from_overrides(cls, overrides: list[str], base: dict[str, Any] | None = None) -> PreprocessConfig:
        """Build from ``key=value`` strings (Hydra/OmegaConf syntax); unknown keys name themselves."""
        return structured_config(cls, base, overrides, prefix="preprocess.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Preprocessed:
    """``array``: float32 ``[C, X, Y, Z]`` or ``[C, H, W]`` in ``[0, 1]``; ``foreground``: per spatial
    axis, the fraction of foreground pixels in each slice along that axis."""

    array: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray | None
    modality: str
    foreground: list[list[float]]


def _resample(array: np.ndarray, spacing: tuple[float, ...], target: tuple[float, ...]) -> np.ndarray:
    """Linear resampling of a [X, Y(, Z)] array to ``target`` spacing, Gaussian anti-aliasing when shrinking.

    The output grid starts at the first voxel's centre; its last samples can lie up to half an output voxel past the
    last input voxel's centre (e.g. 2 mm -> 1 mm). The input is padded by one copy of its border voxels, so those
    samples take the border's value instead of the 0 outside the image (which a CT window maps to tissue).
    """
    padded = np.pad(np.ascontiguousarray(array), 1, mode="edge")
    image = sitk.GetImageFromArray(np.ascontiguousarray(padded.T))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([-float(s) for s in spacing])  # the original first voxel stays at 0
    factors = [t / s for s, t in zip(spacing, target, strict=True)]
    if any(f > 1.01 for f in factors):
        sigmas = [max(f - 1.0, 0.0) / 2.0 * s for f, s in zip(factors, spacing, strict=True)]
        image = sitk.SmoothingRecursiveGaussian(image, [max(sg, 1e-3) for sg in sigmas])
    size = [max(1, round(n * s / t)) for n, s, t in zip(array.shape, spacing, target, strict=True)]
    resampled = sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        [0.0] * len(spacing),
        [float(t) for t in target],
        image.GetDirection(),
        0.0,
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(resampled).T.copy()


def normalise_intensity(array: np.ndarray, modality: str, config: PreprocessConfig) -> np.ndarray:
    """Map raw intensities to ``[0, 1]`` channels ``[C, ...]`` by modality.

    CT: each HU window ``[level, width]`` clipped to ``[0, 1]``. MR: robust percentiles over
    non-zero voxels. X-ray and anything else: robust percentiles over all pixels.
    """
    if modality in CT_MODALITIES:
        channels = [np.clip((array - (level - width / 2.0)) / width, 0.0, 1.0) for level, width in config.ct_windows]
        return np.stack(channels).astype(np.float32)
    values = array[array > 0] if modality in MR_MODALITIES and np.count_nonzero(array > 0) > 16 else array
    low, high = np.percentile(values, config.percentiles)
    if high - low <= 1e-6 * max(1.0, abs(high)):
        low, high = float(array.min()), float(array.max())
    if high - low <= 0:
        raise ValueError("image has constant intensity (no contrast)")
    return np.clip((array - low) / (high - low), 0.0, 1.0).astype(np.float32)[None]


def foreground_fractions(array: np.ndarray, threshold: float) -> list[list[float]]:
    """For each spatial axis of ``array`` [C, ...], the foreground fraction of every slice along it."""
    mask = (array > threshold).any(axis=0)
    spatial = range(mask.ndim)
    return [[round(float(v), 4) for v in mask.mean(axis=tuple(a for a in spatial if a != axis))] for axis in spatial]


def preprocess(image: LoadedImage, config: PreprocessConfig, source: str = "") -> Preprocessed:
    """Resample, normalise and measure foreground; errors become ``DataError`` naming ``source``."""
    array = image.array
    spacing = tuple(float(s) for s in image.spacing)
    affine = None if image.affine is None else np.array(image.affine, dtype=float)
    if image.dims == 3 and config.spacing is not None:
        target = tuple(s if t is None else float(t) for s, t in zip(spacing, config.spacing, strict=True))
        if not np.allclose(target, spacing, rtol=1e-3):
            array = _resample(array, spacing, target)
            if affine is not None:
                affine[:3, :3] = affine[:3, :3] @ np.diag(np.asarray(target) / np.asarray(spacing))
            spacing = target
    elif image.dims == 2 and config.max_side_2d is not None and max(array.shape) > config.max_side_2d:
        factor = max(array.shape) / config.max_side_2d
        target = tuple(s * factor for s in spacing)
        array = _resample(array, spacing, target)
        spacing = target
    try:
        normalised = normalise_intensity(array, image.modality, config)
    except ValueError as exc:
        raise DataError(source, str(exc)) from None
    return Preprocessed(
        array=normalised,
        spacing=spacing,
        affine=affine,
        modality=image.modality,
        foreground=foreground_fractions(normalised, config.foreground_threshold),
    )

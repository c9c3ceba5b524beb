"""Torch datasets over the preprocessed cache.

* ``MultiCropSliceDataset``: 2D images and slices of volumes (planes configurable), each
  giving SwAV multi-crop views ``[1, s, s]``.
* ``TwoViewStackDataset``: stacks of ``N`` consecutive slices of one volume, two augmented views
  ``[N, 1, s, s]`` with the slices' physical positions (mm) and a padding mask.

Randomness is drawn from ``numpy.random.default_rng([seed, epoch, index])``: a sample is the
same whichever worker (or how many workers) produce it, and differs between epochs. The epoch is
either set with ``set_epoch`` before iterating (as with ``DistributedSampler``) or carried by the
index itself, ``dataset[(epoch, index)]``, which lets long-lived loader workers cross epochs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medssl.data.cache import CacheEntry, open_cache
from medssl.data.geometry import PLANE_AXIS, slice_to_display
from medssl.data.manifest import Manifest, ManifestRow
from medssl.data.preprocess import PreprocessConfig
from medssl.data.views import (
    AugmentConfig,
    MultiCrop,
    MultiCropConfig,
    apply_seeded,
    check_ratio,
    view_transform,
)


@dataclass
class CachedItem:
    row: ManifestRow
    entry: CacheEntry


def cached_items(
    manifest: Manifest,
    cache_root: Path,
    config: PreprocessConfig,
    splits: Sequence[str] | None = None,
) -> list[CachedItem]:
    """The manifest's rows that have a cache entry, optionally only those of some splits
    (``""`` selects rows without a split)."""
    entries = open_cache(manifest, cache_root, config)
    return [
        CachedItem(row, entries[row.id])
        for row in manifest.rows
        if row.id in entries and (splits is None or row.split in splits)
    ]


@dataclass
class SliceConfig:
    """Which slices of volumes become 2D samples."""

    planes: list[str] = field(default_factory=lambda: ["axial"])
    min_foreground: float = 0.1

    def __post_init__(self) -> None:
        bad = [p for p in self.planes if p not in PLANE_AXIS]
        if bad or not self.planes:
            raise ValueError(f"slices.planes must be a non-empty list of {sorted(PLANE_AXIS)}, got {self.planes}")
        if not 0 <= self.min_foreground <= 1:
            raise ValueError(f"slices.min_foreground must be in [0, 1], got {self.min_foreground}")


@dataclass
class StackConfig:
    """Stacks of ``n_slices`` slices (every ``stride``-th) along ``plane``, cropped to ``size``."""

    n_slices: int = 16
    plane: str = "axial"
    stride: int = 1
    min_foreground: float = 0.1
    size: int = 96
    scale: list[float] = field(default_factory=lambda: [0.3, 1.0])
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])  # crop aspect (w / h), log-uniform
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        check_ratio(self.ratio, "stacks.ratio")
        if self.plane not in PLANE_AXIS:
            raise ValueError(f"stacks.plane must be one of {sorted(PLANE_AXIS)}, got {self.plane!r}")
        if self.n_slices < 1 or self.stride < 1:
            raise ValueError(f"stacks.n_slices and stacks.stride must be >= 1, got {self.n_slices}, {self.stride}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"stacks.scale must be [low, high] with 0 < low <= high <= 1, got {self.scale}")


class _CachedDataset(Dataset):
    """Holds the items and opens their memory-mapped arrays lazily, once per process."""

    def __init__(self, items: Sequence[CachedItem], seed: int) -> None:
        self.items = list(items)
        self.seed = int(seed)
        self.epoch = 0
        self._arrays: dict[int, np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def array(self, item: int) -> np.ndarray:
        array = self._arrays.get(item)
        if array is None:
            array = self.items[item].entry.array()
            self._arrays[item] = array
        return array

    def rng(self, index: int, epoch: int | None = None) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch if epoch is None else int(epoch), int(index)])

    def _key(self, key: int | tuple[int, int]) -> tuple[int, int]:
        """``(epoch, index)`` of a plain index (the current epoch) or of an epoch-tagged one."""
        if isinstance(key, tuple):
            return int(key[0]), int(key[1])
        return self.epoch, int(key)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state


class MultiCropSliceDataset(_CachedDataset):
    """2D samples: every 2D image, and every foreground slice of every volume in ``slices.planes``.

    ``__getitem__`` returns ``{"views": list of [1, s, s] (globals first), "source_dims",
    "group", "label", "index"}``.
    """

    def __init__(
        self,
        items: Sequence[CachedItem],
        views: MultiCropConfig | None = None,
        slices: SliceConfig | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(items, seed)
        self.views_config = views or MultiCropConfig()
        self.slices = slices or SliceConfig()
        self.multicrop = MultiCrop(self.views_config)
        item_index, axis_index, slice_index = [], [], []
        for i, cached in enumerate(self.items):
            if cached.row.dims == 2:
                item_index.append(i)
                axis_index.append(-1)
                slice_index.append(-1)
                continue
            foreground = cached.entry.meta["foreground"]
            for plane in self.slices.planes:
                axis = PLANE_AXIS[plane]
                keep = np.flatnonzero(np.asarray(foreground[axis]) >= self.slices.min_foreground)
                item_index.extend([i] * len(keep))
                axis_index.extend([axis] * len(keep))
                slice_index.extend(keep.tolist())
        self.item_index = np.asarray(item_index, dtype=np.int64)
        self.axis_index = np.asarray(axis_index, dtype=np.int8)
        self.slice_index = np.asarray(slice_index, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.item_index)

    @property
    def groups(self) -> list[str]:
        """The manifest ``group`` of every sample (for the balanced sampler)."""
        return [self.items[i].row.group for i in self.item_index]

    def image(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        """The un-augmented sample ``[1, H, W]`` in display orientation, float32 in [0, 1]."""
        item = int(self.item_index[index])
        array = self.array(item)
        channel = int(rng.integers(array.shape[0]))
        axis = int(self.axis_index[index])
        if axis < 0:
            plane = np.asarray(array[channel])
        else:
            plane = slice_to_display(np.take(array[channel], int(self.slice_index[index]), axis=axis))
        scale = self.items[item].entry.scale
        return torch.from_numpy(np.ascontiguousarray(plane, dtype=np.float32) * scale)[None]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = self._key(key)
        rng = self.rng(index, epoch)
        row = self.items[int(self.item_index[index])].row
        return {
            "views": self.multicrop(self.image(index, rng), rng),
            "source_dims": row.dims,
            "group": row.group,
            "label": row.label,
            "index": index,
        }


class TwoViewStackDataset(_CachedDataset):
    """3D samples: two augmented views of one stack of ``n_slices`` slices of a volume.

    The stack is drawn inside the volume's foreground range along ``plane``; a volume with
    fewer slices is padded (zeros, ``mask`` False). Both views share the slices and differ in
    crop and augmentation. Returns ``{"views": [view1, view2] each [N, 1, s, s],
    "positions": [N] mm along the plane normal, "mask": [N] bool, "mask_noise": [2, N] uniform scores
    (which slices L_mask hides in each view), "group", "label", "index"}``.
    """

    def __init__(self, items: Sequence[CachedItem], config: StackConfig | None = None, seed: int = 0) -> None:
        super().__init__([it for it in items if it.row.dims == 3], seed)
        self.config = config or StackConfig()
        self.axis = PLANE_AXIS[self.config.plane]
        self.transform = view_transform(self.config.size, self.config.scale, self.config.augment, self.config.ratio)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def groups(self) -> list[str]:
        return [it.row.group for it in self.items]

    def slice_indices(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Indices along the plane axis of the stack's slices, and which of them exist."""
        cfg = self.config
        meta = self.items[index].entry.meta
        depth = int(meta["shape"][1 + self.axis])
        foreground = np.flatnonzero(np.asarray(meta["foreground"][self.axis]) >= cfg.min_foreground)
        low, high = (int(foreground[0]), int(foreground[-1])) if foreground.size else (0, depth - 1)
        need = (cfg.n_slices - 1) * cfg.stride + 1
        if high - low + 1 >= need:
            start = int(rng.integers(low, high - need + 2))
        else:
            start = int(np.clip(round((low + high + 1 - need) / 2), 0, max(0, depth - need)))
        indices = start + cfg.stride * np.arange(cfg.n_slices)
        return indices, indices < depth

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = self._key(key)
        rng = self.rng(index, epoch)
        cached = self.items[index]
        array = self.array(index)
        channel = int(rng.integers(array.shape[0]))
        indices, valid = self.slice_indices(index, rng)
        slices = np.moveaxis(np.take(array[channel], indices[valid], axis=self.axis), self.axis, 0)
        slices = slice_to_display(slices).astype(np.float32) * cached.entry.scale  # [n, H, W]
        stack = np.zeros((len(indices), *slices.shape[1:]), dtype=np.float32)
        stack[valid] = slices
        mask = torch.from_numpy(valid)
        views = []
        for _ in range(2):
            view = apply_seeded(self.transform, torch.from_numpy(stack), rng)
            view[~mask] = 0.0
            views.append(view.unsqueeze(1))
        meta = cached.entry.meta
        origin = meta["affine"][self.axis][3] if meta["affine"] else 0.0
        positions = np.where(valid, origin + indices * float(meta["spacing"][self.axis]), 0.0)
        return {
            "views": views,
            "positions": torch.from_numpy(positions.astype(np.float32)),
            "mask": mask,
            "mask_noise": torch.from_numpy(rng.random((2, len(indices))).astype(np.float32)),
            "group": cached.row.group,
            "label": cached.row.label,
            "index": index,
        }

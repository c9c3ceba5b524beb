"""Torch datasets over the preprocessed cache: the loader only reads, the views are made in batch on the device.

* ``MultiCropSliceDataset``: 2D images and slices of volumes (planes configurable); a sample is the cached plane
  ``[1, H, W]`` at storage precision plus the random numbers of its multi-crop views; :meth:`views` turns a batch
  into the views ``[B, 1, s, s]`` on the training device (:mod:`medssl.data.device_views`).
* ``TwoViewStackDataset``: stacks of ``N`` consecutive slices of one volume ``[N, H, W]`` plus the numbers of their
  two views (one geometry per view, shared by the stack's slices), the slices' physical positions (mm) and a padding
  mask; :meth:`views` gives two views ``[B, N, 1, s, s]``.

Samples of different heights and widths share a batch padded at the bottom and right (:meth:`collate`); each
sample's crop boxes lie inside its own extent, so the padding is never sampled.

Randomness is drawn from ``numpy.random.default_rng([seed, epoch, index])``: a sample (its numbers, hence its views)
is the same whichever worker (or how many workers, on whichever device) produce it, and differs between epochs. The
epoch is either set with ``set_epoch`` before iterating (as with ``DistributedSampler``) or carried by the index
itself, ``dataset[(epoch, index)]``, which lets long-lived loader workers cross epochs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from medssl.data.cache import CacheEntry, open_cache
from medssl.data.device_views import ViewParams, draw_view_params, pad_planes, render_views
from medssl.data.geometry import PLANE_AXIS, slice_to_display
from medssl.data.manifest import Manifest, ManifestRow
from medssl.data.preprocess import PreprocessConfig
from medssl.data.views import AugmentConfig, MultiCropConfig, check_ratio


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


class _CachedDataset(Dataset, ABC):
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

    @staticmethod
    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        """A list of samples -> a batch: ``pixels`` padded to the largest height and width (bottom, right),
        ``params`` ``[B, V, N_PARAMS]``, ``scale`` ``[B]``, the rest as ``default_collate`` does it."""
        pixels = pad_planes([s["pixels"] for s in samples])
        rest = default_collate([{k: v for k, v in s.items() if k != "pixels"} for s in samples])
        return {"pixels": pixels, **rest}

    @staticmethod
    def float_pixels(batch: dict[str, Any], device: torch.device | str | None) -> Tensor:
        """The batch's padded planes as float32 on ``device``, in [0, 1] for 8-bit storage (scaled on the device)."""
        pixels = batch["pixels"].to(device, non_blocking=True).float()
        scale = torch.as_tensor(batch["scale"], dtype=torch.float32).to(pixels.device)
        return pixels * scale.view(-1, *([1] * (pixels.ndim - 1)))

    def sample_views(self, key: int | tuple[int, int]) -> list[Tensor]:
        """One sample's views on the CPU, without the batch dimension (pictures, tests)."""
        return [view[0] for view in self.views(self.collate([self[key]]))]

    @abstractmethod
    def views(self, batch: dict[str, Any], device: torch.device | str | None = None) -> list[Tensor]:
        """The augmented views of a collated batch, made on ``device``."""


class MultiCropSliceDataset(_CachedDataset):
    """2D samples: every 2D image, and every foreground slice of every volume in ``slices.planes``.

    ``__getitem__`` returns ``{"pixels": [1, H, W] at storage precision, "scale": float (pixels * scale is in the
    preprocessed range), "params": [n_global + n_local, N_PARAMS] float64 (globals first), "source_dims", "group",
    "label", "index"}``; :meth:`views` makes the views of a collated batch.
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

    def plane(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """The un-augmented sample ``[H, W]`` in display orientation, at storage precision (a view of the cache
        where the orientation allows; one channel drawn from ``rng``)."""
        array = self.array(int(self.item_index[index]))
        channel = int(rng.integers(array.shape[0]))
        axis = int(self.axis_index[index])
        if axis < 0:
            return np.asarray(array[channel])
        return slice_to_display(np.take(array[channel], int(self.slice_index[index]), axis=axis))

    def image(self, index: int, rng: np.random.Generator) -> Tensor:
        """The un-augmented sample ``[1, H, W]`` in display orientation, float32 in [0, 1]."""
        scale = self.items[int(self.item_index[index])].entry.scale
        return torch.from_numpy(np.ascontiguousarray(self.plane(index, rng), dtype=np.float32) * scale)[None]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = self._key(key)
        rng = self.rng(index, epoch)
        cached = self.items[int(self.item_index[index])]
        plane = self.plane(index, rng)
        height, width = plane.shape
        cfg = self.views_config
        params = [
            draw_view_params(rng, height, width, count, scale, cfg.ratio, cfg.augment)
            for count, scale in ((cfg.n_global, cfg.global_scale), (cfg.n_local, cfg.local_scale))
        ]
        return {
            "pixels": torch.from_numpy(np.array(plane))[None],  # a copy: the cache is mapped read-only
            "scale": cached.entry.scale,
            "params": torch.from_numpy(np.concatenate(params)),
            "source_dims": cached.row.dims,
            "group": cached.row.group,
            "label": cached.row.label,
            "index": index,
        }

    def views(self, batch: dict[str, Any], device: torch.device | str | None = None) -> list[Tensor]:
        """The multi-crop views of a collated batch on ``device``: ``n_global`` tensors ``[B, 1, global_size,
        global_size]``, then ``n_local`` tensors ``[B, 1, local_size, local_size]`` (float32)."""
        cfg = self.views_config
        pixels = self.float_pixels(batch, device)
        params = ViewParams.from_rows(batch["params"], pixels.device)
        globals_ = render_views(pixels, params.select(slice(0, cfg.n_global)), cfg.global_size)
        out = list(globals_.unbind(1))
        if cfg.n_local:
            locals_ = render_views(pixels, params.select(slice(cfg.n_global, None)), cfg.local_size)
            out += list(locals_.unbind(1))
        return out


class TwoViewStackDataset(_CachedDataset):
    """3D samples: two augmented views of one stack of ``n_slices`` slices of a volume.

    The stack is drawn inside the volume's foreground range along ``plane``; a volume with
    fewer slices is padded (zeros, ``mask`` False). Both views share the slices and differ in
    crop and augmentation (one geometry and one set of intensity numbers per view, shared by its slices).
    Returns ``{"pixels": [N, H, W] at storage precision, "scale": float, "params": [2, N_PARAMS],
    "positions": [N] mm along the plane normal, "mask": [N] bool, "mask_noise": [2, N] uniform scores
    (which slices L_mask hides in each view), "group", "label", "index"}``; :meth:`views` makes the two views
    ``[B, N, 1, s, s]`` of a collated batch.
    """

    def __init__(self, items: Sequence[CachedItem], config: StackConfig | None = None, seed: int = 0) -> None:
        super().__init__([it for it in items if it.row.dims == 3], seed)
        self.config = config or StackConfig()
        self.axis = PLANE_AXIS[self.config.plane]

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
        slices = slice_to_display(np.moveaxis(np.take(array[channel], indices[valid], axis=self.axis), self.axis, 0))
        stack = np.zeros((len(indices), *slices.shape[1:]), dtype=slices.dtype)  # [N, H, W], zeros where no slice
        stack[valid] = slices
        cfg = self.config
        params = draw_view_params(rng, stack.shape[1], stack.shape[2], 2, cfg.scale, cfg.ratio, cfg.augment)
        meta = cached.entry.meta
        origin = meta["affine"][self.axis][3] if meta["affine"] else 0.0
        positions = np.where(valid, origin + indices * float(meta["spacing"][self.axis]), 0.0)
        return {
            "pixels": torch.from_numpy(stack),
            "scale": cached.entry.scale,
            "params": torch.from_numpy(params),
            "positions": torch.from_numpy(positions.astype(np.float32)),
            "mask": torch.from_numpy(valid),
            "mask_noise": torch.from_numpy(rng.random((2, len(indices))).astype(np.float32)),
            "group": cached.row.group,
            "label": cached.row.label,
            "index": index,
        }

    def views(self, batch: dict[str, Any], device: torch.device | str | None = None) -> list[Tensor]:
        """The two views ``[B, N, 1, size, size]`` of a collated batch on ``device``; missing slices stay zero."""
        pixels = self.float_pixels(batch, device)  # [B, N, H, W]: the slices as channels share each view's numbers
        params = ViewParams.from_rows(batch["params"], pixels.device)
        rendered = render_views(pixels, params, self.config.size)  # [B, 2, N, S, S]
        keep = torch.as_tensor(batch["mask"], device=pixels.device)[:, :, None, None, None]
        return [(view.unsqueeze(2) * keep) for view in rendered.unbind(1)]

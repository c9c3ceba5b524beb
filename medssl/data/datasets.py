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

A cache entry that cannot be read while sampling (its ``.npy`` or ``.json`` deleted, truncated or corrupt since the
cache was opened) does not stop the run: the sample is replaced by another one drawn from ``(seed, epoch, index)``
(so the same one whichever worker draws it), the entry's key is logged once per process and listed in the sample's
``"skipped"`` and in the batch's (:meth:`collate`), which :class:`SkippedEntries` counts for the trainer's reports.
Keys are content hashes of the cache, never archive paths. More unreadable entries than ``max_unreadable`` (a
fraction of the dataset's items) stop it with :class:`~medssl.data.errors.UnreadableCacheError`.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from array import array
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from medssl.data.cache import CacheEntry, CacheIndex, open_cache
from medssl.data.device_views import ViewParams, draw_view_params, pad_planes, render_views
from medssl.data.errors import DataError, UnreadableCacheError
from medssl.data.geometry import PLANE_AXIS, slice_to_display
from medssl.data.manifest import Manifest, ManifestRow, RowTable
from medssl.data.preprocess import PreprocessConfig
from medssl.data.views import AugmentConfig, MultiCropConfig, check_ratio

log = logging.getLogger(__name__)

MAX_OPEN_ARRAYS = 256
"""Memory-mapped arrays a dataset keeps open per process, the most recently used: each holds a file descriptor and
its mapped pages, and an epoch over 100,000 files would exhaust both."""
MAX_UNREADABLE = 0.5
"""Default ``max_unreadable``: the fraction of a dataset's items that may turn unreadable before it stops."""
SUBSTITUTE_DRAWS = 16
"""Draws for a readable substitute of an unreadable sample before giving up with :class:`UnreadableCacheError`."""
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, IndexError, TypeError)
"""What reading a damaged entry raises: missing or unreadable file (OSError), bad ``.npy`` header, file shorter than
its array or bad JSON (ValueError), empty file (EOFError), metadata without a field or with a wrong type (the rest)."""


@dataclass(slots=True)
class CachedItem:
    row: ManifestRow
    entry: CacheEntry


class UnreadableEntryError(DataError):
    """One cache entry cannot be read (``path``: its key, a content hash); the dataset replaces its samples."""


@dataclass
class SkippedEntries:
    """Samples a stream's dataset replaced because their cache entry could not be read, by entry key (a content hash
    of the cache, never an archive path): over the run (``total``) and since the last :meth:`take_window`.

    Fed from the batches' ``"skipped"`` lists (:meth:`add`), so it counts in the main process what loader workers
    met."""

    total: Counter[str] = field(default_factory=Counter)
    window: Counter[str] = field(default_factory=Counter)

    def add(self, keys: Iterable[str]) -> None:
        """Count one replaced sample per key in ``keys`` (a batch's ``"skipped"``)."""
        for key in keys:
            self.total[key] += 1
            self.window[key] += 1

    def take_window(self) -> Counter[str]:
        """The counts since the previous call (the logging window), and start a new window."""
        window, self.window = self.window, Counter()
        return window

    @staticmethod
    def describe(counts: Counter[str], limit: int = 10) -> str:
        """``"5 samples of 2 unreadable cache entries replaced (keys: ab12.. x3, cd34.. x2)"``; "" when none."""
        if not counts:
            return ""
        shown = ", ".join(f"{key} x{n}" for key, n in counts.most_common(limit))
        more = f", and {len(counts) - limit} more" if len(counts) > limit else ""
        return (
            f"{sum(counts.values())} samples of {len(counts)} unreadable cache entries replaced (keys: {shown}{more})"
        )


class CachedItems(Sequence[CachedItem]):
    """The rows of a manifest that have a cache entry, held as their positions (``[M]`` int64) in the manifest's rows
    and its :class:`CacheIndex`: each :class:`CachedItem` (and its row) is made when it is read, so a dataset over
    100,000 rows holds 8 bytes a row here, not a row object."""

    def __init__(self, rows: Sequence[ManifestRow], index: CacheIndex, positions: array) -> None:
        self.rows = rows
        self.index = index
        self.positions = positions

    def __len__(self) -> int:
        return len(self.positions)

    @overload
    def __getitem__(self, item: int) -> CachedItem: ...

    @overload
    def __getitem__(self, item: slice) -> CachedItems: ...

    def __getitem__(self, item: int | slice) -> CachedItem | CachedItems:
        if isinstance(item, slice):
            return CachedItems(self.rows, self.index, self.positions[item])
        return CachedItem(self.rows[self.positions[item]], self.entry(item))

    def entry(self, item: int) -> CacheEntry:
        """The cache entry of item ``item`` (no row made)."""
        entry = self.index.entry_at(self.positions[item])
        assert entry is not None  # positions hold only rows with an entry
        return entry

    def column(self, name: str) -> list[Any]:
        """One manifest column (``dims``, ``group``, ``label``, ...) of the items ``[M]``, without making rows where the
        rows are a :class:`RowTable`."""
        values = self.rows.column(name) if isinstance(self.rows, RowTable) else None
        if values is None:
            return [getattr(self.rows[p], name) for p in self.positions]
        return [values[p] for p in self.positions]

    def where(self, keep: Sequence[bool]) -> CachedItems:
        """The items whose flag in ``keep`` ``[M]`` is true."""
        kept = array("q", (p for p, k in zip(self.positions, keep, strict=True) if k))
        return CachedItems(self.rows, self.index, kept)


def item_column(items: Sequence[CachedItem], name: str) -> list[Any]:
    """The manifest column ``name`` of ``items`` ``[M]`` (without making rows for :class:`CachedItems`)."""
    if isinstance(items, CachedItems):
        return items.column(name)
    return [getattr(item.row, name) for item in items]


def cached_items(
    manifest: Manifest,
    cache_root: Path,
    config: PreprocessConfig,
    splits: Sequence[str] | None = None,
) -> CachedItems:
    """The manifest's rows that have a cache entry, optionally only those of some splits
    (``""`` selects rows without a split)."""
    index = open_cache(manifest, cache_root, config)
    rows = manifest.rows
    split_of = rows.column("split") if isinstance(rows, RowTable) else [row.split for row in rows]
    wanted = None if splits is None else set(splits)
    positions = array(
        "q",
        (i for i in range(len(rows)) if index.entry_at(i) is not None and (wanted is None or split_of[i] in wanted)),
    )
    return CachedItems(rows, index, positions)


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
    """Holds the items and opens their memory-mapped arrays lazily, once per process (at most
    :data:`MAX_OPEN_ARRAYS` open at a time); replaces the samples of entries that cannot be read.

    ``unreadable``: item -> entry key of the entries this process found unreadable; ``max_unreadable``: the fraction of
    the items that may be unreadable before :class:`UnreadableCacheError` stops the dataset.
    """

    def __init__(self, items: Sequence[CachedItem], seed: int, max_unreadable: float = MAX_UNREADABLE) -> None:
        self.items: Sequence[CachedItem] = items if isinstance(items, CachedItems) else list(items)
        self.seed = int(seed)
        self.epoch = 0
        self.max_unreadable = float(max_unreadable)
        self.unreadable: dict[int, str] = {}
        self._arrays: OrderedDict[int, np.ndarray] = OrderedDict()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def array(self, item: int) -> np.ndarray:
        """The item's array, memory-mapped (kept open for its next samples).

        Raises:
            UnreadableEntryError: the entry cannot be read (now or before, in this process).
            UnreadableCacheError: and too many entries cannot.
        """
        if item in self.unreadable:
            raise UnreadableEntryError(self.unreadable[item], "unreadable (found before)")
        array = self._arrays.pop(item, None)
        try:
            if array is None:
                array = self.entry(item).array()
            _check_mapped(array)
        except _READ_ERRORS as exc:
            raise self._unreadable_entry(item, exc) from None
        self._arrays[item] = array  # most recently used last
        if len(self._arrays) > MAX_OPEN_ARRAYS:
            self._arrays.popitem(last=False)
        return array

    def entry_scale(self, item: int) -> float:
        """The item's storage scale (``entry.scale``), or :class:`UnreadableEntryError`."""
        try:
            return float(self.entry(item).scale)
        except _READ_ERRORS as exc:
            raise self._unreadable_entry(item, exc) from None

    def entry(self, item: int) -> CacheEntry:
        """The item's cache entry, without making its row (what reading a sample needs)."""
        items = self.items
        return items.entry(item) if isinstance(items, CachedItems) else items[item].entry

    def entry_key(self, item: int) -> str:
        """The item's cache entry key (a content hash; a row id for entries without one)."""
        key = getattr(self.entry(item), "key", None)
        return str(key) if key else str(getattr(self.items[item].row, "id", item))

    def _unreadable_entry(self, item: int, exc: BaseException) -> UnreadableEntryError:
        """Record that ``item``'s entry cannot be read (logged once per entry and process); raise
        :class:`UnreadableCacheError` when more than ``max_unreadable`` of the items cannot."""
        key, reason = self.entry_key(item), _reason(exc)
        if key not in self.unreadable.values():
            log.warning("cache entry %s cannot be read (%s): its samples are replaced by others", key, reason)
        self.unreadable[item] = key
        if len(self.unreadable) > self.max_unreadable * len(self.items):
            raise UnreadableCacheError(
                f"{len(self.unreadable)} of the {len(self.items)} cache entries of this dataset cannot be read "
                f"(more than max_unreadable={self.max_unreadable:g}); the last: {key} ({reason}). Rebuild the cache "
                "(medssl manifest preprocess) or check its disk"
            )
        return UnreadableEntryError(key, reason)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """The sample ``key`` (an index, or ``(epoch, index)``); one whose entry cannot be read is replaced by a
        sample drawn from ``(seed, epoch, index)``, and ``"skipped"`` lists the keys of the entries met unreadable."""
        epoch, index = self._key(key)
        skipped: list[str] = []
        chosen = index
        for draw in range(SUBSTITUTE_DRAWS + 1):
            try:
                sample = self._sample(epoch, chosen)
            except UnreadableEntryError as exc:
                if exc.path not in skipped:
                    skipped.append(exc.path)
                chosen = int(np.random.default_rng([self.seed, epoch, index, draw + 1]).integers(len(self)))
                continue
            sample["skipped"] = skipped
            return sample
        raise UnreadableCacheError(
            f"no readable sample in {SUBSTITUTE_DRAWS + 1} draws for sample {index} (unreadable cache entries: "
            f"{', '.join(skipped)}); rebuild the cache (medssl manifest preprocess) or check its disk"
        )

    @abstractmethod
    def _sample(self, epoch: int, index: int) -> dict[str, Any]:
        """Sample ``index`` of ``epoch``; raises :class:`UnreadableEntryError` when its entry cannot be read."""

    def rng(self, index: int, epoch: int | None = None) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch if epoch is None else int(epoch), int(index)])

    def _key(self, key: int | tuple[int, int]) -> tuple[int, int]:
        """``(epoch, index)`` of a plain index (the current epoch) or of an epoch-tagged one."""
        if isinstance(key, tuple):
            return int(key[0]), int(key[1])
        return self.epoch, int(key)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = OrderedDict()
        return state

    @staticmethod
    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        """A list of samples -> a batch: ``pixels`` padded to the largest height and width (bottom, right),
        ``params`` ``[B, V, N_PARAMS]``, ``scale`` ``[B]``, ``skipped`` the samples' unreadable entry keys (a list,
        usually empty), the rest as ``default_collate`` does it."""
        pixels = pad_planes([s["pixels"] for s in samples])
        skipped = [key for s in samples for key in s.get("skipped", ())]
        rest = default_collate([{k: v for k, v in s.items() if k not in ("pixels", "skipped")} for s in samples])
        return {"pixels": pixels, **rest, "skipped": skipped}

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
    "label", "index", "skipped"}``; :meth:`views` makes the views of a collated batch.

    The sample index (``item_index``, ``axis_index``, ``slice_index``, ``[S]`` each, 13 bytes a sample) is built
    straight into numpy arrays; a volume's metadata is read for its foreground and not kept. A volume whose metadata
    cannot be read gives no sample (logged, in ``unreadable``).
    """

    def __init__(
        self,
        items: Sequence[CachedItem],
        views: MultiCropConfig | None = None,
        slices: SliceConfig | None = None,
        seed: int = 0,
        max_unreadable: float = MAX_UNREADABLE,
    ) -> None:
        super().__init__(items, seed, max_unreadable)
        self.views_config = views or MultiCropConfig()
        self.slices = slices or SliceConfig()
        self.item_index, self.axis_index, self.slice_index = self._sample_index()

    def _sample_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``item_index`` int64, ``axis_index`` int8 (-1: a 2D image) and ``slice_index`` int32 (-1), ``[S]`` each:
        the item, plane axis and slice of every sample."""
        index = _SampleIndex(len(self.items))
        axes = [PLANE_AXIS[plane] for plane in self.slices.planes]
        recent: dict[str, list[np.ndarray]] = {}  # foreground slices of the last entries (rows with one content)
        images_from = 0  # the first of a run of 2D items, added together
        for i, dims in enumerate(item_column(self.items, "dims")):
            if dims == 2:
                continue
            index.add(np.arange(images_from, i), -1, -1)
            images_from = i + 1
            for axis, keep in zip(axes, self._foreground_slices(i, axes, recent), strict=False):
                index.add(i, axis, keep)
        index.add(np.arange(images_from, len(self.items)), -1, -1)
        return index.arrays()

    def _foreground_slices(self, item: int, axes: list[int], recent: dict[str, list[np.ndarray]]) -> list[np.ndarray]:
        """The slices ``[K]`` of volume ``item`` along each of ``axes`` with enough foreground; none (and the entry
        recorded as unreadable) when its metadata cannot be read. ``recent``: a small memo by entry key."""
        key = self.entry_key(item)
        kept = recent.get(key)
        if kept is not None:
            return kept
        try:
            foreground = _metadata(self.entry(item))["foreground"]
            kept = [np.flatnonzero(np.asarray(foreground[axis]) >= self.slices.min_foreground) for axis in axes]
        except _READ_ERRORS as exc:
            self._unreadable_entry(item, exc)
            return []
        if len(recent) >= 256:
            recent.clear()
        recent[key] = kept
        return kept

    def __len__(self) -> int:
        return len(self.item_index)

    @property
    def groups(self) -> list[str]:
        """The manifest ``group`` of every sample (for the balanced sampler)."""
        groups = item_column(self.items, "group")
        return [groups[i] for i in self.item_index]

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
        scale = self.entry_scale(int(self.item_index[index]))
        return torch.from_numpy(np.ascontiguousarray(self.plane(index, rng), dtype=np.float32) * scale)[None]

    def _sample(self, epoch: int, index: int) -> dict[str, Any]:
        rng = self.rng(index, epoch)
        item = int(self.item_index[index])
        cached = self.items[item]
        scale = self.entry_scale(item)
        plane = self.plane(index, rng)
        height, width = plane.shape
        cfg = self.views_config
        params = [
            draw_view_params(rng, height, width, count, scale_range, cfg.ratio, cfg.augment)
            for count, scale_range in ((cfg.n_global, cfg.global_scale), (cfg.n_local, cfg.local_scale))
        ]
        return {
            "pixels": torch.from_numpy(np.array(plane))[None],  # a copy: the cache is mapped read-only
            "scale": scale,
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

    def __init__(
        self,
        items: Sequence[CachedItem],
        config: StackConfig | None = None,
        seed: int = 0,
        max_unreadable: float = MAX_UNREADABLE,
    ) -> None:
        volumes = [dims == 3 for dims in item_column(items, "dims")]
        if isinstance(items, CachedItems):
            kept: Sequence[CachedItem] = items.where(volumes)
        else:
            kept = [it for it, v in zip(items, volumes, strict=True) if v]
        super().__init__(kept, seed, max_unreadable)
        self.config = config or StackConfig()
        self.axis = PLANE_AXIS[self.config.plane]
        # per volume, read on first use: depth, first and last foreground slice, origin and spacing along the axis
        self._geometry = np.full((len(self.items), 5), np.nan)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def groups(self) -> list[str]:
        return item_column(self.items, "group")

    def geometry(self, index: int) -> tuple[int, int, int, float, float]:
        """``(depth, low, high, origin, spacing)`` of volume ``index`` along the plane axis: its slices, its first and
        last slice with enough foreground (all of them when none has), the position (mm) of slice 0 and the distance
        between slices. From the entry's metadata, read once per process and kept as 5 numbers.

        Raises:
            UnreadableEntryError: the metadata cannot be read.
        """
        known = self._geometry[index]
        if np.isnan(known[0]):
            try:
                meta = _metadata(self.entry(index))
                depth = int(meta["shape"][1 + self.axis])
                foreground = np.flatnonzero(np.asarray(meta["foreground"][self.axis]) >= self.config.min_foreground)
                origin = float(meta["affine"][self.axis][3]) if meta["affine"] else 0.0
                spacing = float(meta["spacing"][self.axis])
            except _READ_ERRORS as exc:
                raise self._unreadable_entry(index, exc) from None
            low, high = (int(foreground[0]), int(foreground[-1])) if foreground.size else (0, depth - 1)
            known[:] = (depth, low, high, origin, spacing)
        return int(known[0]), int(known[1]), int(known[2]), float(known[3]), float(known[4])

    def slice_indices(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Indices along the plane axis of the stack's slices, and which of them exist."""
        cfg = self.config
        depth, low, high, _, _ = self.geometry(index)
        need = (cfg.n_slices - 1) * cfg.stride + 1
        if high - low + 1 >= need:
            start = int(rng.integers(low, high - need + 2))
        else:
            start = int(np.clip(round((low + high + 1 - need) / 2), 0, max(0, depth - need)))
        indices = start + cfg.stride * np.arange(cfg.n_slices)
        return indices, indices < depth

    def _sample(self, epoch: int, index: int) -> dict[str, Any]:
        rng = self.rng(index, epoch)
        cached = self.items[index]
        _, _, _, origin, spacing = self.geometry(index)
        scale = self.entry_scale(index)
        array = self.array(index)
        channel = int(rng.integers(array.shape[0]))
        indices, valid = self.slice_indices(index, rng)
        slices = slice_to_display(np.moveaxis(np.take(array[channel], indices[valid], axis=self.axis), self.axis, 0))
        stack = np.zeros((len(indices), *slices.shape[1:]), dtype=slices.dtype)  # [N, H, W], zeros where no slice
        stack[valid] = slices
        cfg = self.config
        params = draw_view_params(rng, stack.shape[1], stack.shape[2], 2, cfg.scale, cfg.ratio, cfg.augment)
        positions = np.where(valid, origin + indices * spacing, 0.0)
        return {
            "pixels": torch.from_numpy(stack),
            "scale": scale,
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


class _SampleIndex:
    """The growing ``(item, axis, slice)`` arrays of a sample index, doubled when full (never Python lists)."""

    def __init__(self, capacity: int) -> None:
        self.size = 0
        self.item = np.empty(max(capacity, 16), np.int64)
        self.axis = np.empty(len(self.item), np.int8)
        self.slice = np.empty(len(self.item), np.int32)

    def add(self, items: np.ndarray | int, axis: int, slices: np.ndarray | int) -> None:
        """``K`` samples: ``items`` ``[K]`` (2D images: ``axis`` and ``slices`` -1), or one volume ``items`` at
        ``slices`` ``[K]`` along ``axis``."""
        count = np.size(items) if np.ndim(items) else np.size(slices)
        end = self.size + count
        if end > len(self.item):
            grown = max(end, 2 * len(self.item))
            self.item, self.axis, self.slice = (np.resize(a, grown) for a in (self.item, self.axis, self.slice))
        self.item[self.size : end] = items
        self.axis[self.size : end] = axis
        self.slice[self.size : end] = slices
        self.size = end

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``item_index`` int64, ``axis_index`` int8, ``slice_index`` int32, ``[S]`` each (of the filled part)."""
        return self.item[: self.size].copy(), self.axis[: self.size].copy(), self.slice[: self.size].copy()


def _metadata(entry: Any) -> dict[str, Any]:
    """An entry's metadata, read without keeping it where the entry can (:meth:`CacheEntry.read_meta`)."""
    read = getattr(entry, "read_meta", None)
    return read() if read is not None else entry.meta  # type: ignore[no-any-return]


def _check_mapped(array: np.ndarray) -> None:
    """Raise OSError when the file under a memory-mapped array has gone or no longer holds its bytes: reading a page
    past the end of a truncated file kills the process (SIGBUS) instead of raising. Arrays in memory pass."""
    filename = getattr(array, "filename", None)
    if filename is None:
        return
    size = os.stat(filename).st_size
    if size < int(getattr(array, "offset", 0)) + array.nbytes:
        raise OSError(f"the file is shorter ({size} bytes) than its array")


def _reason(exc: BaseException) -> str:
    """Why an entry cannot be read, without a path: ``FileNotFoundError: No such file or directory``."""
    names_a_file = isinstance(exc, OSError) and exc.filename is not None  # its message would hold the path
    detail = (exc.strerror or "") if names_a_file else str(exc)
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
